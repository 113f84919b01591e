"""``params.yaml``: its schema (``schema``) and the view a stage gets of it (``view``)."""
