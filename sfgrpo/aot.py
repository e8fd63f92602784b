"""The run's rollout and update compiled ahead of time from abstract shapes: no weights read or allocated.

``abstract_run`` builds what ``train`` builds (the policy with its LoRA adapters, the GRPO split, the
optimizer state, the programs, one global batch) as shapes only (``nnx.eval_shape``, ``jax.eval_shape``)
on a mesh; ``compile_program`` lowers and compiles one program for those shapes and reports its compile
time, its per-device memory (XLA's ``memory_analysis``) and its FLOPs (``sfgrpo.flops``). The dry run
(``sfgrpo.dry_run``) and ``benchmarks/compile_grpo_update.py`` use it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sfgrpo import builders, flops, runtime
from sfgrpo.iteration import Conditioner, Programs
from sfgrpo.models import flux2, omnigen2, qwen2_5_vl, qwen3, vae, vae_flux1
from sfgrpo.models.policy import EditPolicy, OmniGen2EditPolicy
from sfgrpo.models.tiny import PixelAutoencoder
from sfgrpo.rl.step import compute_copy

# Qwen3-4B, FLUX.2-klein-4B's text encoder (its config.json), for a plan without the model folder.
QWEN3_4B = qwen3.Qwen3Config(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    layer_types=("full_attention",) * 36,
)


# Qwen2.5-VL-3B's language model, OmniGen2's text encoder (its mllm/config.json), for a plan without the
# model folder.
QWEN2_5_VL_3B = qwen2_5_vl.Qwen2_5_VLTextConfig(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)


@dataclasses.dataclass(frozen=True)
class OmniGen2Configs:
    """The architecture of an OmniGen2 folder's components; ``source`` says where it was read."""

    transformer: omnigen2.OmniGen2Config
    vae: vae_flux1.Flux1VAEConfig
    text: qwen2_5_vl.Qwen2_5_VLTextConfig
    source: str


def omnigen2_configs(folder: Path | None) -> OmniGen2Configs:
    """The components' configs from an OmniGen2 folder's JSON files (no weights read), or the released
    OmniGen2's when ``folder`` is None."""
    if folder is None:
        return OmniGen2Configs(
            omnigen2.CONFIGS["omnigen2"], vae_flux1.Flux1VAEConfig(), QWEN2_5_VL_3B, "built-in OmniGen2"
        )
    from sfgrpo.models import omnigen2_weights, vae_weights  # noqa: PLC0415

    vae_dir = vae_weights.resolve_vae_folder(folder)
    return OmniGen2Configs(
        omnigen2_weights.read_config(folder / "transformer"),
        vae_flux1.config_from_dict(vae_weights.read_config_dict(vae_dir), source=str(vae_dir)),
        qwen2_5_vl.read_config(folder / "mllm"),
        str(folder),
    )


@dataclasses.dataclass(frozen=True)
class KleinConfigs:
    """The architecture of a FLUX.2-klein folder's components; ``source`` says where it was read."""

    transformer: flux2.Flux2Config
    vae: vae.Flux2VAEConfig
    text: qwen3.Qwen3Config
    source: str


def klein_configs(folder: Path | None) -> KleinConfigs:
    """The components' configs from a checked klein folder's JSON files (no weights read), or klein-4B's
    when ``folder`` is None."""
    if folder is None:
        return KleinConfigs(flux2.CONFIGS["klein-4b"], vae.Flux2VAEConfig(), QWEN3_4B, "built-in klein-4B")
    from sfgrpo.models import klein, qwen3_weights, vae_weights, weights  # noqa: PLC0415

    vae_dir = vae_weights.resolve_vae_folder(folder)
    return KleinConfigs(
        weights.read_config(folder / "transformer").replace(reference_kv=klein.uses_reference_kv(folder)),
        vae.config_from_dict(vae_weights.read_config_dict(vae_dir), source=str(vae_dir)),
        qwen3_weights.read_config(folder / "text_encoder"),
        str(folder),
    )


@dataclasses.dataclass
class AbstractRun:
    """A run's state and programs as shapes: ``params`` (trainable, float32), ``frozen``, ``opt_state``,
    the global ``batch`` (B rows), and the rollout's abstract outputs ``out`` and ``credit``."""

    mesh: jax.sharding.Mesh
    programs: Programs
    params: Any
    frozen: Any
    opt_state: Any
    ref_params: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    key: Any
    out: Any
    credit: Any
    attention: str


def abstract_run(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    global_batch: int,
    klein: KleinConfigs | OmniGen2Configs | None = None,
) -> AbstractRun:
    """The run of ``config`` on ``mesh`` with ``global_batch`` rows per iteration, from shapes alone.

    'klein' and 'omnigen2' models take their architecture from ``klein`` (``KleinConfigs`` or
    ``OmniGen2Configs``; default: klein-4B, the released OmniGen2). cuDNN and splash attention are traced
    as 'blockwise': the CPU compiler has neither cuDNN nor Mosaic TPU kernels, and blockwise attention has
    their memory profile (linear in the sequence, no L x L weights).
    """
    m, d = config.model, config.data
    dtype = builders.DTYPES[m.dtype]
    hw = d.resolution
    text_len = builders.text_length(config)
    attention = m.get("attention", "xla")
    attention = "blockwise" if attention in ("cudnn", "splash") else attention
    cfg = config.sampler.cfg_scale != 1.0
    masked_text = m.name == "omnigen2"

    if m.name == "tiny":

        def build() -> EditPolicy:
            policy = builders.build_policy(config, config.seed)
            builders.add_lora(policy, config, config.seed + 2)
            return policy

        autoencoder: Any = PixelAutoencoder(pool=m.pixel_pool)
        text_fields = {"text_ids": ((text_len,), jnp.int32)}
    elif m.name == "omnigen2":
        og2 = klein if isinstance(klein, OmniGen2Configs) else omnigen2_configs(None)

        def build() -> OmniGen2EditPolicy:
            tcfg = og2.transformer.replace(remat=m.remat, attention=attention, scan_unroll=m.scan_unroll)
            transformer = omnigen2.OmniGen2Transformer(tcfg, rngs=nnx.Rngs(0), dtype=dtype)
            autoencoder = vae_flux1.Flux1VAE(og2.vae, rngs=nnx.Rngs(1), dtype=dtype)
            text = None  # a prompt cache supplies the text features
            if not m.prompt_cache:
                text = qwen2_5_vl.Qwen2_5_VLTextEncoder(og2.text, rngs=nnx.Rngs(3), dtype=dtype)
            grid = autoencoder.grid(hw, hw)
            policy = OmniGen2EditPolicy(transformer, text, autoencoder, grid_hw=grid)
            builders.add_lora(policy, config, config.seed + 2)
            return policy

        autoencoder = None
        text_fields = {"text_mask": ((text_len,), jnp.int32)}
        if m.prompt_cache:
            text_fields["text_embeds"] = ((text_len, og2.transformer.text_feat_dim), dtype)
        else:
            text_fields["text_ids"] = ((text_len,), jnp.int32)
    else:
        klein = klein if isinstance(klein, KleinConfigs) else klein_configs(None)
        layers = tuple(int(i) for i in m.text_layers)

        def build() -> EditPolicy:
            tcfg = klein.transformer.replace(remat=m.remat, attention=attention, scan_unroll=m.scan_unroll)
            transformer = flux2.Flux2Transformer(tcfg, rngs=nnx.Rngs(0), dtype=dtype)
            autoencoder = vae.Flux2VAE(klein.vae, rngs=nnx.Rngs(1), dtype=dtype)
            text = None  # a prompt cache supplies the text features
            if not m.prompt_cache:
                text = qwen3.Qwen3TextEncoder(klein.text, layers=layers, rngs=nnx.Rngs(3), dtype=dtype)
            policy = EditPolicy(transformer, text, autoencoder)
            builders.add_lora(policy, config, config.seed + 2)
            return policy

        autoencoder = None
        if m.prompt_cache:
            text_fields = {"text_embeds": ((text_len, klein.transformer.joint_attention_dim), dtype)}
        else:
            text_fields = {"text_ids": ((text_len,), jnp.int32), "text_mask": ((text_len,), jnp.int32)}

    with runtime.use_mesh(mesh):
        abstract = nnx.eval_shape(build)
        graphdef, params, frozen, compute_dtypes = builders.split_for_grpo(abstract, config)
        optimizer = builders.make_optimizer(config.rl.lr, config.rl.weight_decay, config.rl.max_grad_norm)
        opt_state = jax.eval_shape(optimizer.init, params)
        ref_params: Any = {}
        if config.rl.kl_beta > 0:
            # As train: LoRA's reference is the adapters zeroed, a full fine-tuning's a compute-dtype copy.
            ref_params = jax.eval_shape(lambda p: compute_copy(p, compute_dtypes), params)
        # The empty instruction's fields (CFG) are tiny host arrays: zeros of the right shape will do.
        uncond = {k: np.zeros((1, *s), dt) for k, (s, dt) in text_fields.items()} if cfg else None
        ae = autoencoder if autoencoder is not None else abstract.autoencoder
        condition = Conditioner(ae, (hw, hw), text_len, uncond=uncond, masked_text=masked_text)
        programs = builders.make_programs(config, graphdef, optimizer, condition, compute_dtypes)

        def spec(shape: tuple[int, ...], dt: Any) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dt, sharding=runtime.batch_sharding(mesh, len(shape)))

        b, r = global_batch, d.r_max
        batch = {
            "source": spec((b, hw, hw, 3), jnp.uint8),
            "target": spec((b, hw, hw, 3), jnp.uint8),
            "boxes": spec((b, r, 4), jnp.float32),
            "region_valid": spec((b, r), jnp.bool_),
            "region_masks": spec((b, r, hw, hw), jnp.bool_),
            "has_masks": spec((b,), jnp.bool_),
            "group_id": spec((b,), jnp.int32),
            **{k: spec((b, *s), dt) for k, (s, dt) in text_fields.items()},
        }
        key = jax.eval_shape(lambda: jax.random.key(0))
        out = jax.eval_shape(programs.rollout, params, frozen, batch, key)
        credit, _ = jax.eval_shape(programs.reward, params, frozen, out.edited, batch, out.weights)
    return AbstractRun(
        mesh, programs, params, frozen, opt_state, ref_params, batch, key, out, credit, attention
    )


@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """One compiled program: times (s), per-device memory (bytes; None where XLA does not say), FLOPs of
    the whole program over all devices (``flops``: jaxpr count with trip counts; ``xla_flops``: XLA's
    per-device cost_analysis, loop bodies once) and the while loops whose trip count is unknown."""

    name: str
    lower_s: float
    compile_s: float
    argument_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    temp_bytes: int | None
    code_bytes: int | None
    flops: float
    unknown_loops: int
    xla_flops: float | None

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs not aliased to an argument: what the program holds at once."""
        out = (self.output_bytes or 0) - (self.alias_bytes or 0)
        return (self.argument_bytes or 0) + (self.temp_bytes or 0) + max(out, 0)


def program_args(run: AbstractRun, name: str) -> tuple[Any, ...]:
    """The abstract arguments of program ``name`` ('rollout' or 'update')."""
    if name == "rollout":
        return run.params, run.frozen, run.batch, run.key
    if name == "update":
        return run.params, run.frozen, run.opt_state, run.ref_params, run.out, run.credit, run.key
    raise ValueError(f"unknown program {name!r}; 'rollout' or 'update'")


def compile_program(run: AbstractRun, name: str) -> tuple[CompiledReport, Any]:
    """Traces, lowers and compiles program ``name`` for ``run``'s shapes; (report, jax Compiled)."""
    with runtime.use_mesh(run.mesh):
        t0 = time.perf_counter()
        traced = run.programs._jit[name].trace(*program_args(run, name))
        lowered = traced.lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    total, unknown = flops.count(traced.jaxpr)
    mem = compiled.memory_analysis()
    field = lambda f: getattr(mem, f, None) if mem is not None else None  # noqa: E731
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return (
        CompiledReport(
            name,
            t1 - t0,
            t2 - t1,
            field("argument_size_in_bytes"),
            field("output_size_in_bytes"),
            field("alias_size_in_bytes"),
            field("temp_size_in_bytes"),
            field("generated_code_size_in_bytes"),
            total,
            unknown,
            (cost or {}).get("flops"),
        ),
        compiled,
    )


def compiled_lines(compiled: Any, *, bf16_on_cpu: bool) -> list[str]:
    """What XLA reports about a ``jax.stages.Compiled``: ``memory_analysis()`` per device (GiB) and
    ``cost_analysis()`` FLOPs (loop bodies once), one figure a line."""
    mem = compiled.memory_analysis()
    lines = ["memory_analysis (per device):"]
    for name in (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    ):
        value = getattr(mem, name, None)
        if value is not None:
            lines.append(f"  {name:30s} {value / 2**30:8.2f} GiB")
    if bf16_on_cpu:
        # XLA:CPU has no bf16 matmuls: it converts the operands to f32, hoisting f32 copies of the stacked
        # weights out of the scan, which inflates temp memory by about 2x the weights. GPUs/TPUs do not.
        lines.append(
            "  note: on CPU, temp includes f32 copies of the bf16 weights: an upper bound for TPU/GPU"
        )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        lines.append(f"flops (XLA estimate, loop bodies once) {cost['flops'] / 1e12:8.2f} TFLOP")
    return lines


def param_count(tree: Any) -> int:
    """Elements in a pytree of arrays or shapes."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
