"""``--dry_run``: the plan of a run, on any machine, for the machines its config is written for.

The run is built on as many simulated CPU devices as its mesh asks for, from shapes alone (no weights
read or allocated); its rollout and update are compiled ahead of time (``sfgrpo.aot``); and what can be
checked without the pod is checked: the config, the model folder, the dataset, the prompt cache and the
judge, each where it is reachable. The plan goes to stdout (and ``--plan_out``); nothing is written in the
workdir, and ``jax.distributed`` is not initialised: one process plans for the whole slice.

A config file says which machines it is written for in a module-level ``TARGET`` dict (configs/tpu_v5.py):
device, processes, devices_per_process, memory_bytes (one device's) and launch (the script that runs it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ml_collections

_MARKER = "SFGRPO_DRY_RUN_DEVICES"  # set in the re-executed process: its simulated device count
# Where a launcher says how many processes a job has (jax reads the same variables to initialise).
_PROCESS_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
JUDGE_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class Target:
    """The machines a config file is written for (its ``TARGET``); memory_bytes of one device."""

    device: str = "CPU"
    processes: int = 1
    devices_per_process: int = 1
    memory_bytes: float | None = None
    launch: str | None = None

    @property
    def devices(self) -> int:
        return self.processes * self.devices_per_process


def load_target(config_path: str) -> tuple[Target, str]:
    """The ``TARGET`` of ``--config``'s file (``path[:variant]``), and where it came from."""
    file = config_path.split(":", 1)[0]
    try:
        spec = importlib.util.spec_from_file_location("_sfgrpo_config_target", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        target = getattr(module, "TARGET", None)
    except Exception:  # noqa: BLE001 - the config itself loaded; a target is only a hint
        target = None
    if not isinstance(target, dict):
        return Target(), f"{file} names no TARGET: one process, one device"
    return Target(**target), f"TARGET of {file}"


def wrong_machine(config: ml_collections.ConfigDict, config_path: str) -> str | None:
    """None when this machine's devices can make the config's mesh; else one line: the mesh asked for,
    the devices and processes found, and what to do instead."""
    from sfgrpo import builders  # noqa: PLC0415 - jax after the runtime is initialised

    try:
        builders.mesh_sizes(config)
    except builders.MeshError:
        file = config_path.split(":", 1)[0]
        target, _ = load_target(config_path)
        found = builders.found_devices()
        if not target.launch:
            return (
                f"config.mesh asks for {builders.mesh_request(config)}, but {found}: set config.mesh to fit "
                "this machine, or plan the run here with --dry_run"
            )
        return (
            f"config.mesh asks for {builders.mesh_request(config, target.devices)} on the machines {file} is "
            f"written for ({_plural(target.processes, 'process')} x {target.devices_per_process} "
            f"{target.device}), but {found}: run it there with {target.launch}, or plan it here "
            "with --dry_run"
        )
    except builders.ConfigError as err:
        return str(err)
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def processes_for(flag: int | None, target: Target, target_source: str) -> tuple[int, str]:
    """(processes the plan is for, where that number came from): --num_processes, else the launch
    environment, else the config's target."""
    if flag is not None:
        return flag, "--num_processes"
    for name in _PROCESS_ENV:
        value = os.environ.get(name, "")
        n = len(value.split(",")) if name == "TPU_WORKER_HOSTNAMES" and value else value
        if str(n).isdigit() and int(n) >= 1:
            return int(n), f"${name} (the launch environment)"
    return target.processes, target_source


def devices_for(
    config: ml_collections.ConfigDict, processes: int, target: Target, flag: int | None
) -> tuple[int, str]:
    """(devices to simulate, why): --dry_run_devices, else the mesh's size when it has no -1 axis, else
    processes x the target's devices per process."""
    if flag is not None:
        return flag, "--dry_run_devices"
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if -1 not in sizes and all(isinstance(s, int) and s >= 1 for s in sizes):
        return sizes[0] * sizes[1] * sizes[2], "the config's mesh"
    return (
        processes * target.devices_per_process,
        f"{_plural(processes, 'process')} x {target.devices_per_process}",
    )


def use_simulated_devices(devices: int) -> None:
    """Gives this process ``devices`` simulated CPU devices. XLA reads the flag once, when its backend
    starts: before that, setting it here is enough; after (an embedding program started jax), the command
    is executed again with it set."""
    from jax._src import xla_bridge  # noqa: PLC0415 - the one way to ask whether the backend started

    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if os.environ.get(_MARKER) == str(devices):
        return
    if not xla_bridge.backends_are_initialized():
        import jax  # noqa: PLC0415

        os.environ["XLA_FLAGS"] = flags
        os.environ[_MARKER] = str(devices)
        jax.config.update("jax_platforms", "cpu")  # the plan compiles with XLA:CPU, even on a TPU host
        return
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", _MARKER: str(devices)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sfgrpo.main", *sys.argv[1:]], env)


# --- checks -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """One line of the plan's checks: ``status`` 'ok', 'unreachable' (not here; fine for a plan) or
    'problem' (reachable and wrong: the run would fail)."""

    what: str
    status: str
    detail: str


def check_model(config: ml_collections.ConfigDict) -> tuple[Check, Any]:
    """The model folder's layout and configs where it is reachable; (check, KleinConfigs, OmniGen2Configs
    or None)."""
    from sfgrpo import aot  # noqa: PLC0415
    from sfgrpo.models import klein, omnigen2_folder  # noqa: PLC0415

    m = config.model
    if m.name not in ("klein", "omnigen2"):
        return Check("model", "ok", "the tiny policy, built from the config (no weights)"), None
    folder = Path(m.folder).expanduser()
    builtin = "klein-4B" if m.name == "klein" else "the released OmniGen2"
    if not folder.exists():
        return Check("model folder", "unreachable", f"{folder} is not here; planned as {builtin}"), None
    try:
        if m.name == "klein":
            folder = klein.check_folder(folder)
            klein.check_consistency(folder, tuple(int(i) for i in m.text_layers))
            configs = aot.klein_configs(folder)
        else:
            folder = omnigen2_folder.check_folder(folder)
            omnigen2_folder.check_consistency(folder)
            configs = aot.omnigen2_configs(folder)
    except (OSError, ValueError) as err:
        return Check("model folder", "problem", str(err)), None
    t = configs.transformer
    if m.name == "klein":
        blocks = f"{t.num_layers} double + {t.num_single_layers} single blocks, width {t.inner_dim}"
    else:
        blocks = f"{t.num_layers} layers + 3 x {t.num_refiner_layers} refiner layers, width {t.hidden_size}"
    detail = f"{folder}: layout and configs fit ({blocks}); weight files' headers read, no weights"
    return Check("model folder", "ok", detail), configs


def check_data(config: ml_collections.ConfigDict, processes: int) -> Check:
    """The dataset's splits where reachable, and that one epoch holds at least one global batch."""
    from sfgrpo import builders  # noqa: PLC0415
    from sfgrpo.data import pipeline  # noqa: PLC0415

    d = config.data
    if d.source == "tfds" and not Path(d.tfds_dir).is_dir():
        return Check("dataset", "unreachable", f"{d.tfds_dir} is not here")
    try:
        sizes = {split: len(builders.data_source(config, split)) for split in ("train", "test")}
        pcfg = builders.pipeline_config(
            config, batch_size=config.rl.batch_size, group_size=config.rl.group_size, seed=config.seed
        )
        epoch = pipeline.steps_per_epoch(sizes["train"], pcfg, processes)
    except (OSError, ValueError) as err:
        return Check("dataset", "problem", str(err).splitlines()[0])
    where = "synthetic shapes" if d.source == "shapes" else d.tfds_dir
    return Check(
        "dataset",
        "ok",
        f"{where}: {sizes['train']} train, {sizes['test']} test examples; {epoch} steps/epoch",
    )


def check_prompt_cache(config: ml_collections.ConfigDict) -> Check | None:
    m = config.model
    if m.name not in ("klein", "omnigen2") or not m.prompt_cache:
        return None
    if Path(m.prompt_cache).expanduser().is_dir():
        return Check("prompt cache", "ok", f"{m.prompt_cache} exists (its fingerprint is checked at start)")
    return Check("prompt cache", "unreachable", f"{m.prompt_cache} is not here; the run builds it at start")


def check_judge(config: ml_collections.ConfigDict) -> Check:
    """A GET of the judge's endpoint with a short timeout: any HTTP answer means it is reachable."""
    r = config.reward
    if r.kind not in ("vlm", "server"):
        return Check("judge", "ok", f"reward.kind={r.kind!r}: in-process, nothing to reach")
    url = r.url.rstrip("/") + ("/models" if r.kind == "vlm" else "")
    try:
        with urllib.request.urlopen(url, timeout=JUDGE_TIMEOUT_S) as response:  # noqa: S310 - the config's URL
            return Check("judge", "ok", f"{url} answered HTTP {response.status}")
    except urllib.error.HTTPError as err:
        return Check("judge", "ok", f"{url} answered HTTP {err.code} (reachable)")
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return Check("judge", "unreachable", f"{url}: {reason} ({JUDGE_TIMEOUT_S:.0f} s timeout)")


# --- the plan -----------------------------------------------------------------------------------------


def run(
    config: ml_collections.ConfigDict,
    config_path: str,
    *,
    processes_flag: int | None,
    devices_flag: int | None,
    plan_out: str | None,
) -> int:
    """The dry run; returns the exit status (0: planned; 2: a bad config or a check found a problem,
    said in one line on stderr). May re-execute the process first (``use_simulated_devices``)."""
    if plan_out and not Path(plan_out).expanduser().absolute().parent.is_dir():
        print(f"sfgrpo: --plan_out={plan_out}: its folder does not exist", file=sys.stderr)
        return 2
    target, target_source = load_target(config_path)
    processes, processes_source = processes_for(processes_flag, target, target_source)
    devices, devices_source = devices_for(config, processes, target, devices_flag)
    if processes < 1 or devices < 1 or devices % processes:
        print(
            f"sfgrpo: --dry_run needs >= 1 process and devices a multiple of them; got {devices} devices "
            f"({devices_source}) for {processes} processes ({processes_source})",
            file=sys.stderr,
        )
        return 2
    use_simulated_devices(devices)

    import jax  # noqa: PLC0415 - after XLA_FLAGS is set

    from sfgrpo import aot, builders  # noqa: PLC0415

    start = time.perf_counter()
    if jax.device_count() != devices or jax.default_backend() != "cpu":
        print(
            f"sfgrpo: --dry_run wanted {devices} simulated CPU devices, got {jax.device_count()} "
            f"{jax.default_backend()} devices",
            file=sys.stderr,
        )
        return 2
    try:
        builders.validate(config, processes=processes)
        mesh = builders.make_mesh(config)
    except builders.ConfigError as err:
        print(f"sfgrpo: {err}", file=sys.stderr)
        return 2
    model_check, klein_configs = check_model(config)
    checks = [
        Check("config", "ok", f"builders.validate for {_plural(processes, 'process')} on {devices} devices"),
        model_check,
        check_data(config, processes),
        check_prompt_cache(config),
        check_judge(config),
    ]
    checks = [c for c in checks if c is not None]
    global_batch = config.rl.batch_size * processes
    abstract = aot.abstract_run(config, mesh, global_batch, klein_configs)
    reports = [aot.compile_program(abstract, name)[0] for name in ("rollout", "update")]
    from sfgrpo.dry_run_plan import render  # noqa: PLC0415

    text = render(
        config,
        config_path,
        abstract,
        reports,
        checks,
        target=target,
        target_source=target_source,
        processes=(processes, processes_source),
        devices=(devices, devices_source),
        klein=klein_configs,
        seconds=time.perf_counter() - start,
    )
    print(text, flush=True)
    if plan_out:
        try:
            Path(plan_out).expanduser().write_text(text + "\n")
        except OSError as err:
            print(f"sfgrpo: --plan_out={plan_out}: cannot write the plan ({err.strerror})", file=sys.stderr)
            return 2
    problems = [c for c in checks if c.status == "problem"]
    if problems:
        print(
            "sfgrpo: dry run found problems: " + "; ".join(f"{c.what}: {c.detail}" for c in problems),
            file=sys.stderr,
        )
        return 2
    return 0
