"""Bad input to every command gets exit status 2, one line naming the input and what is wrong, no
traceback, and leaves the files as they were (issue 12).

The training command is driven in-process through ``main.run`` (what ``python -m sfgrpo.main`` runs after
parsing its flags) and through real processes for the flag parsing itself; ``sfgrpo.data.build`` and
``sfgrpo.edit`` through their ``main``. The reward server's command line has its own list in
tests/test_server_cli.py and the judge's config in tests/test_reward_config.py.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import PIL.Image
import pytest
from helpers import tiny_config
from png_bomb import zero_png

from sfgrpo import edit, main
from sfgrpo.data import build

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: path -> (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_one_line(err: str, *fragments: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


# --- sfgrpo.main: config values -------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
CONFIG_VALUES = [
    ("rl.lr", -1.0, "config.rl.lr: must be a finite number > 0, got -1.0"),
    ("rl.lr", 0.0, "config.rl.lr: must be a finite number > 0"),
    ("rl.lr", NAN, "config.rl.lr: must be a finite number > 0, got nan"),
    ("rl.lr", INF, "config.rl.lr: must be a finite number > 0, got inf"),
    ("rl.weight_decay", -0.1, "config.rl.weight_decay: must be a finite number >= 0"),
    ("rl.max_grad_norm", 0.0, "config.rl.max_grad_norm: must be a finite number > 0"),
    ("rl.max_grad_norm", NAN, "config.rl.max_grad_norm"),
    ("rl.kl_beta", -1.0, "config.rl.kl_beta"),
    ("rl.kl_beta", NAN, "config.rl.kl_beta"),
    ("rl.adv_clip", 0.0, "config.rl.adv_clip: must be > 0"),
    ("rl.adv_clip", NAN, "config.rl.adv_clip"),
    ("rl.adv_eps", -1e-4, "config.rl.adv_eps"),
    ("rl.mix_lambda", 1.5, "config.rl.mix_lambda: must lie in [0, 1]"),
    ("rl.inner_epochs", 0, "config.rl.inner_epochs: must be >= 1"),
    ("rl.group_size", 1, "config.rl.group_size: a group needs at least 2 rollouts"),
    ("rl.group_size", 5, "config.rl.batch_size"),
    ("rl.credit", "pixel", "config.rl.credit"),
    ("rl.adv_std", "batch", "config.rl.adv_std"),
    ("rl.token_weights", "pixels", "config.rl.token_weights: 'boxes' or 'masks'"),
    ("rl.token_map", "random", "config.rl.token_map: 'own' or 'shuffled'"),
    ("rl.rewards_from", "mine", "config.rl.rewards_from: 'own' or 'other_group'"),
    ("sampler.schedule", "cosine", "config.sampler.schedule: one of ('flux2', 'linear', 'omnigen2')"),
    ("data.seed", -2, "config.data.seed: must be an integer >= 0, or -1"),
    ("warmstart.seed", -5, "config.warmstart.seed: must be an integer >= 0, or -1"),
    ("rl.max_consecutive_skips", 0, "config.rl.max_consecutive_skips: must be an integer >= 1"),
    ("reward.scale", NAN, "config.reward.scale: must be a finite number > 0, got nan"),
    ("reward.scale", 0.0, "config.reward.scale"),
    ("reward.kind", "nope", "config.reward.kind"),
    ("warmstart.batch_size", 0, "config.warmstart.batch_size: must be an integer >= 1, got 0"),
    ("warmstart.checkpoint_every", 0, "config.warmstart.checkpoint_every: must be an integer >= 1, got 0"),
    ("warmstart.steps", -1, "config.warmstart.steps"),
    ("warmstart.lr", NAN, "config.warmstart.lr"),
    ("sampler.num_steps", 0, "config.sampler.num_steps"),
    ("sampler.eval_steps", 0, "config.sampler.eval_steps"),
    ("sampler.eta", 0.0, "config.sampler.eta"),
    ("sampler.cfg_scale", NAN, "config.sampler.cfg_scale"),
    ("sampler.kind", "euler", "config.sampler.kind"),
    ("data.source", "folder", "config.data.source"),
    ("data.resolution", 30, "config.data.resolution"),
    ("data.num_workers", -1, "config.data.num_workers"),
    ("data.r_max", 0, "config.data.r_max"),
    ("model.name", "sd3", "config.model.name"),
    ("model.dtype", "float8", "config.model.dtype"),
    ("model.lora_rank", -1, "config.model.lora_rank"),
    ("model.lora_alpha", NAN, "config.model.lora_alpha"),
    ("model.text_dim", 7, "config.model.text_dim"),
    ("model.transformer.axes_dims_rope", (4, 4, 4, 8), "config.model.transformer.axes_dims_rope"),
    ("train.steps", 0, "config.train.steps"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every"),
    ("train.grid_rows", -1, "config.train.grid_rows"),
    ("train.eval_examples", -1, "config.train.eval_examples"),
    ("seed", -1, "config.seed: must be an integer >= 0"),
]


def _set(config, key, value):
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    node[name] = value


def _run_main(config, workdir, capsys):
    code = main.run(config, str(workdir))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", CONFIG_VALUES, ids=[f"{k}={v}" for k, v, _ in CONFIG_VALUES])
def test_main_config_values(tmp_path, capsys, key, value, message):
    config = tiny_config()
    _set(config, key, value)
    before = snapshot(tmp_path)
    code, err = _run_main(config, tmp_path / "run", capsys)
    assert code == 2
    assert_one_line(err, "sfgrpo: ", message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "key, value, taken",
    [("token_map", "shuffled", "region-to-token map"), ("rewards_from", "other_group", "rewards")],
)
def test_main_controls_need_another_group(tmp_path, capsys, key, value, taken):
    config = tiny_config()
    config.rl.group_size = config.rl.batch_size  # one group: there is no other to take from
    config.rl[key] = value
    before = snapshot(tmp_path)
    code, err = _run_main(config, tmp_path / "run", capsys)
    assert code == 2
    assert_one_line(
        err, f"sfgrpo: config.rl.{key}: ", f"'{value}' takes another group's {taken}: the global batch"
    )
    assert snapshot(tmp_path) == before


def test_main_compilation_cache_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    config = tiny_config()
    config.train.compilation_cache_dir = str(tmp_path / "cache")
    before = snapshot(tmp_path)
    code, err = _run_main(config, tmp_path / "run", capsys)
    assert code == 2
    assert_one_line(err, "sfgrpo: config.train.compilation_cache_dir: ", "exists and is not a folder")
    assert snapshot(tmp_path) == before


# --- sfgrpo.main: what the config points at ------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_assets(tmp_path_factory):
    """A tiny FLUX.2-klein folder and a small TFDS shapes dataset."""
    return helpers.klein_assets(tmp_path_factory.mktemp("klein_bad"))


def _klein_config(folder, data, workdir):
    return helpers.klein_test_config(helpers.load_config("gpu.py"), folder, data, workdir)


def _truncate(file: Path, keep) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))])


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# (name, how to break a copy of the klein folder, what to change in the config, the message's fragments)
KLEIN_CASES = [
    ("missing folder", None, {"model.folder": "{root}/nowhere"}, ["config.model.folder", "does not exist"]),
    (
        "truncated transformer weights",
        lambda f: _truncate(f / "transformer/diffusion_pytorch_model.safetensors", lambda n: n // 2),
        {},
        ["config.model.folder", "diffusion_pytorch_model.safetensors is truncated"],
    ),
    (
        "truncated text encoder header",
        lambda f: _truncate(f / "text_encoder/model.safetensors", lambda n: 100),
        {},
        ["config.model.folder", "model.safetensors: header of", "truncated"],
    ),
    (
        "weights that are not safetensors",
        lambda f: (f / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"<html>404</html>" * 64),
        {},
        ["config.model.folder", "diffusion_pytorch_model.safetensors"],
    ),
    (
        "no vae",
        lambda f: shutil.rmtree(f / "vae"),
        {},
        ["config.model.folder", "missing: vae/"],
    ),
    (
        "head dim that RoPE does not cover",
        lambda f: _edit_json(f / "transformer/config.json", attention_head_dim=32),
        {},
        ["config.model.folder", "sum(axes_dims_rope)=16 != attention_head_dim=32"],
    ),
    (
        "a broken config.json",
        lambda f: (f / "text_encoder/config.json").write_text("{not json"),
        {},
        ["config.model.folder", "text_encoder/config.json: cannot read JSON"],
    ),
    (
        "text layers the encoder does not have",
        None,
        {"model.text_layers": (9, 18, 40)},
        ["config.model.text_layers (9, 18, 40)", "layers [40] out of range"],
    ),
    (
        "missing dataset",
        None,
        {"data.tfds_dir": "{root}/nodata"},
        ["config.data.tfds_dir", "not a directory"],
    ),
    ("empty dataset folder", None, {"data.tfds_dir": "{root}/empty"}, ["config.data.tfds_dir", "holds no"]),
    (
        "judge server URL",
        None,
        {"reward.kind": "server", "reward.url": "notaurl"},
        ["config.reward.url", "http(s) URL"],
    ),
    (
        "host judge module",
        None,
        {"reward.kind": "host", "reward.host_import": "no_such_module_xyz", "reward.host_reward": "x"},
        ["config.reward.host_import", "no_such_module_xyz"],
    ),
]


@pytest.mark.parametrize("name, damage, changes, fragments", KLEIN_CASES, ids=[c[0] for c in KLEIN_CASES])
def test_main_refuses_what_the_config_points_at(
    tmp_path, capsys, klein_assets, name, damage, changes, fragments
):
    folder, data = klein_assets
    if damage is not None:
        folder = Path(shutil.copytree(folder, tmp_path / "klein"))
        damage(folder)
    (tmp_path / "empty").mkdir()
    config = _klein_config(folder, data, tmp_path / "run")
    for key, value in changes.items():
        _set(config, key, value.format(root=tmp_path) if isinstance(value, str) else value)
    before = snapshot(tmp_path), snapshot(data)
    code, err = _run_main(config, tmp_path / "run", capsys)
    assert code == 2
    assert_one_line(err, "sfgrpo: ", *fragments)
    assert (snapshot(tmp_path), snapshot(data)) == before


def test_main_refuses_a_stopped_judge_server(tmp_path, capsys):
    config = tiny_config()
    config.reward.kind, config.reward.url = "server", "http://127.0.0.1:9"
    config.reward.retries, config.reward.backoff_s = 0, 0.01
    code, err = _run_main(config, tmp_path / "run", capsys)
    assert code == 2
    assert_one_line(err, "sfgrpo: reward server http://127.0.0.1:9 is not answering")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_main_refuses_a_workdir_that_cannot_be_one(tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("keep me")
    workdir = tmp_path / "notes.txt" if where == "file" else tmp_path / "notes.txt" / "run"
    code, err = _run_main(tiny_config(), workdir, capsys)
    assert code == 2
    assert_one_line(err, f"--workdir {workdir}", "is a file, not a directory")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# --- sfgrpo.main: the command line ----------------------------------------------------------------------

COMMAND_LINES = [
    (["--config.rl.no_such_key=1"], "unknown config key 'no_such_key' in --config.rl.no_such_key"),
    (["--config.nosection.x=1"], "unknown config key 'nosection' in --config.nosection.x"),
    (["--config.rl.lr=abc"], "--config.rl.lr=abc: could not convert string to float: 'abc'"),
    (["--config.rl.group_size=2.5"], "--config.rl.group_size=2.5"),
    (["--config.rl.credit"], "Missing value for flag --config.rl.credit"),
    (["--config=configs/nothere.py"], "--config configs/nothere.py: no such file"),
    (["--config=configs/gpu.py:nope"], "ValueError: configs/gpu.py: unknown variant 'nope'"),
    (["--config={broken}"], "cannot load it: SyntaxError"),
    (["extra"], "unexpected arguments ['extra']"),
    (["--config.rl.lr=-1"], "config.rl.lr: must be a finite number > 0, got -1.0"),
]


@pytest.mark.parametrize("args, message", COMMAND_LINES, ids=[" ".join(a) for a, _ in COMMAND_LINES])
def test_main_command_line(tmp_path, args, message):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    args = [a.format(broken=broken) for a in args]
    if not any(a.startswith("--config=") for a in args):
        args = ["--config=configs/default.py", *args]
    done = subprocess.run(
        [sys.executable, "-m", "sfgrpo.main", f"--workdir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2
    # Only absl's start-up notes (I-prefixed log lines) may precede the message.
    lines = [line for line in done.stderr.splitlines() if not line.startswith(("I1", "W1"))]
    assert_one_line("\n".join(lines) + "\n", "sfgrpo: ", message)
    assert not (tmp_path / "run").exists()


# --- sfgrpo.data.build ----------------------------------------------------------------------------------

BUILD_CASES = [
    (["--output", "{file}", "--shapes", "4"], "--output", "is a file, not a directory"),
    (["--output", "{file}/data", "--shapes", "4"], "--output", "is a file, not a directory"),
    (["--output", "{out}", "--shapes", "0"], "--shapes needs at least one example, got 0"),
    (["--output", "{out}", "--shapes", "4", "--r-max", "-1"], "--r-max must be >= 0"),
    (["--output", "{out}", "--shapes", "4", "--split", "test"], "--split 'test' applies to --input"),
    (["--output", "{out}", "--shapes", "4", "--box-format", "unit"], "--box-format applies to --input"),
    (["--output", "{out}", "--shapes", "4", "--heldout", "-1"], "--heldout must be >= 0"),
    (["--output", "{out}", "--shapes", "4", "--image-size", "8"], "image_size must be >= 16"),
    (["--output", "{out}", "--shapes", "4", "--max-edits", "0"], "max_edits"),
    (["--output", "{out}", "--shapes", "four"], "argument --shapes: invalid int value: 'four'"),
    (["--output", "{out}", "--input", "{dir}"], "--box-format is required with --input"),
    (["--output", "{out}", "--input", "{dir}", "--box-format", "unit"], "no metadata.jsonl"),
    (["--output", "{out}", "--input", "{dir}", "--box-format", "pixel", "--seed", "3"], "--seed"),
    (["--output", "{out}", "--shapes", "4", "--input", "{dir}"], "not allowed with argument"),
    (["--output", "{out}", "--input", "{records}", "--box-format", "unit"], "record 'a'"),
]


@pytest.mark.parametrize(
    "args, fragments", [(c[0], c[1:]) for c in BUILD_CASES], ids=[" ".join(c[0][2:]) for c in BUILD_CASES]
)
def test_build_command_line(tmp_path, capsys, args, fragments):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "dir").mkdir()
    records = tmp_path / "records"
    records.mkdir()
    (records / "metadata.jsonl").write_text(
        json.dumps({"id": "a", "source": "gone.png", "instruction": "x", "regions": []}) + "\n"
    )
    names = {
        "file": tmp_path / "notes.txt",
        "out": tmp_path / "out",
        "dir": tmp_path / "dir",
        "records": records,
    }
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        build.main([a.format(**names) for a in args])
    assert exit_.value.code == 2
    assert_one_line(capsys.readouterr().err, "python -m sfgrpo.data.build: error: ", *fragments)
    assert snapshot(tmp_path) == before


def test_failed_build_into_an_existing_folder_keeps_what_was_there(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    records = tmp_path / "records"
    records.mkdir()
    (records / "metadata.jsonl").write_text(
        json.dumps({"id": "a", "source": "gone.png", "instruction": "x", "regions": []}) + "\n"
    )
    with pytest.raises(SystemExit):
        build.main(["--output", str(out), "--input", str(records), "--box-format", "unit"])
    assert_one_line(capsys.readouterr().err, "record 'a'")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


# --- sfgrpo.edit ----------------------------------------------------------------------------------------


@pytest.fixture
def edit_files(tmp_path):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(src)
    bomb = tmp_path / "bomb.png"
    import base64  # noqa: PLC0415

    bomb.write_bytes(base64.b64decode(zero_png(10_000, 10_000)))  # 100 MP in ~300 KB, under PIL's limit
    (tmp_path / "outdir").mkdir()
    return {"src": src, "bomb": bomb, "model": tmp_path / "model", "outdir": tmp_path / "outdir"}


EDIT_CASES = [
    (["--image", "{bomb}"], "--image", "bomb.png' is 10000x10000 = 100000000 pixels"),
    (["--max_text_length", "0"], "--max_text_length=0 must be >= 1"),
    (["--guidance", "nan"], "--guidance=nan must be a finite number >= 1"),
    (["--guidance", "0.5"], "--guidance=0.5"),
    (["--seed", "-1"], "--seed=-1 must be >= 0"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--width", "100"], "--width=100 must be a positive multiple of 16"),
    (["--out", "{outdir}"], "is a directory"),
    (["--out", "{outdir}/sub/o.png"], "does not exist"),
    (["--model", "{model}"], "--model", "does not exist"),
]


@pytest.mark.parametrize(
    "args, fragments", [(c[0], c[1:]) for c in EDIT_CASES], ids=[" ".join(c[0]) for c in EDIT_CASES]
)
def test_edit_command_line(tmp_path, capsys, edit_files, args, fragments):
    given = {a for a in args if a.startswith("--")}
    defaults = {
        "--model": str(edit_files["model"]),
        "--image": str(edit_files["src"]),
        "--prompt": "make it red",
        "--out": str(tmp_path / "o.png"),
    }
    argv = [x for k, v in defaults.items() if k not in given for x in (k, v)]
    argv += [a.format(**edit_files) for a in args]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        edit.main(argv)
    assert exit_.value.code == 2
    assert_one_line(capsys.readouterr().err, "sfgrpo.edit: ", *fragments)
    assert snapshot(tmp_path) == before
