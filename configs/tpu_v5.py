"""SpatialFlow-GRPO on FLUX.2-klein-4B on a TPU v5p-64 slice (32 chips, 4 per host, 8 hosts, 95 GB HBM each).

    python -m sfgrpo.main --config=configs/tpu_v5.py --workdir=gs-fuse-or-local-dir \\
        --config.model.folder=/mnt/disks/models/FLUX.2-klein-4B --config.data.tfds_dir=... \\
        --config.reward.url=http://judge:8000/v1

Run the same command on every host of the slice (see launch/); jax discovers the slice by itself. The
shared settings, each with its reason, are in ``sfgrpo/klein_config.py``; this file sets the slice's.
"""

import ml_collections

from sfgrpo.klein_config import klein_config

# The machines this file is written for: --dry_run plans for them, and a run elsewhere is told so.
# 95 GB of HBM per v5p chip.
TARGET = dict(
    device="TPU v5p", processes=8, devices_per_process=4, memory_bytes=95e9, launch="launch/tpu_v5.sh"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = klein_config()
    # FSDP over the 4 chips of a host, data parallel across the 8 hosts: the frozen bf16 transformer
    # (7.8 GB) is sharded 4 ways inside a host, where its all-gathers ride the fast ICI links of one tray,
    # and only gradients of the LoRA adapters (96M parameters) cross hosts.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=4, tensor=1))
    # The Pallas splash-attention kernel: XLA's TPU attention materialises each (heads, L, L) weight matrix
    # (2560² per head here), splash tiles it in VMEM. Parity: tests/test_attention.py (interpret mode).
    c.model.attention = "splash"
    # 32 rollouts per host, 256 per iteration: 16 prompts x G=16. A group stays on one host.
    c.rl.batch_size = 32
    # One sample per chip per micro-batch (32 over the slice): a 2560-token sequence with remat 'dots'
    # fits the HBM left beside the sharded weights with room to spare (see
    # benchmarks/compile_grpo_update.py); 8 micro-batches per iteration, 4 per optimizer step: 2 steps.
    c.rl.micro_batch = 32
    c.rl.grad_accum = 4
    if arg not in (None, ""):
        raise ValueError(f"configs/tpu_v5.py: unknown variant {arg!r}")
    return c
