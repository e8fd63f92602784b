"""Score a policy on an editing benchmark: ``python -m sfgrpo.evaluate``.

    python -m sfgrpo.evaluate --benchmark PATH --out DIR (--workdir RUN [--step N|base] | --model KLEIN_DIR
        [--lora FILE]) [--protocol shapes|regions|viescore|imgedit] [--judge-url URL --judge-model NAME]
        [--seeds S] [--steps N] [--sampler ode|sde|cps [--eta E]] [--shapes-reward KEY=VALUE,...]
    python -m sfgrpo.evaluate compare DIR_A DIR_B [--out DIR]

The benchmark (``sfgrpo.evaluation.benchmarks``: a record folder, a built TFDS dataset, a GEdit-Bench-style
folder, an ImgEdit-style ``basic_edit.json``, or ``shapes:test[:N]``, a run's synthetic held-out split) is
edited by the policy with ODE sampling, the noise of each (example, seed) fixed (``editing.example_noise``),
and every edit is written as a PNG under ``DIR/images/``. ``--sampler sde|cps`` (tiny-model runs) edits with
the run's rollout sampler instead, the images GRPO trained on; ``--shapes-reward`` scores them with the run's
reward with some options changed (a fixed reward's view of the same edits). The protocol scores each edit:
  shapes    the run's own synthetic reward against the exact target (no judge);
  regions   SPEC section 5's region schema from a VLM judge: region success, background preservation;
  viescore  GEdit-Bench's semantic consistency x perceptual quality, overall sqrt(SC * PQ), 0..10;
  imgedit   ImgEdit-Bench's per-edit-type rubric, three 1..5 scores averaged.
Outputs: ``DIR/scores.jsonl`` (a row per example and seed), ``summary.json`` (the unweighted mean over task
types, per task type and language, failures), ``summary.md`` and ``gallery.html``. ``DIR/evaluation.json``
records what was evaluated; a rerun with the same settings resumes (finished rows and edits are kept, judge
answers come from the cache), and one with other settings is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import PIL.Image
import tqdm

from sfgrpo import runtime
from sfgrpo.evaluation import train_config

_log = logging.getLogger(__name__)

PROTOCOLS = train_config.PROTOCOLS
JUDGED = ("regions", "viescore", "imgedit")
IDENTITY_FILE = "evaluation.json"
SCORES_FILE = "scores.jsonl"


_SAMPLER_IS_FOR_TINY_RUNS = (
    "--sampler {} is for the demo's tiny-model runs (--workdir): a klein or OmniGen2 policy edits with its "
    "pipeline's ODE sampler"
)


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked: the message names the input and what is wrong."""


# --- outputs -------------------------------------------------------------------------------------------


def image_name(key: str) -> str:
    """A file-name stem for an example key: its safe characters plus a short hash (keys may collide once
    unsafe characters are replaced, or differ only in case)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80].strip("._") or "example"
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def write_png(image: np.ndarray, path: Path) -> None:
    """Writes atomically: a killed run leaves either no file or a whole one."""
    partial = path.with_suffix(".partial.png")
    PIL.Image.fromarray(image).save(partial)
    os.replace(partial, path)


def read_png(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def _identity(args: argparse.Namespace, benchmark: Any, policy: dict[str, Any], judge: dict | None) -> dict:
    return {
        "benchmark": benchmark.describe(),
        "policy": policy,
        "protocol": args.protocol,
        "judge": judge,
        "seeds": list(range(args.seeds)),
    }


def _check_identity(out: Path, identity: dict[str, Any], overwrite: bool) -> None:
    """Resumes an evaluation of the same things; refuses to mix in other settings unless ``overwrite``."""
    path = out / IDENTITY_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        if stored != identity:
            if not overwrite:
                differ = sorted(k for k in identity if stored.get(k) != identity.get(k))
                raise EvaluationError(
                    f"--out {str(out)!r} holds an evaluation of other settings (they differ in {differ}); "
                    "give another --out, or --overwrite to replace it"
                )
            for name in (SCORES_FILE, IDENTITY_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "images", ignore_errors=True)
            _log.warning("--overwrite: replacing the evaluation in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    path.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")


# --- the run ---------------------------------------------------------------------------------------------


def _make_editor(args: argparse.Namespace) -> Any:
    from sfgrpo import checkpoint, trained  # noqa: PLC0415
    from sfgrpo.evaluation import editing  # noqa: PLC0415
    from sfgrpo.models import lora  # noqa: PLC0415

    if args.workdir is not None:
        config = trained.read_config(args.workdir)
        if config.model.name == "tiny":
            if args.lora is not None or args.model is not None:
                raise EvaluationError(
                    f"--workdir {args.workdir!r} trained the demo's tiny model: --model and --lora are "
                    "for klein"
                )
            step = None if args.step == "latest" else args.step
            try:
                return editing.RunEditor(
                    args.workdir,
                    step,
                    batch_size=args.batch_size,
                    eval_steps=args.steps,
                    sampler=args.sampler,
                    eta=args.eta,
                    shapes_reward=args.shapes_reward,
                )
            except (trained.TrainedRunError, checkpoint.CheckpointError):
                raise
            except editing.RewardOptionsError as err:
                raise EvaluationError(f"--shapes-reward on {args.workdir!r}: {err}") from None
            except ValueError as err:  # a sampler, eta or step count the run's window cannot take
                raise EvaluationError(f"--sampler {args.sampler} on {args.workdir!r}: {err}") from None
    if args.sampler != "ode":  # --eta without it is refused by _check_args
        raise EvaluationError(_SAMPLER_IS_FOR_TINY_RUNS.format(args.sampler))
    step = None if args.step == "latest" else args.step
    if step == "base":
        raise EvaluationError("--step base is for tiny-model runs; for a klein run evaluate --model BASE_DIR")
    try:
        return editing.FolderEditor(
            model=args.model,
            workdir=args.workdir,
            step=step,
            lora_file=args.lora,
            steps=args.steps,
            guidance=args.guidance,
            text_guidance=args.text_guidance,
            image_guidance=args.image_guidance,
            dtype=args.dtype,
        )
    except (lora.LoRAFileError, trained.TrainedRunError, checkpoint.CheckpointError):
        raise
    except ValueError as err:  # a model folder that is not one, options of the other model
        raise EvaluationError(f"--model {args.model!r}: {err}") from None


def _rows_done(path: Path) -> list[dict[str, Any]]:
    from sfgrpo.evaluation import aggregate  # noqa: PLC0415

    return aggregate.read_rows(path) if path.exists() else []


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """Edits, scores and summarises; returns the summary."""
    from sfgrpo import trained  # noqa: PLC0415
    from sfgrpo.evaluation import aggregate, benchmarks, editing, gallery, judge_prompts, judges  # noqa: PLC0415

    run_config = trained.read_config(args.workdir) if args.workdir is not None else None
    benchmark = benchmarks.read_benchmark(
        args.benchmark,
        box_format=args.box_format,
        images=args.images,
        run_config=run_config,
        limit=args.limit,
        task_types=args.task_types.split(",") if args.task_types else None,
    )
    protocol = args.protocol
    if protocol is None:
        if benchmark.format != "shapes":
            raise EvaluationError(f"--protocol: give one of {PROTOCOLS} for {args.benchmark!r}")
        protocol = args.protocol = "shapes"
        _log.info(
            "--benchmark %s: scoring with the shapes protocol (the exact synthetic reward)", args.benchmark
        )
    judge = None
    if protocol in JUDGED:
        if not args.judge_url or not args.judge_model:
            raise EvaluationError(
                f"--protocol {protocol} asks a VLM judge: give --judge-url and --judge-model"
            )
        api_key = None
        if args.judge_api_key_env:
            if args.judge_api_key_env not in os.environ:
                raise EvaluationError(f"--judge-api-key-env: variable {args.judge_api_key_env!r} is not set")
            api_key = os.environ[args.judge_api_key_env]
        try:  # the judge's settings, prompts and the examples it must judge: named errors
            judge = judges.BenchmarkJudge(
                protocol,
                args.judge_url,
                args.judge_model,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                timeout_s=args.timeout,
                retries=args.retries,
                backoff_s=args.backoff,
                max_concurrency=args.concurrency,
                api_key=api_key,
                prompts=judge_prompts.load_prompts(args.prompts) if args.prompts else None,
                cache_dir=str(Path(args.out) / "judge_cache"),
            )
            for example in benchmark.examples:  # before any edit: a rubric or regions the protocol lacks
                judge.check_example(example.key, example.task_type, len(example.labels))
            judge.check()
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    elif any(v is not None for v in (args.judge_url, args.judge_model, args.prompts)):
        raise EvaluationError("--judge-url, --judge-model and --prompts are for the judged protocols")
    editor = _make_editor(args)
    try:
        editor.check(benchmark.examples)
        if protocol == "shapes":
            if not isinstance(editor, editing.RunEditor):
                raise ValueError(
                    "the shapes protocol scores a tiny-model training run (--workdir) with the run's own "
                    "reward; score a klein policy with --protocol regions, viescore or imgedit"
                )
            editing.check_scorable(benchmark.examples)
    except ValueError as err:
        raise EvaluationError(f"--benchmark {args.benchmark!r}: {err}") from None
    out = Path(args.out)
    identity = _identity(args, benchmark, editor.describe(), judge.describe() if judge else None)
    _check_identity(out, identity, args.overwrite)

    scores_path = out / SCORES_FILE
    rows = _rows_done(scores_path)
    # Rewrite what was read: a killed run's torn last line must not glue onto the next row appended.
    partial = scores_path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(partial, scores_path)
    done = {(r["key"], r["seed"]) for r in rows}
    total = len(benchmark.examples) * args.seeds
    bar = tqdm.tqdm(total=total, initial=len(done), desc="evaluate", unit="edit", mininterval=0.5)
    with open(scores_path, "a", encoding="utf-8") as sink:
        for seed in range(args.seeds):
            pending = [e for e in benchmark.examples if (e.key, seed) not in done]
            chunk = max(args.batch_size, 1) * 4
            for start in range(0, len(pending), chunk):
                part = pending[start : start + chunk]
                new = _evaluate_chunk(part, seed, editor, judge, protocol, out)
                for row in new:
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows.extend(new)
                bar.update(len(new))
    bar.close()
    if judge is not None:
        judge.close()
    meta = {k: v for k, v in identity.items() if k != "protocol"}
    summary = aggregate.summarize(rows, protocol=protocol, meta=meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    aggregate.write_summary_md(summary, out / "summary.md")
    gallery.write_gallery(rows, summary, out / "gallery.html")
    failed = sum(r["overall"] is None for r in rows)
    _log.info(
        "%s on %s: overall %s over %d task types (%d rows, %d failed); wrote %s",
        protocol,
        args.benchmark,
        "n/a" if summary["overall"] is None else f"{summary['overall']:.4f}",
        len(summary["by_task_type"]),
        len(rows),
        failed,
        out,
    )
    return summary


def _evaluate_chunk(
    examples: Sequence[Any], seed: int, editor: Any, judge: Any, protocol: str, out: Path
) -> list[dict[str, Any]]:
    from sfgrpo.evaluation import editing, judges  # noqa: PLC0415

    edits = editor.edit(examples, seed, score=protocol == "shapes")
    rows = []
    items = []
    for i, example in enumerate(examples):
        stem = image_name(example.key)
        source_rel, edit_rel = f"images/{stem}_source.png", f"images/{stem}_seed{seed}.png"
        if not (out / source_rel).exists():
            write_png(edits.sources[i], out / source_rel)
        write_png(edits.images[i], out / edit_rel)
        rows.append({**editing.example_fields(example, seed), "source": source_rel, "edit": edit_rel})
        if judge is not None:
            items.append(
                judges.JudgeItem(
                    key=example.key,
                    instruction=example.instruction,
                    task_type=example.task_type,
                    source=edits.sources[i],
                    edited=edits.images[i],
                    boxes=example.boxes,
                    labels=example.labels,
                )
            )
    if judge is None:
        return [{**row, **editing.shapes_row_fields(s)} for row, s in zip(rows, edits.scores, strict=True)]
    results = judge.score(items)
    return [{**row, **judges.to_row_fields(r)} for row, r in zip(rows, results, strict=True)]


# --- the command line -----------------------------------------------------------------------------------


def _step(value: str) -> int | str:
    if value in ("base", "latest"):
        return value
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a step number, 'latest' or 'base', got {value!r}"
        ) from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {step}")
    return step


def _options(value: str) -> dict[str, str]:
    from sfgrpo.evaluation import editing  # noqa: PLC0415

    try:
        return editing.parse_options(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfgrpo.evaluate",
        description="Score a policy on an editing benchmark (or: python -m sfgrpo.evaluate compare A B).",
    )
    p.add_argument(
        "--benchmark", required=True, help="a benchmark folder or file, or shapes:test[:N examples]"
    )
    p.add_argument("--out", required=True, help="the evaluation's folder (reruns resume)")
    p.add_argument("--workdir", help="a training run to evaluate")
    p.add_argument(
        "--step", type=_step, help="with --workdir: a checkpoint step, 'latest' (default) or 'base'"
    )
    p.add_argument(
        "--model", help="a FLUX.2-klein or OmniGen2 folder (with --workdir: the run's base, checked)"
    )
    p.add_argument("--lora", help="a diffusers-format LoRA for that model to fold into --model")
    p.add_argument(
        "--protocol", choices=PROTOCOLS, help="how edits are scored (default: shapes for shapes:*)"
    )
    p.add_argument(
        "--judge-url", help="the judge's OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--judge-model", help="the judge's served model name")
    p.add_argument("--judge-api-key-env", help="an environment variable holding the judge's API key")
    p.add_argument("--prompts", help="a JSON file of judge prompt templates replacing the built-in ones")
    p.add_argument("--temperature", type=float, default=0.0, help="judge sampling temperature (default 0)")
    p.add_argument("--max-tokens", type=_positive, default=1024, help="judge answer length limit")
    p.add_argument("--concurrency", type=_positive, default=8, help="judge requests in flight")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed judge request")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubling)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--seeds", type=_positive, default=1, help="noise seeds per example: 0 .. S-1")
    p.add_argument(
        "--steps", type=_positive, help="sampler steps (default: the run's eval or rollout steps; klein 4/50)"
    )
    from sfgrpo.evaluation import editing  # noqa: PLC0415

    editing.add_sampler_arguments(p)
    p.add_argument("--guidance", type=float, help="klein base models: the CFG scale (default 4)")
    p.add_argument("--text-guidance", type=float, help="OmniGen2: text guidance scale (default 4)")
    p.add_argument("--image-guidance", type=float, help="OmniGen2: image guidance scale (default 1)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="klein parameter dtype"
    )
    p.add_argument("--batch-size", type=_positive, default=8, help="tiny-model runs: edits per compiled call")
    p.add_argument(
        "--shapes-reward",
        type=_options,
        help="tiny-model runs: score with the run's shapes reward with these options changed, as "
        "KEY=VALUE,... (e.g. kept_saturation=0.25: rescore a run as a fixed reward would)",
    )
    p.add_argument("--box-format", choices=("pixel", "unit", "qwen1000"), help="a record folder's box format")
    p.add_argument("--images", help="the folder an ImgEdit table's image paths are relative to")
    p.add_argument("--limit", type=_positive, help="evaluate the first N examples only")
    p.add_argument("--task-types", help="comma-separated task types to keep")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an evaluation of other settings in --out"
    )
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfgrpo.evaluate compare",
        description="Paired per-example deltas (B - A) of two evaluations of one benchmark, bootstrap CIs.",
    )
    p.add_argument("dir_a", help="the baseline evaluation's --out")
    p.add_argument("dir_b", help="the evaluation compared with it")
    p.add_argument("--out", help="where to write compare.{json,md,png} (default: DIR_B/compare_vs_<A>)")
    p.add_argument("--bootstrap", type=_positive, default=10000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    return p


def _fail(message: str) -> NoReturn:
    print(f"sfgrpo.evaluate: {message}", file=sys.stderr)
    sys.exit(2)


def _check_args(args: argparse.Namespace) -> None:
    if args.workdir is None and args.model is None:
        _fail("give the policy: --workdir RUN, or --model KLEIN_DIR [--lora FILE]")
    if args.step is not None and args.workdir is None:
        _fail(f"--step {args.step} needs --workdir")
    if args.workdir is not None and not Path(args.workdir).is_dir():
        _fail(f"--workdir {args.workdir!r} is not a directory")
    if args.model is not None and not Path(args.model).is_dir():
        _fail(f"--model {args.model!r} is not a directory")
    if args.lora is not None and not Path(args.lora).is_file():
        _fail(f"--lora {args.lora!r} is not a file")
    if args.prompts is not None and not Path(args.prompts).is_file():
        _fail(f"--prompts {args.prompts!r} is not a file")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        _fail(f"--temperature {args.temperature} must be a finite number >= 0")
    if args.retries < 0:
        _fail(f"--retries {args.retries} must be >= 0")
    for name in ("backoff", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            _fail(f"--{name} {value} must be a positive number of seconds")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1.0):
        _fail(f"--guidance {args.guidance} must be a finite number >= 1")
    from sfgrpo.evaluation import editing  # noqa: PLC0415

    if (error := editing.sampler_arguments_error(args.sampler, args.eta)) is not None:
        _fail(error)
    if args.sampler != "ode" and args.workdir is None:
        _fail(_SAMPLER_IS_FOR_TINY_RUNS.format(args.sampler))
    if args.shapes_reward and (args.workdir is None or args.model is not None):
        _fail("--shapes-reward is for the demo's tiny-model runs (--workdir), scored by the shapes reward")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        _fail(f"--out {args.out!r} exists and is not a directory")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; bad input exits with status 2 and a one-line message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runtime.log_to_stderr()
    from sfgrpo import checkpoint, trained  # noqa: PLC0415
    from sfgrpo.data.records import RecordError  # noqa: PLC0415
    from sfgrpo.evaluation import benchmarks, judges  # noqa: PLC0415
    from sfgrpo.models import lora  # noqa: PLC0415

    if argv[:1] == ["compare"]:
        from sfgrpo.evaluation import compare  # noqa: PLC0415

        cargs = _compare_parser().parse_args(argv[1:])
        try:
            result = compare.compare(
                cargs.dir_a, cargs.dir_b, cargs.out, n_boot=cargs.bootstrap, seed=cargs.seed
            )
        except (ValueError, FileNotFoundError) as err:
            _fail(str(err))
        _log.info("compare: %s", json.dumps(result.get("overall", result), default=str)[:400])
        return 0
    args = _parser().parse_args(argv)
    _check_args(args)
    try:
        run_evaluation(args)
    except (
        EvaluationError,
        benchmarks.BenchmarkError,
        RecordError,
        trained.TrainedRunError,
        lora.LoRAFileError,
        checkpoint.CheckpointError,
        FileNotFoundError,
        judges.EndpointDown,
    ) as err:
        _fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
