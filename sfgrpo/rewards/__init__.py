"""Region rewards in the SFReward schema (SPEC section 5)."""
