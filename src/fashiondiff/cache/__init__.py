"""The embedding cache: its format and its reader (``fashiondiff.embed`` writes it)."""
