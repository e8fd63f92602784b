"""Export a training run for use outside sfgrpo:
``python -m sfgrpo.export --workdir W [--step N|latest] --out PATH [--format peft|merged] [--base DIR]``.

Formats:
  peft    the LoRA adapter as a diffusers/PEFT safetensors file (LoRA runs on a FLUX.2-klein or OmniGen2
          folder): ``pipe = Flux2KleinPipeline.from_pretrained(base); pipe.load_lora_weights(PATH)``, or
          OmniGen2's ``OmniGen2Pipeline.load_lora_weights(PATH)`` (whose loader ignores the PEFT alpha: an
          OmniGen2 export folds alpha / r into lora_B, see ``models.lora``). Its metadata
          holds the PEFT config (rank, alpha, target modules) that diffusers reads, and sfgrpo's: the
          version, the step, the base folder's name and fingerprint, and the run's config. ``--out`` is the
          file (ending in .safetensors) or a folder that receives ``pytorch_lora_weights.safetensors`` (the
          name ``load_lora_weights(folder)`` looks for) and ``sfgrpo_export.json``.
  merged  klein or OmniGen2: a complete pipeline folder (``Flux2KleinPipeline.from_pretrained(PATH)``,
          ``OmniGen2Pipeline.from_pretrained(PATH)``): its
          ``transformer/`` holds the adapter folded into the base weights (or a full fine-tuning's weights)
          in the base's dtype, as sharded safetensors with an index; the other components are hard-linked
          from the base (copied across filesystems). sfgrpo trains from it (``config.model.folder=PATH``).
          The demo's tiny model: ``transformer/`` (a diffusers ``Flux2Transformer2DModel`` folder),
          ``text_encoder/`` (its word encoder: ``model.safetensors`` and ``config.json``).
Default: peft for a LoRA run on a model folder, merged otherwise. Every export folder holds
``sfgrpo_export.json`` (what it is and where it came from). Exports are written next to ``--out`` and
renamed into place once complete; an existing ``--out`` is replaced only with ``--overwrite``.

The trainer exports too (``train.export_format``, ``train.export_every``): to ``workdir/export/step_<N>/``
at the end of the run and every ``export_every`` steps, with the parameters it holds (no reload); on
several processes every process takes part in gathering the parameters and one process writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import ml_collections
import numpy as np
from safetensors.numpy import save_file

import sfgrpo
from sfgrpo import checkpoint, runtime
from sfgrpo.data import shapes
from sfgrpo.models import lora, save_weights, weights
from sfgrpo.models.policy import EditPolicy
from sfgrpo.trained import BaseModel, TrainedRunError, load_trained

_log = logging.getLogger(__name__)

FORMATS = ("peft", "merged")
TRAIN_FORMATS = ("auto", "none", *FORMATS)  # config.train.export_format
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for load_lora_weights
INFO_FILE = "sfgrpo_export.json"
GIB = 1024**3


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the input and why."""


FOLDER_MODELS = ("klein", "omnigen2")  # trained from a model folder, which an export refers to


def default_format(config: ml_collections.ConfigDict) -> str:
    """peft for a LoRA run on a model folder (the adapter is all that changed), merged otherwise."""
    lora_on_folder = config.model.name in FOLDER_MODELS and int(config.model.lora_rank) > 0
    return "peft" if lora_on_folder and int(config.warmstart.steps) == 0 else "merged"


def check_format(config: ml_collections.ConfigDict, fmt: str) -> None:
    """Raises ``ExportError`` when the run cannot be exported as ``fmt``."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {FORMATS}")
    if fmt == "peft":
        if int(config.model.lora_rank) == 0:
            raise ExportError("--format peft: the run fine-tuned the whole transformer (no LoRA); use merged")
        if config.model.name not in FOLDER_MODELS:
            raise ExportError(
                f"--format peft: the {config.model.name!r} model's base is its warm start, which no "
                "diffusers folder holds; use merged"
            )


def export_info(config: ml_collections.ConfigDict, base: BaseModel, step: int, fmt: str) -> dict[str, Any]:
    """What an export is and where it came from (``sfgrpo_export.json``)."""
    m = config.model
    adapter = None
    if int(m.lora_rank) > 0:
        alpha = float(m.lora_alpha) if float(m.lora_alpha) > 0 else 2.0 * int(m.lora_rank)
        adapter = {"rank": int(m.lora_rank), "alpha": alpha, "targets": m.lora_targets or "default"}
    return {
        "sfgrpo_version": sfgrpo.__version__,
        "format": fmt,
        "step": int(step),
        "model": m.name,
        "base": base.describe(),
        "lora": adapter,
        "merged": fmt == "merged" and adapter is not None,
        "config": json.loads(config.to_json_best_effort()),
    }


def export_policy(
    policy: EditPolicy,
    config: ml_collections.ConfigDict,
    base: BaseModel,
    step: int,
    out: Path,
    fmt: str,
    *,
    as_file: bool = False,
    write: bool = True,
    max_shard_bytes: int = save_weights.DEFAULT_SHARD_BYTES,
) -> None:
    """Writes ``policy`` (its transformer with attached adapters or trained weights) to ``out`` as ``fmt``.

    ``out``: a folder, which must not exist; with ``as_file`` (peft only) the adapter file itself. merged
    folds the adapters into ``policy``'s kernels. A collective on several processes; only ``write``
    processes touch the disk.
    """
    check_format(config, fmt)
    info = export_info(config, base, step, fmt)
    if fmt == "peft":
        meta = {
            "sfgrpo_version": info["sfgrpo_version"],
            "sfgrpo_step": str(step),
            "base_model_name": info["base"]["name"],
            "base_model_sha256": info["base"]["sha256"],
            "sfgrpo_config": json.dumps(info["config"], sort_keys=True),
        }
        file = out if as_file else out / LORA_FILE
        if write and not as_file:
            out.mkdir(parents=True)
            (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        lora.export_lora(policy.transformer, file, extra_metadata=meta, write=write)
        return
    lora.merge_lora(policy.transformer)
    if write:
        out.mkdir(parents=True)
    if config.model.name in FOLDER_MODELS:
        folder = Path(base.folder)
        transformer_config = json.loads((folder / "transformer" / weights.CONFIG_NAME).read_text())
        save_weights.save_transformer(
            policy.transformer,
            out / "transformer",
            dtype=_file_dtype(folder / "transformer"),
            config=transformer_config,
            max_shard_bytes=max_shard_bytes,
            write=write,
        )
        if write:
            _link_components(folder, out)
    else:
        save_weights.save_transformer(
            policy.transformer,
            out / "transformer",
            dtype=np.float32,
            max_shard_bytes=max_shard_bytes,
            write=write,
        )
        if write:
            _save_word_encoder(policy.text_encoder, out / "text_encoder")
    if write:
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _file_dtype(folder: Path) -> Any:
    """The dtype of a diffusers folder's weights (its first tensor's)."""
    reader = weights.SafetensorsReader(weights.weight_files(folder))
    return reader[reader.keys()[0]].dtype


def _link_components(base: Path, out: Path) -> None:
    """The base pipeline's index and every component but the transformer, hard-linked (or copied)."""
    index = json.loads((base / "model_index.json").read_text())
    shutil.copy2(base / "model_index.json", out / "model_index.json")
    for name in sorted(k for k in index if not k.startswith("_") and k != "transformer"):
        if not (base / name).is_dir():
            continue
        shutil.copytree(base / name, out / name, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _save_word_encoder(encoder: Any, folder: Path) -> None:
    """The demo's word-level text encoder: its two tables, and the vocabulary that indexes them."""
    folder.mkdir(parents=True)
    tables = {
        "words": np.asarray(runtime.to_host(encoder.words.get_value()), np.float32),
        "positions": np.asarray(runtime.to_host(encoder.positions.get_value()), np.float32),
    }
    save_file(tables, os.fspath(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "_class_name": "WordTextEncoder",
        "_module": "sfgrpo.models.tiny",
        "vocab_size": int(tables["words"].shape[0]),
        "dim": int(tables["words"].shape[1]),
        "max_len": int(tables["positions"].shape[0]),
        "vocabulary": list(shapes.VOCAB),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def publish(out: Path, build: Callable[[Path], None], *, overwrite: bool, write: bool) -> None:
    """Runs ``build(partial)`` (a collective) on a path next to ``out``, then renames it into place: a
    failed or interrupted export leaves ``out`` as it was. An existing ``out`` is replaced only with
    ``overwrite``."""
    partial = out.with_name(f".{out.name}.partial")
    if write:
        _remove(partial)
    runtime.barrier(f"export-clean {out}")
    try:
        build(partial)
    except BaseException:
        if write:
            _remove(partial)
        raise
    if write:
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise ExportError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            os.replace(out, old)
            os.replace(partial, out)
            _remove(old)
        else:
            os.replace(partial, out)
    runtime.barrier(f"export-published {out}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def export_run(
    workdir: str | Path,
    out: str | Path,
    *,
    fmt: str | None = None,
    step: int | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = save_weights.DEFAULT_SHARD_BYTES,
) -> Path:
    """Loads the run at ``workdir`` (checkpoint ``step``, default the newest) and exports it to ``out``;
    returns ``out``. Raises ``ExportError``/``TrainedRunError``/``checkpoint.CheckpointError``."""
    out = Path(out).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"--out {str(out)!r}: its folder {str(out.parent)!r} does not exist")
    run = load_trained(workdir, step=step, base=base)
    fmt = fmt or default_format(run.config)
    check_format(run.config, fmt)
    _log.info("exporting %s step %d as %s to %s", run.workdir, run.step, fmt, out)
    as_file = fmt == "peft" and out.suffix == ".safetensors"

    def build(path: Path) -> None:
        export_policy(
            run.policy,
            run.config,
            run.base,
            run.step,
            path,
            fmt,
            as_file=as_file,
            max_shard_bytes=max_shard_bytes,
        )

    publish(out, build, overwrite=overwrite, write=True)
    return out


def export_in_training(
    policy: EditPolicy, config: ml_collections.ConfigDict, base: BaseModel, step: int, workdir: Path
) -> Path | None:
    """The trainer's export of ``step`` to ``workdir/export/step_<step>`` (skipped when it exists); returns
    the path, or None when ``train.export_format`` is 'none'. A collective on several processes."""
    fmt = config.train.export_format
    if fmt == "none":
        return None
    fmt = default_format(config) if fmt == "auto" else fmt
    directory = workdir / "export"
    out = directory / f"step_{step}"
    write = runtime.writes_here(directory)
    if runtime.all_processes(out.exists()):
        _log.info("export of step %d is already in %s", step, out)
        return out

    def build(path: Path) -> None:
        export_policy(policy, config, base, step, path, fmt, write=write)

    publish(out, build, overwrite=True, write=write)
    _log.info("exported step %d as %s to %s", step, fmt, out)
    return out


# --- the command ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfgrpo.export", description="Export a training run's model for diffusers."
    )
    p.add_argument("--workdir", required=True, help="the training run's workdir")
    p.add_argument("--out", required=True, help="the file (peft, .safetensors) or folder to write")
    p.add_argument("--step", default="latest", help="the checkpoint's step, or 'latest' (default)")
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="default: peft for LoRA on klein, else merged"
    )
    p.add_argument("--base", default=None, help="the base model folder, if not the run's config.model.folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="merged: largest safetensors shard (GiB)")
    return p


def _fail(message: str) -> NoReturn:
    print(f"sfgrpo.export: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The command line; bad input exits with status 2 and a one-line message."""
    args = _parser().parse_args(argv)
    runtime.log_to_stderr()
    step = None
    if args.step != "latest":
        try:
            step = int(args.step)
        except ValueError:
            _fail(f"--step {args.step!r} must be a step number or 'latest'")
        if step < 0:
            _fail(f"--step {step} must be >= 0")
    if not (np.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        _fail(f"--max_shard_gb {args.max_shard_gb} must be a positive number")
    try:
        out = export_run(
            args.workdir,
            args.out,
            fmt=args.format,
            step=step,
            base=args.base,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * GIB),
        )
    except (ExportError, TrainedRunError, checkpoint.CheckpointError) as err:
        _fail(str(err))
    print(out)


if __name__ == "__main__":
    main()
