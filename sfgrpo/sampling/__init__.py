"""Sampling: the FLUX.2 sigma schedule, the SDE step with log-probabilities, and the rollout."""
