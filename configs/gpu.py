"""SpatialFlow-GRPO on FLUX.2-klein-4B on GPU hosts: 2 hosts of 8 x H100 80 GB (16 GPUs).

    python -m sfgrpo.main --config=configs/gpu.py --workdir=/shared/runs/klein \\
        --config.model.folder=/models/FLUX.2-klein-4B --config.data.tfds_dir=... \\
        --config.reward.url=http://judge:8000/v1

One process per host (all 8 GPUs each), started by launch/gpu_multinode.sh, or under SLURM. The shared
settings, each with its reason, are in ``sfgrpo/klein_config.py``; this file sets the hosts'.
"""

import ml_collections

from sfgrpo.klein_config import klein_config

# The machines this file is written for: --dry_run plans for them, and a run elsewhere is told so.
# An H100 "80 GB" holds 81559 MiB.
TARGET = dict(
    device="H100 80GB",
    processes=2,
    devices_per_process=8,
    memory_bytes=81559 * 2**20,
    launch="launch/gpu_multinode.sh",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = klein_config()
    # FSDP over the 8 GPUs of a host (NVLink), data parallel across hosts (the slower network carries only
    # the LoRA gradients). With one host, data=-1 simply becomes 1.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=8, tensor=1))
    # cuDNN's fused attention: 96 ms against XLA's 143 ms for a klein-4B LoRA step on one H200 (measured).
    c.model.attention = "cudnn"
    # 32 rollouts per host: 2 prompts x G=16 per host, 64 per iteration on 2 hosts.
    c.rl.batch_size = 32
    # One sample per GPU per micro-batch (16 over 2 hosts): the 80 GB of an H100 hold the sharded weights,
    # the adapters' optimizer state and one 2560-token sequence's remat activations. 4 micro-batches per
    # iteration, 2 per optimizer step. With another host count, micro_batch must stay a multiple of the
    # GPU count (the config check says so).
    c.rl.micro_batch = 16
    c.rl.grad_accum = 2
    if arg not in (None, ""):
        raise ValueError(f"configs/gpu.py: unknown variant {arg!r}")
    return c
