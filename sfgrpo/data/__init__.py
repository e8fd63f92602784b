"""Editing datasets: the record format, the TFDS builder, the shapes task and the grain pipeline."""
