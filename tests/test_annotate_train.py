"""The annotator's output in training: diff-annotated record folders -> a TFDS dataset -> two GRPO
iterations of the tiny policy. Kept apart from tests/test_annotate.py because compiling the trainer's
programs takes about half a minute on a 2-core CPU; the run is a one-device process, which compiles a
quarter faster than the suite's eight simulated devices."""

import json
import math
import os
import subprocess
import sys
import textwrap

from helpers import ROOT, tiny_config
from test_annotate_run import shapes_folder

from sfgrpo import builders, metrics
from sfgrpo.data import annotate, pipeline, tfds_builder
from sfgrpo.data.records import read_jsonl_folder

_ONE_DEVICE = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
_TRAIN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from helpers import ROOT, tiny_config
    from sfgrpo import train
    c = tiny_config()
    c.data.source, c.data.tfds_dir = "tfds", sys.argv[1]
    c.train.steps, c.train.fuse_step, c.train.checkpoint_every = 2, True, 100
    c.warmstart.steps = 0
    train.train(c, sys.argv[2])
    """
)


def test_annotated_folder_builds_and_trains(tmp_path):
    """diff-annotated shapes folders (train and held-out test) -> one TFDS dataset -> two GRPO iterations."""
    for split in ("train", "test"):
        shapes_folder(tmp_path / split, 8, split=split, size=32)
        annotate.main(
            ["--input", str(tmp_path / split), "--output", str(tmp_path / f"{split}_regions")]
            + ["--method", "diff", "--box-format", "unit"]
        )
    # The build CLI writes one split per dataset folder; train and test go in together through its writer.
    data = str(tmp_path / "data")
    folders = {s: str(tmp_path / f"{s}_regions") for s in ("train", "test")}
    tfds_builder.write_dataset(
        data, {s: (lambda f=f: read_jsonl_folder(f, "unit", r_max=3)) for s, f in folders.items()}
    )
    first = tfds_builder.example_to_record(tfds_builder.load_split(data, "train")[0])
    assert first.has_masks and first.meta["annotation"]["method"] == "diff"

    c = tiny_config()
    c.data.source, c.data.tfds_dir = "tfds", data
    # What the trainer reads: every record with its annotated regions and masks.
    pcfg = builders.pipeline_config(c, batch_size=8, group_size=1, seed=0, shuffle=False)
    batch = next(pipeline.make_iterator(builders.data_source(c, "train"), pcfg))
    annotated = [json.loads(t) for t in open(tmp_path / "train_regions" / "metadata.jsonl")]
    assert batch["has_masks"].all()
    assert batch["region_valid"].sum() == sum(len(a["regions"]) for a in annotated)

    env = dict(os.environ, XLA_FLAGS=_ONE_DEVICE, JAX_PLATFORMS="cpu")
    args = [data, str(tmp_path / "run"), str(ROOT / "tests")]
    done = subprocess.run(
        [sys.executable, "-c", _TRAIN, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grpo = [r for r in metrics.read_metrics(tmp_path / "run" / "metrics.jsonl") if r["stage"] == "grpo"]
    assert [r["step"] for r in grpo] == [1, 2] and all(math.isfinite(r["loss"]) for r in grpo)
