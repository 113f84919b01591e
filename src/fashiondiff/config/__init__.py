"""``params.yaml``: a module per section, their shared types (``schema``), the view a stage gets (``view``)."""
