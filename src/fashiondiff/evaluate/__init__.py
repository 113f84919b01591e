"""Evaluation of base vs tuned Kandinsky 2.1: metrics, figures and the evaluate stage's function.

``metrics`` (Fréchet distance, CLIP score), ``fid`` (the standard Inception FID),
``figures`` (sample grid, image + text figure), ``run.evaluate`` (what
``stages/evaluate.py`` calls).
"""
