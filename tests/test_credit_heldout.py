"""The credit study's larger held-out evaluation: a study folder of two real tiny runs (arms scalar and
spatial, one seed) and their base, scored on more held-out examples than the runs hold, then summarised
with gains over the base and paired differences; a rerun skips the finished evaluations."""

import json

import numpy as np
import PIL.Image
import pytest
from helpers import tiny_config

from sfgrpo import train
from sfgrpo.evaluation import aggregate
from sfgrpo.experiments import credit_heldout


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout_study") / "study"
    rows = []
    for arm, seed in (("scalar", 0), ("spatial", 1)):
        c = tiny_config()
        c.seed = seed
        c.data.seed = c.warmstart.seed = 0  # one task and base for every run, as in the study
        c.rl.lr = 2e-2  # two iterations that move the edits
        # A judge whose rewards differ within groups (the shapes reward scores this barely trained model 0,
        # so GRPO would not move it); the evaluation still scores with the shapes reward.
        c.reward.kind = "host"
        c.reward.host_reward = "brightness"
        c.reward.host_import = "brightness_judge"
        c.reward.overlap = False
        workdir = root / "runs" / f"k1_{arm}_s0"
        train.train(c, workdir)
        # The study writes run folders relative to itself; older studies' summaries hold absolute paths.
        named = str(workdir) if arm == "scalar" else str(workdir.relative_to(root))
        rows.append({"k": 1, "arm": arm, "seed": 0, "status": "ok", "workdir": named})
    rows.append({"k": 1, "arm": "placebo", "seed": 0, "status": "failed", "workdir": str(root / "x")})
    (root / "base").mkdir()
    (root / "base" / "k1").symlink_to(root / "runs" / "k1_scalar_s0")  # the runs share one warm start
    (root / "study.json").write_text(json.dumps({"steps": 2, "ks": [1]}))
    (root / "summary.json").write_text(json.dumps({"rows": rows}))
    return root


def _png(path):
    return np.asarray(PIL.Image.open(path).convert("RGB")).astype(int)


def _mean_reward(folder):
    return np.mean([r["overall"] for r in aggregate.read_rows(folder / "scores.jsonl")])


def test_scores_base_and_finals_on_more_examples_and_pairs_the_arms(study):
    lines: list[str] = []
    args = credit_heldout.parse_args(["--study", str(study), "--examples", "11", "--jobs", "2"])
    assert credit_heldout.run(args, log=lines.append) == 0, lines
    assert "1 of 3 runs did not finish: left out" in lines
    root = study / "heldout" / "test11x1"
    doc = json.loads((root / "step2" / "heldout.json").read_text())
    folders = {"base": root / "base_k1"} | {a: root / "step2" / f"k1_{a}_s0" for a in ("scalar", "spatial")}
    for folder in folders.values():  # 11 examples: the runs' 8 held-out ones and 3 new
        assert len(aggregate.read_rows(folder / "scores.jsonl")) == 11
    assert json.loads((folders["scalar"] / "summary.json").read_text())["policy"]["step"] == 2
    base = _mean_reward(folders["base"])
    k1 = doc["by_k"]["1"]
    assert k1["base"]["reward"] == pytest.approx(base)
    for arm in ("scalar", "spatial"):
        final = _mean_reward(folders[arm])
        assert k1["arms"][arm]["reward"]["mean"] == pytest.approx(final)
        assert k1["arms"][arm]["gain"]["mean"] == pytest.approx(final - base)
        assert k1["arms"][arm]["reward"]["n"] == 1 and k1["arms"][arm]["reward"]["ci95"] is None
    pair = k1["paired"]["spatial - scalar"]
    assert pair["mean"] == pytest.approx(_mean_reward(folders["spatial"]) - _mean_reward(folders["scalar"]))
    assert pair["n"] == 1 and set(k1["paired"]) == {"spatial - scalar"}  # the failed placebo is left out
    # Each evaluation edited with its own policy (this barely trained model scores 0 whatever it edits).
    for a, b in (("base", "scalar"), ("scalar", "spatial")):
        moved = []
        rows_a, rows_b = (
            sorted(aggregate.read_rows(folders[x] / "scores.jsonl"), key=lambda r: r["key"]) for x in (a, b)
        )
        for row_a, row_b in zip(rows_a, rows_b, strict=True):
            assert row_a["key"] == row_b["key"]
            moved.append(np.abs(_png(folders[a] / row_a["edit"]) - _png(folders[b] / row_b["edit"])).mean())
        assert np.mean(moved) > 0.5, (a, b, moved)
    # Edit by edit: each run against its base, and the arms of one seed against each other.
    gains = {r["arm"]: r["gain_edits"] for r in doc["runs"]}
    for arm in ("scalar", "spatial"):
        assert gains[arm]["mean"] == pytest.approx(_mean_reward(folders[arm]) - base)
        assert gains[arm]["edits"] == 11 and gains[arm]["ci95"] >= 0
    (by_seed,) = doc["paired_by_seed"]
    assert (by_seed["pair"], by_seed["seed"], by_seed["k"]) == ("spatial - scalar", 0, 1)
    assert by_seed["reward"]["mean"] == pytest.approx(pair["mean"])
    report = (root / "step2" / "heldout.md").read_text()
    assert "| spatial | 1 |" in report and "| spatial - scalar |" in report
    assert "| spatial - scalar | 0 |" in report and "gain over base (± edits)" in report

    lines.clear()
    assert credit_heldout.run(args, log=lines.append) == 0
    assert "3 of 3 evaluations already complete: skipped" in lines
    assert not any(line.startswith("evaluating") for line in lines), lines

    # The rollout's sampler: its own folder, each policy's SDE edits, the same numbers taken the same way.
    sde_args = credit_heldout.parse_args(["--study", str(study), "--examples", "11", "--sampler", "sde"])
    assert credit_heldout.run(sde_args, log=lines.append) == 0, lines
    sde_root = study / "heldout" / "test11x1_sde"
    sde_doc = json.loads((sde_root / "step2" / "heldout.json").read_text())
    for name, folder in folders.items():
        sde_folder = sde_root / folder.relative_to(root)
        sampler = json.loads((sde_folder / "evaluation.json").read_text())["policy"]["sampler"]
        assert sampler["kind"] == "sde" and sampler["steps"] == 3, name  # tiny_config's rollout steps
        rows = {r["key"]: r for r in aggregate.read_rows(sde_folder / "scores.jsonl")}
        ode_rows = {r["key"]: r for r in aggregate.read_rows(folder / "scores.jsonl")}
        assert rows.keys() == ode_rows.keys()
        moved = [
            np.abs(_png(sde_folder / rows[k]["edit"]) - _png(folder / ode_rows[k]["edit"])).mean()
            for k in rows
        ]
        assert np.mean(moved) > 0.5, (name, moved)
    sde_gain = {r["arm"]: r["gain_edits"]["mean"] for r in sde_doc["runs"]}
    base_sde = _mean_reward(sde_root / "base_k1")
    assert sde_gain["spatial"] == pytest.approx(_mean_reward(sde_root / "step2" / "k1_spatial_s0") - base_sde)
    assert "rollout sampler with sde window noise" in (sde_root / "step2" / "heldout.md").read_text()

    # Another reward's view of the same ODE edits: its own folder, the same images, the options recorded.
    options = "preserve_tol=0.01,preserve_floor=0"
    argv = ["--study", str(study), "--examples", "11", "--shapes-reward", options]
    strict_args = credit_heldout.parse_args(argv)
    assert strict_args.shapes_reward == "preserve_floor=0,preserve_tol=0.01"  # sorted: one folder per reward
    assert credit_heldout.run(strict_args, log=lines.append) == 0, lines
    strict_root = study / "heldout" / "test11x1_reward-preserve_floor=0,preserve_tol=0.01"
    for name, folder in folders.items():
        strict_folder = strict_root / folder.relative_to(root)
        policy = json.loads((strict_folder / "evaluation.json").read_text())["policy"]
        assert policy["shapes_reward"]["preserve_tol"] == 0.01, name
        rows = {r["key"]: r for r in aggregate.read_rows(strict_folder / "scores.jsonl")}
        ode_rows = {r["key"]: r for r in aggregate.read_rows(folder / "scores.jsonl")}
        for key, row in rows.items():
            assert np.array_equal(_png(strict_folder / row["edit"]), _png(folder / ode_rows[key]["edit"]))
    assert "preserve_floor=0,preserve_tol=0.01" in (strict_root / "step2" / "heldout.md").read_text()


def test_bad_flags_and_folders_are_one_line_errors(tmp_path, capsys):
    assert credit_heldout.main(["--study", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--study" in err[0] and "study.json" in err[0]
    assert credit_heldout.main(["--study", str(tmp_path), "--examples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--examples" in err[0]
    assert credit_heldout.main(["--study", str(tmp_path), "--eta", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eta 0.5" in err[0] and "--sampler" in err[0]
    assert credit_heldout.main(["--study", str(tmp_path), "--shapes-reward", "kept"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shapes-reward" in err[0] and "KEY=VALUE" in err[0]


def test_summary_statistics_over_seeds():
    base = {2: {"reward": 0.5, "region_success_rate": 0.4, "multi_region_success": 0.2,
                "background_preservation": 0.9, "failed": 0, "edits": 64}}  # fmt: skip
    finals = {"scalar": [0.52, 0.50, 0.54], "spatial": [0.55, 0.56, 0.55], "placebo": [0.51, 0.50]}
    runs = [
        {"k": 2, "arm": arm, "seed": seed,
         "means": {"reward": v, "region_success_rate": 0.5, "multi_region_success": 0.3,
                   "background_preservation": 0.8 + seed / 100, "failed": seed, "edits": 64}}
        for arm, values in finals.items() for seed, v in enumerate(values)
    ]  # fmt: skip
    s = credit_heldout.summarise(base, runs)["2"]
    spatial = s["arms"]["spatial"]
    assert spatial["reward"]["mean"] == pytest.approx(np.mean([0.55, 0.56, 0.55]))
    assert spatial["reward"]["ci95"] == pytest.approx(4.303 * np.std([0.55, 0.56, 0.55], ddof=1) / np.sqrt(3))
    assert spatial["gain"]["mean"] == pytest.approx(np.mean([0.55, 0.56, 0.55]) - 0.5)
    assert spatial["background_preservation"]["mean"] == pytest.approx(0.81)
    assert spatial["failed_edits"] == 3
    diffs = [0.03, 0.06, 0.01]
    paired = s["paired"]["spatial - scalar"]
    assert paired["mean"] == pytest.approx(np.mean(diffs)) and paired["positive"] == 3 and paired["n"] == 3
    assert paired["ci95"] == pytest.approx(4.303 * np.std(diffs, ddof=1) / np.sqrt(3))
    # The placebo ran seeds 0 and 1 only: its pairs use those.
    assert s["paired"]["spatial - placebo"]["n"] == 2
    assert s["paired"]["placebo - scalar"]["mean"] == pytest.approx(np.mean([-0.01, 0.0]))
    assert s["paired"]["placebo - scalar"]["positive"] == 0
    assert "mix - scalar" not in s["paired"]


def _scores(folder, rows):
    folder.mkdir()
    lines = [{"key": key, "overall": value, "scores": {"reward": value}} for key, value in rows.items()]
    (folder / "scores.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return folder


def test_edit_differences_pair_the_same_edits_and_skip_the_invalid(tmp_path):
    a = _scores(tmp_path / "a", {"x/0": 0.9, "y/0": 0.5, "z/0": None, "w/0": 0.7})
    b = _scores(tmp_path / "b", {"w/0": 0.4, "x/0": 0.6, "y/0": 0.5, "z/0": 0.1})  # another order
    d = credit_heldout.edit_difference(a, b)
    diffs = [0.3, 0.0, 0.3]  # x, y, w; z has no score in a
    assert d["edits"] == 3 and d["mean"] == pytest.approx(np.mean(diffs))
    assert d["ci95"] == pytest.approx(1.96 * np.std(diffs, ddof=1) / np.sqrt(3))
    one = _scores(tmp_path / "one", {"x/0": 0.2})
    assert credit_heldout.edit_difference(one, b) == {"mean": pytest.approx(-0.4), "ci95": None, "edits": 1}
    other = _scores(tmp_path / "other", {"q/0": 0.2})
    with pytest.raises(credit_heldout.HeldoutError, match="no edit scored in both"):
        credit_heldout.edit_difference(other, b)


def test_runs_scored_on_other_examples_than_their_base_are_refused(tmp_path):
    for name, sha in (("base", "abc"), ("same", "abc"), ("other", "def")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"benchmark": {"sha256": sha}}))
    credit_heldout._check_same_benchmark(tmp_path / "base", [tmp_path / "same"])
    with pytest.raises(credit_heldout.HeldoutError, match="other held-out examples"):
        credit_heldout._check_same_benchmark(tmp_path / "base", [tmp_path / "same", tmp_path / "other"])


def test_a_sweep_without_its_rows_is_a_one_line_error_and_rows_are_labelled_by_setting(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps({"steps": 2, "ks": [1]}))
    assert credit_heldout.main(["--study", str(tmp_path), "--sweep"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sweep" in err[0] and "sweep.json" in err[0] and "--sweep-only" in err[0]
    rows = [
        {"k": 2, "arm": "scalar", "seed": 1000, "lr": 5e-4, "clip": 1e-4, "kl_beta": 0.3},
        {"k": 2, "arm": "spatial", "seed": 1000, "lr": 5e-4, "clip": 1e-3},  # a sweep from before β
    ]
    (tmp_path / "sweep.json").write_text(json.dumps({"settings": {"steps": 40}, "rows": rows}))
    steps, labelled = credit_heldout.sweep_rows(tmp_path)
    assert steps == 40
    assert [r["arm"] for r in labelled] == [
        "scalar lr=0.0005 clip=0.0001 β=0.3",
        "spatial lr=0.0005 clip=0.001 β=0",
    ]
