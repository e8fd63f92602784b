"""Shared test set-up: the demo config shrunk to seconds, and a built policy with its programs."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sfgrpo import builders, runtime
from sfgrpo.data import pipeline

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str = "default.py", arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("config_under_test", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config() -> ml_collections.ConfigDict:
    """configs/default.py at test size: 32 px images, a 2-block transformer, 3 sampler steps."""
    c = load_config()
    c.data.resolution = 32
    c.data.shapes_train = 64
    c.data.shapes_eval = 8
    c.model.transformer.update(
        dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=16,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),
        )
    )
    c.model.text_dim = 16
    c.sampler.num_steps = 3
    c.sampler.eval_steps = 2
    c.warmstart.steps = 2
    c.warmstart.batch_size = 8
    c.rl.batch_size = 16
    c.rl.group_size = 4
    c.rl.micro_batch = 8
    c.rl.grad_accum = 2
    c.train.steps = 2
    c.train.eval_every = 100
    c.train.checkpoint_every = 1
    return c


def klein_assets(root: Path) -> tuple[Path, Path]:
    """(a tiny FLUX.2-klein folder, a small TFDS shapes dataset of 64 px images) built under ``root``."""
    from tiny_klein import build_tiny_klein  # noqa: PLC0415 - torch and diffusers: only where needed

    from sfgrpo.data import build, shapes  # noqa: PLC0415

    folder = build_tiny_klein(root / "klein")
    data = root / "data"
    build.build_shapes(
        str(data), 16, seed=0, heldout=8, config=shapes.ShapesConfig(image_size=64, max_edits=2)
    )
    return folder, data


def klein_test_config(
    config: ml_collections.ConfigDict, folder: Path, data: Path, workdir: Path
) -> ml_collections.ConfigDict:
    """A shipped FLUX.2-klein config (configs/tpu_v5.py, gpu.py) at test sizes on a tiny klein folder
    (tests/tiny_klein.py) and a TFDS shapes dataset of 64 px images; everything else stays as shipped."""
    c = config
    c.model.folder = str(folder)
    c.model.dtype = "float32"
    c.model.max_text_tokens = 64
    c.model.lora_rank = 4
    c.model.lora_alpha = 8.0
    c.model.attention = "xla"  # cudnn needs a GPU
    if c.model.prompt_cache:
        c.model.prompt_cache = str(workdir / "prompt_cache")
    c.data.tfds_dir = str(data)
    c.data.resolution = 64
    c.data.r_max = 2
    c.data.num_workers = 0
    c.sampler.num_steps = 4
    c.sampler.eval_steps = 2
    c.sampler.window_size = 2
    c.sampler.window_hi = 2
    c.rl.group_size = 4
    c.rl.batch_size = 8
    c.rl.micro_batch = 8
    c.rl.grad_accum = 1
    c.reward.kind = "shapes"  # the shapes data has targets and masks: no judge server in this test
    c.train.steps = 2
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    return c


class Setup:
    """A policy, its split state, the compiled programs and one device batch, on the config's mesh."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        builders.validate(config)
        self.config = config
        self.mesh = builders.make_mesh(config)
        with runtime.use_mesh(self.mesh):
            self.model = builders.build_model(config, self.mesh, config.seed)
            self.policy, self.condition = self.model.policy, self.model.condition
            self.adapted = builders.add_lora(self.policy, config, config.seed + 2)
            self.graphdef, self.params, self.frozen, self.compute_dtypes = builders.split_for_grpo(
                self.policy, config
            )
            self.optimizer = builders.make_optimizer(config.rl.lr, 0.0, 1.0)
            self.opt_state = self.optimizer.init(self.params)
            self.programs = builders.make_programs(
                config, self.graphdef, self.optimizer, self.condition, self.compute_dtypes
            )
            pcfg = builders.pipeline_config(
                config, batch_size=config.rl.batch_size, group_size=config.rl.group_size, seed=0
            )
            host = next(pipeline.make_iterator(builders.data_source(config, "train"), pcfg))
            self.batch = builders.device_batch(host, self.mesh, self.model.text_fields)

    def __call__(self, name, *args):
        with runtime.use_mesh(self.mesh):
            return self.programs(name, *args)

    def key(self, seed: int = 0) -> jax.Array:
        return jax.random.key(seed)


def entries_moved(dtype: str, lora_rank: int, steps: int):
    """Trains the tiny policy in ``dtype`` (LoRA of ``lora_rank``, 0: full fine-tuning) for ``steps``
    optimizer steps on one rollout with random advantages; returns the set-up, the final (params,
    opt_state) and, per trainable leaf path, which entries the last step changed."""
    c = tiny_config()
    c.model.dtype = dtype
    c.model.lora_rank = lora_rank
    # Clip ranges that never act here: after the first step the ratios leave 1 by different amounts in bf16
    # and float32, and a sample clipped in one dtype only has no gradient there, which is not rounding.
    for credit_mode in ("spatial", "region", "scalar"):
        c.rl[f"clip_range_{credit_mode}"] = (0.5, 0.5)
    s = Setup(c)
    out = s("rollout", s.params, s.frozen, s.batch, s.key(1))
    credit, _ = s("reward", s.params, s.frozen, out.edited, s.batch, out.weights)
    credit = credit._replace(
        adv=jax.random.normal(s.key(2), credit.adv.shape), mask=jnp.ones_like(credit.mask)
    )
    params, opt_state = s.params, s.opt_state
    for i in range(steps):
        before = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
        params, opt_state, m = s("update", params, s.frozen, opt_state, {}, out, credit, s.key(10 + i))
        assert float(m["skipped_updates"]) == 0.0
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    after = [np.asarray(x, np.float32) for x in jax.tree.leaves(params)]
    return s, params, opt_state, {p: a != b for p, a, b in zip(paths, after, before, strict=True)}
