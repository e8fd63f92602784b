"""The config stored with checkpoints: flattening, the global batch, and which changes a resume refuses."""

from helpers import tiny_config

from sfgrpo import run_config


def test_snapshot_is_flat_json_with_the_global_batch():
    c = tiny_config()
    snap = run_config.snapshot(c, process_count=2)
    assert snap["rl.credit"] == "spatial"
    assert snap["model.transformer.num_layers"] == 1
    assert snap["model.transformer.axes_dims_rope"] == [4, 4, 4, 4]
    assert snap[run_config.GLOBAL_BATCH] == 2 * c.rl.batch_size


def test_compare_splits_experiment_changes_from_harmless_ones():
    c = tiny_config()
    saved = run_config.snapshot(c, 1)
    c.rl.lr = 1e-3
    c.train.steps = 99
    c.mesh.fsdp = 2
    c.reward.timeout_s = 5.0
    altering, harmless = run_config.compare(saved, run_config.snapshot(c, 1))
    assert altering == {"rl.lr": (tiny_config().rl.lr, 1e-3)}
    assert set(harmless) == {"train.steps", "mesh.fsdp", "reward.timeout_s"}


def test_more_hosts_with_the_same_per_host_batch_change_the_experiment():
    c = tiny_config()
    altering, _ = run_config.compare(run_config.snapshot(c, 1), run_config.snapshot(c, 2))
    assert list(altering) == [run_config.GLOBAL_BATCH]


def test_added_and_removed_keys_show_as_absent():
    altering, _ = run_config.compare({"a": 1, "b": 2}, {"b": 2, "c": 3})
    assert altering == {"a": (1, "<absent>"), "c": ("<absent>", 3)}


def test_keys_added_later_are_absent_in_old_checkpoints_only_at_their_neutral_value():
    # A checkpoint from before rl.token_map resumes with 'own' (the same experiment), not 'shuffled'.
    old = {"rl.lr": 1e-3}
    altering, _ = run_config.compare(old, {"rl.lr": 1e-3, "rl.token_map": "own", "data.seed": -1})
    assert altering == {}
    altering, _ = run_config.compare(old, {"rl.lr": 1e-3, "rl.token_map": "shuffled"})
    assert altering == {"rl.token_map": ("<absent>", "shuffled")}


def test_describe_is_one_line_and_bounded():
    changes = {f"k{i}": (i, i + 1) for i in range(12)}
    text = run_config.describe(changes)
    assert "\n" not in text and text.startswith("k0 0 -> 1, k1 1 -> 2") and text.endswith("and 4 more")
    assert run_config.describe({"rl.credit": ("spatial", "scalar")}) == "rl.credit 'spatial' -> 'scalar'"


def test_harmless_prefixes_match_whole_sections_only():
    assert run_config.is_harmless("mesh.data")
    assert run_config.is_harmless("train.steps")
    assert not run_config.is_harmless("train.steps_extra")
    assert not run_config.is_harmless("model.folder")


def test_eval_benchmark_keys_resume_old_checkpoints_and_may_change():
    c = tiny_config()
    current = run_config.snapshot(c, 1)
    old = {k: v for k, v in current.items() if not k.startswith("train.eval_benchmark")}
    assert run_config.compare(old, current) == ({}, {})  # a checkpoint from before the keys
    c.train.eval_benchmark, c.train.eval_benchmark_examples = "shapes:test", 5
    altering, harmless = run_config.compare(old, run_config.snapshot(c, 1))
    assert altering == {} and set(harmless) == {"train.eval_benchmark", "train.eval_benchmark_examples"}
