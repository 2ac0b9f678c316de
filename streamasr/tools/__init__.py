"""Command-line tools on top of everything: the demo, model importers, the tiny test model."""
