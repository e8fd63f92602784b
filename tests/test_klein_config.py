"""The FLUX.2-klein configs (configs/tpu_v5.py, configs/gpu.py): valid as shipped, and training from a folder.

The shipped configs are loaded, kept in structure (the mesh's fsdp axis, LoRA, bf16-free float32 here,
remat, the random window, the prompt cache) and shrunk to tiny sizes: a tiny diffusers FLUX.2-klein folder
(tests/tiny_klein.py), a small TFDS shapes dataset, 64x64 images, and 2 GRPO iterations.
"""

import importlib.util
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import klein_assets, klein_test_config

from sfgrpo import builders, train
from sfgrpo.data.prompt_cache import META

REPO = Path(__file__).resolve().parents[1]


def shipped(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return klein_assets(tmp_path_factory.mktemp("klein"))


@pytest.mark.parametrize("name", ["tpu_v5", "gpu"])
def test_shipped_configs_are_klein_4b_lora_64_bf16_with_remat(name):
    c = shipped(name)
    model = (c.model.name, c.model.lora_rank, c.model.dtype, c.model.remat)
    assert model == ("klein", 64, "bfloat16", "dots")
    assert tuple(c.model.text_layers) == (9, 18, 27) and c.model.max_text_tokens == 512
    assert c.model.folder and c.data.tfds_dir and c.mesh.fsdp > 1
    assert c.rl.batch_size % c.rl.group_size == 0
    with pytest.raises(ValueError, match="unknown variant"):
        shipped(name, "nope")


def test_a_folder_missing_a_component_is_a_config_error(assets, tmp_path):
    folder, data = assets
    c = klein_test_config(shipped("gpu"), tmp_path / "missing", data, tmp_path)
    with pytest.raises(builders.ConfigError, match="config.model.folder"):
        train.train(c, tmp_path / "run")


@pytest.mark.parametrize("value", [0, -2])
def test_a_bad_scan_unroll_is_a_config_error(assets, tmp_path, value):
    folder, data = assets
    c = klein_test_config(shipped("gpu"), folder, data, tmp_path)
    c.model.scan_unroll = value
    with pytest.raises(
        builders.ConfigError, match=rf"config.model.scan_unroll: scan_unroll={value} \(an int"
    ):
        train.train(c, tmp_path / "run")


@pytest.mark.parametrize("name", ["tpu_v5", "gpu"])
def test_two_grpo_iterations_from_the_tiny_klein_folder(assets, tmp_path, name, caplog):
    folder, data = assets
    c = klein_test_config(shipped(name), folder, data, tmp_path)
    if name == "gpu":
        c.model.prompt_cache = ""  # the text encoder stays in the policy and encodes every batch
    seen = []
    with caplog.at_level(logging.INFO):
        final = train.train(c, tmp_path / "run", on_step=lambda step, m: seen.append((step, m)))
    assert [s for s, _ in seen] == [1, 2]
    for _, m in seen:
        assert np.isfinite(m["loss"]) and m["skipped_updates"] == 0 and m["optimizer_steps"] >= 1
    assert np.isfinite(final["eval/reward/mean"])
    # Every program compiled exactly once.
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled ")]
    names = [m.split()[1] for m in compiled]
    assert len(names) == len(set(names)) and "update" in names
    # The LoRA adapters trained; the checkpoint holds only them.
    params = train.final_params(tmp_path / "run")
    leaves = jax.tree.leaves(params)
    assert leaves and all("lora" in "/".join(map(str, p)).lower() for p, _ in _paths(params))
    assert any(np.abs(x).max() > 0 for x in leaves)
    if name == "tpu_v5":
        meta = json.loads((tmp_path / "prompt_cache" / META).read_text())
        assert meta["shape"][1:] == [64, 3 * 32] and len(meta["rows"]) >= 2
        # A second start reuses the cache without loading the text encoder again.
        caplog.clear()
        with caplog.at_level(logging.INFO):
            c.train.steps = 3
            c.train.eval_every = 3
            c.train.checkpoint_every = 3
            train.train(c, tmp_path / "run")
        assert any("reused" in r.getMessage() for r in caplog.records)


def _paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]
