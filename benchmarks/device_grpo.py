"""One full GRPO iteration (rollout + reward credit + update) of FLUX.2-klein-4B on the devices JAX sees:
images/s, seconds per iteration, memory, and MFU against the device's dense bf16 peak.

    python benchmarks/device_grpo.py [--config gpu|tpu_v5] [--iters 3] [--batch N] [--json out.json]
    python benchmarks/device_grpo.py --toy --iters 1          # a tiny model at 64x64 px, for a CPU

On one H200 the default (configs/gpu.py, 16 rollouts of 512x512 px) should take 3 to 6 minutes, most of it
compiling. ``--toy`` keeps the config's sampler, window, remat and micro-batching but builds a transformer
of 3 blocks and a VAE of a few thousand weights, at 64x64 px with 16 text tokens, G = 4 and 8 rollouts. The
JSON (``--json``) holds the settings, the compile times, every timing, memory, FLOPs, peak, MFU and HFU.

What runs is the training run's own rollout and update (``Programs`` from ``builders.make_programs``,
lowered and compiled by ``sfgrpo.aot.compile_program`` as the dry run does), with the shipped config's
settings: bfloat16, LoRA rank, remat, attention, the group size G, the SDE window, the sampler steps and
the resolution (``--batch/--steps/--resolution/...`` override them). Nothing is downloaded or read: the
klein-4B transformer (``flux2_config.CONFIGS['klein-4b']``) and the FLUX.2 VAE are randomly initialised,
the text features are random arrays of the prompt cache's shape (T x 7680; Qwen3 does not run in training
either), and the remote VLM judge is replaced by random per-region scores handed to the real credit
program (``Programs.credit``), as the judge's scores are. Left out of the timed iteration: the data
pipeline (decode, resize; a random device batch is reused) and the judge itself (HTTP, its GPU, and the
transfer of the edited images to the host).

Shapes per device follow the config's target (configs/gpu.py: 4 rollouts and 1 sample per micro-batch per
GPU, 2 optimizer steps per iteration): the default batch is that, rounded up to whole groups (G = 16 on one
GPU); the mesh is FSDP over up to the config's ``mesh.fsdp`` devices, data-parallel over the rest.

Printed: device kind and count, jax version; trace+lower and compile times of the rollout and the update
apart; median (min, max) over ``--iters`` timed iterations after one warm-up, each stage timed with
``jax.block_until_ready``; images/s; peak device memory (``memory_stats()``; else XLA's
``memory_analysis()``); FLOPs of both programs (``sfgrpo.flops.count`` on their jaxprs: every loop body
times its trip count), achieved TFLOP/s and MFU against the device's dense bf16 peak (a table keyed by
``device_kind``; a measured matmul on a CPU or an unknown device); the rollout's ideal time (its transformer
forward passes at peak) and how far the measurement is from it. Targets on an H100/H200-class GPU: update
MFU >= 40%, rollout <= 1.5x its ideal time.

FLOPs are counted on the programs traced with XLA attention, the same math: cuDNN's and splash's kernels
are opaque calls in the jaxpr, and blockwise attention's backward pass is a custom VJP it does not show.
The update's MFU counts model FLOPs (the forward and backward passes, without what remat recomputes); its
HFU counts what runs, the recomputation included.

On a GPU, XLA may take 95% of device memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set). Out of memory,
the script says so and exits 3: rerun with a smaller ``--batch`` (a multiple of G, or with ``--group``) or
``--micro-batch``. A cuDNN attention that fails to compile is retried once with XLA's. Off their platform
cuDNN and splash attention are replaced by blockwise attention (as the dry run traces them).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, str(ROOT))


class _Absent(types.ModuleType):
    """Stands in for a package of the data pipeline that is not installed: any attribute, call or subclass of
    it is another stand-in, so that the modules importing it load; nothing here uses it."""

    def __getattr__(self, name: str) -> _Absent:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> _Absent:
        return _Absent(f"{self.__name__}()")

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)


def _stub_absent(names: tuple[str, ...]) -> list[str]:
    """Installs ``_Absent`` for each of ``names`` that cannot be imported; returns those names."""
    absent = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            sys.modules[name] = _Absent(name)
            absent.append(name)
    return absent


# sfgrpo.builders imports the data pipeline (grain, TFDS), which the benchmark does not run: an accelerator
# image without them (the H200 image has neither) still runs it.
STUBBED = _stub_absent(("grain", "tensorflow_datasets"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sfgrpo import aot, builders, flops, runtime  # noqa: E402
from sfgrpo.iteration import Conditioner, Programs  # noqa: E402
from sfgrpo.models import flux2, vae  # noqa: E402
from sfgrpo.models.flux2_config import ATTENTION_IMPLS  # noqa: E402
from sfgrpo.models.policy import EditPolicy  # noqa: E402
from sfgrpo.rewards.base import RegionScores  # noqa: E402
from sfgrpo.rl.step import PolicyParts, merge  # noqa: E402

# Dense bf16 peak TFLOP/s per device (no sparsity), by a pattern of jax's device_kind (lower case); the
# first match wins. SXM parts unless named.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    (r"h100 pcie", 756.0, "H100 PCIe"),
    (r"h100 nvl", 835.0, "H100 NVL"),
    (r"h200", 989.0, "H200"),  # also GH200
    (r"h100", 989.0, "H100 SXM"),
    (r"a100", 312.0, "A100"),
    (r"\bl4\b", 121.0, "L4"),
    (r"tpu v5 ?lite|tpu v5e", 197.0, "TPU v5e"),
    (r"tpu v5p|tpu v5$", 459.0, "TPU v5p"),
    (r"tpu v4$", 275.0, "TPU v4"),
    (r"tpu v6 ?lite|tpu v6e", 918.0, "TPU v6e"),
)

# --toy: every part at test size, the wiring of the real ones (tokens carry 4x the VAE's latent channels,
# 16x spatial compression, text features of the prompt cache's layout at a small width).
TOY_TRANSFORMER = flux2.Flux2Config(
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)
TOY_VAE = vae.Flux2VAEConfig(
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4
)
TOY = dict(resolution=64, text_tokens=16, lora_rank=4, group=4, batch=8)

OOM_HINT = (
    "out of device memory: rerun with a smaller --batch (a multiple of the group size; --group 8 --batch 8 "
    "halves the smallest) or --micro-batch"
)


class BenchmarkError(RuntimeError):
    """A failure with a one-line explanation; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# --- settings -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="auto", help="gpu, tpu_v5 (a file in configs/), or auto: by platform")
    p.add_argument("--toy", action="store_true", help="a tiny transformer and VAE at 64x64 px (CPU tests)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--batch", type=int, help="rollouts per iteration (a multiple of the group size)")
    p.add_argument("--group", type=int, help="group size G (default: the config's)")
    p.add_argument("--micro-batch", type=int, help="samples per micro-batch over all devices")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, help="sampler steps (default: the config's)")
    p.add_argument("--resolution", type=int, help="image side in pixels, a multiple of 16")
    p.add_argument("--text-tokens", type=int, help="text tokens per instruction (default: the config's)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: the config's)")
    p.add_argument("--remat", choices=("none", "full", "dots"), help="remat policy (default: the config's)")
    p.add_argument(
        "--scan-unroll", type=int, help="blocks per iteration of the block loops (default: the config's)"
    )
    p.add_argument(
        "--attention",
        choices=tuple(a for a in ATTENTION_IMPLS if a),
        help="attention kernel (default: the config's; cudnn needs a GPU, splash a TPU)",
    )
    p.add_argument("--dtype", choices=tuple(builders.DTYPES), help="model dtype (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results to this file as JSON")
    args = p.parse_args(argv)
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


def load_config(name: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """configs/<name>.py's config and its TARGET (the machines it is written for)."""
    path = ROOT / "configs" / f"{name}.py"
    if not path.is_file():
        raise BenchmarkError(f"--config {name}: no file {path}")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(), dict(getattr(module, "TARGET", {}))


@dataclasses.dataclass
class Setup:
    """What is benchmarked: the config (overrides applied), the model's architecture and the shapes."""

    config: ml_collections.ConfigDict
    config_name: str
    klein: aot.KleinConfigs
    batch: int
    attention: str
    notes: list[str]


def make_setup(args: argparse.Namespace) -> Setup:
    """The shipped config with the command line's overrides, sized for the devices present."""
    platform = jax.devices()[0].platform
    name = args.config
    if name == "auto":
        name = "tpu_v5" if platform == "tpu" else "gpu"
    config, target = load_config(name)
    notes: list[str] = []
    c, m, rl, s = config, config.model, config.rl, config.sampler
    n = jax.device_count()

    # The config's load per device on the machines it is written for.
    target_devices = int(target.get("processes", 1)) * int(target.get("devices_per_process", 1))
    per_host = int(target.get("devices_per_process", 1))
    rollouts_per_device = max(1, rl.batch_size // per_host)
    micro_per_device = max(1, rl.micro_batch // target_devices)
    optimizer_steps = max(
        1, (rl.batch_size * int(target.get("processes", 1)) // rl.micro_batch) // rl.grad_accum
    )

    klein = aot.klein_configs(None)
    if args.toy:
        klein = aot.KleinConfigs(TOY_TRANSFORMER, TOY_VAE, aot.QWEN3_4B, "toy")
        c.data.resolution = TOY["resolution"]
        m.max_text_tokens = TOY["text_tokens"]
        m.lora_rank = TOY["lora_rank"]
        m.lora_alpha = 2.0 * TOY["lora_rank"]
        rl.group_size = TOY["group"]
    for flag, key in (
        ("group", "rl.group_size"),
        ("steps", "sampler.num_steps"),
        ("resolution", "data.resolution"),
        ("text_tokens", "model.max_text_tokens"),
        ("lora_rank", "model.lora_rank"),
        ("remat", "model.remat"),
        ("scan_unroll", "model.scan_unroll"),
        ("attention", "model.attention"),
        ("dtype", "model.dtype"),
    ):
        value = getattr(args, flag)
        if value is not None:
            section, _, field = key.partition(".")
            config[section][field] = value
    if args.lora_rank is not None and args.lora_rank > 0:
        m.lora_alpha = 2.0 * args.lora_rank  # the config's alpha = 2 x rank
    if args.steps is not None and s.window == "random":
        # Keep the window inside the new step count, ending before the last step.
        s.window_size = min(s.window_size, max(1, args.steps - 1))
        s.window_hi = max(1, min(s.window_hi, args.steps - s.window_size))
        s.window_lo = min(s.window_lo, s.window_hi - 1)

    g = rl.group_size
    batch = args.batch if args.batch is not None else (TOY["batch"] if args.toy else rollouts_per_device * n)
    if args.batch is None:
        batch = -(-max(batch, g) // g) * g  # whole groups
    micro = args.micro_batch if args.micro_batch is not None else micro_per_device * n
    micro_count = batch // micro if micro and batch % micro == 0 else 0
    if args.grad_accum is not None:
        accum = args.grad_accum
    elif micro_count and micro_count % optimizer_steps == 0:
        accum = micro_count // optimizer_steps
    else:
        accum = max(1, micro_count)

    # The mesh: FSDP over up to the config's fsdp devices, data parallel across the rest.
    fsdp = math.gcd(int(c.mesh.fsdp), n) if c.mesh.fsdp > 0 else n
    c.mesh = ml_collections.ConfigDict(dict(data=n // fsdp, fsdp=fsdp, tensor=1))
    rl.batch_size = batch
    rl.micro_batch = micro
    rl.grad_accum = accum
    c.seed = args.seed

    attention = m.attention
    native = {"cudnn": "gpu", "splash": "tpu"}  # kernels of one platform (splash elsewhere: interpret mode)
    if attention in native and platform != native[attention]:
        # As the dry run traces them: blockwise attention has their memory profile (linear in L).
        notes.append(f"attention: {attention} runs on {native[attention]} only; blockwise on {platform}")
        attention = "blockwise"
    try:
        builders.validate(config, processes=1)
    except builders.ConfigError as err:
        raise BenchmarkError(f"the benchmark's settings: {err}") from None
    return Setup(config, name, klein, batch, attention, notes)


# --- the run's state, random --------------------------------------------------------------------------


def policy_builder(setup: Setup, *, attention: str, remat: str) -> Any:
    """A function building the policy (klein transformer + LoRA, VAE, no text encoder: the prompt cache's
    features come with the batch), as ``sfgrpo.aot.abstract_run`` builds it."""
    config, m = setup.config, setup.config.model
    dtype = builders.DTYPES[m.dtype]

    def rngs(seed: int) -> nnx.Rngs:
        # The initialisers' random bits from XLA's RngBitGenerator: the weights are random all the same, and
        # the init program compiles about 5x faster than with threefry (a minute for the VAE's 182 leaves
        # on a CPU). The programs benchmarked draw their noise with the default (threefry) keys.
        return nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))

    def build() -> EditPolicy:
        tcfg = setup.klein.transformer.replace(remat=remat, attention=attention, scan_unroll=m.scan_unroll)
        transformer = flux2.Flux2Transformer(tcfg, rngs=rngs(config.seed), dtype=dtype)
        autoencoder = vae.Flux2VAE(setup.klein.vae, rngs=rngs(config.seed + 1), dtype=dtype)
        policy = EditPolicy(transformer, None, autoencoder)
        # LoRA draws its own keys from the seed (threefry): a few leaves.
        builders.add_lora(policy, config, config.seed + 2)
        return policy

    return build


def make_programs(setup: Setup, abstract: Any) -> tuple[Programs, Any]:
    """The run's programs for a policy, from its abstract instance: (programs, optimizer)."""
    config = setup.config
    graphdef, _, _, compute_dtypes = builders.split_for_grpo(abstract, config)
    optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
    hw = config.data.resolution
    uncond = None
    if config.sampler.cfg_scale != 1.0:
        d = setup.klein.transformer.joint_attention_dim
        uncond = {
            "text_embeds": np.zeros((1, builders.text_length(config), d), builders.DTYPES[config.model.dtype])
        }
    condition = Conditioner(abstract.autoencoder, (hw, hw), builders.text_length(config), uncond=uncond)
    return builders.make_programs(config, graphdef, optimizer, condition, compute_dtypes), optimizer


def random_batch(setup: Setup, mesh: jax.sharding.Mesh, seed: int) -> dict[str, jax.Array]:
    """A device batch of random images, boxes and text features (the prompt cache's layout)."""
    config = setup.config
    rng = np.random.default_rng(seed)
    b, hw, r = setup.batch, config.data.resolution, config.data.r_max
    t, d = builders.text_length(config), setup.klein.transformer.joint_attention_dim
    lo = rng.uniform(0.0, 0.5, (b, r, 2))
    hi = np.minimum(lo + rng.uniform(0.2, 0.5, (b, r, 2)), 1.0)
    boxes = np.concatenate([lo, hi], axis=-1).astype(np.float32)
    regions = rng.integers(1, r + 1, b)
    host = {
        "source": rng.integers(0, 256, (b, hw, hw, 3), dtype=np.uint8),
        "target": rng.integers(0, 256, (b, hw, hw, 3), dtype=np.uint8),
        "boxes": boxes,
        "region_valid": np.arange(r)[None, :] < regions[:, None],
        "region_masks": np.zeros((b, r, hw, hw), bool),
        "has_masks": np.zeros((b,), bool),
        "group_id": (np.arange(b) // config.rl.group_size).astype(np.int32),
        "text_embeds": rng.standard_normal((b, t, d), np.float32).astype(builders.DTYPES[config.model.dtype]),
    }
    return runtime.host_local_to_global(host, mesh)


def random_scores(batch: int, regions: int, scale: float, mesh: jax.sharding.Mesh, seed: int) -> RegionScores:
    """A judge's scores, random in [0, scale], put on the devices as the reward stage puts a judge's."""
    rng = np.random.default_rng(seed)
    u = lambda *shape: rng.uniform(0.0, scale, shape).astype(np.float32)  # noqa: E731
    host = {
        "success": u(batch, regions),
        "preserve": u(batch, regions),
        "background": u(batch),
        "naturalness": u(batch),
        "artifacts": u(batch),
        "overall_success": u(batch),
        "overall_preserve": u(batch),
        "valid": np.ones((batch,), bool),
    }
    return RegionScores(**runtime.host_local_to_global(host, mesh))


# --- peak FLOP/s ---------------------------------------------------------------------------------------


def measure_matmul_tflops(dtype: Any, n: int, reps: int = 5) -> float:
    """Best TFLOP/s of an n x n x n matmul on the default device."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def device_peak(device: Any) -> tuple[float, str]:
    """(dense bf16 peak TFLOP/s of one device, where the figure comes from)."""
    kind = device.device_kind.lower()
    for pattern, tflops, name in PEAK_BF16_TFLOPS:
        if re.search(pattern, kind):
            return tflops, f"table: {name} dense bf16"
    if device.platform == "cpu":
        # XLA:CPU has no native bf16 dots: its best is float32.
        return measure_matmul_tflops(jnp.float32, 1024), "measured: 1024^3 float32 matmul (CPU)"
    return (
        measure_matmul_tflops(jnp.bfloat16, 8192, reps=10),
        f"measured: 8192^3 bf16 matmul (device kind {device.device_kind!r} is not in the table)",
    )


# --- FLOPs ---------------------------------------------------------------------------------------------


def count_flops(programs: Programs, name: str, args: tuple[Any, ...], mesh: jax.sharding.Mesh) -> float:
    """FLOPs of program ``name`` for ``args`` (traced only), every loop body times its trip count."""
    with runtime.use_mesh(mesh):
        traced = programs._jit[name].trace(*args)
    total, unknown = flops.count(traced.jaxpr)
    if unknown:
        print(f"note: {name} has {unknown} while loops of unknown trip count, each counted once")
    return total


def forward_flops(programs: Programs, params: Any, frozen: Any, cond: Any, mesh: jax.sharding.Mesh) -> float:
    """FLOPs of one transformer forward pass for one sample (the rollout's unit of work)."""
    one = lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)  # noqa: E731
    cond1 = cond._replace(
        text=one(cond.text),
        reference=one(cond.reference),
        img_ids=jax.ShapeDtypeStruct(cond.img_ids.shape, cond.img_ids.dtype),
        txt_ids=jax.ShapeDtypeStruct(cond.txt_ids.shape, cond.txt_ids.dtype),
        text_uncond=None,
    )
    h, w = programs.grid
    x = jax.ShapeDtypeStruct((1, h * w, cond.reference.shape[-1]), jnp.float32)
    sigma = jax.ShapeDtypeStruct((1,), jnp.float32)

    def forward(params: Any, frozen: Any, x: jax.Array, sigma: jax.Array, cond: Any) -> jax.Array:
        policy = merge(PolicyParts(programs.graphdef, params, frozen, programs.compute_dtypes))
        return policy.velocity(x, sigma, cond)

    abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
    with runtime.use_mesh(mesh):
        jaxpr = jax.make_jaxpr(forward)(abstract(params), abstract(frozen), x, sigma, cond1)
    return flops.count(jaxpr)[0]


# --- the benchmark -------------------------------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    """An allocation failure of XLA (at compile or run time)."""
    text = str(err)
    return (
        "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
        or re.search(r"\bOOM\b", text) is not None
    )


def memory_stats() -> dict[str, int] | None:
    """The largest peak_bytes_in_use / bytes_in_use / bytes_limit over the local devices, or None."""
    stats = []
    for d in jax.local_devices():
        try:
            s = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without statistics
            s = None
        if s:
            stats.append(s)
    if not stats or not any("peak_bytes_in_use" in s for s in stats):
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: max(int(s.get(k, 0)) for s in stats) for k in keys}


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def count(n: float) -> str:
    """12.3M, 3.96B: a parameter count."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def fmt_flops(n: float) -> str:
    """A FLOP count with its unit: 47.37 PFLOP, 1.23 GFLOP."""
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"


def fmt_rate(flops_per_s: float) -> str:
    """TFLOP/s, with three significant digits below 1."""
    return f"{flops_per_s / 1e12:.3g} TFLOP/s"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:400] if text else type(err).__name__


def run_benchmark(setup: Setup, iters: int, progress: dict[str, str]) -> dict[str, Any]:
    """Builds the random run, compiles, times ``iters`` iterations after a warm-up; returns the results.
    Everything runs under the mesh, as in training; ``progress['stage']`` says how far it got."""
    mesh = builders.make_mesh(setup.config)
    with runtime.use_mesh(mesh):
        return _run_benchmark(setup, iters, mesh, progress)


def _run_benchmark(
    setup: Setup, iters: int, mesh: jax.sharding.Mesh, progress: dict[str, str]
) -> dict[str, Any]:
    config = setup.config
    m, rl = config.model, config.rl
    build = policy_builder(setup, attention=setup.attention, remat=m.remat)

    progress["stage"] = "init"
    print("init             random weights, optimizer state and a random batch ...", flush=True)
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(build)
    programs, optimizer = make_programs(setup, abstract)
    policy = nnx.jit(build)()  # one compiled initialisation, sharded on the mesh
    _, params, frozen, _ = builders.split_for_grpo(policy, config)
    del policy
    opt_state = jax.jit(optimizer.init)(params)
    ref_params: Any = {}
    if rl.kl_beta > 0:  # as train: LoRA's reference is the adapters zeroed
        ref_params = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))(params)
    batch = random_batch(setup, mesh, config.seed)
    jax.block_until_ready((params, frozen, opt_state, batch))
    init_s = time.perf_counter() - t0
    after_init = memory_stats()
    in_use = gib(after_init["bytes_in_use"]) if after_init else "n/a"
    print(
        f"init             {init_s:.1f} s: {count(aot.param_count(frozen))} frozen ({m.dtype}), "
        f"{count(aot.param_count(params))} trained (float32); device memory in use {in_use}",
        flush=True,
    )

    key = jax.random.key(config.seed)
    run = aot.AbstractRun(
        mesh, programs, params, frozen, opt_state, ref_params, batch, key, None, None, setup.attention
    )
    results: dict[str, Any] = {"compile": {}, "memory_analysis": {}}
    traced_flops: dict[str, float] = {}

    def compile_one(name: str) -> Any:
        progress["stage"] = f"compile {name}"
        report, compiled = aot.compile_program(run, name)
        results["compile"][name] = {"lower_s": report.lower_s, "compile_s": report.compile_s}
        results["memory_analysis"][name] = {
            "argument_bytes": report.argument_bytes,
            "output_bytes": report.output_bytes,
            "alias_bytes": report.alias_bytes,
            "temp_bytes": report.temp_bytes,
            "peak_bytes": report.peak_bytes,
        }
        traced_flops[name] = report.flops
        print(
            f"compiled {name:8s}trace+lower {report.lower_s:6.1f} s, compile {report.compile_s:6.1f} s; "
            f"XLA memory_analysis: {gib(report.argument_bytes)} arguments + {gib(report.temp_bytes)} "
            f"temporaries, {gib(report.peak_bytes)} in all per device",
            flush=True,
        )
        return compiled

    b, r, scale = setup.batch, config.data.r_max, float(config.reward.scale)

    def keys(i: int) -> tuple[jax.Array, jax.Array]:
        rollout_key, update_key = jax.random.split(jax.random.fold_in(key, i))
        return rollout_key, update_key

    # The warm-up iteration; its rollout gives the update the (concrete) inputs it is compiled for.
    rollout = compile_one("rollout")
    progress["stage"] = "warm-up rollout"
    rollout_key, update_key = keys(0)
    out = jax.block_until_ready(rollout(params, frozen, batch, rollout_key))
    after_rollout = memory_stats()
    credit, _ = jax.block_until_ready(
        programs("credit", random_scores(b, r, scale, mesh, 0), batch, out.weights)
    )
    run.out, run.credit = out, credit
    update = compile_one("update")
    progress["stage"] = "warm-up update"
    params, opt_state, metrics = jax.block_until_ready(
        update(params, frozen, opt_state, ref_params, out, credit, update_key)
    )
    run.params, run.opt_state = params, opt_state  # the warm-up's were donated (GPU/TPU)

    progress["stage"] = "flops"
    try:
        results["flops"] = count_all_flops(setup, run, traced_flops)
    except Exception as err:  # noqa: BLE001 - the timings are still worth having
        print(f"warning: FLOPs not counted ({type(err).__name__}: {first_line(err)}); no MFU", flush=True)
        results["flops"] = None
    run.out = run.credit = None
    del out, credit

    progress["stage"] = "timed iterations"
    times: dict[str, list[float]] = {"rollout_s": [], "reward_s": [], "update_s": [], "iteration_s": []}
    for i in range(1, iters + 1):
        rollout_key, update_key = keys(i)
        t0 = time.perf_counter()
        out = jax.block_until_ready(rollout(params, frozen, batch, rollout_key))
        t1 = time.perf_counter()
        scores = random_scores(b, r, scale, mesh, i)
        credit, _ = jax.block_until_ready(programs("credit", scores, batch, out.weights))
        t2 = time.perf_counter()
        params, opt_state, metrics = jax.block_until_ready(
            update(params, frozen, opt_state, ref_params, out, credit, update_key)
        )
        t3 = time.perf_counter()
        del out, credit
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            times[k].append(v)
        print(
            f"iteration {i:<6d} rollout {t1 - t0:8.3f} s, reward {t2 - t1:6.3f} s, update {t3 - t2:8.3f} s, "
            f"total {t3 - t0:8.3f} s",
            flush=True,
        )
    after_all = memory_stats()

    progress["stage"] = "peak"
    peak_tflops, peak_source = device_peak(jax.devices()[0])
    peak = peak_tflops * 1e12 * jax.device_count()
    med = {k: statistics.median(v) for k, v in times.items()}
    if after_all:
        memory = {
            "source": "memory_stats",
            "peak_bytes": after_all["peak_bytes_in_use"],
            "peak_bytes_after_rollout": after_rollout["peak_bytes_in_use"] if after_rollout else None,
            "bytes_in_use_after_init": after_init["bytes_in_use"] if after_init else None,
            "bytes_limit": after_all["bytes_limit"],
        }
    else:
        memory = {
            "source": "memory_analysis",
            "peak_bytes": max(v["peak_bytes"] for v in results["memory_analysis"].values()),
        }
    results.update(
        times={k: summary(v) for k, v in times.items()},
        images_per_s=setup.batch / med["iteration_s"],
        memory=memory,
        peak_tflops_per_device=peak_tflops,
        peak_source=peak_source,
        init_s=init_s,
        update_metrics={k: float(v) for k, v in metrics.items()},
    )
    f = results["flops"]
    if f is not None:
        results.update(
            achieved_tflops={
                "rollout": f["rollout"] / med["rollout_s"] / 1e12,
                "update": f["update"] / med["update_s"] / 1e12,
                "iteration": (f["rollout"] + f["update"]) / med["iteration_s"] / 1e12,
            },
            mfu={
                "rollout": f["rollout"] / med["rollout_s"] / peak,
                "update": f["update_model"] / med["update_s"] / peak,
                "iteration": (f["rollout"] + f["update_model"]) / med["iteration_s"] / peak,
            },
            hfu={"update": f["update"] / med["update_s"] / peak},
            rollout_ideal_s=f["forwards"] * f["forward"] / peak,
        )
        results["rollout_vs_ideal"] = med["rollout_s"] / results["rollout_ideal_s"]
    return results


def count_all_flops(setup: Setup, run: aot.AbstractRun, traced: dict[str, float]) -> dict[str, float]:
    """FLOPs of the rollout and the update (``traced``: counted on the compiled programs' own traces),
    counted on traces (no compile) with XLA attention where the run's is another (an opaque kernel or a
    custom VJP in the jaxpr; the same math); 'update_model': the update without remat, so without its
    recomputation; 'forward': one transformer forward for one sample; 'forwards': the rollout's."""
    m, s, mesh = setup.config.model, setup.config.sampler, run.mesh
    args = {name: aot.program_args(run, name) for name in ("rollout", "update")}
    counted = dict(traced)
    if setup.attention != "xla":
        build_xla = policy_builder(setup, attention="xla", remat=m.remat)
        programs_xla, _ = make_programs(setup, nnx.eval_shape(build_xla))
        counted = {name: count_flops(programs_xla, name, args[name], mesh) for name in args}
    build_model = policy_builder(setup, attention="xla", remat="none")
    programs_model, _ = make_programs(setup, nnx.eval_shape(build_model))
    return {
        "rollout": counted["rollout"],
        "update": counted["update"],
        "update_model": count_flops(programs_model, "update", args["update"], mesh),
        "forward": forward_flops(programs_model, run.params, run.frozen, run.out.cond, mesh),
        "forwards": setup.batch * s.num_steps * (2 if s.cfg_scale != 1.0 else 1),
    }


def describe(setup: Setup) -> dict[str, Any]:
    """The benchmarked settings, for the header and the JSON."""
    c = setup.config
    s, rl, m = c.sampler, c.rl, c.model
    hw = c.data.resolution
    settings = builders.grpo_settings(c)
    tokens = (hw // setup.klein.vae.scale) ** 2
    micro_count = setup.batch // rl.micro_batch
    return {
        "config": f"configs/{setup.config_name}.py",
        "toy": setup.klein.source == "toy",
        "model": "toy" if setup.klein.source == "toy" else "FLUX.2-klein-4B (random weights)",
        "dtype": m.dtype,
        "lora_rank": int(m.lora_rank),
        "remat": m.remat,
        "scan_unroll": int(m.scan_unroll),
        "attention": setup.attention,
        "mesh": dict(c.mesh),
        "batch": setup.batch,
        "group_size": int(rl.group_size),
        "resolution": hw,
        "tokens": {"target": tokens, "reference": tokens, "text": builders.text_length(c)},
        "sampler_steps": int(s.num_steps),
        "window": settings.window,
        "window_mode": s.window,
        "cfg_scale": float(s.cfg_scale),
        "micro_batch": int(rl.micro_batch),
        "grad_accum": int(rl.grad_accum),
        "optimizer_steps": micro_count // rl.grad_accum * int(rl.inner_epochs),
        "inner_epochs": int(rl.inner_epochs),
    }


def print_header(setup: Setup, info: dict[str, Any]) -> None:
    d = jax.devices()[0]
    t = info["tokens"]
    toy = " --toy" if info["toy"] else ""
    print(f"device           {d.device_kind} ({d.platform}) x {jax.device_count()}; jax {jax.__version__}")
    print(
        f"settings         {info['config']}{toy}: {info['model']}, {info['dtype']}, "
        f"LoRA {info['lora_rank']}, remat {info['remat']}, scan_unroll {info['scan_unroll']}, "
        f"attention {info['attention']}"
    )
    print(
        f"batch            {info['batch']} rollouts (G={info['group_size']}), {info['resolution']}x"
        f"{info['resolution']} px: {t['target']} target + {t['reference']} reference + {t['text']} text "
        "tokens per sequence"
    )
    w = f"{info['window']} ({info['window_mode']})"
    print(f"sampler          {info['sampler_steps']} steps, SDE window of {w}")
    print(
        f"update           micro-batches of {info['micro_batch']}, {info['grad_accum']} per optimizer step: "
        f"{info['optimizer_steps']} optimizer step(s); mesh {info['mesh']}"
    )
    if STUBBED:
        print(f"note             not installed, stubbed (the data pipeline is not run): {', '.join(STUBBED)}")
    for note in setup.notes:
        print(f"note             {note}")


def print_results(res: dict[str, Any]) -> None:
    t = res["times"]
    print(
        f"timed            median (min, max) over {len(t['iteration_s']['all'])} iterations after 1 warm-up"
    )
    for k in ("rollout_s", "reward_s", "update_s", "iteration_s"):
        v = t[k]
        print(f"  {k[:-2]:14s} {v['median']:9.3f} s  ({v['min']:.3f}, {v['max']:.3f})")
    print(f"  images/s       {res['images_per_s']:9.3f}")
    mem = res["memory"]
    if mem["source"] == "memory_stats":
        print(
            f"memory           peak {gib(mem['peak_bytes'])} per device (memory_stats; after the rollout "
            f"{gib(mem['peak_bytes_after_rollout'])}; weights and state "
            f"{gib(mem['bytes_in_use_after_init'])}; limit {gib(mem['bytes_limit'])})"
        )
    else:
        per = ", ".join(f"{k} {gib(v['peak_bytes'])}" for k, v in res["memory_analysis"].items())
        print(f"memory           no memory_stats here: XLA's memory_analysis per device, {per}")
    rate = fmt_rate(res["peak_tflops_per_device"] * 1e12)
    print(f"peak             {rate} per device ({res['peak_source']})")
    f = res["flops"]
    if f is None:
        print("FLOPs            not counted: no MFU")
        return
    a, mfu = res["achieved_tflops"], res["mfu"]
    print(
        f"rollout          {fmt_flops(f['rollout'])}, {fmt_rate(a['rollout'] * 1e12)}, MFU "
        f"{100 * mfu['rollout']:.1f}%; ideal {res['rollout_ideal_s']:.3g} s = {f['forwards']} forwards x "
        f"{fmt_flops(f['forward'])} at peak; measured/ideal {res['rollout_vs_ideal']:.2f} (target <= 1.5)"
    )
    print(
        f"update           {fmt_flops(f['update'])} run, {fmt_flops(f['update_model'])} without remat's "
        f"recomputation; {fmt_rate(a['update'] * 1e12)}, MFU {100 * mfu['update']:.1f}% (target >= 40%), "
        f"HFU {100 * res['hfu']['update']:.1f}%"
    )
    print(f"iteration        {fmt_rate(a['iteration'] * 1e12)}, MFU {100 * mfu['iteration']:.1f}%")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup = make_setup(args)
    except BenchmarkError as err:
        print(f"device_grpo: {err}", file=sys.stderr)
        return err.code
    info = describe(setup)
    print_header(setup, info)
    results: dict[str, Any] | None = None
    while results is None:
        progress = {"stage": "start"}
        try:
            results = run_benchmark(setup, args.iters, progress)
        except Exception as err:
            stage = progress["stage"]
            if is_oom(err):
                error = (
                    f"{OOM_HINT} (batch {setup.batch}, micro-batch {setup.config.rl.micro_batch}; "
                    f"during {stage})"
                )
                print(f"device_grpo: {error}\n  {first_line(err)}", file=sys.stderr)
                if args.json:
                    args.json.write_text(json.dumps({"settings": info, "error": error}, indent=2))
                return 3
            if setup.attention == "cudnn" and stage.startswith(("compile", "warm-up")):
                print(
                    f"device_grpo: cuDNN attention failed during {stage} ({type(err).__name__}: "
                    f"{first_line(err)}); retrying with XLA attention",
                    flush=True,
                )
                setup.attention = info["attention"] = "xla"
                setup.notes.append("attention: cuDNN failed; XLA's")
                continue
            raise
    print_results(results)
    device = jax.devices()[0]
    payload = {
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "count": jax.device_count(),
            "jax_version": jax.__version__,
        },
        "settings": info,
        "notes": [*setup.notes, *(f"stubbed, not installed: {name}" for name in STUBBED)],
        **results,
    }
    line = (
        f"SUMMARY {device.device_kind} x{jax.device_count()}: {info['batch']} rollouts/iteration, "
        f"{results['times']['iteration_s']['median']:.3g} s/iteration, {results['images_per_s']:.3g} images/s"
    )
    if results["flops"] is not None:
        line += (
            f", update MFU {100 * results['mfu']['update']:.1f}%, rollout "
            f"{results['rollout_vs_ideal']:.2f}x ideal"
        )
    print(f"{line}, peak memory {gib(results['memory']['peak_bytes'])}")
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
