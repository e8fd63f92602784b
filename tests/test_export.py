"""``sfgrpo.export`` and ``sfgrpo.edit --workdir/--lora``: a trained run becomes a model diffusers loads.

FLUX.2-klein: a tiny klein folder, 2 GRPO iterations with a large learning rate (so that the adapters move
the edit far beyond the parity tolerance), the trainer's own export (a PEFT adapter), and the CLI's merged
export. diffusers' ``Flux2KleinPipeline`` with ``load_lora_weights`` on the adapter and ``from_pretrained``
on the merged folder produce, from the same noise, the image ``sfgrpo.edit --workdir`` produces, within the
edit path's parity tolerance (tests/klein_parity.py); the merged folder trains on in sfgrpo.

The demo's tiny model: its merged export (a diffusers transformer folder and the word encoder) computes
what the run's warm start plus adapters compute.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from flax import nnx
from helpers import klein_assets, klein_test_config, load_config, tiny_config
from klein_parity import PROMPT, SENSITIVE, STEPS, assert_parity, moved, noise, pipeline, source, theirs
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.numpy import save_file
from tiny_klein import build_tiny_klein

from sfgrpo import edit, export, train, trained
from sfgrpo.data import shapes
from sfgrpo.models import flux2, lora
from sfgrpo.models.klein import load_klein

TEXT_TOKENS = 64


# --- FLUX.2-klein ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_run(tmp_path_factory):
    """(base folder, workdir, data) of 2 GRPO iterations of LoRA on the tiny klein folder."""
    root = tmp_path_factory.mktemp("export_klein")
    folder, data = klein_assets(root)
    c = _klein_config(folder, data, root)
    train.train(c, root / "run")
    return folder, root / "run", data


def _klein_config(folder, data, root):
    c = klein_test_config(load_config("gpu.py"), folder, data, root)
    c.model.prompt_cache = ""
    c.rl.lr = 2e-2  # two steps that move the edit visibly
    return c


def _edit(parts, image=None):
    return edit.edit_pixels(
        parts, source() if image is None else image, PROMPT, steps=STEPS, noise=noise((4, 5))
    )


def test_trainer_exports_the_adapter_that_diffusers_loads(klein_run):
    folder, workdir, _ = klein_run
    out = workdir / "export" / "step_2"
    assert sorted(p.name for p in out.iterdir()) == sorted([export.INFO_FILE, export.LORA_FILE])
    recorded = json.loads((workdir / trained.BASE_FILE).read_text())
    with safe_open(str(out / export.LORA_FILE), framework="numpy") as f:
        meta = f.metadata()
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 8.0
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in peft["transformer.target_modules"]
    assert meta["base_model_name"] == "klein" and meta["base_model_sha256"] == recorded["sha256"]
    assert meta["sfgrpo_step"] == "2" and json.loads(meta["sfgrpo_config"])["rl"]["lr"] == 2e-2

    ours = _edit(edit.load_parts(workdir=str(workdir), max_text_length=TEXT_TOKENS))
    pipe = pipeline(folder)
    before = theirs(pipe, source(), PROMPT, noise((4, 5)), (4, 5), TEXT_TOKENS)
    pipe.load_lora_weights(str(out))
    assert_parity(ours, theirs(pipe, source(), PROMPT, noise((4, 5)), (4, 5), TEXT_TOKENS))
    assert moved(ours, before) > SENSITIVE  # the adapters matter far beyond the tolerance

    # --lora: the same file folded into the base folder.
    with_file = _edit(edit.load_parts(str(folder), lora_file=str(out / export.LORA_FILE), max_text_length=64))
    assert_parity(with_file, ours)


def test_merged_export_loads_in_diffusers_and_sfgrpo_and_trains_on(klein_run, tmp_path):
    folder, workdir, data = klein_run
    out = export.export_run(workdir, tmp_path / "merged", fmt="merged", max_shard_bytes=100_000)
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    assert json.loads((out / export.INFO_FILE).read_text())["merged"] is True
    for component in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / component).exists()

    ours = _edit(edit.load_parts(workdir=str(workdir), max_text_length=TEXT_TOKENS))
    assert_parity(_edit(load_klein(out, max_text_length=TEXT_TOKENS)), ours)
    assert_parity(ours, theirs(pipeline(out), source(), PROMPT, noise((4, 5)), (4, 5), TEXT_TOKENS))

    # The merged folder is a base sfgrpo trains from.
    c = _klein_config(out, data, tmp_path)
    seen = []
    train.train(c, tmp_path / "again", on_step=lambda step, m: seen.append(m["loss"]))
    assert len(seen) == 2 and np.isfinite(seen).all()
    assert json.loads((tmp_path / "again" / trained.BASE_FILE).read_text())["folder"] == str(out)


def test_a_missing_or_different_base_is_refused(klein_run, tmp_path, capsys):
    folder, workdir, data = klein_run
    other = build_tiny_klein(tmp_path / "other", seed=1)  # the same architecture, other weights

    code, err = _export_cli(["--workdir", workdir, "--out", tmp_path / "x", "--base", other], capsys)
    assert code == 2 and "is not the model this run trained on" in err and "other" in err
    code, err = _export_cli(
        ["--workdir", workdir, "--out", tmp_path / "x", "--base", tmp_path / "gone"], capsys
    )
    assert code == 2 and "does not exist" in err and "gone" in err
    assert not (tmp_path / "x").exists()
    # Resuming the run on another base is refused, even with config changes allowed.
    c = _klein_config(other, data, tmp_path)
    c.train.steps = 3
    c.train.allow_config_change = True
    with pytest.raises(train.TrainingError, match="not the model this run trained on"):
        train.train(c, workdir)
    # A copy of the base elsewhere is the same base.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    out = export.export_run(workdir, tmp_path / "adapter.safetensors", base=copy)
    assert out.is_file()


def _cli(main, args, capsys):
    """(exit status, stderr) of a command's ``main``."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _export_cli(args, capsys):
    return _cli(export.main, args, capsys)


def test_export_cli_bad_inputs(klein_run, tmp_path, capsys):
    _, workdir, _ = klein_run
    out = tmp_path / "o"
    code, err = _export_cli(["--workdir", tmp_path / "nowhere", "--out", out], capsys)
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _export_cli(["--workdir", empty, "--out", out], capsys)
    assert code == 2 and "no config.json" in err
    shutil.copy(workdir / "config.json", empty / "config.json")
    code, err = _export_cli(["--workdir", empty, "--out", out], capsys)
    assert code == 2 and "has no checkpoint" in err
    code, err = _export_cli(["--workdir", workdir, "--out", out, "--step", 9], capsys)
    assert code == 2 and "no checkpoint of step 9 (it has [2])" in err
    code, err = _export_cli(["--workdir", workdir, "--out", out, "--step", "last"], capsys)
    assert code == 2 and "--step 'last'" in err
    code, err = _export_cli(["--workdir", workdir, "--out", tmp_path / "no" / "o"], capsys)
    assert code == 2 and "does not exist" in err
    out.mkdir()
    code, err = _export_cli(["--workdir", workdir, "--out", out], capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    code, _ = _export_cli(["--workdir", workdir, "--out", out, "--overwrite"], capsys)
    assert code == 0
    assert (out / export.LORA_FILE).is_file() and not list(tmp_path.glob(".*partial"))
    for line in err.strip().splitlines():
        assert "Traceback" not in line


def test_lora_file_from_diffusers_peft_folds_in_with_its_alpha(klein_run, tmp_path):
    """A LoRA written by diffusers/PEFT (rank 2, alpha 3, attention only) edits as diffusers applies it."""
    folder, _, _ = klein_run
    pipe = pipeline(folder)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.transformer.add_adapter(
        LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(pipe.transformer)
    Flux2KleinPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata={"r": 2, "lora_alpha": 3, "target_modules": targets},
    )
    file = tmp_path / export.LORA_FILE
    fresh = pipeline(folder)
    fresh.load_lora_weights(str(file))
    ours = _edit(edit.load_parts(str(folder), lora_file=str(file), max_text_length=TEXT_TOKENS))
    assert_parity(ours, theirs(fresh, source(), PROMPT, noise((4, 5)), (4, 5), TEXT_TOKENS))
    assert moved(ours, _edit(load_klein(folder, max_text_length=TEXT_TOKENS))) > SENSITIVE

    bad = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_x.lora_down.weight": np.zeros((2, 4), np.float32)}, str(bad))
    with pytest.raises(lora.LoRAFileError, match="not in diffusers' format"):
        edit.load_parts(str(folder), lora_file=str(bad))


# --- the demo's tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export_tiny") / "run"
    c = tiny_config()
    c.rl.lr = 2e-2
    train.train(c, workdir)
    return workdir


def test_tiny_merged_export_computes_what_the_run_computes(tiny_run, tmp_path, capsys):
    out = tiny_run / "export" / "step_2"
    model, info = Flux2Transformer2DModel.from_pretrained(out / "transformer", output_loading_info=True)
    assert isinstance(model, Flux2Transformer2DModel)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    run = trained.load_trained(tiny_run)
    assert run.step == 2 and run.lora
    rng = np.random.default_rng(0)
    cfg = run.policy.transformer.config
    x = jnp.asarray(rng.standard_normal((2, 16, cfg.in_channels)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 8, cfg.joint_attention_dim)), jnp.float32)
    img_ids, txt_ids = flux2.make_position_ids(4, 4, 8)
    t = jnp.asarray([0.3, 0.8])

    def velocity(transformer):
        return np.asarray(transformer(x, text, t, img_ids, txt_ids))

    exported = flux2.from_pretrained(out / "transformer")
    np.testing.assert_allclose(velocity(exported), velocity(run.policy.transformer), atol=1e-5)
    words = safe_open(str(out / "text_encoder" / "model.safetensors"), framework="numpy").get_tensor("words")
    np.testing.assert_array_equal(words, np.asarray(run.policy.text_encoder.words.get_value()))
    assert json.loads((out / "text_encoder" / "config.json").read_text())["vocabulary"] == list(shapes.VOCAB)

    # Adapters far from zero (this tiny run's rewards are all 0, so GRPO left them at B = 0): the merged
    # export computes what base + adapters compute.
    base = velocity(run.policy.transformer)
    for lin in lora.linear_paths(run.policy.transformer).values():
        if lin.lora is not None:
            b = lin.lora.b.get_value()
            lin.lora.b.set_value(jnp.asarray(rng.standard_normal(b.shape) * 0.05, b.dtype))
    adapted = velocity(run.policy.transformer)
    assert np.abs(adapted - base).mean() > 1e-3
    export.export_policy(run.policy, run.config, run.base, run.step, tmp_path / "random", "merged")
    np.testing.assert_allclose(
        velocity(flux2.from_pretrained(tmp_path / "random" / "transformer")), adapted, atol=1e-5
    )

    code, err = _export_cli(["--workdir", tiny_run, "--out", tmp_path / "a", "--format", "peft"], capsys)
    assert code == 2 and "base is its warm start" in err
    code, _ = _export_cli(["--workdir", tiny_run, "--out", tmp_path / "s1", "--step", 1], capsys)
    assert code == 0
    info = json.loads((tmp_path / "s1" / export.INFO_FILE).read_text())
    assert info["step"] == 1 and info["format"] == "merged" and info["base"] == {"kind": "warmstart"}


def _edit_cli(args, capsys):
    return _cli(edit.main, args, capsys)


def test_edit_cli_with_a_run(klein_run, tiny_run, tmp_path, capsys):
    _, workdir, _ = klein_run
    src = tmp_path / "in.png"
    PIL.Image.fromarray(source()).save(src)
    common = ["--image", src, "--prompt", PROMPT, "--steps", STEPS, "--max_text_length", TEXT_TOKENS]
    code, err = _edit_cli(["--workdir", workdir, "--step", 2, *common, "--out", tmp_path / "o.png"], capsys)
    assert code == 0, err
    with PIL.Image.open(tmp_path / "o.png") as image:
        assert image.size == (source().shape[1], source().shape[0])
    for args, message in (
        (["--workdir", workdir, "--step", 9], "no checkpoint of step 9"),
        (["--workdir", tiny_run], "demo's 'tiny' model"),
        (["--model", workdir, "--step", 2], "--step 2 needs --workdir"),
        ([], "give the model"),
        (["--workdir", workdir, "--lora", tmp_path / "none.safetensors"], "is not a file"),
    ):
        code, err = _edit_cli([*args, *common, "--out", tmp_path / "bad.png"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "bad.png").exists()


def test_full_fine_tuning_exports_its_weights_at_every_export_step(tmp_path):
    c = tiny_config()
    c.model.lora_rank = 0
    c.rl.lr = 1e-3
    c.train.export_every = 1
    # A judge whose rewards differ within groups (the shapes reward scores this barely trained model 0).
    c.reward.kind = "host"
    c.reward.host_reward = "brightness"
    c.reward.host_import = "brightness_judge"
    c.reward.overlap = False
    train.train(c, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "export").iterdir()) == ["step_1", "step_2"]
    run = trained.load_trained(tmp_path / "run")
    assert not run.lora
    exported = flux2.from_pretrained(tmp_path / "run" / "export" / "step_2" / "transformer")
    mine = nnx.to_flat_state(nnx.state(run.policy.transformer))
    theirs = dict(nnx.to_flat_state(nnx.state(exported)))
    for path, value in mine:
        np.testing.assert_array_equal(np.asarray(theirs[path].get_value()), np.asarray(value.get_value()))
    first = flux2.from_pretrained(tmp_path / "run" / "export" / "step_1" / "transformer")
    moved_weights = [
        np.abs(np.asarray(theirs[p].get_value()) - np.asarray(v.get_value())).max()
        for p, v in nnx.to_flat_state(nnx.state(first))
    ]
    assert max(moved_weights) > 0  # step 2 trained on from step 1
    info = json.loads((tmp_path / "run" / "export" / "step_2" / export.INFO_FILE).read_text())
    assert info["format"] == "merged" and info["lora"] is None and info["merged"] is False
