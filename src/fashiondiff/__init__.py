"""Fine-tune Kandinsky 2.1 on FashionGen: data, models, training, evaluation.

The DVC stages in ``stages/`` are thin entry points into this package; see README.md.
"""

__version__ = "0.1.0"
