"""Base models: the real Kandinsky 2.1 or the embedded tiny one, behind one loader."""
