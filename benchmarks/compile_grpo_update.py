"""AOT-compiles the FLUX.2-klein-4B GRPO update with a shipped config's settings, from abstract shapes on CPU.

Nothing is allocated: the policy (klein-4B transformer + LoRA, the FLUX.2 VAE; text features come from the
prompt cache) is built with ``nnx.eval_shape``, the rollout's outputs are derived with ``jax.eval_shape``
of the run's own rollout and credit programs, and the run's ``update`` program (inner epoch, micro-batch
shuffle, window scan, remat, AdamW) is lowered and compiled for the config's mesh on simulated CPU
devices. It prints compile time and ``memory_analysis()`` per device.

One process stands in for the whole slice: ``--hosts`` multiplies the per-host batch, so the global batch
is the slice's (configs/tpu_v5.py: 8 hosts x 32 = 256 rollouts on 32 chips).

    python benchmarks/compile_grpo_update.py [--config tpu_v5] [--devices 32] [--hosts 8]
"""

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="tpu_v5", help="a file in configs/ (without .py)")
parser.add_argument("--devices", type=int, default=32, help="simulated devices (v5p-64: 32 chips)")
parser.add_argument("--hosts", type=int, default=8, help="hosts the per-host batch is multiplied by")
args = parser.parse_args()

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from compiled_report import print_compiled  # noqa: E402
from flax import nnx  # noqa: E402

from sfgrpo import builders, runtime  # noqa: E402
from sfgrpo.iteration import Conditioner  # noqa: E402
from sfgrpo.models import flux2, lora, vae  # noqa: E402
from sfgrpo.models.policy import EditPolicy  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    config = load(args.config)
    config.rl.batch_size *= args.hosts
    config.model.attention = "xla"  # the CPU compiler has no cuDNN; TPUs use XLA's attention anyway
    config.reward.kind = "shapes"  # the update does not depend on the judge; skip the URL checks
    builders.validate(config)
    settings = builders.grpo_settings(config)
    mesh = builders.make_mesh(config)
    m, d = config.model, config.data
    dtype = builders.DTYPES[m.dtype]
    cfg = flux2.CONFIGS["klein-4b"].replace(remat=m.remat, attention=m.attention)
    text_dim = cfg.joint_attention_dim
    b, hw, t = config.rl.batch_size, d.resolution, m.max_text_tokens

    def build() -> EditPolicy:
        transformer = flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        autoencoder = vae.Flux2VAE(vae.Flux2VAEConfig(), rngs=nnx.Rngs(1), dtype=dtype)
        policy = EditPolicy(transformer, None, autoencoder)  # prompt cache: no text encoder
        lora.apply_lora(
            policy.transformer,
            lora.LoRAConfig(m.lora_rank, m.lora_alpha, lora.DEFAULT_PATTERNS),
            rngs=nnx.Rngs(2),
        )
        return policy

    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(build)
        graphdef, params, frozen = nnx.split(abstract, builders.grpo_filter(config), ...)
        optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
        opt_state = jax.eval_shape(optimizer.init, params)
        condition = Conditioner(abstract.autoencoder, (hw, hw), t)
        programs = builders.make_programs(config, graphdef, optimizer, condition)

        def spec(shape, dt):
            return jax.ShapeDtypeStruct(shape, dt, sharding=runtime.batch_sharding(mesh, len(shape)))

        r = d.r_max
        batch = {
            "source": spec((b, hw, hw, 3), jnp.uint8),
            "target": spec((b, hw, hw, 3), jnp.uint8),
            "boxes": spec((b, r, 4), jnp.float32),
            "region_valid": spec((b, r), jnp.bool_),
            "region_masks": spec((b, r, hw, hw), jnp.bool_),
            "group_id": spec((b,), jnp.int32),
            "text_embeds": spec((b, t, text_dim), dtype),
        }
        key = jax.eval_shape(lambda: jax.random.key(0))
        out = jax.eval_shape(programs.rollout, params, frozen, batch, key)
        credit, _ = jax.eval_shape(programs.reward, params, frozen, out.edited, batch, out.weights)
        ref_params: dict = {}

        t0 = time.perf_counter()
        lowered = programs._jit["update"].lower(params, frozen, opt_state, ref_params, out, credit, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    print(f"config           configs/{args.config}.py (batch x{args.hosts} hosts)")
    print(
        f"model            FLUX.2-klein-4B {count(frozen) / 1e9:.3f}B frozen params ({m.dtype}), "
        f"remat {m.remat}"
    )
    print(f"LoRA             rank {m.lora_rank}, {count(params) / 1e6:.1f}M trained params")
    print(f"mesh             {dict(mesh.shape)} ({args.devices} simulated devices)")
    tokens = (hw // 16) ** 2
    print(
        f"batch            {b} rollouts, {hw}x{hw} px, {tokens} target + {tokens} reference + {t} text "
        f"tokens; window {settings.window} of {config.sampler.num_steps} steps"
    )
    print(f"micro-batches    {settings.micro_batch} samples each, {settings.grad_accum} per optimizer step")
    print(f"lower            {t1 - t0:8.1f} s")
    print(f"compile          {t2 - t1:8.1f} s")
    print_compiled(compiled, bf16_on_cpu=dtype == jnp.bfloat16 and jax.devices()[0].platform == "cpu")


if __name__ == "__main__":
    main()
