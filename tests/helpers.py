"""Shared test set-up: the demo config shrunk to seconds, and a built policy with its programs."""

import importlib.util
from pathlib import Path

import jax
import ml_collections

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
