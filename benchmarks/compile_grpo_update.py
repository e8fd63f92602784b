"""AOT-compiles a shipped config's GRPO rollout and update (FLUX.2-klein-4B or OmniGen2, from the config's
model.name) with its settings, from abstract shapes on CPU.

Nothing is allocated: ``sfgrpo.aot`` builds the policy with ``nnx.eval_shape`` (FLUX.2-klein-4B: the
klein-4B transformer + LoRA and the FLUX.2 VAE; OmniGen2: the released OmniGen2 transformer + LoRA and the
FLUX.1 VAE; text features from the prompt cache), derives the rollout's outputs with ``jax.eval_shape``,
and lowers and compiles the run's own ``rollout`` and ``update`` programs (inner epoch, micro-batch
shuffle, window scan, remat, AdamW) for the config's mesh on simulated CPU devices. It prints compile
times and XLA's raw ``memory_analysis()`` per device. ``python -m sfgrpo.main --dry_run`` does the same
work and prints a plan around it (checks, FLOPs with loop trip counts, memory against the target).

One process stands in for the whole slice: ``--hosts`` multiplies the per-host batch, so the global batch
is the slice's (configs/tpu_v5.py and configs/omnigen2_tpu_v5.py: 8 hosts x 32 = 256 rollouts on 32
chips; configs/omnigen2_gpu.py: 2 hosts x 32 = 64 rollouts on 16 GPUs).

    python benchmarks/compile_grpo_update.py [--config tpu_v5] [--devices 32] [--hosts 8]
    python benchmarks/compile_grpo_update.py --config omnigen2_gpu --devices 16 --hosts 2
"""

import argparse
import importlib.util
import os
import sys
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

from sfgrpo import aot, builders  # noqa: E402

# The model line's name for each config.model.name.
MODELS = {"klein": "FLUX.2-klein-4B", "omnigen2": "OmniGen2", "tiny": "tiny FLUX.2-shaped policy"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    config = load(args.config)
    config.reward.kind = "shapes"  # the update does not depend on the judge; skip the URL checks
    builders.validate(config, processes=args.hosts)
    mesh = builders.make_mesh(config)
    m, d = config.model, config.data
    run = aot.abstract_run(config, mesh, config.rl.batch_size * args.hosts)
    settings = run.programs.settings
    b, hw, t = config.rl.batch_size * args.hosts, d.resolution, m.max_text_tokens
    print(f"config           configs/{args.config}.py (batch x{args.hosts} hosts)")
    frozen = aot.param_count(run.frozen) / 1e9
    print(
        f"model            {MODELS.get(m.name, m.name)} {frozen:.3f}B frozen params ({m.dtype}), "
        f"remat {m.remat}, attention {run.attention}"
    )
    print(f"LoRA             rank {m.lora_rank}, {aot.param_count(run.params) / 1e6:.1f}M trained params")
    print(f"mesh             {dict(mesh.shape)} ({args.devices} simulated devices)")
    gh, gw = run.programs.grid
    tokens = gh * gw
    print(
        f"batch            {b} rollouts, {hw}x{hw} px, {tokens} target + {tokens} reference + {t} text "
        f"tokens; window {settings.window} of {config.sampler.num_steps} steps"
    )
    print(f"micro-batches    {settings.micro_batch} samples each, {settings.grad_accum} per optimizer step")
    bf16_on_cpu = m.dtype == "bfloat16" and jax.devices()[0].platform == "cpu"
    for name in ("rollout", "update"):
        report, compiled = aot.compile_program(run, name)
        print(f"--- {name}: lower {report.lower_s:.1f} s, compile {report.compile_s:.1f} s")
        print("\n".join(aot.compiled_lines(compiled, bf16_on_cpu=bf16_on_cpu)))
        print(
            f"flops (jaxpr, loops x trip counts) {report.flops / args.devices / 1e12:8.2f} TFLOP per device"
        )


if __name__ == "__main__":
    main()
