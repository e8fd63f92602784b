"""The ``train.eval_benchmark*`` config keys and their defaults, shared by every shipped config.

``train.eval_benchmark`` scores a benchmark subset at every evaluation, as ``python -m sfgrpo.evaluate``
scores it (noise seed 0, the first ``eval_benchmark_examples`` examples), logged as ``bench/*`` metrics
(``sfgrpo.evaluation.in_training``).
"""

from __future__ import annotations

from typing import Any

PROTOCOLS = ("shapes", "regions", "viescore", "imgedit")  # as sfgrpo.evaluate's --protocol
BOX_FORMATS = ("", "pixel", "unit", "qwen1000")  # '': none given (a record folder needs one)


def eval_benchmark_defaults() -> dict[str, Any]:
    """The keys, off by default."""
    return {
        # '' = off; else a --benchmark path: 'shapes:test' (the run's held-out shapes split), a record or
        # GEdit/ImgEdit folder, a TFDS dataset built by sfgrpo.data.build.
        "eval_benchmark": "",
        "eval_benchmark_protocol": "shapes",  # the run's shapes reward; or 'regions', 'viescore', 'imgedit'
        "eval_benchmark_examples": 16,  # the benchmark's first N examples, edited in one batch
        "eval_benchmark_judge_url": "",  # the judged protocols' OpenAI-compatible endpoint, e.g. .../v1
        "eval_benchmark_judge_model": "",  # the judge's served model name
        "eval_benchmark_box_format": "",  # a record folder's boxes: 'pixel', 'unit' or 'qwen1000'
    }
