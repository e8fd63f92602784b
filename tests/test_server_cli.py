"""The reward server's command line: every bad input exits with status 2 and one line naming it."""

import logging

import pytest

from sfgrpo.rewards.server import main as server_main

_CLI_ERRORS = [
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--port", "-1"], "--port must be in 0..65535, got -1"),
    (["--port", "http"], "argument --port: invalid int value: 'http'"),
    (
        ["--host", "192.0.2.1"],
        "--host 192.0.2.1: cannot listen on 192.0.2.1:0: Cannot assign requested address",
    ),
    (
        ["--import", "no_such_module_xyz"],
        "--import no_such_module_xyz: cannot import it: ModuleNotFoundError",
    ),
    (["--reward", "nope"], "--reward: unknown reward 'nope'; registered: ["),
    (["--option", "pool"], "--option expects KEY=VALUE, got 'pool'"),
    (["--option", "=4"], "--option expects KEY=VALUE, got '=4'"),
    (
        ["--option", "colour=red"],
        "--option: reward 'shapes' takes no option 'colour'; its options: ['pool', 'preserve_floor',",
    ),
    (
        ["--option", "preserve_floor=0.5"],
        "option preserve_floor: must be below option preserve_tol (0.25), got 0.5",
    ),
    (
        ["--option", "pool=four"],
        "--option pool=four: reward 'shapes' refused its options: option pool must be an",
    ),
    (
        ["--option", "pool=-2"],
        "--option pool=-2: reward 'shapes' refused its options: option pool must be an",
    ),
    (["--option", "pool=1", "--option", "pool=2"], "--option pool is given twice (pool=1, pool=2)"),
    (["--scale", "0"], "--scale must be a finite number > 0, got 0.0"),
    (["--scale", "nan"], "--scale must be a finite number > 0, got nan"),
    (["--max-request-mb", "0"], "--max-request-mb must be > 0, got 0.0"),
    (["--max-request-mb", "-1"], "--max-request-mb must be > 0, got -1.0"),
    (["--max-request-mb", "inf"], "--max-request-mb must be a finite number, got inf"),
    (["--max-request-mb", "lots"], "argument --max-request-mb: invalid float value: 'lots'"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be >= 1, got 0"),
    (["--max-image-pixels", "1e6"], "argument --max-image-pixels: invalid int value: '1e6'"),
    (
        ["--max-image-pixels", "100000000"],
        "--max-image-pixels must be <= 89478485 (Pillow's decompression-bomb",
    ),
    (["--max-decoded-mb", "0"], "--max-decoded-mb must be > 0, got 0.0"),
    (["--max-decoded-mb", "nan"], "--max-decoded-mb must be a finite number, got nan"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
    (["--max-queue", "-1"], "--max-queue must be >= 0, got -1"),
    (["--read-timeout-s", "0"], "--read-timeout-s must be > 0, got 0.0"),
    (["--nope", "1"], "unrecognized arguments: --nope 1"),
]


@pytest.mark.parametrize("args, message", _CLI_ERRORS, ids=[" ".join(a) for a, _ in _CLI_ERRORS])
def test_bad_command_lines_exit_2_with_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's log handlers
    argv = ["--reward", "shapes", "--port", "0", *args]
    with pytest.raises(SystemExit) as info:
        server_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("python -m sfgrpo.rewards.server: error: "), err
    assert message in err, err
