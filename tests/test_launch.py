"""The launch scripts (launch/tpu_v5.sh, launch/gpu_multinode.sh, launch/device_credit.sh): their dry run
(DRY_RUN=1), their argument checks and the quoting of awkward overrides, run with bash as subprocesses. No
network, no JAX: gcloud, ssh, git, python and tar on PATH are stubs that either fail (a call is recorded and
the test fails) or record their argv."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_v5.sh"
GPU = REPO / "launch" / "gpu_multinode.sh"
DEVICE_CREDIT = REPO / "launch" / "device_credit.sh"
STUBBED = ("gcloud", "ssh", "scp", "git", "python", "python3", "pip", "tar", "mktemp")

# Overrides a shell would mangle if they were not quoted, and one with a newline.
AWKWARD = [
    "--config.reward.url=http://judge:8000/v1",
    "--config.a=two words",
    "--config.b=it's",
    '--config.c="double"',
    "--config.d=$HOME ${HOME} $(id) `id`",
    "--config.e=x; touch PWNED & echo | cat > PWNED2",
    "--config.f=back\\slash",
    "--config.g=*?[a]~",
    "--config.h=",
    "--config.i=é",
    "--config.j='",
    "--config.k=line\nbreak",
]

# Records one call: its argv (name first) and working directory, NUL-separated, a \x01 after each call.
RECORD = '#!/bin/bash\n{ printf "%s\\0" "${0##*/}" "$PWD" "$@"; printf "\\1"; } >> "$RECORD_FILE"\n'
FAIL = '#!/bin/bash\necho "${0##*/} $*" >> "$CALLED_FILE"\nexit 97\n'


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """A home directory and two bin directories: `fail` (stubs that must not run) and `record`."""
    dirs = {name: tmp_path / name for name in ("home", "fail", "record")}
    for path in dirs.values():
        path.mkdir()
    for name in STUBBED:
        for kind, text in (("fail", FAIL), ("record", RECORD)):
            stub = dirs[kind] / name
            stub.write_text(text)
            stub.chmod(0o755)
    dirs["called"] = tmp_path / "called.txt"
    dirs["record_file"] = tmp_path / "record.bin"
    return dirs


def run(
    script: Path,
    args: list[str],
    sandbox: dict[str, Path],
    stubs: str = "fail",
    cwd: Path | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """The script under bash with a clean environment (no COORDINATOR or SLURM variables leak in)."""
    environ = {
        "PATH": f"{sandbox[stubs]}:/usr/bin:/bin",
        "HOME": str(sandbox["home"]),
        "LC_ALL": "C.UTF-8",
        "CALLED_FILE": str(sandbox["called"]),
        "RECORD_FILE": str(sandbox["record_file"]),
        **env,
    }
    return subprocess.run(
        ["bash", str(script), *args],
        env=environ,
        cwd=cwd or sandbox["home"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def calls(sandbox: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """The recorded calls: (program, working directory, arguments)."""
    if not sandbox["record_file"].exists():
        return []
    out = []
    for record in sandbox["record_file"].read_bytes().decode().split("\x01")[:-1]:
        name, cwd, *args = record.split("\0")[:-1]
        out.append((name, cwd, args))
    sandbox["record_file"].unlink()
    return out


def nothing_ran(sandbox: dict[str, Path]) -> None:
    assert not sandbox["called"].exists(), sandbox["called"].read_text()


def commands(stdout: str) -> list[str]:
    """The printed command lines (the dry run's comment lines start with #)."""
    return [line for line in stdout.splitlines() if not line.startswith("#")]


PASTE_PRELUDE = r"""
record() { printf '%s\0' "$@"; printf '\1'; }
cd() { record cd "$@"; }
git() { record git "$@"; }
gcloud() { record gcloud "$@"; }
python() { record python "$@"; }
archive='$archive'
"""


def pasted(line: str, sandbox: dict[str, Path]) -> list[list[str]]:
    """What a printed line runs when pasted into bash: the argv of each command (recorded, not run)."""
    result = subprocess.run(
        ["bash", "-c", PASTE_PRELUDE + line],
        env={
            "PATH": f"{sandbox['fail']}:/usr/bin:/bin",
            "HOME": "/nohome",
            "CALLED_FILE": str(sandbox["called"]),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    nothing_ran(sandbox)
    return [record.split("\0")[:-1] for record in result.stdout.split("\x01")[:-1]]


def parsed(line: str, sandbox: dict[str, Path]) -> list[list[str]]:
    """The commands of a printed line, as bash runs them; shlex reads the same (lines without $'...')."""
    argvs = pasted(line, sandbox)
    if "$'" not in line:
        words = shlex.split(line)
        split = [list(group) for group in _split_on(words, "&&")]
        assert split == argvs
    return argvs


def _split_on(words: list[str], sep: str) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    for word in words:
        if word == sep:
            groups.append([])
        else:
            groups[-1].append(word)
    return groups


def one_line_error(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def usage_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("Runs SpatialFlow-GRPO")
    assert "DRY_RUN=1" in result.stderr


# --- launch/tpu_v5.sh -------------------------------------------------------------------------------------


def gcloud_ssh(tpu: str, zone: str, remote: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        tpu,
        "--zone",
        zone,
        "--worker=all",
        "--command",
        remote,
    ]


def remote_runs(
    remote: str, sandbox: dict[str, Path], repo_dir: str, shell: str
) -> list[tuple[str, str, list[str]]]:
    """The remote command under a worker's login shell (`$SHELL -c`, as ssh runs it) in a fake home that holds
    the repository's virtualenv; every program it calls records its argv instead of running."""
    venv = sandbox["home"] / repo_dir / ".venv" / "bin"
    venv.mkdir(parents=True, exist_ok=True)
    (venv / "activate").write_text("")
    env = {
        "PATH": f"{sandbox['record']}:/usr/bin:/bin",
        "HOME": str(sandbox["home"]),
        "RECORD_FILE": str(sandbox["record_file"]),
        "LC_ALL": "C.UTF-8",
    }
    result = subprocess.run(
        [shell, "-c", remote], env=env, cwd=sandbox["home"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert not (sandbox["home"] / "PWNED").exists()
    return calls(sandbox)


@pytest.mark.parametrize("repo_dir", [None, "my 'repo' $HOME; dir"])
def test_tpu_train_dry_run(sandbox, repo_dir):
    env = {"DRY_RUN": "1"} | ({"SFGRPO_DIR": repo_dir} if repo_dir else {})
    workdir = "/mnt/shared runs/it's $klein"
    result = run(TPU, ["train", "my-tpu", "us-east5-a", workdir, *AWKWARD], sandbox, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    nothing_ran(sandbox)
    assert "every worker of TPU my-tpu" in result.stdout
    [line] = commands(result.stdout)
    [argv] = parsed(line, sandbox)
    remote = argv[-1]
    assert argv == gcloud_ssh("my-tpu", "us-east5-a", remote)
    intended = ["-m", "sfgrpo.main", "--config=configs/tpu_v5.py", f"--workdir={workdir}", *AWKWARD]
    repo_dir = repo_dir or "sfgrpo"
    for shell in ("bash", "dash"):  # a worker's login shell: bash on Cloud TPU VMs; the quoting is POSIX
        if shutil.which(shell) is None:
            continue
        [(name, cwd, args)] = remote_runs(remote, sandbox, repo_dir, shell)
        assert (name, cwd, args) == ("python", str(sandbox["home"] / repo_dir), intended)


def test_tpu_train_runs_what_the_dry_run_prints(sandbox):
    args = ["train", "my-tpu", "us-east5-a", "/mnt/shared/klein", *AWKWARD]
    printed = commands(run(TPU, args, sandbox, DRY_RUN="1").stdout)
    result = run(TPU, args, sandbox, stubs="record")
    assert result.returncode == 0, result.stderr
    [(name, _, argv)] = calls(sandbox)
    assert [[name, *argv]] == [argvs[0] for argvs in (parsed(line, sandbox) for line in printed)]


def test_tpu_setup_dry_run(sandbox):
    repo_dir = "my 'repo' dir"
    result = run(TPU, ["setup", "my-tpu", "us-east5-a"], sandbox, DRY_RUN="1", SFGRPO_DIR=repo_dir)
    assert result.returncode == 0, result.stderr
    nothing_ran(sandbox)
    mktemp, archive, scp, ssh = commands(result.stdout)
    assert mktemp == "archive=$(mktemp -d)/sfgrpo.tar.gz"
    assert parsed(archive, sandbox) == [
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", "$archive", "HEAD"]
    ]
    assert '"$archive"' in archive and '"$archive"' in scp
    assert parsed(scp, sandbox) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "--zone",
            "us-east5-a",
            "--worker=all",
            "$archive",
            "my-tpu:sfgrpo.tar.gz",
        ]
    ]
    [argv] = parsed(ssh, sandbox)
    remote = argv[-1]
    assert argv == gcloud_ssh("my-tpu", "us-east5-a", remote)
    for shell in ("bash", "dash"):
        if shutil.which(shell) is None:
            continue
        home, repo = sandbox["home"], str(sandbox["home"] / repo_dir)
        assert remote_runs(remote, sandbox, repo_dir, shell) == [
            ("tar", str(home), ["-xzf", "sfgrpo.tar.gz", "-C", repo_dir]),
            ("python3", repo, ["-m", "venv", ".venv"]),
            ("pip", repo, ["install", "-e", ".[tpu]"]),
        ]


def test_tpu_setup_runs_what_the_dry_run_prints(sandbox, tmp_path):
    printed = commands(run(TPU, ["setup", "my-tpu", "us-east5-a"], sandbox, DRY_RUN="1").stdout)
    (sandbox["record"] / "mktemp").write_text(f"#!/bin/bash\nmkdir -p {tmp_path}/t && echo {tmp_path}/t\n")
    result = run(TPU, ["setup", "my-tpu", "us-east5-a"], sandbox, stubs="record")
    assert result.returncode == 0, result.stderr
    archive = f"{tmp_path}/t/sfgrpo.tar.gz"
    expected = [parsed(line, sandbox)[0] for line in printed[1:]]
    expected = [[archive if word == "$archive" else word for word in argv] for argv in expected]
    assert [[name, *argv] for name, _, argv in calls(sandbox)] == expected
    assert not (tmp_path / "t").exists()  # the archive's temporary directory is removed


def test_tpu_help(sandbox):
    result = run(TPU, ["--help"], sandbox)
    assert result.returncode == 0 and result.stdout.startswith("Runs SpatialFlow-GRPO")


@pytest.mark.parametrize(
    "args", [[], ["train"], ["train", "my-tpu"], ["train", "my-tpu", "us-east5-a"], ["setup", "my-tpu"]]
)
def test_tpu_missing_arguments(sandbox, args):
    usage_error(run(TPU, args, sandbox))
    nothing_ran(sandbox)


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["deploy", "t", "z", "/w"], {}, ["deploy", "action"]),
        (["setup", "t", "z", "extra arg"], {}, ["extra arg"]),
        (["train", "t", "z", "--config.seed=1"], {}, ["WORKDIR", "--config.seed=1"]),
        (["train", "t", "z", "--config.seed=1", "--config.x=2"], {}, ["WORKDIR", "--config.seed=1"]),
        (["train", "t", "z", "runs/klein"], {}, ["WORKDIR", "runs/klein", "absolute"]),
        (["train", "t", "z", "gs://bucket/klein"], {}, ["WORKDIR", "gs://bucket/klein"]),
        (["train", "--zone", "z", "/w"], {}, ["TPU_NAME", "--zone"]),
        (["train", "t", "", "/w"], {}, ["ZONE"]),
        (["train", "t", "-z", "/w"], {}, ["ZONE", "-z"]),
        (["train", "t", "z", "/w"], {"SFGRPO_DIR": "~/sfgrpo"}, ["SFGRPO_DIR", "~/sfgrpo"]),
        (["train", "t", "z", "/w"], {"DRY_RUN": "yes"}, ["DRY_RUN", "yes"]),
        (
            ["train", "t", "z", "/w"],
            {"SFGRPO_CONFIG": "configs/nope.py"},
            ["SFGRPO_CONFIG", "configs/nope.py"],
        ),
        (["train", "t", "z", "/w"], {"SFGRPO_CONFIG": "../x.py"}, ["SFGRPO_CONFIG", "configs/NAME.py"]),
    ],
)
def test_tpu_bad_arguments(sandbox, args, env, names):
    one_line_error(run(TPU, args, sandbox, **env), *names)
    nothing_ran(sandbox)


# --- launch/gpu_multinode.sh ------------------------------------------------------------------------------

GPU_ENVS = {
    "explicit": {"COORDINATOR": "host0:1234", "NUM_HOSTS": "2", "HOST_RANK": "1"},
    "one host": {"COORDINATOR": "127.0.0.1:1234", "NUM_HOSTS": "1", "HOST_RANK": "0"},
    "slurm": {"SLURM_JOB_ID": "77", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
    "none": {},
}


@pytest.mark.parametrize("case", GPU_ENVS)
def test_gpu_dry_run_and_run(sandbox, case):
    env = GPU_ENVS[case]
    workdir = "/shared/runs/it's $klein"
    result = run(GPU, [workdir, *AWKWARD], sandbox, DRY_RUN="1", **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    nothing_ran(sandbox)
    [comment, line] = result.stdout.splitlines()
    distributed = []
    if "COORDINATOR" in env:
        distributed = [
            f"--coordinator_address={env['COORDINATOR']}",
            f"--num_processes={env['NUM_HOSTS']}",
            f"--process_id={env['HOST_RANK']}",
        ]
        assert f"rank {env['HOST_RANK']} of {env['NUM_HOSTS']}" in comment
    elif "SLURM_JOB_ID" in env:
        assert "jax reads SLURM's variables" in comment and "task 1 of 2" in comment
    else:
        assert "not under SLURM" in comment
    intended = [
        "-m",
        "sfgrpo.main",
        "--config=configs/gpu.py",
        f"--workdir={workdir}",
        *distributed,
        *AWKWARD,
    ]
    assert parsed(line, sandbox) == [["cd", str(REPO)], ["python", *intended]]
    # Without DRY_RUN the script runs exactly that (python is a recording stub here).
    result = run(GPU, [workdir, *AWKWARD], sandbox, stubs="record", **env)
    assert result.returncode == 0, result.stderr
    assert calls(sandbox) == [("python", str(REPO), intended)]


def test_gpu_relative_workdir_is_from_the_current_directory(sandbox, tmp_path):
    result = run(GPU, ["runs/klein"], sandbox, cwd=tmp_path, DRY_RUN="1")
    assert parsed(commands(result.stdout)[0], sandbox)[1][4] == f"--workdir={tmp_path}/runs/klein"


def test_gpu_help(sandbox):
    result = run(GPU, ["-h"], sandbox)
    assert result.returncode == 0 and result.stdout.startswith("Runs SpatialFlow-GRPO")


def test_gpu_missing_workdir(sandbox):
    usage_error(run(GPU, [], sandbox, **GPU_ENVS["explicit"]))
    nothing_ran(sandbox)


COORD = {"COORDINATOR": "host0:1234"}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        (COORD, ["NUM_HOSTS"]),
        (COORD | {"HOST_RANK": "0"}, ["NUM_HOSTS"]),
        (COORD | {"NUM_HOSTS": "2"}, ["HOST_RANK"]),
        (COORD | {"NUM_HOSTS": "", "HOST_RANK": "0"}, ["NUM_HOSTS"]),
        (COORD | {"NUM_HOSTS": "0", "HOST_RANK": "0"}, ["NUM_HOSTS", "'0'"]),
        (COORD | {"NUM_HOSTS": "-1", "HOST_RANK": "0"}, ["NUM_HOSTS", "'-1'"]),
        (COORD | {"NUM_HOSTS": "two", "HOST_RANK": "0"}, ["NUM_HOSTS", "'two'"]),
        (COORD | {"NUM_HOSTS": "02", "HOST_RANK": "0"}, ["NUM_HOSTS", "'02'"]),
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": "2"}, ["HOST_RANK", "'2'"]),
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": "-1"}, ["HOST_RANK", "'-1'"]),
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": "x"}, ["HOST_RANK", "'x'"]),
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": "1.0"}, ["HOST_RANK", "'1.0'"]),
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": " 1"}, ["HOST_RANK"]),
        # bash arithmetic would run the command substitution in an unchecked value
        (COORD | {"NUM_HOSTS": "2", "HOST_RANK": "a[$(touch PWNED)]"}, ["HOST_RANK"]),
        ({"COORDINATOR": "host0", "NUM_HOSTS": "2", "HOST_RANK": "0"}, ["COORDINATOR", "'host0'"]),
        ({"COORDINATOR": "host0:0", "NUM_HOSTS": "2", "HOST_RANK": "0"}, ["COORDINATOR"]),
        ({"COORDINATOR": "host0:70000", "NUM_HOSTS": "2", "HOST_RANK": "0"}, ["COORDINATOR"]),
        ({"COORDINATOR": ":1234", "NUM_HOSTS": "2", "HOST_RANK": "0"}, ["COORDINATOR"]),
        ({"NUM_HOSTS": "2", "HOST_RANK": "0"}, ["NUM_HOSTS", "COORDINATOR"]),
        ({"HOST_RANK": "1"}, ["HOST_RANK", "COORDINATOR"]),
        ({"DRY_RUN": "true"}, ["DRY_RUN", "'true'"]),
        ({"SFGRPO_CONFIG": "/etc/passwd"}, ["SFGRPO_CONFIG", "configs/NAME.py"]),
        ({"SFGRPO_CONFIG": "configs/nope.py"}, ["SFGRPO_CONFIG", "no such file"]),
    ],
)
@pytest.mark.parametrize("dry_run", ["0", "1"])
def test_gpu_bad_environment(sandbox, env, names, dry_run):
    env = {"DRY_RUN": dry_run} | env
    one_line_error(run(GPU, ["/shared/runs/klein"], sandbox, **env), *names)
    nothing_ran(sandbox)
    assert not (sandbox["home"] / "PWNED").exists()


@pytest.mark.parametrize("workdir", ["--config.seed=1", "-v", ""])
def test_gpu_bad_workdir(sandbox, workdir):
    one_line_error(run(GPU, [workdir, "--config.x=1"], sandbox, **GPU_ENVS["explicit"]), "WORKDIR", workdir)
    nothing_ran(sandbox)


@pytest.mark.parametrize(
    ("script", "args", "config"),
    [
        (TPU, ["train", "t", "z", "/w"], "configs/omnigen2_tpu_v5.py"),
        (GPU, ["/w"], "configs/omnigen2_gpu.py"),
    ],
)
def test_sfgrpo_config_picks_another_shipped_config(sandbox, script, args, config):
    result = run(script, args, sandbox, DRY_RUN="1", SFGRPO_CONFIG=config)
    assert result.returncode == 0, result.stderr
    assert f"--config={config}" in result.stdout
    nothing_ran(sandbox)


# --- launch/device_credit.sh -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, ["OUT"]),
        ({"SEEDS": "0"}, ["SEEDS", "'0'"]),
        ({"SEEDS": "two"}, ["SEEDS", "'two'"]),
        ({"JOBS": "-1"}, ["JOBS", "'-1'"]),
        ({"BUDGET_S": "1.5"}, ["BUDGET_S", "'1.5'"]),
        ({"SCORE_S": ""}, ["SCORE_S"]),
        ({"FIRST_SEED": "07"}, ["FIRST_SEED", "'07'"]),
        ({"FIRST_SEED": "a[$(touch PWNED)]"}, ["FIRST_SEED"]),
        ({"TINY": "yes"}, ["TINY", "'yes'"]),
    ],
)
def test_device_credit_bad_settings(sandbox, tmp_path, env, names):
    env = ({"OUT": str(tmp_path / "out")} if names != ["OUT"] else {}) | env
    one_line_error(run(DEVICE_CREDIT, [], sandbox, **env), *names)
    nothing_ran(sandbox)
    assert not (sandbox["home"] / "PWNED").exists() and not (REPO / "PWNED").exists()


def test_device_credit_runs_the_declared_study_then_scores_and_packs_it(sandbox, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = run(DEVICE_CREDIT, [], sandbox, "record", OUT=str(out), WORK=str(work), PYTHON="python3")
    assert result.returncode == 0, result.stderr
    ran = [(name, args) for name, _, args in calls(sandbox) if args[:2] != ["-m", "pip"]]  # .whl/ or not
    assert [name for name, _ in ran] == ["python3", "python3", "python3", "tar"]
    study, score = ran[1][1], ran[2][1]
    # The declared confirmation (docs/credit_study/kl01_confirm): seeds 7-9, every arm, β = 0.1, 40 steps.
    assert study[:2] == ["-m", "sfgrpo.experiments.credit"]
    assert " ".join(study[2:]) == (
        f"--out {work} --ks 2 --first-seed 7 --seeds 3 --arms scalar,spatial,placebo --jobs 3 "
        "--sweep-seeds 0 --hparams docs/credit_study/kl_mid/hparams_beta0.1.json --set rl.grad_accum=1 "
        "--set rl.inner_epochs=2 --steps 40 --eval-every 5"
    )
    assert score == ["-m", "sfgrpo.experiments.credit_heldout", "--study", str(work), "--examples", "512",
                     "--jobs", "3"]  # fmt: skip
    tar = ran[3][1]
    assert tar[:2] == ["-czf", f"{out}/credit_device.tar.gz"] and tar[-3:] == ["-C", str(tmp_path), "work"]
    assert {
        "--exclude=checkpoints",
        "--exclude=warmstart",
        "--exclude=warmstart_progress",
        "--exclude=compile_cache",  # the study's shared compiled programs: large, and only for this machine
        "--exclude=export",
    } <= set(tar)
    assert "scoring exited 0" in (out / "device_credit.log").read_text()


def test_scripts_are_executable():
    for script in (TPU, GPU, DEVICE_CREDIT, REPO / "launch" / "device_wheels.sh"):
        assert os.access(script, os.X_OK), script
