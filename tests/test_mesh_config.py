"""The mesh and batch arithmetic of builders.validate: every bad value is a ConfigError naming its key (never
a ZeroDivisionError), and a mesh the devices cannot make is blamed on the mesh (MeshError), not on the
batch. The test process has 8 simulated devices (conftest.py)."""

import jax
import pytest
from helpers import tiny_config

from sfgrpo import builders


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mesh.data", 0),
        ("mesh.fsdp", 0),
        ("mesh.tensor", -2),
        ("mesh.data", -3),
        ("rl.micro_batch", 0),
        ("rl.micro_batch", -8),
        ("rl.grad_accum", 0),
        ("rl.grad_accum", -1),
        ("rl.batch_size", 0),
    ],
)
def test_bad_mesh_and_batch_values_name_their_key(key, value):
    config = tiny_config()
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(builders.ConfigError, match=rf"config\.{key}\b"):
        builders.validate(config)


def test_two_free_axes_are_refused():
    config = tiny_config()
    config.mesh.fsdp = -1  # data is -1 already
    with pytest.raises(builders.ConfigError, match=r"config\.mesh\.fsdp: at most one axis may be -1"):
        builders.validate(config)


@pytest.mark.parametrize(("data", "fsdp"), [(3, 1), (-1, 3), (4, 4)])
def test_a_mesh_the_devices_cannot_make_blames_the_mesh(data, fsdp):
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = data, fsdp
    with pytest.raises(builders.MeshError, match=r"^config\.mesh: data=.* found 8 cpu devices in 1 process$"):
        builders.validate(config)
    with pytest.raises(builders.MeshError):
        builders.make_mesh(config)


def test_mesh_sizes_resolve_the_free_axis():
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = -1, 4
    assert builders.mesh_sizes(config) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert builders.mesh_sizes(config, devices=32) == {"data": 8, "fsdp": 4, "tensor": 1}
    assert builders.batch_shards(config, devices=32) == 32
    assert builders.mesh_request(config, 32) == "data=-1 x fsdp=4 x tensor=1 (-1: the rest) = 32 devices"


def test_processes_multiply_the_global_batch():
    config = tiny_config()  # 16 per host, micro-batches of 8 in pairs
    builders.validate(config, processes=2)
    config.rl.micro_batch, config.rl.grad_accum = 32, 1  # 32 divides the global batch of 2 processes only
    builders.validate(config, processes=2)
    with pytest.raises(
        builders.ConfigError, match=r"config\.rl\.micro_batch: 32 must divide the global batch 16"
    ):
        builders.validate(config)


def test_optimizer_steps_per_iteration_count_micro_batches_accumulation_and_epochs():
    config = tiny_config()  # 16 per host, micro-batches of 8 in pairs: one on-policy step
    assert builders.optimizer_steps_per_iteration(config.rl, processes=1) == 1
    assert builders.optimizer_steps_per_iteration(config.rl, processes=2) == 2
    config.rl.grad_accum, config.rl.inner_epochs = 1, 3
    assert builders.optimizer_steps_per_iteration(config.rl, processes=1) == 6
