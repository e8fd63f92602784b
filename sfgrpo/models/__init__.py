"""Flax NNX models: the FLUX.2 transformer, LoRA, weight loading, and the demo's tiny parts."""
