"""The trained model of a run: a workdir's config, its base model and one checkpoint's GRPO parameters.

Shared by ``sfgrpo.export`` and ``sfgrpo.edit --workdir``. The base is what GRPO started from: for a
FLUX.2-klein or OmniGen2 run, the model folder ``config.model.folder`` (or the folder passed as ``base``);
for the demo's tiny model, the warm start cached in ``workdir/warmstart``. A folder run records its base's
fingerprint (``weights.folder_fingerprint``) in ``workdir/base_model.json`` when it starts; loading the run
with a base whose fingerprint differs is refused, since the adapters were trained on other weights, and so
is resuming the run on it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from sfgrpo import builders, checkpoint, runtime, warmstart
from sfgrpo.models import weights
from sfgrpo.models.policy import EditPolicy, OmniGen2EditPolicy
from sfgrpo.rl.step import compute_copy

_log = logging.getLogger(__name__)

BASE_FILE = "base_model.json"
CONFIG_FILE = "config.json"


class TrainedRunError(ValueError):
    """A workdir whose trained model cannot be loaded as asked; the message names the input and why."""


@dataclasses.dataclass
class BaseModel:
    """What a run's GRPO started from. kind: 'folder' (a FLUX.2-klein or OmniGen2 model folder) or 'warmstart'
    (the tiny model's cached warm start). folder and fingerprint are the folder's, None for 'warmstart'."""

    kind: str
    folder: Path | None = None
    fingerprint: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON for export metadata."""
        if self.kind == "folder":
            return {
                "kind": "folder",
                "name": self.folder.name,
                "folder": str(self.folder),
                "sha256": self.fingerprint,
            }
        return {"kind": "warmstart"}


@dataclasses.dataclass
class TrainedRun:
    """A loaded run. ``policy``: the base with the checkpoint's parameters (LoRA adapters attached, not
    merged, or the trained weights in the model's dtype); text encoder and autoencoder are the demo's, and
    None for klein (they are the base folder's, untrained)."""

    workdir: Path
    config: ml_collections.ConfigDict
    step: int
    policy: EditPolicy | OmniGen2EditPolicy
    base: BaseModel

    @property
    def lora(self) -> bool:
        return int(self.config.model.lora_rank) > 0


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``workdir/config.json``."""
    workdir = Path(workdir)
    file = workdir / CONFIG_FILE
    if not workdir.is_dir():
        raise TrainedRunError(f"--workdir {str(workdir)!r} does not exist or is not a directory")
    if not file.is_file():
        raise TrainedRunError(f"--workdir {str(workdir)!r} has no {CONFIG_FILE}: not a sfgrpo training run")
    try:
        return ml_collections.ConfigDict(json.loads(file.read_text()))
    except (OSError, ValueError) as err:
        raise TrainedRunError(f"{file} is unreadable ({err})") from None


FOLDER_MODELS = ("klein", "omnigen2")  # runs whose base is a model folder (fingerprinted, recorded)


def folder_base(folder: str | Path) -> BaseModel:
    """The base of a klein run at ``folder``, fingerprinted."""
    folder = Path(folder).absolute()
    try:
        return BaseModel("folder", folder, weights.folder_fingerprint(folder))
    except (OSError, ValueError) as err:
        raise TrainedRunError(f"base model folder {str(folder)!r}: {err}") from None


def recorded_base(workdir: Path) -> dict[str, Any] | None:
    """The base a run recorded when it started (``base_model.json``), or None (a tiny run, or a run from
    before sfgrpo recorded it)."""
    file = workdir / BASE_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise TrainedRunError(f"{file} is unreadable ({err})") from None


def check_base(workdir: Path, base: BaseModel, what: str) -> None:
    """Raises ``TrainedRunError`` when ``base`` is not the base the run at ``workdir`` recorded."""
    recorded = recorded_base(workdir)
    if recorded is None:
        _log.warning("%s records no base model fingerprint (an older run?): %s is not checked", workdir, what)
        return
    if recorded.get("sha256") != base.fingerprint:
        raise TrainedRunError(
            f"{what} {str(base.folder)!r} is not the model this run trained on: its fingerprint "
            f"{base.fingerprint[:12]} differs from the {str(recorded.get('sha256'))[:12]} recorded from "
            f"{recorded.get('folder')!r} in {workdir / BASE_FILE}"
        )


def run_base(workdir: Path, config: ml_collections.ConfigDict) -> BaseModel:
    """The base of the run ``config`` starts (or resumes) in ``workdir``; for a resumed klein run, checked
    against the base it recorded (raises ``TrainedRunError``: the adapters were trained on other weights)."""
    if config.model.name not in FOLDER_MODELS:
        return BaseModel("warmstart")
    base = folder_base(config.model.folder)
    if (workdir / BASE_FILE).is_file():
        check_base(workdir, base, "config.model.folder")
    return base


def write_base(workdir: Path, base: BaseModel) -> None:
    """Records a klein run's base in ``base_model.json`` (process 0; kept once written)."""
    if base.kind != "folder" or (workdir / BASE_FILE).is_file() or jax.process_index() != 0:
        return
    record = {"folder": str(base.folder), "name": base.folder.name, "sha256": base.fingerprint}
    (workdir / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def checkpoint_steps(workdir: Path) -> list[int]:
    """The steps with a finished checkpoint in ``workdir/checkpoints``."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    with checkpoint.Checkpointer(directory, save_every=1, keep=1 << 30, create=False, async_save=False) as c:
        return c.all_steps()


def load_trained(
    workdir: str | Path,
    *,
    step: int | str | None = None,
    base: str | Path | None = None,
    dtype: str | None = None,
) -> TrainedRun:
    """Loads the run at ``workdir``: its base, and the GRPO parameters of checkpoint ``step`` (default: the
    newest), on this process's first device. ``step='base'`` loads the model GRPO started from (its
    ``step`` is then 0; LoRA adapters are attached at their zero initialisation, which changes nothing).

    Args:
      base: the base folder of a klein run, instead of the run's ``config.model.folder`` (the run's folder
        moved, or another machine); checked against the fingerprint the run recorded.
      dtype: 'float32' or 'bfloat16' instead of the run's ``config.model.dtype``.

    Raises ``TrainedRunError`` (no checkpoint, no such step, a missing or different base, a run this
    cannot load) and ``checkpoint.CheckpointError`` for an unreadable checkpoint.
    """
    workdir = Path(workdir).absolute()
    config = read_config(workdir)
    from_base = step == "base"
    if not from_base:
        steps = checkpoint_steps(workdir)
        if not steps:
            raise TrainedRunError(
                f"--workdir {str(workdir)!r} has no checkpoint: GRPO has not saved a step yet"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise TrainedRunError(
                f"--workdir {str(workdir)!r} has no checkpoint of step {step} (it has {steps})"
            )
    if dtype is not None:
        if dtype not in builders.DTYPES:
            raise TrainedRunError(f"dtype {dtype!r} is not one of {sorted(builders.DTYPES)}")
        config.model.dtype = dtype
    mesh = runtime.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    with runtime.use_mesh(mesh):
        policy, base_model = _base_policy(workdir, config, base, mesh)
        if from_base:
            builders.add_lora(policy, config, config.seed + 2)
            _log.info("loaded the base model of %s (%s)", workdir, base_model.folder or "its warm start")
            return TrainedRun(workdir, config, 0, policy, base_model)
        optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
        key = jax.random.key(config.seed)
        abstract = builders.abstract_train_state(policy, config, optimizer, key)
        ckpt = checkpoint.Checkpointer(
            workdir / "checkpoints", save_every=1, keep=1 << 30, create=False, async_save=False
        )
        with ckpt:
            state, _, _ = ckpt.restore(step, abstract_train_state=abstract)
        builders.add_lora(policy, config, config.seed + 2)
        _, params, _, compute_dtypes = builders.split_for_grpo(policy, config)
        nnx.update(policy, compute_copy(state["params"], compute_dtypes))
    _log.info("loaded %s at step %d (base: %s)", workdir, step, base_model.folder or "its warm start")
    return TrainedRun(workdir, config, step, policy, base_model)


def _base_policy(
    workdir: Path, config: ml_collections.ConfigDict, base: str | Path | None, mesh: Any
) -> tuple[EditPolicy | OmniGen2EditPolicy, BaseModel]:
    """The policy GRPO started from, and what it is."""
    if config.model.name in FOLDER_MODELS:
        if int(config.warmstart.steps) > 0:
            raise TrainedRunError(
                f"{workdir} warm-started the {config.model.name} model (warmstart.steps="
                f"{config.warmstart.steps}): its base is that warm start, text encoder included, which "
                "sfgrpo loads only inside training"
            )
        folder = Path(base if base is not None else config.model.folder)
        what = "--base" if base is not None else "the run's config.model.folder"
        if not folder.is_dir():
            raise TrainedRunError(
                f"{what} {str(folder)!r} does not exist; pass the folder the run trained on as --base"
            )
        base_model = folder_base(folder)
        check_base(workdir, base_model, what)
        dtype = builders.DTYPES[config.model.dtype]
        # XLA's attention (the folder's config sets none): an export or edit may run on another backend.
        if config.model.name == "omnigen2":
            from sfgrpo.models import omnigen2  # noqa: PLC0415

            transformer = omnigen2.from_pretrained(folder, dtype=dtype, mesh=mesh)
            grid = (config.data.resolution // 16, config.data.resolution // 16)  # 16 px tokens
            return OmniGen2EditPolicy(transformer, None, None, grid_hw=grid), base_model
        from sfgrpo.models import flux2  # noqa: PLC0415

        transformer = flux2.from_pretrained(folder, dtype=dtype, mesh=mesh)
        return EditPolicy(transformer, None, None), base_model
    if base is not None:
        raise TrainedRunError(
            f"--base is for runs on a model folder; {workdir} trained the {config.model.name!r} model"
        )
    policy = builders.build_model(config, mesh, builders.warmstart_seed(config)).policy
    if int(config.warmstart.steps) > 0:
        cache = workdir / "warmstart"
        if not warmstart.load_cached(policy, cache, warmstart.fingerprint(config)):
            raise TrainedRunError(
                f"{workdir}: the warm start the run trained on is missing or from other settings ({cache})"
            )
    return policy, BaseModel("warmstart")
