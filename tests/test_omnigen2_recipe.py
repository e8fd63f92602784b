"""The OmniGen2 recipe and its configs (configs/omnigen2_tpu_v5.py, omnigen2_gpu.py): EditScore's settings
as shipped, and GRPO training from a tiny OmniGen2 folder (tests/tiny_omnigen2.py) with every credit mode,
CFG with the masked empty instruction, the prompt cache and the text encoder; and that the image tokens'
row-major order is the one the region weights assume."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import klein_test_config

from sfgrpo import builders, metrics, train
from sfgrpo.data.prompt_cache import META
from sfgrpo.models import lora, omnigen2, vae_flux1
from sfgrpo.rl import regions

REPO = Path(__file__).resolve().parents[1]


def shipped(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(a tiny OmniGen2 folder, a small TFDS shapes dataset of 64 px images)."""
    from tiny_omnigen2 import build_tiny_omnigen2

    from sfgrpo.data import build, shapes

    root = tmp_path_factory.mktemp("omnigen2")
    folder = build_tiny_omnigen2(root / "omnigen2")
    data = root / "data"
    build.build_shapes(
        str(data), 16, seed=0, heldout=8, config=shapes.ShapesConfig(image_size=64, max_edits=2)
    )
    return folder, data


def omnigen2_test_config(name: str, folder: Path, data: Path, workdir: Path):
    """A shipped OmniGen2 config at test sizes: the klein test sizes, a fixed window of 2 of 4 steps
    starting at 0 (the recipe's fixed-window shape), CFG kept."""
    c = klein_test_config(shipped(name), folder, data, workdir)
    c.sampler.window_hi = 1
    return c


@pytest.mark.parametrize("name", ["omnigen2_tpu_v5", "omnigen2_gpu"])
def test_shipped_configs_are_editscores_recipe(name):
    c = shipped(name)
    assert (c.model.name, c.model.lora_rank, c.model.lora_alpha, c.model.dtype) == (
        "omnigen2",
        32,
        64.0,
        "bfloat16",
    )
    assert (c.sampler.num_steps, c.sampler.window_size, c.sampler.window_lo, c.sampler.window_hi) == (
        20,
        12,
        0,
        1,
    )
    assert c.sampler.schedule == "omnigen2" and c.sampler.cfg_scale > 1
    assert tuple(c.rl.clip_range_scalar) == (1e-4, 5e-4) and c.rl.kl_beta == 0.04 and c.rl.lr == 4e-4
    assert "text_layers" not in c.model and c.mesh.tensor == 1 and c.mesh.fsdp > 1
    builders.validate(c, processes=2 if name == "omnigen2_gpu" else 8)
    with pytest.raises(ValueError, match="unknown variant"):
        shipped(name, "nope")


def test_the_omnigen2_schedule_is_required(assets, tmp_path):
    folder, data = assets
    c = omnigen2_test_config("omnigen2_gpu", folder, data, tmp_path)
    c.sampler.schedule = "flux2"
    with pytest.raises(builders.ConfigError, match="config.sampler.schedule: model.name='omnigen2'"):
        builders.validate(c)


@pytest.mark.parametrize(
    "name,credit", [("omnigen2_tpu_v5", "spatial"), ("omnigen2_gpu", "region"), ("omnigen2_gpu", "scalar")]
)
def test_two_grpo_iterations_from_the_tiny_omnigen2_folder(assets, tmp_path, name, credit, caplog):
    folder, data = assets
    c = omnigen2_test_config(name, folder, data, tmp_path)
    c.rl.credit = credit
    if name == "omnigen2_gpu":
        c.model.prompt_cache = ""  # the text encoder stays in the policy and encodes every batch
    seen = []
    with caplog.at_level(logging.INFO):
        final = train.train(c, tmp_path / "run", on_step=lambda step, m: seen.append((step, m)))
    assert [s for s, _ in seen] == [1, 2]
    for _, m in seen:
        assert np.isfinite(m["loss"]) and m["skipped_updates"] == 0 and m["optimizer_steps"] >= 1
    assert np.isfinite(final["eval/reward/mean"])
    compiled = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("compiled ")]
    assert len(compiled) == len(set(compiled)) and "update" in compiled  # each program compiled once
    params = train.final_params(tmp_path / "run")
    leaves = jax.tree.leaves(params)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert leaves and all("lora" in p.lower() for p in paths)
    assert any("feed_forward" in p for p in paths) and any("context_refiner" in p for p in paths)
    assert any(np.abs(x).max() > 0 for x in leaves)
    if name == "omnigen2_tpu_v5":
        meta = json.loads((tmp_path / "prompt_cache" / META).read_text())
        assert meta["shape"][1:] == [64, 24]  # 64 text tokens x the tiny Qwen2.5-VL's 24 channels
        # The run's end exported the adapters as the PEFT file OmniGen2's pipeline loads; it folds into
        # the base transformer by upstream module names.
        exported = tmp_path / "run" / "export" / "step_2" / "pytorch_lora_weights.safetensors"
        base = omnigen2.from_pretrained(folder)
        before = np.asarray(base.layers.attn.to_q.kernel[...])
        merged = lora.merge_lora_file(base, exported)
        assert len(merged) == 5 * 7  # 2 layers + 3 refiners of 1 block, 7 projections each
        assert np.abs(np.asarray(base.layers.attn.to_q.kernel[...]) - before).max() > 0


def test_image_tokens_are_row_major_as_the_region_weights(assets):
    """A bright 16 px block at token row 1, column 3 of a 64 x 96 image (4 x 6 tokens) changes the VAE's
    token 1 * 6 + 3 most, and a box over that block weights that token: the transformer's tokens, the
    VAE's and ``regions.token_weights`` share one row-major order."""
    folder, _ = assets
    vae = vae_flux1.load_flux1_vae(folder)
    base = np.full((1, 64, 96, 3), 128, np.uint8)
    marked = base.copy()
    marked[:, 16:32, 48:64] = 255
    change = jnp.abs(vae.encode(jnp.asarray(marked)) - vae.encode(jnp.asarray(base))).sum(-1)[0]
    assert int(jnp.argmax(change)) == 1 * 6 + 3
    box = jnp.asarray([[[48 / 96, 16 / 64, 64 / 96, 32 / 64]]], jnp.float32)  # (x0, y0, x1, y1) / size
    weights = regions.token_weights(box, jnp.asarray([[True]]), vae.grid(64, 96))
    assert int(jnp.argmax(weights[0, 0])) == 1 * 6 + 3
    assert float(weights[0, 0, 1 * 6 + 3]) == pytest.approx(1.0)


def test_two_processes_train_from_the_tiny_omnigen2_folder(assets, tmp_path):
    """configs/omnigen2_gpu.py on 2 real processes x 2 CPU devices (loopback): the prompt cache built as a
    collective and written once, 2 GRPO iterations, one export of the adapters."""
    from multiprocess import ROOT, Group

    folder, data = assets
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    overrides = [
        f"--config.model.folder={folder}",
        "--config.model.dtype=float32",
        "--config.model.max_text_tokens=64",
        "--config.model.lora_rank=4",
        "--config.model.lora_alpha=8.0",
        "--config.model.attention=xla",
        f"--config.model.prompt_cache={cache}",
        f"--config.data.tfds_dir={data}",
        "--config.data.resolution=64",
        "--config.data.r_max=2",
        "--config.data.num_workers=0",
        "--config.mesh.fsdp=2",  # 4 devices over both processes: data 2 x fsdp 2
        "--config.sampler.num_steps=4",
        "--config.sampler.eval_steps=2",
        "--config.sampler.window_size=2",
        "--config.sampler.window_hi=1",
        "--config.rl.group_size=4",
        "--config.rl.batch_size=4",  # per process: one group each, 8 rollouts per iteration
        "--config.rl.micro_batch=4",
        "--config.rl.grad_accum=2",
        "--config.reward.kind=shapes",
        "--config.train.steps=2",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2",
    ]

    def command(i: int, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sfgrpo.main",
            f"--config={ROOT / 'configs' / 'omnigen2_gpu.py'}",
            f"--workdir={workdir}",
            *overrides,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]

    group = Group(command, 2, 2, tmp_path / "logs")
    codes = group.wait(900)
    for i, code in enumerate(codes):
        out = group.output(i)
        assert code == 0 and "Traceback" not in out, out[-4000:]
    records = [r for r in metrics.read_metrics(workdir / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert json.loads((cache / META).read_text())["shape"][1:] == [64, 24]
    assert (workdir / "export" / "step_2" / "pytorch_lora_weights.safetensors").is_file()
