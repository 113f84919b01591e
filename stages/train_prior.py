"""DVC stage `train_prior`: fine-tune Kandinsky 2.1's prior on the embedding cache.

Usage: python stages/train_prior.py --cache DIR [--val-cache DIR] --out DIR --checkpoints DIR \
           --summary FILE --plot FILE [--val-plot FILE --val-pictures DIR]
Runs as is, or under `accelerate launch` for several processes or GPUs.
"""

import sys

from fashiondiff.train.stage import main

if __name__ == "__main__":
    main("prior", sys.argv[1:])
