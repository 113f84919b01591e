"""Base models: one loader for the real Kandinsky 2.1 or the embedded tiny one; the full-size configs."""
