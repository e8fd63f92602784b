"""configs/default.py's multi-edit variant ('multi', 'multi_k<K>'): its task, reward options, bad values."""

import pytest
from helpers import load_config

from sfgrpo import builders
from sfgrpo.data import shapes


def test_multi_edit_config_variant():
    c = load_config(arg="multi_k3")
    builders.validate(c)
    task = builders.shapes_config(c)
    assert (task.image_size, task.min_edits, task.max_edits, task.min_gap) == (128, 3, 3, 16)
    assert builders.text_length(c) == 18
    assert dict(builders.grpo_settings(c).shapes_reward)["preserve_floor"] == 0.012
    assert dict(builders.grpo_settings(c).shapes_reward)["noise_tol"] == 0.011
    # The study's sampler: unshifted sigmas, a random window of 2 trained steps; heads that carry a token.
    assert builders.sampler_schedule(c) == "linear" and builders.grpo_settings(c).window == 2
    assert c.model.transformer.attention_head_dim >= c.model.transformer.in_channels
    # Off-policy steps, so that the ratios leave 1 and the clip ranges (SPEC's scale) act.
    assert builders.optimizer_steps_per_iteration(c.rl, processes=1) == 4
    assert c.rl.clip_range_spatial == (1e-3, 1e-3) and c.rl.clip_range_scalar == (1e-4, 1e-4)
    # The demo keeps its task (no multi-edit keys) and shares the sampler schedule, the heads and the
    # reward's tolerances, less the untouched shapes' term (its figures were measured without it).
    demo = load_config()
    assert "edits" not in demo.data
    demo_reward, multi_reward = (dict(builders.grpo_settings(x).shapes_reward) for x in (demo, c))
    assert demo_reward["kept_saturation"] == 0.0 and multi_reward["kept_saturation"] == 0.25
    assert {**demo_reward, "kept_saturation": 0.25} == multi_reward
    assert builders.shapes_config(demo) == shapes.ShapesConfig(image_size=64, max_edits=3)
    assert builders.sampler_schedule(demo) == "linear"
    assert demo.model.transformer.attention_head_dim >= demo.model.transformer.in_channels
    c.data.edits = 5
    with pytest.raises(builders.ConfigError, match="data.edits"):
        builders.validate(c)
    c.data.edits, c.data.r_max = 3, 2
    with pytest.raises(builders.ConfigError, match="data.r_max"):
        builders.validate(c)
    c.data.r_max, c.data.shape_size = 3, (0.6, 0.7)
    with pytest.raises(builders.ConfigError, match="config.data"):
        builders.validate(c)
    c = load_config(arg="multi_k3")
    c.reward.preserve_floor = 0.5
    with pytest.raises(builders.ConfigError, match="reward.preserve_floor"):
        builders.validate(c)
    c = load_config(arg="multi_k3")
    c.reward.noise_floor = 0.02
    with pytest.raises(builders.ConfigError, match="reward.noise_floor"):
        builders.validate(c)
    with pytest.raises(ValueError, match="K must be 1..4"):
        load_config(arg="multi_k5")
