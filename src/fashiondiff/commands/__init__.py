"""The commands: ``fashiondiff generate``, ``serve``, ``ui`` and ``convert`` (no stage imports them)."""
