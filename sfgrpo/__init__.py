"""sfgrpo: SpatialFlow-GRPO, online RL with spatial credit for flow-matching image editors, in JAX."""

__version__ = "0.1.0"
