"""``python -m sfgrpo.main --dry_run``: every shipped config plans on this CPU machine (shrunk so that its
programs compile in seconds), writes nothing in the workdir, and reads no weights; and a run without
--dry_run on too few devices ends in one line, exit status 2.

The klein configs plan against a folder holding the components' configs and weight files without tensors: a
dry run that read a weight would fail on them. The three dry runs run side by side (one process each).
"""

import http.server
import json
import os
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sfgrpo import flops

ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "SFGRPO_DRY_RUN_DEVICES")

# Component configs of a klein folder at test size (tests/tiny_klein.py's architecture).
_KLEIN = {
    "model_index.json": {"_class_name": "Flux2KleinPipeline", "is_distilled": True},
    "transformer/config.json": {
        "_class_name": "Flux2Transformer2DModel",
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 4, 4, 4],
        "guidance_embeds": False,
        "in_channels": 16,
        "joint_attention_dim": 96,
        "mlp_ratio": 3.0,
        "num_attention_heads": 2,
        "num_layers": 1,
        "num_single_layers": 1,
        "patch_size": 1,
        "timestep_guidance_channels": 32,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKLFlux2",
        "block_out_channels": [8, 8, 8, 8],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "patch_size": [2, 2],
    },
    "text_encoder/config.json": {
        "model_type": "qwen3",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 28,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
    },
    "tokenizer/tokenizer_config.json": {},
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
    },
}
_WEIGHTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
)

# Small programs: few steps, small images, short prompts, small batches; each config keeps its mesh shape.
_SMALL = [
    "--config.sampler.num_steps=4",
    "--config.data.resolution=64",
    "--config.rl.group_size=4",
    "--config.rl.grad_accum=1",  # a second micro-batch per step would double the update's compile time
]
_KLEIN_SMALL = [
    *_SMALL,
    "--config.sampler.window_size=1",
    "--config.sampler.window_hi=2",
    "--config.model.max_text_tokens=8",
    "--config.model.lora_rank=4",
]
CASES = {
    # 2 simulated devices (the flag); the tiny policy.
    "default": (
        ["--config=configs/default.py", *_SMALL, "--config.rl.batch_size=8", "--config.rl.micro_batch=8"],
        ["--dry_run_devices=2"],
        {},
    ),
    # 2 processes (the flag) x the target's 4 chips per host: a (2, 4, 1) mesh; prompt-cache text features.
    "tpu_v5": (
        [
            "--config=configs/tpu_v5.py",
            *_KLEIN_SMALL,
            "--config.rl.batch_size=8",
            "--config.rl.micro_batch=16",
        ],
        ["--num_processes=2"],
        {},
    ),
    # 1 process (the launch environment) on a (1, 2, 1) mesh (the config's, overridden); no prompt cache:
    # the text encoder is part of the programs.
    "gpu": (
        [
            "--config=configs/gpu.py",
            *_KLEIN_SMALL,
            "--config.mesh.data=1",
            "--config.mesh.fsdp=2",
            "--config.rl.batch_size=8",
            "--config.rl.micro_batch=8",
            "--config.model.prompt_cache=",
        ],
        [],
        {"OMPI_COMM_WORLD_SIZE": "1"},
    ),
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    return {**env, **extra}


def _klein_folder(root: Path) -> Path:
    for name, content in _KLEIN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    for name in _WEIGHTS:
        (root / name).write_bytes(struct.pack("<Q", 2) + b"{}")  # a safetensors header, and no tensors
    return root


class _Judge(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Runs the three dry runs side by side; {name: (completed process, workdir, plan file)}."""
    root = tmp_path_factory.mktemp("dry_run")
    folder = _klein_folder(root / "klein")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge = f"http://127.0.0.1:{server.server_address[1]}/v1"
    running = {}
    for name, (args, flags, env) in CASES.items():
        workdir, plan = root / f"work_{name}", root / f"plan_{name}.txt"
        extra = (
            [f"--config.model.folder={folder}", f"--config.reward.url={judge}"] if name != "default" else []
        )
        cmd = [
            sys.executable,
            "-m",
            "sfgrpo.main",
            "--dry_run",
            *args,
            *extra,
            *flags,
            f"--workdir={workdir}",
        ]
        cmd.append(f"--plan_out={plan}")
        running[name] = (
            subprocess.Popen(
                cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
            workdir,
            plan,
        )
    out = {}
    for name, (proc, workdir, plan) in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), workdir, plan)
    server.shutdown()
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_plans_a_shipped_config(plans, name):
    proc, workdir, plan = plans[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()  # nothing written in the workdir
    text = proc.stdout
    assert plan.read_text().strip() == text.strip()
    for field in ("mesh ", "batch ", "tokens ", "parameters ", "checks", "rollout ", "update ", "total "):
        assert field in text, field
    assert "FLOPs per iteration" in text
    assert re.search(r"\n  total +[1-9][\d.]* [MGTP]FLOP", text), text
    if name == "default":
        assert "devices 2  [--dry_run_devices]" in text
        assert "mesh          data=2 x fsdp=1 x tensor=1 = 2 devices" in text
        assert "global 8 = 8 per process x 1 process" in text
    if name == "tpu_v5":
        assert "processes     2  [--num_processes]" in text
        assert "mesh          data=2 x fsdp=4 x tensor=1 = 8 devices" in text
        assert "global 16 = 8 per process x 2 processes" in text
        assert "against TPU v5p" in text and "of one device" in text
        assert "XLA:CPU has no bf16 matmuls" in text  # the f32-copy caveat
    if name == "gpu":
        assert "processes     1  [$OMPI_COMM_WORLD_SIZE (the launch environment)]" in text
        assert "devices 2  [the config's mesh]" in text
        assert "mesh          data=1 x fsdp=2 x tensor=1 = 2 devices" in text
        assert "attention cudnn (traced as blockwise" in text
    if name != "default":
        assert "model folder  ok:" in text and "no weights" in text
        assert "judge         ok:" in text and "answered HTTP 404" in text
        assert "dataset       unreachable:" in text


def test_wrong_machine_is_one_line(tmp_path):
    """configs/tpu_v5.py's mesh on one CPU device: one line naming the mesh and the devices, exit 2."""
    workdir = tmp_path / "run"
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "sfgrpo.main", "--config=configs/tpu_v5.py", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sfgrpo:")]
    assert len(lines) == 1, proc.stderr
    assert "data=-1 x fsdp=4 x tensor=1 (-1: the rest) = 32 devices" in lines[0]
    assert "found 1 cpu device in 1 process" in lines[0]
    assert "launch/tpu_v5.sh" in lines[0] and "--dry_run" in lines[0]
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config=configs/nope.py"], "configs/nope.py"),
        (["--config=configs/default.py", "--config.mesh.tensor=0"], "sfgrpo: config.mesh.tensor: a positive"),
        (["--config=configs/default.py", "--dry_run_devices=0"], "sfgrpo: --dry_run needs >= 1 process"),
        (["--config=configs/default.py", "--plan_out=/nonexistent/plan.txt"], "sfgrpo: --plan_out="),
    ],
)
def test_bad_input_to_dry_run_is_one_line(tmp_path, args, expected):
    cmd = [sys.executable, "-m", "sfgrpo.main", "--dry_run", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr


def test_flops_count_scan_bodies_times_their_length():
    def f(w, x):
        def body(c, _):
            return jnp.tanh(c @ w), None

        def outer(c, _):
            return jax.lax.scan(jax.checkpoint(body), c, None, length=3)[0], None

        return jax.lax.scan(outer, x, None, length=5)[0].sum()

    w, x = jnp.ones((64, 64)), jnp.ones((8, 64))
    one = 2 * 8 * 64 * 64
    assert flops.count(jax.make_jaxpr(f)(w, x)) == (15 * one, 0)
    # The gradient: the forward, its recomputation (remat), and two products in the backward pass.
    assert flops.count(jax.make_jaxpr(jax.grad(f))(w, x)) == (4 * 15 * one, 0)
