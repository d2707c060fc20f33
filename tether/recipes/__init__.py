"""Training recipes, one thin loop per file; what two recipes share lives below them (tests/test_layers.py)."""
