"""The embedded default: the stand-in that lets the pipeline run on a CPU with no downloads.

``synthetic`` writes FashionGen-layout HDF5 files, ``tiny`` builds Kandinsky 2.1's very
classes at a few MB, ``pretrain`` teaches them the synthetic look. Its stages live in
``standin/dvc.yaml``; the real stages never import this package, so with real data and
weights none of it runs and no edit here makes a real stage stale.
"""
