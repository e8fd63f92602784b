"""AOT-compiles a FLUX.2-klein-4B LoRA training step (forward + backward) from abstract shapes.

No weights are allocated: the model comes from ``nnx.eval_shape``, the inputs are ``jax.ShapeDtypeStruct``s,
and the step is only lowered and compiled. It proves that the real graph builds, and reports XLA's
compile time and ``memory_analysis()``.

Default: a 512x512 target (32x32 = 1024 tokens) plus one 512x512 reference image (1024 tokens), 512 text
tokens (the Klein pipeline's max_sequence_length), batch 1, bfloat16 parameters, LoRA rank 32 / alpha 64 on
the attention and MLP projections, remat 'dots', on one CPU device.

    python benchmarks/compile_klein4b.py [--batch 1] [--remat dots] [--scan-unroll 20] [--devices 8 --fsdp 8]
"""

import argparse
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--size", type=int, default=512, help="image side in pixels (target and reference)")
parser.add_argument("--text-len", type=int, default=512)
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--remat", default="dots", choices=["none", "full", "dots"])
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
parser.add_argument(
    "--attention", default="xla", choices=["xla", "cudnn", "blockwise"], help="cudnn needs a GPU"
)
parser.add_argument("--scan-unroll", type=int, default=1, help="blocks per iteration of the block loops")
parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices")
parser.add_argument("--fsdp", type=int, default=1, help="fsdp mesh size (data takes the rest)")
args = parser.parse_args()

# XLA reads the device count when the backend starts: set it before jax is imported.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sfgrpo import runtime  # noqa: E402
from sfgrpo.aot import compiled_lines  # noqa: E402
from sfgrpo.models import flux2, lora  # noqa: E402


def main():
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    try:
        cfg = flux2.CONFIGS["klein-4b"].replace(
            remat=args.remat, attention=args.attention, scan_unroll=args.scan_unroll
        )
    except ValueError as err:
        parser.error(str(err))
    mesh = runtime.make_mesh(data=-1, fsdp=args.fsdp, tensor=1)
    grid = args.size // 16
    target_len, image_len = grid * grid, 2 * grid * grid  # target then one reference image

    def build():
        model = flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        lora.apply_lora(model, lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank), rngs=nnx.Rngs(1))
        return model

    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(build)
        graphdef, adapter, base = nnx.split(abstract, lora.LORA, ...)
        img_ids, txt_ids = flux2.make_position_ids(grid, grid, args.text_len, [(grid, grid)])
        batch = runtime.batch_sharding(mesh, 3)
        b = args.batch
        hidden = jax.ShapeDtypeStruct((b, image_len, cfg.in_channels), dtype, sharding=batch)
        text = jax.ShapeDtypeStruct((b, args.text_len, cfg.joint_attention_dim), dtype, sharding=batch)
        target = jax.ShapeDtypeStruct((b, target_len, cfg.out_dim), jnp.float32, sharding=batch)
        sigma = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=runtime.batch_sharding(mesh, 1))

        def train_step(adapter, base, hidden, text, sigma, target):
            """Flow-matching loss on the target tokens; gradient w.r.t. the LoRA parameters only."""

            def loss_fn(adapter):
                model = nnx.merge(graphdef, adapter, base)
                v = model(hidden, text, sigma, img_ids, txt_ids)[:, :target_len]
                return jnp.mean(jnp.square(v.astype(jnp.float32) - target))

            return jax.value_and_grad(loss_fn)(adapter)

        t0 = time.perf_counter()
        lowered = jax.jit(train_step).lower(adapter, base, hidden, text, sigma, target)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    print(f"model            FLUX.2-klein-4B, {count(base) / 1e9:.3f}B base params ({args.dtype})")
    print(f"LoRA             rank {args.rank}, {count(adapter) / 1e6:.1f}M params")
    print(f"tokens           {target_len} target + {image_len - target_len} reference + {args.text_len} text")
    print(
        f"batch, remat     {args.batch}, {args.remat}; attention {args.attention}; "
        f"scan_unroll {args.scan_unroll}"
    )
    print(f"mesh             {dict(mesh.shape)} on {jax.devices()[0].device_kind}")
    print(f"lower            {t1 - t0:8.1f} s")
    print(f"compile          {t2 - t1:8.1f} s")
    bf16_on_cpu = dtype == jnp.bfloat16 and jax.devices()[0].platform == "cpu"
    print("\n".join(compiled_lines(compiled, bf16_on_cpu=bf16_on_cpu)))


if __name__ == "__main__":
    main()
