"""``python -m sfgrpo.evaluate``: a policy edits a benchmark, the protocol scores it, the run resumes.

The demo's tiny model: a 2-iteration run evaluated on its held-out shapes split with the shapes protocol,
at its base and after GRPO; the scores are checked against the shapes reward recomputed from the written
PNGs, the edits against a change of batch size (the noise belongs to the example), and a killed evaluation
resumes without redoing finished edits. FLUX.2-klein: a tiny klein folder scored with 'viescore' by a fake
judge on loopback.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from helpers import tiny_config

from sfgrpo import builders, evaluate, train, trained
from sfgrpo.evaluation import aggregate, editing
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rewards.base import SCORE_SCALE
from sfgrpo.rewards.reward_config import SHAPES_DEFAULTS, shapes_reward_options
from sfgrpo.rewards.synthetic import shapes_scores


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("evaluate_tiny") / "run"
    c = tiny_config()
    c.rl.lr = 2e-2  # two iterations that move the edits
    # A judge whose rewards differ within groups (the shapes reward scores this barely trained model 0,
    # so GRPO would not move it); the evaluation still scores with the shapes reward.
    c.reward.kind = "host"
    c.reward.host_reward = "brightness"
    c.reward.host_import = "brightness_judge"
    c.reward.overlap = False
    train.train(c, workdir)
    return workdir


def _cli(args, capsys):
    try:
        code = evaluate.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _png(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def _recomputed_reward(run_dir, row, example, **options):
    """The shapes reward of the written edit PNG, judged as the trainer judges (autoencoder round trips),
    with ``options`` of the shapes reward changed."""
    config = trained.read_config(run_dir)
    # As the evaluation scores: the run's shapes options, or the reward's defaults for a host-reward run.
    base = dict(builders.grpo_settings(config).shapes_reward) or dict(SHAPES_DEFAULTS)
    ae = PixelAutoencoder(pool=config.model.pixel_pool)
    grid = ae.grid(*example.source.shape[:2])

    def round_trip(x):
        return ae.decode(ae.encode(jnp.asarray(x[None])), grid)

    edited = _png(row["_dir"] / row["edit"]).astype(np.float32)[None] / 255.0
    k = len(example.labels)
    scores = shapes_scores(
        jnp.asarray(edited),
        round_trip(example.source),
        round_trip(example.target),
        jnp.asarray(example.masks[None]),
        jnp.asarray(example.boxes[None]),
        jnp.ones((1, k), bool),
        scale=SCORE_SCALE,
        **{**base, **options},
    )
    return editing.shapes_row_scores(scores, np.ones((1, k), bool), SCORE_SCALE)[0]


def test_shapes_protocol_scores_a_run_at_its_base_and_after_grpo(tiny_run, tmp_path, capsys, monkeypatch):
    from sfgrpo.evaluation import benchmarks

    examples = {
        e.key: e
        for e in benchmarks.read_benchmark("shapes:test", run_config=trained.read_config(tiny_run)).examples
    }
    base, after = tmp_path / "base", tmp_path / "after"
    code, err = _cli(
        ["--benchmark", "shapes:test", "--workdir", tiny_run, "--step", "base", "--out", base], capsys
    )
    assert code == 0, err
    code, err = _cli(
        ["--benchmark", "shapes:test", "--workdir", tiny_run, "--out", after, "--batch-size", 3], capsys
    )
    assert code == 0, err

    rows = {d: aggregate.read_rows(d / "scores.jsonl") for d in (base, after)}
    assert all(len(r) == len(examples) for r in rows.values())
    moved = []
    for d, rs in rows.items():
        for row in rs:
            row["_dir"] = d
            assert row["failure"] is None and row["overall"] == row["scores"]["reward"]
            assert _png(d / row["edit"]).shape == (32, 32, 3)
            again = _recomputed_reward(tiny_run, row, examples[row["key"]])
            # The PNG is the float edit rounded to uint8: the reward moves by far less than 1e-2.
            assert abs(again["reward"] - row["scores"]["reward"]) < 1e-2
            assert abs(again["background_preservation"] - row["scores"]["background_preservation"]) < 1e-2
    for a, b in zip(rows[base], rows[after], strict=True):
        assert a["key"] == b["key"]
        moved.append(np.abs(_png(base / a["edit"]).astype(int) - _png(after / b["edit"])).mean())
    assert np.mean(moved) > 1.0  # GRPO at lr 2e-2 changed the edits

    summary = json.loads((after / "summary.json").read_text())
    by_type = {}
    for row in rows[after]:
        by_type.setdefault(row["task_type"], []).append(row["overall"])
    assert summary["by_task_type"] == pytest.approx({t: np.mean(v) for t, v in by_type.items()})
    assert summary["overall"] == pytest.approx(np.mean([np.mean(v) for v in by_type.values()]))
    assert summary["policy"]["step"] == 2 and summary["benchmark"]["format"] == "shapes"
    for name in ("summary.md", "gallery.html"):
        assert (after / name).stat().st_size > 0

    # The noise belongs to (seed, example): batches of 8 (base run: default) and 3 give the same edits.
    same = tmp_path / "after8"
    code, err = _cli(["--benchmark", "shapes:test", "--workdir", tiny_run, "--out", same], capsys)
    assert code == 0, err
    for row in aggregate.read_rows(same / "scores.jsonl"):
        diff = np.abs(_png(same / row["edit"]).astype(int) - _png(after / row["edit"]))
        assert diff.max() <= 1

    code, err = _cli(["compare", base, after, "--bootstrap", 500], capsys)
    assert code == 0, err
    result = json.loads((after / f"compare_vs_{base.name}" / "compare.json").read_text())
    assert result["n_pairs"] == len(examples)


def test_the_rollout_sampler_edits_with_its_noise_and_reduces_to_ode_without_it(tiny_run, tmp_path, capsys):
    """--sampler sde|cps: the rollout's sampler; its step noise is fixed by (seed, batch), and with eta -> 0
    the SDE steps are the Euler steps, so the edits are the ODE edits."""
    base = ["--benchmark", "shapes:test", "--workdir", tiny_run, "--step", "base", "--batch-size", 4]
    outs = {name: tmp_path / name for name in ("ode", "sde", "sde_again", "cps", "sde_eta0")}
    for name, extra in (
        ("ode", []),
        ("sde", ["--sampler", "sde", "--steps", 2]),
        ("sde_again", ["--sampler", "sde", "--steps", 2]),
        ("cps", ["--sampler", "cps", "--steps", 2, "--eta", 0.5]),
        ("sde_eta0", ["--sampler", "sde", "--steps", 2, "--eta", 1e-7]),
    ):
        code, err = _cli([*base, "--out", outs[name], *extra], capsys)
        assert code == 0, (name, err)
    samplers = {
        name: json.loads((out / "evaluation.json").read_text())["policy"]["sampler"]
        for name, out in outs.items()
    }
    assert samplers["ode"]["kind"] == "ode" and samplers["ode"]["steps"] == 2  # tiny_config's eval steps
    assert samplers["sde"]["kind"] == "sde" and samplers["sde"]["eta"] == pytest.approx(0.8)
    assert samplers["sde"]["window"] == "all_but_last" and "per batch" in samplers["sde"]["step_noise"]
    assert samplers["cps"]["kind"] == "cps" and samplers["cps"]["eta"] == 0.5

    def edits(name):
        rows = sorted(aggregate.read_rows(outs[name] / "scores.jsonl"), key=lambda r: r["key"])
        return np.stack([_png(outs[name] / r["edit"]).astype(int) for r in rows])

    ode = edits("ode")
    assert np.abs(edits("sde") - edits("sde_again")).max() == 0  # the same batches draw the same noise
    assert np.abs(edits("sde_eta0") - ode).max() <= 1  # no noise: the Euler steps (uint8 rounding)
    assert np.abs(edits("sde") - ode).mean() > 1.0  # eta 0.8 on the first step moves the edits
    assert np.abs(edits("cps") - edits("sde")).mean() > 1.0

    code, err = _cli([*base, "--out", outs["ode"], "--sampler", "sde", "--steps", 2], capsys)
    assert code == 2 and "other settings" in err  # an ODE evaluation is never mixed with SDE edits


def test_a_killed_evaluation_resumes_and_other_settings_are_refused(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    args = [
        "--benchmark",
        "shapes:test",
        "--workdir",
        tiny_run,
        "--out",
        out,
        "--seeds",
        2,
        "--batch-size",
        4,
    ]
    code, err = _cli(args, capsys)
    assert code == 0, err
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 16
    full = {(r["key"], r["seed"]): r for r in map(json.loads, lines)}

    # A kill after 5 rows, in the middle of writing the 6th.
    (out / "scores.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    edited = []
    real_edit = editing.RunEditor.edit

    def counting_edit(self, examples, seed, *, score):
        edited.extend((e.key, seed) for e in examples)
        return real_edit(self, examples, seed, score=score)

    monkeypatch.setattr(editing.RunEditor, "edit", counting_edit)
    code, err = _cli(args, capsys)
    assert code == 0, err
    assert len(edited) == 11 and not set(edited) & {
        tuple(json.loads(x)[k] for k in ("key", "seed")) for x in lines[:5]
    }
    rows = aggregate.read_rows(out / "scores.jsonl")
    assert {(r["key"], r["seed"]): r["overall"] for r in rows} == pytest.approx(
        {k: r["overall"] for k, r in full.items()}, abs=1e-6
    )
    edited.clear()
    code, err = _cli(args, capsys)  # finished: nothing is edited again
    assert code == 0 and edited == []

    code, err = _cli([*args[:-4], "--seeds", 1, "--step", 1], capsys)
    assert code == 2 and "other settings" in err and "--overwrite" in err
    code, err = _cli([*args[:-4], "--seeds", 1, "--step", 1, "--overwrite"], capsys)
    assert code == 0, err
    assert len(aggregate.read_rows(out / "scores.jsonl")) == 8


def test_shapes_reward_options_rescore_the_same_edits(tiny_run, tmp_path, capsys):
    """--shapes-reward scores the run's own edits with some reward options changed, and says so in the
    evaluation's identity, so that a folder never mixes two rewards."""
    from sfgrpo.evaluation import benchmarks

    config = trained.read_config(tiny_run)
    examples = {e.key: e for e in benchmarks.read_benchmark("shapes:test", run_config=config).examples}
    common = ["--benchmark", "shapes:test", "--workdir", tiny_run, "--step", "base"]
    plain, loose = tmp_path / "plain", tmp_path / "loose"
    assert _cli([*common, "--out", plain], capsys)[0] == 0
    override = {"preserve_floor": 0.9, "preserve_tol": 1.0}
    text = ",".join(f"{k}={v}" for k, v in override.items())
    code, err = _cli([*common, "--out", loose, "--shapes-reward", text], capsys)
    assert code == 0, err
    plain_rows = {r["key"]: r for r in aggregate.read_rows(plain / "scores.jsonl")}
    higher = 0
    for row in aggregate.read_rows(loose / "scores.jsonl"):
        row["_dir"] = loose
        before = plain_rows[row["key"]]
        assert np.array_equal(_png(loose / row["edit"]), _png(plain / before["edit"]))  # the same edits
        again = _recomputed_reward(tiny_run, row, examples[row["key"]], **override)
        for score in ("reward", "background_preservation"):
            assert abs(again[score] - row["scores"][score]) < 1e-2
        higher += row["scores"]["background_preservation"] > before["scores"]["background_preservation"]
    assert higher > 0  # the looser preservation tolerance scored some of the same backgrounds higher
    identity = json.loads((loose / "evaluation.json").read_text())
    reward = identity["policy"]["shapes_reward"]
    assert config.reward.kind == "host"  # scored with the shapes reward's defaults, less the override
    assert reward == dict(shapes_reward_options({**SHAPES_DEFAULTS, **override}))
    assert "shapes_reward" not in json.loads((plain / "evaluation.json").read_text())["policy"]
    code, err = _cli([*common, "--out", loose], capsys)  # the same folder without the options
    assert code == 2 and "differ in ['policy']" in err


def test_bad_command_lines_exit_2_with_one_line(tiny_run, tmp_path, capsys):
    shapes = ["--benchmark", "shapes:test", "--out", tmp_path / "o"]
    run = [*shapes, "--workdir", tiny_run]
    gedit = tmp_path / "gedit"
    gedit.mkdir()
    PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(gedit / "a.png")
    words = " ".join(["red"] * 40)  # more words than the tiny model's encoder holds
    lines = [{"key": "short", "task_type": "t", "instruction": "make it red", "instruction_language": "en",
              "input_image": "a.png"}, {"key": "long", "task_type": "t", "instruction": words,
              "instruction_language": "en", "input_image": "a.png"}]  # fmt: skip
    (gedit / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:1]))
    long_bench = tmp_path / "gedit_long"
    long_bench.mkdir()
    (long_bench / "a.png").write_bytes((gedit / "a.png").read_bytes())
    (long_bench / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    on_gedit = ["--out", tmp_path / "g", "--workdir", tiny_run]
    cases = [
        (shapes, "give the policy"),
        ([*shapes, "--model", tmp_path / "nope"], "not a directory"),
        ([*run, "--step", 7], "step 7"),
        ([*run, "--protocol", "viescore"], "--judge-url"),
        ([*shapes, "--step", 1, "--model", tmp_path], "--step"),
        (
            ["--benchmark", tmp_path / "nowhere", "--out", tmp_path / "o", "--workdir", tiny_run],
            "does not exist",
        ),
        (["compare", tmp_path / "a", tmp_path / "b"], "scores.jsonl"),
        ([*run, "--eta", 0.5], "--eta 0.5"),
        ([*run, "--sampler", "sde", "--eta", 0], "--eta 0"),
        ([*run, "--sampler", "sde", "--steps", 1], "at least 2 sampler steps"),
        ([*shapes, "--model", tmp_path, "--sampler", "sde"], "tiny-model runs"),
        (["--benchmark", gedit, *on_gedit, "--protocol", "shapes"], "target and region masks"),
        (["--benchmark", long_bench, *on_gedit, "--protocol", "shapes"], "'long'"),
        ([*run, "--shapes-reward", "colour=1"], "unknown options ['colour']"),
        ([*run, "--shapes-reward", "kept_saturation=0.2,kept_floor=0.5"], "kept_floor: must be below"),
        ([*shapes, "--model", tmp_path, "--shapes-reward", "kept_saturation=0.2"], "tiny-model runs"),
    ]
    for args, message in cases:
        code, err = _cli(args, capsys)
        assert code == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("sfgrpo.evaluate: ") and message in last, (args, err)
    code, err = _cli([*run, "--shapes-reward", "kept_saturation"], capsys)  # argparse's own one line
    assert code == 2 and "--shapes-reward: expected KEY=VALUE" in err.strip().splitlines()[-1]


# --- judged protocols --------------------------------------------------------------------------------------


def _judge_args(fake):
    return ["--judge-url", fake.url, "--judge-model", fake.model, "--retries", 0, "--backoff", 0.01]


def test_regions_protocol_on_a_run_asks_the_judge_once_per_call(tiny_run, tmp_path, capsys):
    from fake_edit_judge import FakeEditJudge

    out = tmp_path / "regions"
    args = ["--benchmark", "shapes:test", "--workdir", tiny_run, "--out", out, "--protocol", "regions"]
    with FakeEditJudge() as fake:
        code, err = _cli([*args, *_judge_args(fake)], capsys)
        assert code == 0, err
        assert fake.answered == 2 * 8  # semantic and quality per edit
        rows = aggregate.read_rows(out / "scores.jsonl")
        for row in rows:
            assert row["failure"] is None and set(row["judge"]["answers"]) == {"semantics", "quality"}
            assert 0.0 <= row["scores"]["region_success_rate"] <= 1.0
        # The judge saw the source and the edit the PNGs hold, with the example's boxes.
        first = fake.received[0]
        assert {im.shape for im in first.images} == {(32, 32, 3)}
        code, err = _cli([*args, *_judge_args(fake)], capsys)  # finished: no new requests
        assert code == 0 and fake.requests == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"]["model"] == "fake-edit-judge" and summary["judge"]["temperature"] == 0.0
    assert len(summary["judge"]["prompts_sha256"]) == 64

    # A published protocol's wording replaces a built-in prompt; it is what the judge reads and records.
    quality = 'House quality rubric, 0 to {scale}. Answer with this JSON: {"score": [naturalness, artifacts]}'
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"regions": {"quality": quality}}))
    custom = tmp_path / "custom"
    args = ["--benchmark", "shapes:test", "--workdir", tiny_run, "--protocol", "regions", "--limit", 2]
    args += ["--out", custom, "--prompts", prompts]
    with FakeEditJudge() as fake:
        code, err = _cli([*args, *_judge_args(fake)], capsys)
        assert code == 0, err
        asked = [r.text for r in fake.received if r.text.startswith("House quality rubric")]
        assert len(asked) == 2 and asked[0].startswith("House quality rubric, 0 to 25.")
    described = json.loads((custom / "summary.json").read_text())["judge"]
    assert described["prompts"]["quality"] == quality
    assert described["prompts_sha256"] != summary["judge"]["prompts_sha256"]
    prompts.write_text(json.dumps({"regions": {"quality": "no scale here"}}))
    code, err = _cli([*args[:-1], prompts, "--overwrite", "--judge-url", "http://127.0.0.1:9/v1",
                      "--judge-model", "m"], capsys)  # fmt: skip
    assert code == 2 and "regions.quality" in err.strip().splitlines()[-1]


def test_imgedit_table_on_a_run_scores_by_edit_type(tiny_run, tmp_path, capsys):
    from fake_edit_judge import FakeEditJudge

    (tmp_path / "animal").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
            tmp_path / "animal" / f"{i}.png"
        )
    table = {
        "11": {"id": "animal/0.png", "prompt": "add a red square", "edit_type": "add"},
        "12": {"id": "animal/1.png", "prompt": "remove the circle", "edit_type": "remove"},
        "13": {"id": "animal/2.png", "prompt": "make the square blue", "edit_type": "alter"},
    }
    (tmp_path / "basic_edit.json").write_text(json.dumps(table))
    out = tmp_path / "imgedit"
    args = [
        "--benchmark",
        tmp_path / "basic_edit.json",
        "--workdir",
        tiny_run,
        "--out",
        out,
        "--protocol",
        "imgedit",
    ]
    with FakeEditJudge() as fake:
        code, err = _cli([*args, *_judge_args(fake)], capsys)
        assert code == 0, err
        asked = fake.of_kind("imgedit")
        assert len(asked) == 3
        # Each call carries its own edit type's rubric ('alter' is read as ImgEdit's 'adjust').
        assert any('of type "add"' in r.text for r in asked) and any(
            'of type "alter"' in r.text for r in asked
        )
    rows = {r["key"]: r for r in aggregate.read_rows(out / "scores.jsonl")}
    for row in rows.values():
        s = row["scores"]
        assert set(s) == {"compliance", "edit_quality", "preservation"} and all(
            1 <= v <= 5 for v in s.values()
        )
        assert row["overall"] == pytest.approx(np.mean(list(s.values())))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["by_task_type"] == pytest.approx({t: rows[k]["overall"] for k, t in (("11", "add"),
                                                     ("12", "remove"), ("13", "alter"))})  # fmt: skip
    assert summary["overall"] == pytest.approx(np.mean([r["overall"] for r in rows.values()]))


def test_viescore_on_a_klein_folder_per_language_with_a_failure(tmp_path, capsys):
    from fake_edit_judge import FakeEditJudge
    from tiny_klein import build_tiny_klein

    folder = build_tiny_klein(tmp_path / "klein")
    bench = tmp_path / "gedit"
    bench.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (task, lang) in enumerate([("color", "en"), ("color", "cn"), ("remove", "en"), ("remove", "en")]):
        PIL.Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(bench / f"{i}.png")
        rows.append({"key": f"k{i}", "task_type": task, "instruction": f"edit number {i}",
                     "instruction_language": lang, "input_image": f"{i}.png"})  # fmt: skip
    (bench / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vie"
    args = ["--benchmark", bench, "--model", folder, "--out", out, "--protocol", "viescore", "--steps", 2]
    with FakeEditJudge() as fake:
        fake.fault("malformed", times=1, only="viescore_quality")
        code, err = _cli([*args, *_judge_args(fake)], capsys)
        assert code == 0, err
        vie = [r for r in fake.received if r.kind == "viescore_semantics"]
        # The semantic call sees the source and the edit (resized to the source: here the same size).
        assert all(r.sizes == [(64, 80), (64, 80)] for r in vie)
    rows = aggregate.read_rows(out / "scores.jsonl")
    failed = [r for r in rows if r["failure"] is not None]
    assert (
        len(failed) == 1 and failed[0]["failure"]["reason"] == "unparsable" and failed[0]["overall"] is None
    )
    for row in rows:
        if row["failure"] is None:
            s = row["scores"]
            assert s["semantics"] == min(s["success"], s["overediting"])
            assert row["overall"] == pytest.approx(np.sqrt(s["semantics"] * s["quality"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"]["total"] == 1 and set(summary["by_language"]) == {"cn", "en"}
    assert summary["policy"]["kind"] == "klein" and summary["policy"]["sampler"]["steps"] == 2
    gallery = (out / "gallery.html").read_text()
    assert all(f"edit number {i}" in gallery for i in range(4))


def test_an_evaluation_killed_by_sigkill_resumes_without_asking_twice(tiny_run, tmp_path):
    """A real kill (SIGKILL, mid-judging): the rerun finishes the rows, and no judge call whose answer was
    received before the kill is asked again (those answers come from the cache)."""
    from fake_edit_judge import FakeEditJudge

    out = tmp_path / "killed"
    with FakeEditJudge() as fake:
        fake.fault("slow", delay_s=0.5)  # every answer half a second late: time to kill mid-run
        command = [sys.executable, "-m", "sfgrpo.evaluate", "--benchmark", "shapes:test", "--workdir",
                   str(tiny_run), "--out", str(out), "--protocol", "regions", "--batch-size", "1",
                   "--concurrency", "1", *map(str, _judge_args(fake))]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while fake.answered < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = fake.answered
        assert 5 <= before < 16
        fake.clear_faults()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        # 16 calls in all, the answers from before the kill not asked again; the one call in flight when
        # the kill came (answered by the judge, never received) may be asked twice.
        assert 16 <= fake.answered <= 17
    rows = aggregate.read_rows(out / "scores.jsonl")
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows}) and len(rows) == 8
    assert all(r["failure"] is None for r in rows)


def test_viescore_on_an_omnigen2_folder_with_its_guidance(tmp_path, capsys):
    """An OmniGen2 folder is evaluated through its own pipeline (its preprocessing, schedule and the
    two guidance scales); klein's --guidance is refused for it."""
    from fake_edit_judge import FakeEditJudge
    from tiny_omnigen2 import build_tiny_omnigen2

    folder = build_tiny_omnigen2(tmp_path / "omnigen2")
    bench = tmp_path / "gedit"
    bench.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(2):
        PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(bench / f"{i}.png")
        rows.append({"key": f"k{i}", "task_type": "color", "instruction": f"edit number {i}",
                     "instruction_language": "en", "input_image": f"{i}.png"})  # fmt: skip
    (bench / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vie"
    args = ["--benchmark", bench, "--model", folder, "--out", out, "--protocol", "viescore", "--steps", 2]
    with FakeEditJudge() as fake:
        code, err = _cli([*args, "--text-guidance", 3, "--image-guidance", 1.5, *_judge_args(fake)], capsys)
        assert code == 0, err
        assert all(r.sizes == [(64, 96), (64, 96)] for r in fake.received if r.kind == "viescore_semantics")
        klein_option = [*args[:4], "--out", tmp_path / "x", "--protocol", "viescore", "--guidance", 2]
        code, err = _cli([*klein_option, *_judge_args(fake)], capsys)
        assert code == 2 and "--guidance is FLUX.2-klein's" in err
    summary = json.loads((out / "summary.json").read_text())
    sampler = summary["policy"]["sampler"]
    assert summary["policy"]["kind"] == "omnigen2" and sampler["steps"] == 2
    assert (sampler["text_guidance"], sampler["image_guidance"], sampler["schedule"]) == (
        3.0,
        1.5,
        "omnigen2",
    )
    assert all(r["failure"] is None for r in aggregate.read_rows(out / "scores.jsonl"))
