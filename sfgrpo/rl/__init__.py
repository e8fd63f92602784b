"""RL math: region token weights, group advantages, and the clipped policy loss."""
