"""The OmniGen2 SpatialFlow-GRPO settings that ``configs/omnigen2_tpu_v5.py`` and ``configs/omnigen2_gpu.py``
share: EditScore's OmniGen2 RL recipe (20 sampler steps, the first 60% trained, clip (1e-4, 5e-4), KL 0.04,
LoRA r32 / alpha 64, lr 4e-4) on sfgrpo's spatial credit.

It starts from the klein settings (``sfgrpo/klein_config.py``: data, judge, evaluation, checkpoints, which
do not depend on the policy) and replaces what is OmniGen2's, each with its reason. The platform files
set the mesh, the per-device batch and the attention kernel.
"""

from __future__ import annotations

import ml_collections

from sfgrpo.klein_config import klein_config


def omnigen2_recipe() -> ml_collections.ConfigDict:
    c = klein_config()

    c.model.name = "omnigen2"
    c.model.folder = "/mnt/disks/models/OmniGen2"  # the model folder (transformer/, vae/, mllm/, ...): yours
    # bfloat16 weights and activations: the 4B transformer is 8 GB in bf16; the SDE step, log-probabilities
    # and the loss stay in float32 (sampling/sde.py).
    c.model.dtype = "bfloat16"
    # The update re-runs the transformer on 1024 target + 1024 source + 256 text tokens through 32 layers
    # and 6 refiner layers: 'dots' keeps the weight matmuls' outputs and recomputes the rest (see klein).
    c.model.remat = "dots"
    c.model.attention = "blockwise"  # the platform files pick their fused kernel
    del c.model.text_layers  # klein's stacked Qwen3 layers; OmniGen2 takes Qwen2.5-VL's last hidden state
    # The pipeline's max_sequence_length: the chat-templated instruction (a fixed system turn of about 25
    # tokens, then the user's) in 256 tokens, right-padded and masked.
    c.model.max_text_tokens = 256
    c.model.prompt_cache = "/mnt/disks/cache/omnigen2_prompts"  # 1 MiB (256 x 2048 bf16) per instruction
    # EditScore's LoRA: rank 32, alpha 64 on the attention and MLP projections of every block (the four
    # stacks: layers and the three refiners).
    c.model.lora_rank = 32
    c.model.lora_alpha = 64.0

    # EditScore's sampler: 20 steps, the first 60% (12) trained. A window starting at 0 with
    # window_hi = 1 is that fixed window; the trained steps are OmniGen2's high-noise ones, where the
    # edit's layout is decided.
    c.sampler.num_steps = 20
    c.sampler.eval_steps = 28  # OmniGen2Pipeline's default num_inference_steps
    c.sampler.eta = 0.7  # Flow-GRPO's SDE noise level, which EditScore's trainer inherits
    c.sampler.schedule = "omnigen2"  # its scheduler's dynamic time shift (sampling/schedule.py)
    c.sampler.window = "random"
    c.sampler.window_size = 12
    c.sampler.window_lo = 0
    c.sampler.window_hi = 1
    # OmniGen2 is not guidance-distilled: without CFG its edits are washed out. Text guidance 4 (the
    # pipeline's default) against the empty instruction, with the source dropped from the unconditional
    # forward as the pipeline does when image guidance is 1 (rl/step.py velocity_fn), in the rollout and
    # the update alike: 2 forwards per step.
    c.sampler.cfg_scale = 4.0

    # EditScore's objective: asymmetric clip (1e-4 below, 5e-4 above) on the image ratio, KL 0.04.
    # Token ratios spread about sqrt(L) = 32 times wider than the image's (see klein_config); the spatial
    # clip keeps the same 1 : 5 shape at klein's 1e-3 scale.
    c.rl.clip_range_scalar = (1e-4, 5e-4)
    c.rl.clip_range_region = (1e-4, 5e-4)
    c.rl.clip_range_spatial = (1e-3, 5e-3)
    c.rl.kl_beta = 0.04
    c.rl.lr = 4e-4
    return c
