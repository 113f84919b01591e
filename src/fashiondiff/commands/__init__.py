"""The three commands: ``fashiondiff generate``, ``serve`` and ``ui`` (no stage imports them)."""
