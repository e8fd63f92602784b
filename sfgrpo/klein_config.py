"""The FLUX.2-klein-4B SpatialFlow-GRPO settings that ``configs/tpu_v5.py`` and ``configs/gpu.py`` share.

Each platform file takes this config and sets what differs between a TPU v5p slice and GPU hosts: the
mesh, the per-device batch, the attention kernel. Every value has its reason next to it.
"""

from __future__ import annotations

import ml_collections

from sfgrpo.evaluation.train_config import eval_benchmark_defaults
from sfgrpo.rewards.reward_config import reward_config_defaults


def klein_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # set per platform

    # Data: an editing dataset written by `python -m sfgrpo.data.build` (TFDS ArrayRecord). RL-time
    # regions are the dataset's annotations (SPEC section 11).
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"
    c.data.tfds_dir = "/mnt/disks/data/sfgrpo_edits"  # the dataset path: set it to yours
    c.data.resolution = 512  # SPEC section 9: 512x512 outputs; 32x32 = 1024 target tokens
    c.data.r_max = 4  # region slots per example: editing instructions rarely name more regions
    c.data.shapes_train = 0  # unused with tfds
    c.data.shapes_eval = 0
    c.data.num_workers = 8  # grain decode workers per host: PNG decode + resize of 512px images

    c.model = ml_collections.ConfigDict()
    c.model.name = "klein"
    c.model.folder = "/mnt/disks/models/FLUX.2-klein-4B"  # the diffusers folder: set it to yours
    # bfloat16 weights and activations: the 3.9B transformer is 7.8 GB in bf16 against 15.5 GB in f32;
    # the SDE step, log-probabilities and the loss stay in float32 (sampling/sde.py).
    c.model.dtype = "bfloat16"
    # 'dots' saves the weight matmuls' outputs and recomputes the rest of each block in the backward pass:
    # the update re-runs the transformer on 2560-token sequences (1024 target + 1024 source + 512 text),
    # where storing every activation of 25 blocks does not fit beside the weights; 'full' would recompute
    # the matmuls too, about 30% more compute for little more memory.
    c.model.remat = "dots"
    # Blocks per iteration of the loops over the transformer's blocks: 1 compiles one block body per loop.
    # A value >= the depth (20 for klein-4B's single blocks) compiles straight-line code without the
    # loop's stacked per-layer buffers; on a 2-core CPU that made no measurable difference to a
    # klein-shaped update or rollout (benchmarks/vs_diffusers.py --sections unroll; README Performance).
    c.model.scan_unroll = 1
    # Flash-style attention in plain JAX (models/attention.py): memory linear in the 2560-token sequence
    # on any backend; the platform configs pick their fused kernel (cuDNN, Pallas splash).
    c.model.attention = "blockwise"
    # The pipeline's text features: Qwen3 hidden states 9, 18 and 27, concatenated (3 x 2560 = 7680), of
    # 512-token chat-formatted instructions (Flux2KleinPipeline's max_sequence_length).
    c.model.text_layers = (9, 18, 27)
    c.model.max_text_tokens = 512
    # Instructions do not change during RL: encode them once and drop the 4B text encoder from device
    # memory (SPEC section 9 keeps the text encoder frozen). The cache needs 7.5 MiB of disk per distinct
    # instruction; put it on each host's local disk. '' keeps the text encoder and encodes every batch.
    c.model.prompt_cache = "/mnt/disks/cache/klein4b_prompts"
    c.model.prompt_cache_batch = 16  # instructions per encoder call while building the cache
    # LoRA rank 64, alpha 128 on the attention and MLP projections (SPEC section 9: rank 32-64, alpha =
    # 2 x rank): 0.3% of the transformer's parameters, and the reference policy is LoRA-off for free.
    c.model.lora_rank = 64
    c.model.lora_alpha = 128.0
    c.model.lora_targets = ""  # '': the attention and MLP projections of every block

    # Sampler (SPEC sections 3-4).
    c.sampler = ml_collections.ConfigDict()
    c.sampler.num_steps = 10  # SPEC: N = 10-20; 10 keeps the rollout cost down with the window below
    c.sampler.eval_steps = 28  # ODE evaluation close to the model's quality setting
    c.sampler.eta = 0.8  # SPEC: eta about 0.7-1.0
    c.sampler.kind = "sde"
    c.sampler.schedule = "flux2"  # the shifted schedule klein was trained and distilled for
    # Train 4 of the 10 steps, starting at a random step in [0, 4) (Flow-GRPO-Fast): the update costs
    # W/N of training every step, and the early, high-noise steps where edits are decided are covered.
    c.sampler.window = "random"
    c.sampler.window_size = 4
    c.sampler.window_lo = 0
    c.sampler.window_hi = 4
    # klein-4B is guidance-distilled: no true CFG (1.0). The undistilled klein-base models want about 4.
    c.sampler.cfg_scale = 1.0

    # The real model already edits: no supervised warm start.
    c.warmstart = ml_collections.ConfigDict(dict(steps=0, batch_size=8, lr=0.0, checkpoint_every=100))

    # SpatialFlow-GRPO (SPEC sections 7-8).
    c.rl = ml_collections.ConfigDict()
    c.rl.credit = "spatial"  # the method's default
    c.rl.group_size = 16  # SPEC: G = 12-24
    c.rl.batch_size = 32  # per host; set per platform
    # Per-token ratios average 128 channels instead of 1024 x 128 (SPEC section 8), so they spread about
    # sqrt(1024) = 32 times wider than Flow-GRPO's image ratio; its 1e-4 clip would clip almost every
    # token. 1e-3 is a starting point for the experiment SPEC section 8 asks for.
    c.rl.clip_range_spatial = (1e-3, 1e-3)
    c.rl.clip_range_region = (1e-4, 1e-4)  # region ratios average many tokens, like the image ratio
    c.rl.clip_range_scalar = (1e-4, 1e-4)  # Flow-GRPO's
    c.rl.adv_clip = 5.0  # SPEC
    c.rl.adv_std = "group"
    c.rl.adv_eps = 1e-4  # real judges' rewards spread more than the demo's: plain normalisation
    c.rl.token_weights = "boxes"
    c.rl.token_map = "own"  # 'shuffled' is the credit study's placebo
    c.rl.rewards_from = "own"  # 'other_group' is the credit study's no-signal control
    c.rl.mix_lambda = 1.0  # SPEC's default: pure token credit
    c.rl.kl_beta = 0.0  # SPEC: 0-0.04; LoRA's small rank already keeps the policy near the base
    c.rl.kl_form = "exact"
    c.rl.inner_epochs = 1
    c.rl.micro_batch = 0  # samples per micro-batch over all devices: set per platform
    c.rl.grad_accum = 0  # set per platform
    c.rl.lr = 3e-4  # SPEC: 1e-4 to 4e-4 for LoRA
    c.rl.weight_decay = 0.0
    c.rl.max_grad_norm = 1.0  # SPEC section 9
    c.rl.max_consecutive_skips = 3

    # The judge: SFReward / SpatialReward / any Qwen3-VL-class model behind an OpenAI-compatible server
    # (vLLM, SGLang) on this host or the network; set url and model.
    c.reward = reward_config_defaults()
    c.reward.kind = "vlm"
    c.reward.url = "http://127.0.0.1:8000/v1"
    c.reward.model = "SFReward"
    c.reward.api_key_env = ""
    c.reward.timeout_s = 180.0  # a Qwen3-VL-8B answer with reasoning under load
    c.reward.max_concurrency = 64  # two requests per image; vLLM batches concurrent requests
    c.reward.on_failure = "skip"  # a judge hiccup masks one batch out (counted), not the whole run

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.fuse_step = False  # the remote judge splits the iteration at the reward anyway
    c.train.eval_every = 50
    # The first 64 held-out examples, in one batch of 28-step ODE edits: a stable curve at a small cost.
    c.train.eval_examples = 64
    c.train.update(eval_benchmark_defaults())  # train.eval_benchmark: off (sfgrpo/evaluation/train_config.py)
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.log_every = 1
    c.train.grid_rows = 8
    # A resume refuses a config that changes the experiment (model, credit, seed, data, reward, lr, ...;
    # sfgrpo/run_config.py lists the keys that may change freely) unless this is True.
    c.train.allow_config_change = False
    # An unreadable newest checkpoint stops the run; True resumes from the newest readable earlier one.
    c.train.restore_fallback = False
    # The trained model for diffusers, in workdir/export/step_<N>/ (sfgrpo.export): 'auto' (a LoRA adapter
    # file for LoRA on a klein folder, else a merged model folder), 'peft', 'merged' or 'none'; at the end
    # of the run, and every export_every steps when > 0.
    c.train.export_format = "auto"
    c.train.export_every = 0
    # A folder for compiled programs ('' for none; sfgrpo/compile_cache.py): a restart or a resume after
    # a preemption loads them instead of compiling for minutes again. A local disk on each host or a
    # gs:// bucket; for example /mnt/disks/cache/jax_compile.
    c.train.compilation_cache_dir = ""
    return c
