"""``train.eval_benchmark``: the trainer scores a benchmark subset at every evaluation, and its figure at a
step is the one ``python -m sfgrpo.evaluate`` gives for that step's checkpoint.

A 2-iteration run of the demo's tiny model, evaluated at steps 0, 1 and 2 on 5 examples of its held-out
shapes split (5 is no multiple of the 8 batch devices: the batch is padded) with the shapes protocol. A
longer warm start than the other tests' makes edits the shapes reward scores above 0, and the brightness
judge moves the model, so that the figures of different steps differ.
"""

import json

import helpers
import pytest
from helpers import tiny_config

from sfgrpo import evaluate, main, metrics, runtime, train
from sfgrpo.evaluation import in_training

EXAMPLES = 5


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eval_benchmark") / "run"
    c = tiny_config()
    c.warmstart.steps, c.warmstart.lr = 200, 1e-2  # edits the shapes reward scores above 0 (+6 s)
    c.rl.lr = 2e-2  # two iterations that move the edits
    c.reward.kind = "host"  # rewards that differ within groups, so GRPO moves the model
    c.reward.host_reward = "brightness"
    c.reward.host_import = "brightness_judge"
    c.reward.overlap = False
    c.train.steps = 2
    c.train.eval_every = 1
    c.train.eval_benchmark = "shapes:test"
    c.train.eval_benchmark_examples = EXAMPLES
    train.train(c, workdir)
    return workdir


def test_bench_metrics_at_every_evaluation_match_sfgrpo_evaluate(bench_run, tmp_path):
    records = metrics.read_metrics(bench_run / metrics.METRICS_FILE)
    bench = {r["step"]: r for r in records if "bench/overall" in r}
    assert sorted(bench) == [0, 1, 2]
    assert bench[0]["stage"] == "eval" and bench[2]["stage"] == "grpo"
    for r in bench.values():
        assert r["bench/failures"] == 0
        assert 0.0 <= r["bench/overall"] <= 1.0 and "bench/score/reward" in r and "bench/score/quality" in r
    assert bench[2]["bench/overall"] > 0
    # GRPO moved the figure by far more than the tolerance of the comparison below.
    assert abs(bench[2]["bench/overall"] - bench[0]["bench/overall"]) > 1e-4
    tb = metrics.read_tb_scalars(bench_run / "tb")
    assert [s for s, _ in tb["grpo/bench/overall"]] == [1, 2]

    out = tmp_path / "eval"
    args = ["--benchmark", "shapes:test", "--workdir", bench_run, "--step", "2", "--limit", EXAMPLES]
    assert evaluate.main([str(a) for a in [*args, "--out", out]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == EXAMPLES
    assert bench[2]["bench/overall"] == pytest.approx(summary["overall"], abs=1e-5)
    for task_type, value in summary["by_task_type"].items():
        assert bench[2][f"bench/type/{task_type}"] == pytest.approx(value, abs=1e-5)
    for name, score in summary["scores"].items():
        assert bench[2][f"bench/score/{name}"] == pytest.approx(score["overall"], abs=1e-5)


def test_a_judged_protocol_asks_the_judge_once_and_caches_in_the_workdir(tmp_path):
    from fake_edit_judge import FakeEditJudge

    c = tiny_config()
    c.train.eval_benchmark, c.train.eval_benchmark_examples = "shapes:test", 3
    c.train.eval_benchmark_protocol = "regions"
    with FakeEditJudge() as fake:
        c.train.eval_benchmark_judge_url, c.train.eval_benchmark_judge_model = fake.url, fake.model
        setup = helpers.Setup(c)
        bench = in_training.open_benchmark(c, tmp_path)
        with runtime.use_mesh(setup.mesh):
            bench.place(setup.programs, setup.mesh, setup.model.text_fields)
            m = bench.evaluate(0, setup.programs, setup.params, setup.frozen)
            assert fake.answered == 2 * 3  # semantics and quality per edit
            again = bench.evaluate(1, setup.programs, setup.params, setup.frozen)
        bench.close()
        assert fake.answered == 2 * 3  # the same edits: answered from the cache
    assert again == m
    assert m["bench/failures"] == 0 and 0.0 <= m["bench/score/region_success_rate"] <= 1.0
    assert {im.shape for im in fake.received[0].images} == {(32, 32, 3)}
    assert (tmp_path / in_training.JUDGE_CACHE / "answers.jsonl").stat().st_size > 0


BAD = [
    ({"train.eval_benchmark_protocol": "clip"}, "config.train.eval_benchmark_protocol: must be one of"),
    ({"train.eval_benchmark_examples": 0}, "config.train.eval_benchmark_examples: must be an integer >= 1"),
    ({"train.eval_benchmark_box_format": "xywh"}, "config.train.eval_benchmark_box_format: must be one of"),
    (
        {"train.eval_benchmark": "shapes:test", "train.eval_benchmark_protocol": "viescore"},
        "config.train.eval_benchmark_judge_url: the 'viescore' protocol asks a VLM judge",
    ),
    (
        {"train.eval_benchmark": "shapes:test", "train.eval_benchmark_judge_url": "http://127.0.0.1:9/v1"},
        "config.train.eval_benchmark_judge_url: the shapes protocol is scored by the run's reward",
    ),
    ({"train.eval_benchmark": "{root}/nowhere"}, "config.train.eval_benchmark: '"),
    ({"train.eval_benchmark": "shapes:dev"}, "config.train.eval_benchmark: 'shapes:dev'"),
    (
        {
            "train.eval_benchmark": "shapes:test",
            "train.eval_benchmark_protocol": "viescore",
            "train.eval_benchmark_judge_url": "http://127.0.0.1:9/v1",
            "train.eval_benchmark_judge_model": "judge",
        },
        "config.train.eval_benchmark_judge_url: the judge endpoint http://127.0.0.1:9/v1 is not answering",
    ),
]


@pytest.mark.parametrize("changes, message", BAD, ids=[",".join(c) + f"-{i}" for i, (c, _) in enumerate(BAD)])
def test_bad_eval_benchmark_settings_stop_the_run_before_it_writes(tmp_path, capsys, changes, message):
    config = tiny_config()
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value.format(root=tmp_path) if isinstance(value, str) else value
    code = main.run(config, str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()
