"""Benchmarks sfgrpo's FLUX.2 port against diffusers' ``Flux2Transformer2DModel`` on this CPU, in float32.

Usage:
    python benchmarks/vs_diffusers.py                      # the default klein-shaped workload, 5 repetitions
    python benchmarks/vs_diffusers.py --reps 3 --json out.json
    python benchmarks/vs_diffusers.py --tiny               # seconds: a smoke run of every section
    python benchmarks/vs_diffusers.py --sections rollout,update --remat dots --no-torch-compile

Both models hold the same weights: a seeded diffusers model is saved to a temporary folder and loaded with
``sfgrpo.models.flux2.from_pretrained``. The default workload is klein-shaped (128 latent channels,
7680-wide text features, MLP ratio 3) with 2 double + 4 single blocks of 4 heads x 64, batch 2, 1024
target + 1024 reference image tokens and 64 text tokens.

What is measured (wall-clock seconds; JAX timings wait for the result with ``block_until_ready``):

* parity (always first): the max abs difference of the two models' outputs on the same inputs; the script
  exits with status 1 when it exceeds ``--parity-tol`` times the output's max abs value.
* rollout: 6 SDE steps, each a transformer forward over the target + reference tokens whose output is sliced
  to the target tokens, followed by an Euler-Maruyama update of the target latents with fixed noise. JAX:
  one jitted function (``lax.scan`` over the steps); PyTorch: eager under ``torch.no_grad()`` and, with
  ``--torch-compile`` (default on), the model wrapped in ``torch.compile``.
* update: LoRA rank 8 (alpha 16) on every attention and MLP projection of the blocks; one forward + backward
  + AdamW step (after a global grad-norm clip) over the LoRA parameters, loss = MSE of the target-token
  velocity to a fixed target. JAX: sfgrpo's LoRA and ``builders.make_optimizer`` under one ``jax.jit``,
  with the model's ``--remat`` policy; PyTorch: PEFT + ``torch.optim.AdamW`` (torch.compile wraps the
  model's forward and backward; the optimizer step stays eager). Then where the update's time goes: the
  forward, the forward + backward and the whole step timed again together, for JAX and torch eager.
* mfu: the float32 matmul peak of this machine (2048^3 matmuls, JAX and torch), the FLOPs of a forward
  counted by hand from the config and from the forward's jaxpr (``sfgrpo.flops.count``), a single forward
  timed, and the achieved GFLOP/s and % of the JAX matmul peak of the rollout and the update. The update's
  FLOPs are counted from its jaxpr and expressed as forwards of work, next to its time in forwards.
* scaling: a single forward at a few target sizes (equal reference tokens), and a least-squares fit
  time = a * linear_flops + b * attention_flops, measured vs predicted per size.
* kv: reference K/V caching (``Flux2KleinKVPipeline``, ``Flux2Config.reference_kv``) on the same weights.
  Parity of the port's reference pass + cached forward with diffusers' extract step; then the rollout
  (6 SDE steps) and an update over a window of 2 steps structured as sfgrpo's (a gradient per step,
  summed; LoRA, AdamW) with the references computed once ('once', what sfgrpo's rollout and update do),
  recomputed at every step by the same model ('per_step', the saving's baseline; XLA hoists a
  loop-invariant reference pass out of the rollout's scan by itself, not the update's backward), and as
  joint tokens of the plain klein model ('joint', Flux2KleinPipeline's cost); the rollout also against
  diffusers' KV pipeline loop (extract at step 0, cached after), eager.
* unroll: the port's block loops rolled (``Flux2Config.scan_unroll`` 1, one compiled body per loop) against
  fully unrolled (straight-line code without the loop's stacked per-layer buffers), the rollout and the
  update alternating, with their compile times; ``--scan-unroll`` sets the other sections' value.

Timing protocol: compile and warm-up runs are apart (compile times are reported: JAX's trace+lower, XLA's
compile, and torch.compile's first call minus a steady call); then ``--reps`` repetitions, alternating JAX
and torch within each repetition. Medians, min and max are printed, and the ratios torch eager / JAX and
torch.compile / JAX (above 1: JAX is faster). The machine's load average before and after and torch's thread
count (``--torch-threads``, default the usable cores) are reported, since a shared machine skews every
figure: with other processes on the cores, torch's OpenMP threads wait for each other at every op, which
can slow small ops by 100x (``--torch-threads 1`` avoids it). ``--tiny`` leaves torch.compile off (it takes
minutes on a CPU even for a tiny model) unless ``--torch-compile`` is given.

FLOPs counted by hand: 2 * tokens * in * out for every linear layer (embedders, time embedding,
modulations, block projections, output layers) and 4 * B * heads * L^2 * head_dim per block for attention
(QK^T and PV over L = text + target + reference tokens). Norms, RoPE, softmax, SwiGLU and the other
elementwise work are not counted (nor are they by ``sfgrpo.flops.count``, which counts matrix products).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SECTIONS = ("rollout", "update", "mfu", "scaling", "kv", "unroll")
REMATS = ("none", "dots", "full")
SDE_STEPS = 6
SDE_ETA = 0.7
LORA_RANK, LORA_ALPHA = 8, 16.0
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0
UPDATE_SIGMA = 0.5
KV_UPDATE_SIGMAS = (0.5, 0.35)  # the kv section's update: a window of 2 steps, as the shipped klein configs
REFERENCE_MODES = ("joint", "per_step", "once")

# The projections LoRA adapts: sfgrpo's lora.DEFAULT_PATTERNS (attn, ff, ff_context of every block) in
# diffusers' module names, for PEFT.
PEFT_TARGETS = (
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
    r"|.*single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
)

# Workload presets; flags given on the command line override them.
DEFAULT = dict(
    batch=2,
    tokens=1024,
    ref_tokens=1024,
    text_tokens=64,
    heads=4,
    head_dim=64,
    double=2,
    single=4,
    reps=5,
    scaling_sizes="256,512,1024",
    in_channels=128,
    joint_dim=7680,
    time_channels=256,
    peak_size=2048,
)
TINY = dict(
    batch=2,
    tokens=16,
    ref_tokens=16,
    text_tokens=8,
    heads=2,
    head_dim=16,
    double=2,
    single=4,
    reps=1,
    scaling_sizes="16,64",
    in_channels=16,
    joint_dim=24,
    time_channels=32,
    peak_size=512,
)


class BenchmarkError(Exception):
    """A problem that stops the benchmark with a message (bad flags, failed parity)."""


# --------------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the preset (default or ``--tiny``) filling the flags not given."""
    p = argparse.ArgumentParser(
        description="sfgrpo's FLUX.2 port vs diffusers' Flux2Transformer2DModel on this CPU (float32).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="a preset small enough to run in seconds")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--attention", default=None, help="the port's config.attention (passed through)")
    p.add_argument("--remat", default="none", help=f"the port's remat policy for the update, one of {REMATS}")
    p.add_argument(
        "--scan-unroll",
        type=int,
        default=1,
        help="the port's config.scan_unroll: blocks per iteration of the block loops (>= the depth: none)",
    )
    p.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the diffusers model under torch.compile (default: on, off with --tiny)",
    )
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: the usable cores)")
    p.add_argument("--reps", type=int, help="timed repetitions (preset: 5, tiny 1)")
    p.add_argument("--batch", type=int, help="batch size (preset: 2)")
    p.add_argument("--tokens", type=int, help="target image tokens (preset: 1024)")
    p.add_argument("--ref-tokens", type=int, help="reference image tokens (preset: 1024)")
    p.add_argument("--text-tokens", type=int, help="text tokens (preset: 64)")
    p.add_argument("--heads", type=int, help="attention heads (preset: 4)")
    p.add_argument("--head-dim", type=int, help="attention head dim, a multiple of 8 (preset: 64)")
    p.add_argument("--double", type=int, help="double-stream blocks (preset: 2)")
    p.add_argument("--single", type=int, help="single-stream blocks (preset: 4)")
    p.add_argument(
        "--scaling-sizes", help="target token counts for the scaling fit (preset: 256,512,1024; tiny 16,64)"
    )
    p.add_argument("--parity-tol", type=float, default=1e-4, help="max abs diff / output scale allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write every figure as JSON")
    args = p.parse_args(argv)
    try:
        _resolve(args)
    except BenchmarkError as err:
        p.error(str(err))
    return args


def _resolve(args: argparse.Namespace) -> None:
    """Fills preset values and validates; raises ``BenchmarkError`` naming the bad flag."""
    preset = TINY if args.tiny else DEFAULT
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.torch_compile is None:
        args.torch_compile = not args.tiny  # compiling takes minutes on a CPU, even for a tiny model
    if args.torch_threads is None:
        args.torch_threads = usable_cores()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchmarkError(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    args.sections = sections
    if args.remat not in REMATS:
        raise BenchmarkError(f"--remat must be one of {'|'.join(REMATS)}, got {args.remat!r}")
    if args.scan_unroll < 1:
        raise BenchmarkError(f"--scan-unroll must be >= 1, got {args.scan_unroll}")
    if args.attention is not None and args.attention.lower() in ("", "none", "default"):
        args.attention = None
    positive = ("reps", "torch_threads", "batch", "tokens", "text_tokens", "heads", "head_dim")
    for key in positive:
        if getattr(args, key) < 1:
            raise BenchmarkError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("ref_tokens", "double", "single"):
        if getattr(args, key) < 0:
            raise BenchmarkError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.double + args.single == 0:
        raise BenchmarkError("--double and --single are both 0: the model has no blocks")
    if args.head_dim % 8:
        raise BenchmarkError(f"--head-dim must be a multiple of 8 (4 even RoPE axes), got {args.head_dim}")
    try:
        sizes = [int(s) for s in str(args.scaling_sizes).split(",") if s.strip()]
    except ValueError:
        raise BenchmarkError(
            f"--scaling-sizes must be comma-separated integers, got {args.scaling_sizes!r}"
        ) from None
    if "scaling" in sections and (len(set(sizes)) < 2 or min(sizes) < 1):
        raise BenchmarkError(f"--scaling-sizes needs at least 2 distinct positive sizes, got {sizes}")
    args.scaling_sizes = sorted(set(sizes))
    if not args.parity_tol > 0:
        raise BenchmarkError(f"--parity-tol must be > 0, got {args.parity_tol}")


# --------------------------------------------------------------------------------------------------------
# Workload, models and inputs


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int
    tokens: int
    ref_tokens: int
    text_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.tokens + self.ref_tokens

    @property
    def seq(self) -> int:
        return self.text_tokens + self.image_tokens


def _grid(n: int) -> tuple[int, int]:
    """A (height, width) token grid of n tokens, as square as n allows."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def diffusers_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Flux2Transformer2DModel`` arguments of the benchmark's model (klein-shaped by default)."""
    return dict(
        patch_size=1,
        in_channels=args.in_channels,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=args.joint_dim,
        timestep_guidance_channels=args.time_channels,
        mlp_ratio=3.0,
        axes_dims_rope=(args.head_dim // 4,) * 4,
        guidance_embeds=False,
    )


def build_models(args: argparse.Namespace, folder: str) -> tuple[Any, Any]:
    """(diffusers model, sfgrpo model) with the same weights: a seeded diffusers model (norm scales
    perturbed, so they matter) saved to ``folder`` and loaded by the port."""
    import torch  # noqa: PLC0415
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel  # noqa: PLC0415

    from sfgrpo.models import flux2  # noqa: PLC0415

    torch.manual_seed(args.seed)
    theirs = Flux2Transformer2DModel(**diffusers_config(args)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    theirs.requires_grad_(False)
    theirs.save_pretrained(folder)
    try:
        ours = flux2.from_pretrained(
            folder, attention=args.attention, remat=args.remat, scan_unroll=args.scan_unroll
        )
    except ValueError as err:
        raise BenchmarkError(
            f"the port rejects the options (--attention/--remat/--scan-unroll): {err}"
        ) from None
    return theirs, ours


@dataclasses.dataclass
class Inputs:
    """Numpy inputs of one workload: target latents, reference latents, text features, ids, noise."""

    x: np.ndarray  # (B, T, C) target latents
    ref: np.ndarray  # (B, R, C) reference latents
    enc: np.ndarray  # (B, Lt, J) text features
    img_ids: np.ndarray  # (T + R, 4)
    txt_ids: np.ndarray  # (Lt, 4)
    noise: np.ndarray  # (steps, B, T, C) SDE noise
    target: np.ndarray  # (B, T, C_out) the update's regression target


def make_inputs(args: argparse.Namespace, w: Workload, seed: int) -> Inputs:
    from sfgrpo.models.flux2 import make_position_ids  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    c = args.in_channels

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    refs = [_grid(w.ref_tokens)] if w.ref_tokens else []
    img_ids, txt_ids = make_position_ids(*_grid(w.tokens), w.text_tokens, refs=refs)
    return Inputs(
        x=normal(w.batch, w.tokens, c),
        ref=normal(w.batch, w.ref_tokens, c),
        enc=normal(w.batch, w.text_tokens, args.joint_dim),
        img_ids=img_ids,
        txt_ids=txt_ids,
        noise=normal(SDE_STEPS, w.batch, w.tokens, c),
        target=normal(w.batch, w.tokens, c),
    )


def sigmas() -> np.ndarray:
    return np.linspace(1.0, 0.0, SDE_STEPS + 1).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# JAX programs


def jax_forward(model: Any) -> tuple[Callable, Any]:
    """(jitted f(state, hidden, enc, sigma, img_ids, txt_ids) -> velocity of all image tokens, state)."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)

    def forward(state: Any, hidden: Any, enc: Any, sigma: Any, img_ids: Any, txt_ids: Any) -> Any:
        return nnx.merge(graphdef, state)(hidden, enc, sigma, img_ids, txt_ids)

    return jax.jit(forward), state


def _velocity(model: Any, mode: str, tokens: int, kv: Any) -> Callable[..., Any]:
    """f(x (B, T, C), ref, enc, t, img_ids, txt_ids) -> target velocity, with the references handled as
    ``mode`` says (see REFERENCE_MODES; 'once' uses ``kv``, computed by the caller)."""
    import jax.numpy as jnp  # noqa: PLC0415

    def velocity(x: Any, ref: Any, enc: Any, t: Any, img_ids: Any, txt_ids: Any) -> Any:
        if mode == "joint":
            return model(jnp.concatenate([x, ref], axis=1), enc, t, img_ids, txt_ids)[:, :tokens]
        cache = kv if mode == "once" else model.reference_kv(ref, img_ids[tokens:])
        return model(x, enc, t, img_ids[:tokens], txt_ids, None, cache)

    return velocity


def jax_rollout(model: Any, tokens: int, mode: str = "joint") -> tuple[Callable, Any]:
    """(jitted f(state, x, ref, enc, noise, img_ids, txt_ids) -> final target latents, state); ``mode``:
    how the references are handled (REFERENCE_MODES; the cached ones need ``config.reference_kv``)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)
    sig = sigmas()

    def rollout(state: Any, x: Any, ref: Any, enc: Any, noise: Any, img_ids: Any, txt_ids: Any) -> Any:
        model = nnx.merge(graphdef, state)
        kv = model.reference_kv(ref, img_ids[tokens:]) if mode == "once" else None
        velocity = _velocity(model, mode, tokens, kv)

        def step(x: Any, inp: tuple[Any, Any, Any]) -> tuple[Any, None]:
            s, s_next, xi = inp
            t = jnp.broadcast_to(s, (x.shape[0],))
            v = velocity(x, ref, enc, t, img_ids, txt_ids)
            dt = s_next - s
            return x + dt * v + SDE_ETA * jnp.sqrt(-dt) * xi, None

        x, _ = jax.lax.scan(step, x, (jnp.asarray(sig[:-1]), jnp.asarray(sig[1:]), noise))
        return x

    return jax.jit(rollout), state


def jax_update(model: Any, tokens: int) -> tuple[dict[str, Callable], tuple[Any, Any, Any]]:
    """LoRA attached to a copy of ``model``. Returns the jitted stages of an update and (params, opt_state,
    rest): 'step' f(params, opt_state, rest, *data) -> (params, opt_state, loss) is the update; 'forward'
    f(params, rest, *data) -> loss and 'forward+backward' f(params, rest, *data) -> (loss, grads) are its
    first stages, for the breakdown. data = (hidden, enc, img_ids, txt_ids, target)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sfgrpo import builders  # noqa: PLC0415
    from sfgrpo.models import lora  # noqa: PLC0415

    model = nnx.clone(model)
    lora.apply_lora(model, lora.LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, lora.LoRAParam, ...)
    opt = builders.make_optimizer(LR, WEIGHT_DECAY, MAX_GRAD_NORM)
    opt_state = opt.init(params)

    def loss_fn(p: Any, rest: Any, hidden: Any, enc: Any, img_ids: Any, txt_ids: Any, target: Any) -> Any:
        m = nnx.merge(graphdef, p, rest)
        t = jnp.full((hidden.shape[0],), UPDATE_SIGMA, hidden.dtype)
        v = m(hidden, enc, t, img_ids, txt_ids)[:, :tokens]
        return jnp.mean((v - target) ** 2)

    grad_fn = jax.value_and_grad(loss_fn)

    def step(params: Any, opt_state: Any, rest: Any, *data: Any) -> tuple[Any, Any, Any]:
        loss, grads = grad_fn(params, rest, *data)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    stages = {"forward": jax.jit(loss_fn), "forward+backward": jax.jit(grad_fn), "step": jax.jit(step)}
    return stages, (params, opt_state, rest)


def jax_window_update(model: Any, tokens: int, mode: str) -> tuple[Callable, tuple[Any, Any, Any]]:
    """The update as ``sfgrpo.rl.step.update`` structures it, LoRA attached to a copy of ``model``: a
    ``lax.scan`` over the window's steps (KV_UPDATE_SIGMAS), each step's gradient taken apart and summed,
    then AdamW. ``mode`` (REFERENCE_MODES): 'once' runs the reference pass once and pulls the steps'
    summed cache gradient back through it (sfgrpo's update), 'per_step' differentiates a reference pass
    inside every step, 'joint' is the plain klein model. Returns (jitted f(params, opt_state, rest, hidden,
    enc, img_ids, txt_ids, target) -> (params, opt_state, loss), (params, opt_state, rest))."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sfgrpo import builders  # noqa: PLC0415
    from sfgrpo.models import lora  # noqa: PLC0415

    model = nnx.clone(model)
    lora.apply_lora(model, lora.LoRAConfig(rank=LORA_RANK, alpha=LORA_ALPHA), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, lora.LoRAParam, ...)
    opt = builders.make_optimizer(LR, WEIGHT_DECAY, MAX_GRAD_NORM)
    window = len(KV_UPDATE_SIGMAS)

    def step_loss(p: Any, kv: Any, rest: Any, sigma: Any, x: Any, ref: Any, *data: Any) -> Any:
        enc, img_ids, txt_ids, target = data
        velocity = _velocity(nnx.merge(graphdef, p, rest), mode, tokens, kv)
        t = jnp.full((x.shape[0],), sigma, x.dtype)
        return jnp.mean((velocity(x, ref, enc, t, img_ids, txt_ids) - target) ** 2) / window

    def update(params: Any, opt_state: Any, rest: Any, hidden: Any, *data: Any) -> tuple[Any, Any, Any]:
        x, ref = hidden[:, :tokens], hidden[:, tokens:]
        img_ids = data[1]
        kv, pull = jax.vjp(
            lambda p: (
                nnx.merge(graphdef, p, rest).reference_kv(ref, img_ids[tokens:]) if mode == "once" else None
            ),
            params,
        )
        grad = jax.value_and_grad(step_loss, argnums=(0, 1))

        def body(acc: Any, sigma: Any) -> tuple[Any, Any]:
            loss, g = grad(params, kv, rest, sigma, x, ref, *data)
            return jax.tree.map(jnp.add, acc, g), loss

        zeros = jax.tree.map(jnp.zeros_like, (params, kv))
        (g_params, g_kv), losses = jax.lax.scan(body, zeros, jnp.asarray(KV_UPDATE_SIGMAS, jnp.float32))
        if kv is not None:
            g_params = jax.tree.map(jnp.add, g_params, pull(g_kv)[0])
        updates, opt_state = opt.update(g_params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.sum()

    return jax.jit(update), (params, opt.init(params), rest)


def jax_compile(fn: Callable, *args: Any) -> tuple[Callable, dict[str, float], Any]:
    """(compiled fn, {'jax trace+lower': s, 'jax compile': s}, its jaxpr)."""
    import jax  # noqa: PLC0415

    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"jax trace+lower": t1 - t0, "jax compile": t2 - t1}, jax.make_jaxpr(fn)(*args)


def _blocking(fn: Callable, *args: Any) -> Callable[[], Any]:
    import jax  # noqa: PLC0415

    return lambda: jax.block_until_ready(fn(*args))


# --------------------------------------------------------------------------------------------------------
# PyTorch programs


def torch_forward(model: Any, inp: Inputs, sigma: float) -> Callable[[], Any]:
    import torch  # noqa: PLC0415

    hidden = torch.from_numpy(np.concatenate([inp.x, inp.ref], axis=1))
    enc, img_ids, txt_ids = (torch.from_numpy(a) for a in (inp.enc, inp.img_ids, inp.txt_ids))
    t = torch.full((inp.x.shape[0],), sigma)

    def run() -> Any:
        with torch.no_grad():
            return model(
                hidden_states=hidden,
                encoder_hidden_states=enc,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]

    return run


def torch_rollout(model: Any, inp: Inputs) -> Callable[[], Any]:
    import torch  # noqa: PLC0415

    x0, ref, enc, noise = (torch.from_numpy(a) for a in (inp.x, inp.ref, inp.enc, inp.noise))
    img_ids, txt_ids = torch.from_numpy(inp.img_ids), torch.from_numpy(inp.txt_ids)
    sig = sigmas()
    tokens, batch = inp.x.shape[1], inp.x.shape[0]
    ts = [torch.full((batch,), float(s)) for s in sig]

    def run() -> Any:
        x = x0
        with torch.no_grad():
            for k in range(SDE_STEPS):
                v = model(
                    hidden_states=torch.cat([x, ref], dim=1),
                    encoder_hidden_states=enc,
                    timestep=ts[k],
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    return_dict=False,
                )[0][:, :tokens]
                dt = float(sig[k + 1] - sig[k])
                x = x + dt * v + SDE_ETA * math.sqrt(-dt) * noise[k]
        return x

    return run


def torch_kv_rollout(model: Any, inp: Inputs) -> Callable[[], Any]:
    """``Flux2KleinKVPipeline``'s loop on a model with its KV processors: step 0 extracts the reference
    K/V ([reference, target] tokens), the later steps run the target tokens on the cache."""
    import torch  # noqa: PLC0415

    x0, ref, enc, noise = (torch.from_numpy(a) for a in (inp.x, inp.ref, inp.enc, inp.noise))
    tokens, batch = inp.x.shape[1], inp.x.shape[0]
    target_ids = torch.from_numpy(inp.img_ids[:tokens])
    first_ids = torch.from_numpy(np.concatenate([inp.img_ids[tokens:], inp.img_ids[:tokens]]))
    txt_ids = torch.from_numpy(inp.txt_ids)
    sig = sigmas()
    ts = [torch.full((batch,), float(s)) for s in sig]

    def run() -> Any:
        x, cache = x0, None
        with torch.no_grad():
            for k in range(SDE_STEPS):
                common = dict(encoder_hidden_states=enc, timestep=ts[k], txt_ids=txt_ids, return_dict=False)
                if cache is None:
                    v, cache = model(
                        hidden_states=torch.cat([ref, x], dim=1),
                        img_ids=first_ids,
                        kv_cache_mode="extract",
                        num_ref_tokens=ref.shape[1],
                        **common,
                    )
                else:
                    v = model(
                        hidden_states=x, img_ids=target_ids, kv_cache=cache, kv_cache_mode="cached", **common
                    )[0]
                dt = float(sig[k + 1] - sig[k])
                x = x + dt * v + SDE_ETA * math.sqrt(-dt) * noise[k]
        return x

    return run


def torch_lora(base: Any) -> Any:
    """A copy of ``base`` with PEFT LoRA (rank 8, alpha 16) on the projections sfgrpo adapts."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS)
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    return model


def torch_update(model: Any, call: Any, inp: Inputs, stage: str = "step") -> Callable[[], float]:
    """One forward + backward + clip + AdamW step over the LoRA parameters of the PEFT ``model`` (``call`` is
    the model or its torch.compile wrapper); with ``stage`` 'forward' or 'forward+backward', only those."""
    import torch  # noqa: PLC0415

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    hidden = torch.from_numpy(np.concatenate([inp.x, inp.ref], axis=1))
    enc, img_ids, txt_ids = (torch.from_numpy(a) for a in (inp.enc, inp.img_ids, inp.txt_ids))
    target = torch.from_numpy(inp.target)
    t = torch.full((inp.x.shape[0],), UPDATE_SIGMA)
    tokens = inp.x.shape[1]

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        v = call(
            hidden_states=hidden,
            encoder_hidden_states=enc,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0][:, :tokens]
        loss = torch.mean((v - target) ** 2)
        if stage != "forward":
            loss.backward()
        if stage == "step":
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
        return float(loss.detach())

    return run


def torch_compiled(model: Any) -> Any:
    import torch  # noqa: PLC0415

    return torch.compile(model, dynamic=False)


# --------------------------------------------------------------------------------------------------------
# Timing


def stats(times: Sequence[float]) -> dict[str, Any]:
    return dict(
        median=statistics.median(times), min=min(times), max=max(times), all=[float(t) for t in times]
    )


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, Any]]:
    """Runs every fn once per repetition, in turn (JAX, then torch), ``reps`` times; stats per name."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_once(fn)[0])
    return {name: stats(t) for name, t in times.items()}


def ratios(timings: dict[str, dict[str, Any]]) -> dict[str, float]:
    jax_s = timings["jax"]["median"]
    return {f"{name}/jax": t["median"] / jax_s for name, t in timings.items() if name != "jax"}


def warm_torch_compile(
    fn: Callable[[], Any], what: str, errors: dict[str, str]
) -> tuple[Callable[[], Any] | None, float | None]:
    """Calls a torch.compile'd fn twice; (fn, compile seconds = first call - second call), or (None, None)
    with the reason in ``errors`` when compiling fails."""
    try:
        first, _ = time_once(fn)
        second, _ = time_once(fn)
    except Exception as err:  # noqa: BLE001 - any failure of torch.compile: report it and go on
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        errors[what] = reason
        print(f"  torch.compile failed for the {what}; continuing without it ({reason})")
        traceback.print_exc(limit=3, file=sys.stdout)
        return None, None
    return fn, max(first - second, 0.0)


def print_timings(title: str, timings: dict[str, dict[str, Any]], compile_s: dict[str, float]) -> None:
    print(f"  {title} (seconds over the timed repetitions):")
    for name, t in timings.items():
        print(f"    {name:14s} median {t['median']:9.4f}  min {t['min']:9.4f}  max {t['max']:9.4f}")
    for name, r in ratios(timings).items():
        print(f"    ratio {name:18s} {r:6.2f}x")
    for name, s in compile_s.items():
        print(f"    compile/warm-up {name:28s} {s:8.2f} s")


# --------------------------------------------------------------------------------------------------------
# FLOPs


def hand_flops(args: argparse.Namespace, w: Workload) -> dict[str, float]:
    """FLOPs of one forward from the config: {'linear', 'attention', 'total'} (see the module docstring)."""
    b, c, h, d = w.batch, args.heads * args.head_dim, args.heads, args.head_dim
    f = int(c * 3.0)  # mlp hidden
    li, lt, seq = w.image_tokens, w.text_tokens, w.seq
    mac = 0.0
    mac += b * (args.time_channels * c + c * c)  # timestep embedder
    mac += b * c * (6 * c + 6 * c + 3 * c)  # double img, double txt, single modulations (3 * sets * C)
    mac += b * li * args.in_channels * c  # x_embedder
    mac += b * lt * args.joint_dim * c  # context_embedder
    per_token_block = 4 * c * c + c * 2 * f + f * c  # q, k, v, out + SwiGLU MLP (== single block's)
    mac += args.double * b * (li + lt) * per_token_block
    mac += args.single * b * seq * (c * (3 * c + 2 * f) + (c + f) * c)
    mac += b * c * 2 * c  # norm_out modulation
    mac += b * li * c * args.in_channels  # proj_out
    linear = 2.0 * mac
    attention = (args.double + args.single) * 4.0 * b * h * seq * seq * d
    return dict(linear=linear, attention=attention, total=linear + attention)


def jaxpr_flops(jaxpr: Any) -> float:
    from sfgrpo import flops  # noqa: PLC0415

    total, unknown = flops.count(jaxpr)
    if unknown:
        print(f"  note: {unknown} while loop(s) of unknown trip count counted once")
    return total


def matmul_peak(reps: int = 5, n: int = 2048) -> dict[str, float]:
    """Median GFLOP/s of n x n @ n x n float32 matmuls, in JAX and in torch."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    jt = [time_once(_blocking(mm, a, b))[0] for _ in range(reps)]
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(ta, tb)
    tt = [time_once(lambda: torch.matmul(ta, tb))[0] for _ in range(reps)]
    return dict(
        jax_gflops=flops / statistics.median(jt) / 1e9,
        torch_gflops=flops / statistics.median(tt) / 1e9,
        size=n,
    )


# --------------------------------------------------------------------------------------------------------
# Sections


def run_parity(args: argparse.Namespace, theirs: Any, ours: Any, inp: Inputs) -> dict[str, Any]:
    fwd, state = jax_forward(ours)
    hidden = np.concatenate([inp.x, inp.ref], axis=1)
    a = np.asarray(fwd(state, hidden, inp.enc, np.float32(0.7), inp.img_ids, inp.txt_ids))
    b = torch_forward(theirs, inp, 0.7)().numpy()
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    rel = diff / max(scale, 1e-30)
    ok = bool(rel <= args.parity_tol)
    print(
        f"parity: max |ours - diffusers| = {diff:.3e}, output max |.| = {scale:.3e}, "
        f"relative {rel:.2e} (tolerance {args.parity_tol:.0e}): {'OK' if ok else 'FAILED'}"
    )
    return dict(max_abs_diff=diff, output_scale=scale, relative=rel, tolerance=args.parity_tol, ok=ok)


def run_rollout(
    args: argparse.Namespace, theirs: Any, ours: Any, inp: Inputs, errors: dict[str, str]
) -> dict[str, Any]:
    import jax  # noqa: PLC0415

    print(f"rollout: {SDE_STEPS} SDE steps (Euler-Maruyama, eta {SDE_ETA}), target tokens only updated")
    fn, state = jax_rollout(ours, inp.x.shape[1])
    jargs = (state, inp.x, inp.ref, inp.enc, inp.noise, inp.img_ids, inp.txt_ids)
    compiled, compile_s, jaxpr = jax_compile(fn, *jargs)
    compile_times = dict(compile_s)
    fns = {"jax": _blocking(compiled, *jargs)}
    compile_times["jax first call"], ours_x = time_once(fns["jax"])
    fns["torch_eager"] = torch_rollout(theirs, inp)
    compile_times["torch_eager first call"], theirs_x = time_once(fns["torch_eager"])
    if args.torch_compile:
        run, s = warm_torch_compile(torch_rollout(torch_compiled(theirs), inp), "rollout", errors)
        if run is not None:
            fns["torch_compile"] = run
            compile_times["torch.compile (first - second call)"] = s
    diff = float(np.abs(np.asarray(jax.device_get(ours_x)) - theirs_x.numpy()).max())
    print(f"  final latents: max |jax - torch eager| = {diff:.3e}")
    timings = alternate(fns, args.reps)
    print_timings("rollout", timings, compile_times)
    return dict(
        steps=SDE_STEPS,
        max_abs_diff=diff,
        compile_s=compile_times,
        times=timings,
        ratios=ratios(timings),
        flops_jaxpr=jaxpr_flops(jaxpr),
    )


def run_update(
    args: argparse.Namespace, theirs: Any, ours: Any, inp: Inputs, errors: dict[str, str]
) -> dict[str, Any]:
    import jax  # noqa: PLC0415

    print(
        f"update: LoRA rank {LORA_RANK} on attention + MLP projections, forward + backward + AdamW, "
        f"remat={args.remat}"
    )
    tokens = inp.x.shape[1]
    stages, (params, opt_state, rest) = jax_update(ours, tokens)
    hidden = np.concatenate([inp.x, inp.ref], axis=1)
    data = (hidden, inp.enc, inp.img_ids, inp.txt_ids, inp.target)
    compiled, compile_s, jaxpr = jax_compile(stages["step"], params, opt_state, rest, *data)
    compile_times = dict(compile_s)
    box = {"params": params, "opt_state": opt_state, "loss": None}

    def jax_step() -> None:
        box["params"], box["opt_state"], loss = compiled(box["params"], box["opt_state"], rest, *data)
        box["loss"] = jax.block_until_ready(loss)

    compile_times["jax first call"], _ = time_once(jax_step)
    jax_loss = float(box["loss"])
    lora_model = torch_lora(theirs)
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    ours_trainable = sum(int(x.size) for x in jax.tree.leaves(params))
    fns: dict[str, Callable[[], Any]] = {
        "jax": jax_step,
        "torch_eager": torch_update(lora_model, lora_model, inp),
    }
    compile_times["torch_eager first call"], torch_loss = time_once(fns["torch_eager"])
    print(
        f"  LoRA parameters: jax {ours_trainable}, peft {trainable}; first-step loss jax {jax_loss:.6f}, "
        f"torch {torch_loss:.6f}"
    )
    if args.torch_compile:
        compiled_model = torch_lora(theirs)
        run, s = warm_torch_compile(
            torch_update(compiled_model, torch_compiled(compiled_model), inp), "update", errors
        )
        if run is not None:
            fns["torch_compile"] = run
            compile_times["torch.compile (first - second call)"] = s
    timings = alternate(fns, args.reps)
    print_timings("update", timings, compile_times)

    # Where the time goes: the forward alone (with LoRA; in torch, building what the backward needs), the
    # forward + backward, and the whole step (+ clip and AdamW), timed again together (alternating, medians)
    # so that the differences are not skewed by a change of the machine's load since the timings above.
    parts: dict[str, Callable[[], Any]] = {}
    for stage in ("forward", "forward+backward"):
        c, _, _ = jax_compile(stages[stage], box["params"], rest, *data)
        parts[f"jax {stage}"] = _blocking(c, box["params"], rest, *data)
        parts[f"torch_eager {stage}"] = torch_update(lora_model, lora_model, inp, stage)
    parts["jax step"], parts["torch_eager step"] = fns["jax"], fns["torch_eager"]
    for name, fn in parts.items():
        if "step" not in name:
            fn()
    part_times = alternate(parts, args.reps)
    breakdown = {}
    print("  where the update's time goes (medians of a second, separate timing; seconds):")
    for name in ("jax", "torch_eager"):
        fwd = part_times[f"{name} forward"]["median"]
        fb = part_times[f"{name} forward+backward"]["median"]
        total = part_times[f"{name} step"]["median"]
        breakdown[name] = dict(
            forward=fwd, backward=fb - fwd, optimizer=total - fb, step=total, step_over_forward=total / fwd
        )
        print(
            f"    {name:12s} forward {fwd:8.4f}, backward {fb - fwd:8.4f}, clip+AdamW {total - fb:8.4f}; "
            f"step {total:8.4f} (backward / forward {(fb - fwd) / fwd:.2f}, step / forward {total / fwd:.2f})"
        )
    return dict(
        remat=args.remat,
        lora_params=dict(jax=ours_trainable, torch=trainable),
        first_loss=dict(jax=jax_loss, torch=torch_loss),
        breakdown=breakdown,
        compile_s=compile_times,
        times=timings,
        ratios=ratios(timings),
        flops_jaxpr=jaxpr_flops(jaxpr),
    )


def kv_models(theirs: Any, ours: Any) -> tuple[Any, Any]:
    """Copies of both models in ``Flux2KleinKVPipeline``'s mode: diffusers' with its KV attention
    processors, ours with ``config.reference_kv``."""
    from diffusers.models.transformers.transformer_flux2 import (  # noqa: PLC0415
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )
    from flax import nnx  # noqa: PLC0415

    theirs_kv = copy.deepcopy(theirs)
    for block in theirs_kv.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in theirs_kv.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    ours_kv = nnx.clone(ours)
    ours_kv.config = ours.config.replace(reference_kv=True)
    return theirs_kv, ours_kv


def run_kv(args: argparse.Namespace, theirs: Any, ours: Any, inp: Inputs) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415

    tokens = inp.x.shape[1]
    if inp.ref.shape[1] == 0:
        print("kv: skipped (--ref-tokens 0: no references to cache)")
        return dict(skipped="no reference tokens")
    print(f"kv: reference K/V caching (Flux2KleinKVPipeline), {inp.ref.shape[1]} reference tokens")
    from flax import nnx  # noqa: PLC0415

    theirs_kv, ours_kv = kv_models(theirs, ours)
    graphdef, kstate = nnx.split(ours_kv)

    @jax.jit
    def cached_forward(state: Any, x: Any, ref: Any, enc: Any, img_ids: Any, txt_ids: Any) -> Any:
        m = nnx.merge(graphdef, state)
        return m(
            x, enc, np.float32(0.7), img_ids[:tokens], txt_ids, None, m.reference_kv(ref, img_ids[tokens:])
        )

    a = np.asarray(cached_forward(kstate, inp.x, inp.ref, inp.enc, inp.img_ids, inp.txt_ids))
    with torch.no_grad():
        b = theirs_kv(
            hidden_states=torch.from_numpy(np.concatenate([inp.ref, inp.x], axis=1)),
            encoder_hidden_states=torch.from_numpy(inp.enc),
            timestep=torch.full((inp.x.shape[0],), 0.7),
            img_ids=torch.from_numpy(np.concatenate([inp.img_ids[tokens:], inp.img_ids[:tokens]])),
            txt_ids=torch.from_numpy(inp.txt_ids),
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=inp.ref.shape[1],
        )[0].numpy()
    diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    ok = diff / max(scale, 1e-30) <= args.parity_tol
    print(
        f"  parity with diffusers' extract step: max abs {diff:.3e} (output max {scale:.3e}): "
        f"{'OK' if ok else 'FAILED'}"
    )
    out: dict[str, Any] = dict(parity=dict(max_abs_diff=diff, output_scale=scale, ok=bool(ok)))
    if not ok:
        return out

    jargs = (inp.x, inp.ref, inp.enc, inp.noise, inp.img_ids, inp.txt_ids)
    fns: dict[str, Callable[[], Any]] = {}
    compile_times: dict[str, float] = {}
    for mode in ("once", "per_step", "joint"):
        fn, st = jax_rollout(ours if mode == "joint" else ours_kv, tokens, mode)
        compiled, cs, _ = jax_compile(fn, st, *jargs)
        compile_times[f"jax {mode}"] = cs["jax compile"]
        fns["jax" if mode == "once" else f"jax_{mode}"] = _blocking(compiled, st, *jargs)
        time_once(fns["jax" if mode == "once" else f"jax_{mode}"])
    fns["torch_kv_eager"] = torch_kv_rollout(theirs_kv, inp)
    time_once(fns["torch_kv_eager"])
    rollout = alternate(fns, args.reps)
    print_timings(
        f"rollout, {SDE_STEPS} SDE steps ('jax' computes the references once)", rollout, compile_times
    )

    hidden = np.concatenate([inp.x, inp.ref], axis=1)
    data = (hidden, inp.enc, inp.img_ids, inp.txt_ids, inp.target)
    ufns: dict[str, Callable[[], Any]] = {}
    ucompile: dict[str, float] = {}
    losses = {}
    for mode in ("once", "per_step", "joint"):
        fn, (params, opt_state, rest) = jax_window_update(ours if mode == "joint" else ours_kv, tokens, mode)
        compiled, cs, _ = jax_compile(fn, params, opt_state, rest, *data)
        ucompile[f"jax {mode}"] = cs["jax compile"]
        name = "jax" if mode == "once" else f"jax_{mode}"
        ufns[name] = _blocking(compiled, params, opt_state, rest, *data)
        losses[mode] = float(time_once(ufns[name])[1][2])
    print(f"  update losses (same LoRA init): {', '.join(f'{k} {v:.6f}' for k, v in losses.items())}")
    update = alternate(ufns, args.reps)
    print_timings(
        f"update over a window of {len(KV_UPDATE_SIGMAS)} steps (a gradient per step), LoRA + AdamW",
        update,
        ucompile,
    )
    saving = {
        "rollout per_step/once": rollout["jax_per_step"]["median"] / rollout["jax"]["median"],
        "rollout joint/once": rollout["jax_joint"]["median"] / rollout["jax"]["median"],
        "update per_step/once": update["jax_per_step"]["median"] / update["jax"]["median"],
        "update joint/once": update["jax_joint"]["median"] / update["jax"]["median"],
    }
    for k, v in saving.items():
        print(f"  saving {k:24s} {v:5.2f}x")
    return out | dict(
        rollout=dict(times=rollout, ratios=ratios(rollout), compile_s=compile_times),
        update=dict(times=update, ratios=ratios(update), compile_s=ucompile, losses=losses),
        saving=saving,
    )


def run_unroll(args: argparse.Namespace, ours: Any, inp: Inputs) -> dict[str, Any]:
    """The port with its block loops rolled (``scan_unroll`` 1) against fully unrolled, alternating in one
    run: the rollout and the LoRA update, compile times apart."""
    from flax import nnx  # noqa: PLC0415

    depth = max(args.double, args.single)
    variants = {"rolled": 1, "unrolled": depth}
    print(f"unroll: block loops rolled (scan_unroll 1) against unrolled (scan_unroll {depth})")
    tokens = inp.x.shape[1]
    models = {}
    for name, unroll in variants.items():
        models[name] = nnx.clone(ours)
        models[name].config = ours.config.replace(scan_unroll=unroll)
    hidden = np.concatenate([inp.x, inp.ref], axis=1)
    data = (hidden, inp.enc, inp.img_ids, inp.txt_ids, inp.target)
    rargs = (inp.x, inp.ref, inp.enc, inp.noise, inp.img_ids, inp.txt_ids)
    rollout_fns: dict[str, Callable[[], Any]] = {}
    update_fns: dict[str, Callable[[], Any]] = {}
    compile_times: dict[str, float] = {}
    outputs, losses = {}, {}
    for name, model in models.items():
        fn, st = jax_rollout(model, tokens)
        compiled, cs, _ = jax_compile(fn, st, *rargs)
        compile_times[f"rollout {name}"] = cs["jax compile"]
        rollout_fns[name] = _blocking(compiled, st, *rargs)
        outputs[name] = np.asarray(time_once(rollout_fns[name])[1])
        stages, (params, opt_state, rest) = jax_update(model, tokens)
        compiled, cs, _ = jax_compile(stages["step"], params, opt_state, rest, *data)
        compile_times[f"update {name}"] = cs["jax compile"]
        # The same params every call: each repetition is the same first step.
        update_fns[name] = _blocking(compiled, params, opt_state, rest, *data)
        losses[name] = float(time_once(update_fns[name])[1][2])
    diff = float(np.abs(outputs["rolled"] - outputs["unrolled"]).max())
    print(f"  rollout max |rolled - unrolled| {diff:.3e}; update losses {losses}")
    rollout = alternate(rollout_fns, args.reps)
    update = alternate(update_fns, args.reps)
    for title, timings in (("rollout", rollout), ("update", update)):
        print(f"  {title} (seconds over the timed repetitions):")
        for name, t in timings.items():
            print(f"    {name:10s} median {t['median']:9.4f}  min {t['min']:9.4f}  max {t['max']:9.4f}")
    speedup = {
        "rollout rolled/unrolled": rollout["rolled"]["median"] / rollout["unrolled"]["median"],
        "update rolled/unrolled": update["rolled"]["median"] / update["unrolled"]["median"],
    }
    for k, v in speedup.items():
        print(f"  {k:26s} {v:5.3f}x")
    for k, v in compile_times.items():
        print(f"  compile {k:18s} {v:7.2f} s")
    return dict(
        scan_unroll=variants,
        rollout=dict(times=rollout, max_abs_diff=diff),
        update=dict(times=update, losses=losses),
        speedup=speedup,
        compile_s=compile_times,
    )


def run_mfu(
    args: argparse.Namespace,
    theirs: Any,
    ours: Any,
    inp: Inputs,
    w: Workload,
    results: dict[str, Any],
    errors: dict[str, str],
) -> dict[str, Any]:
    print("mfu: matmul peak, FLOPs of a forward, achieved throughput")
    peak = matmul_peak(n=args.peak_size)
    print(
        f"  float32 matmul peak ({peak['size']}^3 matmuls): jax {peak['jax_gflops']:.1f} GFLOP/s, "
        f"torch {peak['torch_gflops']:.1f} GFLOP/s"
    )
    hand = hand_flops(args, w)
    fwd, state = jax_forward(ours)
    hidden = np.concatenate([inp.x, inp.ref], axis=1)
    jargs = (state, hidden, inp.enc, np.float32(0.7), inp.img_ids, inp.txt_ids)
    compiled, compile_s, jaxpr = jax_compile(fwd, *jargs)
    counted = jaxpr_flops(jaxpr)
    print(
        f"  forward FLOPs by hand {hand['total'] / 1e9:.3f} G (linear {hand['linear'] / 1e9:.3f} G, "
        f"attention {hand['attention'] / 1e9:.3f} G); from the jaxpr {counted / 1e9:.3f} G; "
        f"jaxpr / hand = {counted / hand['total']:.4f}"
    )
    fns = {"jax": _blocking(compiled, *jargs)}
    time_once(fns["jax"])
    fns["torch_eager"] = torch_forward(theirs, inp, 0.7)
    time_once(fns["torch_eager"])
    if args.torch_compile and "rollout" not in errors:
        run, _ = warm_torch_compile(torch_forward(torch_compiled(theirs), inp, 0.7), "forward", errors)
        if run is not None:
            fns["torch_compile"] = run
    timings = alternate(fns, args.reps)
    print_timings("single forward", timings, compile_s)
    peak_gflops = peak["jax_gflops"]

    def achieved(flops: float, seconds: float) -> dict[str, float]:
        gflops = flops / seconds / 1e9
        return dict(seconds=seconds, gflops=gflops, pct_of_peak=100.0 * gflops / peak_gflops)

    out: dict[str, Any] = dict(
        matmul_peak=peak,
        forward_flops_hand=hand,
        forward_flops_jaxpr=counted,
        jaxpr_over_hand=counted / hand["total"],
        forward_compile_s=compile_s,
        forward_times=timings,
        forward_ratios=ratios(timings),
        forward={k: achieved(counted, t["median"]) for k, t in timings.items()},
    )
    print("  achieved (median time; FLOPs from the jaxpr; % of the jax matmul peak):")
    for k, a in out["forward"].items():
        print(f"    forward  {k:14s} {a['gflops']:8.1f} GFLOP/s  {a['pct_of_peak']:5.1f} %")
    if "rollout" in results:
        r = results["rollout"]
        out["rollout"] = {k: achieved(r["flops_jaxpr"], t["median"]) for k, t in r["times"].items()}
        out["rollout_flops_over_forward"] = r["flops_jaxpr"] / counted
        for k, a in out["rollout"].items():
            print(f"    rollout  {k:14s} {a['gflops']:8.1f} GFLOP/s  {a['pct_of_peak']:5.1f} %")
    if "update" in results:
        u = results["update"]
        out["update"] = {k: achieved(u["flops_jaxpr"], t["median"]) for k, t in u["times"].items()}
        out["update_forwards_of_work"] = u["flops_jaxpr"] / counted
        out["update_forwards_of_time"] = {
            k: t["median"] / timings[k]["median"] for k, t in u["times"].items() if k in timings
        }
        for k, a in out["update"].items():
            print(f"    update   {k:14s} {a['gflops']:8.1f} GFLOP/s  {a['pct_of_peak']:5.1f} %")
        of_time = ", ".join(f"{k} {v:.2f}" for k, v in out["update_forwards_of_time"].items())
        print(
            f"  update (remat={args.remat}) = {out['update_forwards_of_work']:.2f} forwards of work "
            f"(jaxpr FLOPs); in forwards of time (update / single forward): {of_time}"
        )
    return out


def run_scaling(args: argparse.Namespace, theirs: Any, ours: Any, w: Workload) -> dict[str, Any]:
    print(f"scaling: a single forward at target sizes {args.scaling_sizes} (reference tokens equal)")
    fwd, state = jax_forward(ours)
    rows = []
    times: dict[str, list[float]] = {"jax": [], "torch_eager": []}
    for n in args.scaling_sizes:
        wn = Workload(w.batch, n, n if w.ref_tokens else 0, w.text_tokens)
        inp = make_inputs(args, wn, args.seed + n)
        hidden = np.concatenate([inp.x, inp.ref], axis=1)
        jargs = (state, hidden, inp.enc, np.float32(0.7), inp.img_ids, inp.txt_ids)
        compiled, compile_s, _ = jax_compile(fwd, *jargs)
        fns = {"jax": _blocking(compiled, *jargs), "torch_eager": torch_forward(theirs, inp, 0.7)}
        for fn in fns.values():
            fn()
        t = alternate(fns, args.reps)
        hand = hand_flops(args, wn)
        rows.append(dict(tokens=n, ref_tokens=wn.ref_tokens, flops=hand, compile_s=compile_s, times=t))
        for k in times:
            times[k].append(t[k]["median"])
    design = np.array([[r["flops"]["linear"], r["flops"]["attention"]] for r in rows]) / 1e9  # GFLOP
    fits = {}
    for k, measured in times.items():
        coef, *_ = np.linalg.lstsq(design, np.array(measured), rcond=None)
        predicted = design @ coef
        coef = coef / 1e9  # seconds per FLOP
        fits[k] = dict(
            a_s_per_linear_flop=float(coef[0]),
            b_s_per_attention_flop=float(coef[1]),
            linear_gflops=float(1e-9 / coef[0]) if coef[0] > 0 else None,
            attention_gflops=float(1e-9 / coef[1]) if coef[1] > 0 else None,
            measured_s=[float(m) for m in measured],
            predicted_s=[float(p) for p in predicted],
        )
    print("  time = a * linear_flops + b * attention_flops (least squares over the sizes):")
    for k, f in fits.items():
        lin = f"{f['linear_gflops']:.1f}" if f["linear_gflops"] else "n/a"
        att = f"{f['attention_gflops']:.1f}" if f["attention_gflops"] else "n/a"
        print(f"    {k}: linear at {lin} GFLOP/s, attention at {att} GFLOP/s (1/a, 1/b)")
        for r, m, p in zip(rows, f["measured_s"], f["predicted_s"], strict=True):
            share = r["flops"]["attention"] / r["flops"]["total"]
            print(
                f"      tokens {r['tokens']:6d} (attention {100 * share:4.1f} % of FLOPs): "
                f"measured {m:9.4f} s, predicted {p:9.4f} s"
            )
    return dict(sizes=args.scaling_sizes, rows=rows, fit=fits)


# --------------------------------------------------------------------------------------------------------
# Main


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415

    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cores=usable_cores(),
        torch_threads=torch.get_num_threads(),
        jax_devices=[str(d) for d in jax.devices()],
        versions=dict(jax=jax.__version__, torch=torch.__version__, numpy=np.__version__),
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (1 when parity fails)."""
    args = parse_args(argv)
    import diffusers  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cores = usable_cores()
    torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()
    w = Workload(args.batch, args.tokens, args.ref_tokens, args.text_tokens)
    info = machine_info()
    info["versions"].update(diffusers=diffusers.__version__, peft=peft.__version__)
    info["load_before"] = list(load_before)
    print(
        f"machine: {info['processor']}, {cores} usable cores, torch threads {torch.get_num_threads()}, "
        f"jax devices {info['jax_devices'][:1]}{'...' if len(info['jax_devices']) > 1 else ''}; "
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    if load_before[0] > cores:
        print(
            f"warning: the load average ({load_before[0]:.2f}) exceeds the {cores} cores: other processes "
            "share the CPU and every figure is slowed, torch's OpenMP threads most (try --torch-threads 1)"
        )
    print(
        f"versions: jax {jax.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}"
    )
    print(
        f"workload: batch {w.batch}, {w.tokens} target + {w.ref_tokens} reference image tokens + "
        f"{w.text_tokens} text tokens (L = {w.seq}); "
        f"{args.double} double + {args.single} single blocks, {args.heads} heads x {args.head_dim}; "
        f"attention={args.attention}, remat={args.remat}, scan_unroll {args.scan_unroll}, "
        f"reps {args.reps}, torch.compile {'on' if args.torch_compile else 'off'}"
    )
    report: dict[str, Any] = dict(
        args={k: v for k, v in vars(args).items()},
        workload=dataclasses.asdict(w) | dict(seq=w.seq),
        model=diffusers_config(args),
        machine=info,
        errors={},
    )
    errors: dict[str, str] = report["errors"]

    def finish(status: int) -> int:
        load_after = os.getloadavg()
        info["load_after"] = list(load_after)
        print(f"load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(_jsonable(report), f, indent=1)
            print(f"wrote {args.json_path}")
        return status

    with tempfile.TemporaryDirectory(prefix="sfgrpo-vs-diffusers-") as folder:
        try:
            theirs, ours = build_models(args, folder)
        except BenchmarkError as err:
            print(f"error: {err}", file=sys.stderr)
            return finish(2)
    inp = make_inputs(args, w, args.seed)
    try:
        report["parity"] = run_parity(args, theirs, ours, inp)
    except Exception as err:  # noqa: BLE001 - e.g. an attention implementation this backend lacks
        print(f"error: the forward failed: {type(err).__name__}: {err}", file=sys.stderr)
        return finish(2)
    if not report["parity"]["ok"]:
        print(
            f"error: parity failed (relative difference {report['parity']['relative']:.2e} > "
            f"{args.parity_tol:.0e}); timings of different computations would mean nothing",
            file=sys.stderr,
        )
        return finish(1)
    if "rollout" in args.sections:
        report["rollout"] = run_rollout(args, theirs, ours, inp, errors)
    if "update" in args.sections:
        report["update"] = run_update(args, theirs, ours, inp, errors)
    if "mfu" in args.sections:
        report["mfu"] = run_mfu(args, theirs, ours, inp, w, report, errors)
    if "scaling" in args.sections:
        report["scaling"] = run_scaling(args, theirs, ours, w)
    if "unroll" in args.sections:
        report["unroll"] = run_unroll(args, ours, inp)
    if "kv" in args.sections:
        report["kv"] = run_kv(args, theirs, ours, inp)
        if not report["kv"].get("parity", {}).get("ok", True):
            return finish(1)
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
