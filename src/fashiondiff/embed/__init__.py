"""The embedding cache: frozen encoders run once, training reads arrays."""
