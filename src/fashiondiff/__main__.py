"""``python -m fashiondiff``: the command line (``fashiondiff.commands.main``)."""

import sys

from fashiondiff.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
