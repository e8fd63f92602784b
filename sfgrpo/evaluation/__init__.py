"""Editing benchmarks scored the way the field scores them (``python -m sfgrpo.evaluate``).

Modules, one job each:
  benchmarks  reading a benchmark (the project's record folders and TFDS datasets, GEdit-Bench-style
              JSONL folders, ImgEdit-style ``basic_edit.json``, the synthetic shapes split) into examples;
  editing     the policy under test (a training workdir at a step, or a klein folder with a LoRA) making
              ODE edits with a fixed noise seed per (example, seed), so two policies see the same noise;
  judges      the VLM protocols ('viescore', 'imgedit', 'regions') over an OpenAI-compatible endpoint,
              the answer cache and the scoring rules;
  judge_prompts  the judges' default prompts, the imgedit rubrics and the ``--prompts`` file;
  aggregate   rows -> summary (per task type, unweighted mean over task types, per language) and
              ``summary.md``;
  gallery     ``gallery.html``: source, edit, instruction and scores, sortable, opening from disk;
  compare     two evaluations' paired per-example deltas with bootstrap 95% intervals.
  in_training the trainer's ``train.eval_benchmark``: a fixed subset edited and scored the same way at every
              evaluation, logged as ``bench/*`` metrics.

The row: one JSON object per (example, seed) in ``DIR/scores.jsonl``::

  {"key": str, "seed": int, "task_type": str, "language": str, "instruction": str,
   "source": "images/<name>_source.png", "edit": "images/<name>_seed<S>.png",   # relative to DIR
   "scores": {name: float, ...},        # the protocol's scores (empty when the row failed)
   "overall": float | null,             # the protocol's overall score; null exactly when the row failed
   "failure": null | {"reason": str, "message": str},
   "judge": {"answers": {name: str}}}   # the judge's answer texts (empty for 'shapes')

A failed row (the judge's answer unparsable, out of range, or the endpoint lost) keeps ``overall`` null and
is counted in the summary's ``failures``; it never gets a default score.
"""
