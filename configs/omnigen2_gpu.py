"""SpatialFlow-GRPO on OmniGen2 on GPU hosts: 2 hosts of 8 x H100 80 GB (16 GPUs).

    python -m sfgrpo.main --config=configs/omnigen2_gpu.py --workdir=/shared/runs/omnigen2 \\
        --config.model.folder=/models/OmniGen2 --config.data.tfds_dir=... \\
        --config.reward.url=http://judge:8000/v1

One process per host (all 8 GPUs each), started by ``SFGRPO_CONFIG=configs/omnigen2_gpu.py
launch/gpu_multinode.sh``, or under SLURM. The shared settings, each with its reason, are in
``sfgrpo/omnigen2_recipe.py``; this file sets the hosts'.
"""

import ml_collections

from sfgrpo.omnigen2_recipe import omnigen2_recipe

# The machines this file is written for: --dry_run plans for them, and a run elsewhere is told so.
# An H100 "80 GB" holds 81559 MiB.
TARGET = dict(
    device="H100 80GB",
    processes=2,
    devices_per_process=8,
    memory_bytes=81559 * 2**20,
    launch="SFGRPO_CONFIG=configs/omnigen2_gpu.py launch/gpu_multinode.sh",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = omnigen2_recipe()
    # FSDP over the 8 GPUs of a host (NVLink), data parallel across hosts (only LoRA gradients cross).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=8, tensor=1))
    # cuDNN's fused attention, with the padded text masked by key lengths (models/attention.py).
    c.model.attention = "cudnn"
    # 32 rollouts per host: 2 prompts x G=16 per host, 64 per iteration on 2 hosts.
    c.rl.batch_size = 32
    # One sample per GPU per micro-batch (16 over 2 hosts); 4 micro-batches per iteration, 2 per step.
    c.rl.micro_batch = 16
    c.rl.grad_accum = 2
    if arg not in (None, ""):
        raise ValueError(f"configs/omnigen2_gpu.py: unknown variant {arg!r}")
    return c
