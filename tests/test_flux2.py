"""FLUX.2 transformer: parity with diffusers, position ids, parameter counts, sharding, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from flax import nnx
from tiny_flux2 import TINY_DIFFUSERS

from sfgrpo import runtime
from sfgrpo.models import flux2, lora
from sfgrpo.models.flux2_config import CONFIGS, Flux2Config, config_from_dict

TINY = TINY_DIFFUSERS


# Tests compile many small programs; skipping LLVM's optimisations halves CPU compile time.


def jit_call(model, *args, **kwargs):
    """model(*args, **kwargs) through split/merge under a (fast-compiling) jax.jit."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, a, kw: nnx.merge(graphdef, st)(*a, **kw))(state, args, kwargs)


def save_random_diffusers(folder, seed=0, **overrides):
    """A random diffusers transformer (norm weights perturbed too) saved to folder; returns the model."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def diffusers_forward(model, x, e, t, img_ids, txt_ids, guidance=None):
    with torch.no_grad():
        out = model(
            hidden_states=torch.tensor(x),
            encoder_hidden_states=torch.tensor(e),
            timestep=torch.tensor(t),
            img_ids=torch.tensor(np.asarray(img_ids)),
            txt_ids=torch.tensor(np.asarray(txt_ids)),
            guidance=None if guidance is None else torch.tensor(guidance),
            return_dict=False,
        )[0]
    return out.numpy()


# Tiny diffusers configs: without and with the guidance embedding, and one with other head, RoPE, MLP and
# channel sizes (out_channels != in_channels).
PARITY_CONFIGS = {
    "plain": dict(guidance_embeds=False),
    "guidance": dict(guidance_embeds=True),
    "odd": dict(
        guidance_embeds=False,
        in_channels=12,
        out_channels=8,
        num_layers=1,
        num_single_layers=3,
        attention_head_dim=12,
        num_attention_heads=3,
        joint_attention_dim=20,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 4, 4, 2),
        rope_theta=500,
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (diffusers model, ours loaded from its saved folder)."""
    out = {}
    for seed, (name, overrides) in enumerate(PARITY_CONFIGS.items()):
        folder = tmp_path_factory.mktemp(f"flux2_{name}")
        ref = save_random_diffusers(folder, seed=seed, **overrides)
        out[name] = (ref, flux2.from_pretrained(folder))
    return out


# (config, guidance value given, batch, target grid, reference grids, text length)
CASES = [
    ("plain", False, 2, (3, 5), [(2, 4)], 7),
    ("plain", False, 2, (4, 2), [(3, 3), (2, 2)], 3),
    ("plain", False, 1, (2, 3), [], 9),
    ("guidance", True, 2, (3, 5), [(2, 4)], 7),
    ("guidance", False, 2, (2, 4), [(4, 4), (1, 3)], 5),
    ("odd", False, 2, (5, 3), [(2, 2)], 6),
]


@pytest.mark.parametrize("name,give_guidance,batch,grid,refs,text_len", CASES)
def test_parity_with_diffusers(models, name, give_guidance, batch, grid, refs, text_len):
    ref_model, ours = models[name]
    cfg = ours.config
    img_ids, txt_ids = flux2.make_position_ids(*grid, text_len, refs, batch=batch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, img_ids.shape[1], cfg.in_channels), np.float32)
    e = rng.standard_normal((batch, text_len, cfg.joint_attention_dim), np.float32)
    t = rng.uniform(size=batch).astype(np.float32)
    g = rng.uniform(1, 5, size=batch).astype(np.float32) if give_guidance else None
    want = diffusers_forward(ref_model, x, e, t, img_ids, txt_ids, g)
    args = (
        jnp.asarray(x),
        jnp.asarray(e),
        jnp.asarray(t),
        img_ids,
        txt_ids,
        None if g is None else jnp.asarray(g),
    )
    got = jit_call(ours, *args)
    assert got.shape == want.shape == (batch, img_ids.shape[1], cfg.out_dim)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    # The output is not trivially small: the comparison has teeth.
    assert np.abs(want).max() > 0.5


def test_position_ids_match_klein_pipeline():
    batch, (h, w), refs, text_len = 2, (3, 5), [(2, 4), (3, 3)], 6
    img_ids, txt_ids = flux2.make_position_ids(h, w, text_len, refs, batch=batch)
    target = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(batch, 128, h, w))
    ref = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 128, rh, rw) for rh, rw in refs])
    want_img = torch.cat([target, ref.repeat(batch, 1, 1)], dim=1).numpy()
    want_txt = Flux2KleinPipeline._prepare_text_ids(torch.zeros(batch, text_len, 8)).numpy()
    np.testing.assert_array_equal(np.asarray(img_ids), want_img)
    np.testing.assert_array_equal(np.asarray(txt_ids), want_txt)
    # Reference k sits at T = 10 (k + 1).
    assert set(np.asarray(img_ids)[0, h * w :, 0].tolist()) == {10, 20}


@pytest.mark.parametrize(
    "name,billions", [("klein-4b", 3.88), ("klein-9b", 9.08), ("dev", 32.2), ("flux2-dev", 32.2)]
)
def test_param_counts_from_abstract_shapes(name, billions):
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        abstract = nnx.eval_shape(lambda: flux2.Flux2Transformer.from_config(name, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    count = sum(int(np.prod(x.shape)) for x in leaves)
    assert abs(count / 1e9 - billions) < 0.005 * billions, count


def test_real_configs_match_spec():
    k4, k9, dev = CONFIGS["klein-4b"], CONFIGS["klein-9b"], CONFIGS["dev"]
    assert (k4.num_layers, k4.num_single_layers, k4.num_attention_heads, k4.joint_attention_dim) == (
        5,
        20,
        24,
        7680,
    )
    assert (k9.num_layers, k9.num_single_layers, k9.num_attention_heads, k9.joint_attention_dim) == (
        8,
        24,
        32,
        12288,
    )
    assert (dev.num_layers, dev.num_single_layers, dev.num_attention_heads, dev.guidance_embeds) == (
        8,
        48,
        48,
        True,
    )
    for cfg in (k4, k9, dev):
        assert cfg.axes_dims_rope == (32, 32, 32, 32) and cfg.rope_theta == 2000 and cfg.mlp_ratio == 3.0
    assert not k4.guidance_embeds and not k9.guidance_embeds


def _inputs(batch, grid=(2, 3), refs=((2, 2),), text_len=4, seed=0):
    img_ids, txt_ids = flux2.make_position_ids(*grid, text_len, list(refs))
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=jnp.asarray(rng.standard_normal((batch, img_ids.shape[0], 16), np.float32)),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((batch, text_len, 24), np.float32)),
        timestep=jnp.asarray(rng.uniform(size=batch).astype(np.float32)),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def _sgd_step(graphdef, state, inputs):
    """Loss, output and one SGD step on all parameters (LoRA included), inside jit."""

    def loss_fn(params):
        out = nnx.merge(graphdef, params)(**inputs)
        return jnp.mean(jnp.square(out)), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, state, grads)
    return loss, out, new


def test_sharded_forward_and_grad_step_match_one_device(models):
    """One device without remat vs 8 devices on a data x fsdp mesh (remat 'dots') and on a
    data x fsdp x tensor mesh (remat 'full'): same loss, output and updated parameters, LoRA included."""
    model = nnx.clone(models["plain"][1])  # loaded on one device
    with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
        graphdef, state = nnx.split(model)
        # Non-zero B so that the LoRA path carries gradient into A too.
        state = jax.tree.map(lambda x: x + 0.01, state)
        inputs = _inputs(batch=8)
        loss1, out1, new1 = jax.jit(_sgd_step, static_argnums=0)(graphdef, state, inputs)
    host_state = jax.tree.map(np.asarray, state)

    for mesh_shape, remat in (((2, 4, 1), "dots"), ((2, 2, 2), "full")):
        mesh = runtime.make_mesh(*mesh_shape)
        model.config = model.config.replace(remat=remat)
        graphdef = nnx.graphdef(model)
        sharded_state = jax.device_put(host_state, runtime.state_shardings(state, mesh))
        with runtime.use_mesh(mesh):
            # Every input batch-sharded, ids included (batched as the pipeline passes them).
            batched = {
                k: np.broadcast_to(v, (8, *v.shape)) if k.endswith("_ids") else v for k, v in inputs.items()
            }
            batch_inputs = {
                k: jax.device_put(np.asarray(v), runtime.batch_sharding(mesh, v.ndim))
                for k, v in batched.items()
            }
            step = jax.jit(_sgd_step, static_argnums=0)
            loss8, out8, new8 = step(graphdef, sharded_state, batch_inputs)
        # Parameters really are sharded over fsdp (and tensor), and stay so after the step.
        q = new8["transformer_blocks"]["attn"]["to_q"]["kernel"].get_value()
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        assert len({s.data.shape for s in q.addressable_shards}) == 1
        assert q.addressable_shards[0].data.shape[1] == q.shape[1] // mesh_shape[1]
        assert out8.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out8), np.asarray(out1), atol=1e-5)
        for a, b in zip(jax.tree.leaves(new8), jax.tree.leaves(new1), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_attention_switch_matches_diffusers_and_xla_gradients(tmp_path, impl):
    """attention='blockwise' / 'splash' (Pallas interpret mode on CPU): the forward equals diffusers' with
    two reference images; one SGD step (LoRA included, remat 'dots') equals the XLA-attention model's, on
    one device and on a 2 x 2 x 2 mesh (batch over data x fsdp, heads over tensor)."""
    ref = save_random_diffusers(tmp_path, seed=0)
    grid, refs, text_len, batch = (4, 2), [(3, 3), (2, 2)], 3, 8
    inputs = _inputs(batch, grid, refs, text_len, seed=1)
    want = diffusers_forward(
        ref,
        *(np.asarray(inputs[k]) for k in ("hidden_states", "encoder_hidden_states", "timestep")),
        inputs["img_ids"],
        inputs["txt_ids"],
    )
    steps = {}
    for attn in ("xla", impl):
        model = flux2.from_pretrained(tmp_path, attention=attn, remat="dots")
        if attn == impl:
            got = jit_call(
                model,
                *(inputs[k] for k in ("hidden_states", "encoder_hidden_states", "timestep")),
                inputs["img_ids"],
                inputs["txt_ids"],
            )
            np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
        with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
            lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x + 0.01, state)  # non-zero LoRA B: gradient reaches A
            steps[attn] = jax.jit(_sgd_step, static_argnums=0)(graphdef, state, inputs)
        if attn == impl:
            host_state = jax.tree.map(np.asarray, state)
            mesh = runtime.make_mesh(2, 2, 2)
            sharded = jax.device_put(host_state, runtime.state_shardings(state, mesh))
            with runtime.use_mesh(mesh):
                batch_inputs = {
                    k: jax.device_put(np.asarray(v), runtime.batch_sharding(mesh, np.ndim(v)))
                    if not k.endswith("_ids")
                    else v
                    for k, v in inputs.items()
                }
                steps["mesh"] = jax.jit(_sgd_step, static_argnums=0)(graphdef, sharded, batch_inputs)
    for name in (impl, "mesh"):
        loss, out, new = steps[name]
        np.testing.assert_allclose(float(loss), float(steps["xla"][0]), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(out), np.asarray(steps["xla"][1]), atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(steps["xla"][2]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)


def test_ids_and_shapes_that_do_not_match_the_tokens_are_rejected(models):
    model = models["plain"][1]
    good = _inputs(batch=2)
    bad_img = dict(good, img_ids=good["img_ids"][:-1])
    with pytest.raises(ValueError, match=r"img_ids \(9, 4\)"):
        model(**bad_img)
    with pytest.raises(ValueError, match="txt_ids"):
        model(**dict(good, txt_ids=good["txt_ids"][:, :3]))
    with pytest.raises(ValueError, match="hidden_states"):
        model(**dict(good, hidden_states=good["hidden_states"][..., :8]))


def test_unsupported_configs_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown Flux2 config name 'klein-5b'"):
        flux2.Flux2Transformer.from_config("klein-5b", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="patch_size=2"):
        config_from_dict({**TINY, "patch_size": 2})
    with pytest.raises(ValueError, match=r"fields \['rope_type'\]"):
        config_from_dict({**TINY, "rope_type": "yarn"})
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        config_from_dict({**TINY, "_class_name": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match="remat"):
        Flux2Config(remat="sometimes")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"scan_unroll=.*an int >= 1"):
            Flux2Config(scan_unroll=bad)


def test_unrolled_block_loops_compute_the_same_values_and_gradients():
    """scan_unroll >= the depth compiles straight-line code (no while loop) for the joint forward, the
    reference K/V pass and the cached forward, and their gradients, with the rolled loops' results."""
    base = CONFIGS["tiny"].replace(num_layers=3, num_single_layers=4)
    inputs = _inputs(batch=2, grid=(2, 2), refs=((2, 2),))
    tokens = 4  # the 2 x 2 target grid; the reference's 4 tokens follow
    x, ref = inputs["hidden_states"][:, :tokens], inputs["hidden_states"][:, tokens:]
    text, t, ids = inputs["encoder_hidden_states"], inputs["timestep"], inputs["img_ids"]
    results, loops = [], []
    mesh = runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    for unroll in (1, 4):
        with runtime.use_mesh(mesh):
            joint = flux2.Flux2Transformer(base.replace(scan_unroll=unroll), rngs=nnx.Rngs(0))
            cached = flux2.Flux2Transformer(
                base.replace(scan_unroll=unroll, reference_kv=True), rngs=nnx.Rngs(1)
            )
        graphdef, state = nnx.split((joint, cached))

        def loss(st, gd=graphdef):
            joint, cached = nnx.merge(gd, st)
            kv = cached.reference_kv(ref, ids[tokens:])
            outs = (joint(**inputs), cached(x, text, t, ids[:tokens], inputs["txt_ids"], None, kv))
            return sum(jnp.mean(o**2) for o in outs), (outs, kv)

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        loops.append(fn.lower(state).as_text().count("stablehlo.while"))
        (_, aux), grads = fn(state)
        results.append((aux, grads))
    assert loops[0] > 0 and loops[1] == 0, loops
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[0][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_program_size_does_not_grow_with_depth():
    """Blocks run in a scan: the lowered program has the same ops for 1 or 4 blocks of each kind."""
    inputs = _inputs(batch=2)
    sizes = []
    for depth in (1, 4):
        cfg = CONFIGS["tiny"].replace(num_layers=depth, num_single_layers=depth)
        with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
            abstract = nnx.eval_shape(lambda cfg=cfg: flux2.Flux2Transformer(cfg, rngs=nnx.Rngs(0)))
            graphdef, state = nnx.split(abstract)
            fwd = jax.jit(lambda st, i, gd=graphdef: nnx.merge(gd, st)(**i))
            text = fwd.lower(state, inputs).as_text()
        sizes.append((text.count("dot_general"), text.count("stablehlo.while")))
    assert sizes[0] == sizes[1] and sizes[0][1] == 2 and sizes[0][0] > 20, sizes
