"""SpatialFlow-GRPO on OmniGen2 on a TPU v5p-64 slice (32 chips, 4 per host, 8 hosts, 95 GB HBM each).

    python -m sfgrpo.main --config=configs/omnigen2_tpu_v5.py --workdir=gs-fuse-or-local-dir \\
        --config.model.folder=/mnt/disks/models/OmniGen2 --config.data.tfds_dir=... \\
        --config.reward.url=http://judge:8000/v1

Run the same command on every host of the slice: ``SFGRPO_CONFIG=configs/omnigen2_tpu_v5.py
launch/tpu_v5.sh train TPU_NAME ZONE WORKDIR ...`` does it. The shared settings, each with its
reason, are in ``sfgrpo/omnigen2_recipe.py``; this file sets the slice's.
"""

import ml_collections

from sfgrpo.omnigen2_recipe import omnigen2_recipe

# The machines this file is written for: --dry_run plans for them, and a run elsewhere is told so.
TARGET = dict(
    device="TPU v5p",
    processes=8,
    devices_per_process=4,
    memory_bytes=95e9,
    launch="SFGRPO_CONFIG=configs/omnigen2_tpu_v5.py launch/tpu_v5.sh",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = omnigen2_recipe()
    # FSDP over the 4 chips of a host, data parallel across hosts: the frozen bf16 transformer (8 GB) is
    # sharded 4 ways over a tray's ICI links; only the LoRA gradients cross hosts. No tensor parallelism:
    # 21 query heads and 7 K/V heads split evenly over neither 2 nor 4 chips.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=4, tensor=1))
    # The Pallas splash kernel: XLA's TPU attention would materialise (21, 2304, 2304) weights per sample.
    c.model.attention = "splash"
    # 32 rollouts per host, 256 per iteration: 16 prompts x G=16. A group stays on one host.
    c.rl.batch_size = 32
    # One sample per chip per micro-batch (32 over the slice), 8 micro-batches per iteration, 4 per
    # optimizer step: 2 steps. CFG doubles the forwards, not the activations kept per forward.
    c.rl.micro_batch = 32
    c.rl.grad_accum = 4
    if arg not in (None, ""):
        raise ValueError(f"configs/omnigen2_tpu_v5.py: unknown variant {arg!r}")
    return c
