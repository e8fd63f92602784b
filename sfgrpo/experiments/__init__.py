"""Experiments built from ordinary training runs (``python -m sfgrpo.main``), resumable and reported."""
