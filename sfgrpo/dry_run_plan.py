"""The dry run's plan as text: the slice, the batch, the model, the checks, the compiled programs' memory,
compile times and FLOPs (see ``sfgrpo.dry_run``)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from sfgrpo import aot, builders


def _bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e6:.2f} MFLOP"


def _dtypes(tree: Any) -> str:
    return "/".join(sorted({str(x.dtype) for x in jax.tree.leaves(tree)})) or "-"


def _window(s: ml_collections.ConfigDict, size: int) -> str:
    """How the trained steps are chosen; a random window with one possible start is a fixed one."""
    if s.window == "random" and s.window_hi - s.window_lo == 1:
        return f"steps {s.window_lo}-{s.window_lo + size - 1}, fixed"
    if s.window == "random":
        return f"random, starting in [{s.window_lo}, {s.window_hi})"
    return s.window


def _guidance(model: str, cfg_scale: float) -> str:
    """The sampler's classifier-free guidance, as the model's pipeline does it (``rl.step.velocity_fn``)."""
    if cfg_scale == 1.0:
        return "no cfg"
    if model == "omnigen2":
        return f"text guidance {cfg_scale:g} (2 forwards per step; the unconditional one without the source)"
    return f"cfg {cfg_scale:g} (2 forwards per step)"


def render(
    config: ml_collections.ConfigDict,
    config_path: str,
    run: aot.AbstractRun,
    reports: list[aot.CompiledReport],
    checks: list[Any],
    *,
    target: Any,
    target_source: str,
    processes: tuple[int, str],
    devices: tuple[int, str],
    klein: Any,
    seconds: float,
) -> str:
    """The plan, one fact a line, for the reader who is about to book the pod."""
    m, s, rl = config.model, config.sampler, config.rl
    settings = run.programs.settings
    n_proc, proc_source = processes
    n_dev, dev_source = devices
    sizes = dict(run.mesh.shape)
    shards = sizes["data"] * sizes["fsdp"]
    global_batch = rl.batch_size * n_proc
    micro_count = global_batch // settings.micro_batch
    steps = builders.optimizer_steps_per_iteration(rl, n_proc)
    gh, gw = run.programs.grid
    text_len = next(v for k, v in run.batch.items() if k.startswith("text_")).shape[1]
    tokens = gh * gw
    memory = target.memory_bytes
    lines = [
        f"sfgrpo dry run of {config_path}: a plan from shapes on {_plural(n_dev, 'simulated CPU device')}; "
        "nothing was "
        "run, no weights were read, nothing was written",
        f"target        {target.devices} x {target.device} ({_plural(target.processes, 'process')} x "
        f"{target.devices_per_process})"
        + (f", {memory / 2**30:.1f} GiB each" if memory else "")
        + (f"; launch: {target.launch}" if target.launch else "")
        + f"  [{target_source}]",
        f"processes     {n_proc}  [{proc_source}]; devices {n_dev}  [{dev_source}]",
        "mesh          "
        + " x ".join(f"{k}={v}" for k, v in sizes.items())
        + f" = {_plural(n_dev, 'device')}",
        f"batch         global {global_batch} = {rl.batch_size} per process x {_plural(n_proc, 'process')}; "
        f"{global_batch // rl.group_size} groups of {rl.group_size}; {global_batch / shards:g} per device "
        f"(split over data x fsdp = {shards})",
        f"micro-batches {settings.micro_batch} samples ({settings.micro_batch / shards:g} per device), "
        f"{micro_count} per epoch, {settings.grad_accum} per optimizer step: "
        f"{_plural(steps, 'optimizer step')} per iteration ({_plural(settings.inner_epochs, 'epoch')})"
        + ("; on-policy: every ratio is 1, so the clip range never acts" if steps == 1 else ""),
        f"tokens        {tokens} target + {tokens} reference + {text_len} text = {2 * tokens + text_len} per "
        f"sequence ({config.data.resolution}x{config.data.resolution} px, {gh}x{gw} grid)",
        f"sampler       {s.num_steps} steps ({s.kind}, eta {s.eta}), {settings.window} trained "
        f"({_window(s, settings.window)}), {_guidance(m.name, s.cfg_scale)}",
    ]
    if m.name in ("klein", "omnigen2"):
        name, default = {
            "klein": ("FLUX.2-klein", "built-in klein-4B"),
            "omnigen2": ("OmniGen2", "built-in OmniGen2"),
        }[m.name]
        arch = klein.source if klein is not None else f"{default} (the folder is not here)"
        attention = m.attention + (
            f" (traced as {run.attention}: XLA:CPU has no {m.attention} kernel)"
            if m.attention != run.attention
            else ""
        )
        lines.append(
            f"model         {name} from {arch}; {m.dtype}, remat {m.remat}, "
            f"scan_unroll {m.scan_unroll}, attention {attention}"
        )
    else:
        lines.append(f"model         tiny FLUX.2-shaped policy; {m.dtype}")
    what = f"LoRA rank {m.lora_rank}" if m.lora_rank > 0 else "full fine-tuning"
    lines.append(
        f"parameters    trainable {_count(aot.param_count(run.params))} ({what}, {_dtypes(run.params)}, "
        f"{_gib(_bytes(run.params))}; Adam state {_gib(_bytes(run.opt_state))}); frozen "
        f"{_count(aot.param_count(run.frozen))} ({_dtypes(run.frozen)}, {_gib(_bytes(run.frozen))})"
    )
    lines.append("checks")
    lines += [f"  {c.what:13s} {c.status}: {c.detail}" for c in checks]
    lines.append(f"compiled for XLA:CPU, memory per device (XLA's memory_analysis) against {target.device}")
    lines.append(
        f"  {'program':9s} {'lower':>8s} {'compile':>8s} {'arguments':>11s} {'temporaries':>12s} "
        f"{'outputs':>11s} {'total':>11s}" + ("  of one device" if memory else "")
    )
    for r in reports:
        share = f"  {r.peak_bytes / memory:6.1%}" if memory else ""
        lines.append(
            f"  {r.name:9s} {r.lower_s:7.1f}s {r.compile_s:7.1f}s {_gib(r.argument_bytes):>11s} "
            f"{_gib(r.temp_bytes):>12s} {_gib((r.output_bytes or 0) - (r.alias_bytes or 0)):>11s} "
            f"{_gib(r.peak_bytes):>11s}{share}"
        )
    lines.append(
        "  total = arguments + temporaries + outputs not aliased to an argument (the update's arguments "
        "hold the rollout's trajectory)"
    )
    if m.dtype == "bfloat16":
        lines.append(
            "  note: XLA:CPU has no bf16 matmuls; it keeps f32 copies of bf16 operands (about 2x the "
            "weights in temporaries), so these are upper bounds for a TPU or GPU"
        )
    lines.append(
        "FLOPs per iteration (matmuls and convolutions from the jaxpr, every scan body x its length)"
    )
    total = 0.0
    for r in reports:
        total += r.flops
        xla = f"; XLA's cost_analysis, loop bodies once: {_flops(r.xla_flops)}/device" if r.xla_flops else ""
        loops = f"; {r.unknown_loops} while loops counted once" if r.unknown_loops else ""
        lines.append(f"  {r.name:9s} {_flops(r.flops):>12s}  ({_flops(r.flops / n_dev)}/device{xla}{loops})")
    lines.append(f"  {'total':9s} {_flops(total):>12s}  ({_flops(total / n_dev)}/device)")
    lines.append(f"planned in {seconds:.1f} s")
    return "\n".join(lines)
