"""Reference K/V caching (``Flux2KleinKVPipeline``): parity of ``Flux2Transformer.reference_kv`` and the
cached forward with diffusers' extract and cached modes, values and gradients, on one device, on a mesh
and with each attention implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
    Flux2Transformer2DModel,
)
from flax import nnx
from tiny_flux2 import TINY_DIFFUSERS

from sfgrpo import runtime
from sfgrpo.models import flux2, lora

GRID, REF_GRID, TEXT_LEN, BATCH = (3, 4), (2, 5), 5, 2


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory):
    """(diffusers model with the KV attention processors, ours loaded from the same weights with
    reference_kv=True); guidance embedding on, so that the reference pass's guidance path is covered."""
    folder = tmp_path_factory.mktemp("flux2_kv")
    torch.manual_seed(3)
    theirs = Flux2Transformer2DModel(**{**TINY_DIFFUSERS, "guidance_embeds": True}).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(folder)
    for block in theirs.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in theirs.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    ours = flux2.from_pretrained(folder)
    ours.config = ours.config.replace(reference_kv=True)
    return theirs, ours, folder


def _inputs(seed=0):
    img_ids, txt_ids = flux2.make_position_ids(*GRID, TEXT_LEN, [REF_GRID])
    n = GRID[0] * GRID[1]
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((BATCH, n, 16), np.float32),
        ref=rng.standard_normal((BATCH, REF_GRID[0] * REF_GRID[1], 16), np.float32),
        e=rng.standard_normal((BATCH, TEXT_LEN, 24), np.float32),
        t=rng.uniform(size=BATCH).astype(np.float32),
        g=rng.uniform(1, 4, size=BATCH).astype(np.float32),
        target_ids=img_ids[:n],
        ref_ids=img_ids[n:],
        txt_ids=txt_ids,
    )


def _theirs_extract(model, inp, grad=False):
    """Diffusers' extract step ([ref, target] tokens); returns (target output, cache, ref and x tensors)."""
    ref = torch.tensor(inp["ref"], requires_grad=grad)
    x = torch.tensor(inp["x"])
    with torch.set_grad_enabled(grad):
        out, cache = model(
            hidden_states=torch.cat([ref, x], 1),
            encoder_hidden_states=torch.tensor(inp["e"]),
            timestep=torch.tensor(inp["t"]),
            img_ids=torch.tensor(np.concatenate([inp["ref_ids"], inp["target_ids"]])),
            txt_ids=torch.tensor(inp["txt_ids"]),
            guidance=torch.tensor(inp["g"]),
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=ref.shape[1],
        )
    return out, cache, ref


def _ours(model, inp, t=None):
    """Our reference pass then the cached forward, jitted; returns (output, ReferenceKV)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, inp):
        m = nnx.merge(graphdef, state)
        kv = m.reference_kv(inp["ref"], inp["ref_ids"], inp["g"])
        out = m(
            inp["x"], inp["e"], inp["t"] if t is None else t, inp["target_ids"], inp["txt_ids"], inp["g"], kv
        )
        return out, kv

    return run(state, {k: jnp.asarray(v) for k, v in inp.items()})


def test_reference_kv_and_cached_forward_match_diffusers_extract_and_cached_steps(kv_models):
    theirs, ours, _ = kv_models
    inp = _inputs()
    want, cache, _ = _theirs_extract(theirs, inp)
    got, kv = _ours(ours, inp)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5, rtol=0)
    assert np.abs(want.numpy()).max() > 0.5
    # The cache itself: each block's post-RoPE reference keys and values.
    for i in range(TINY_DIFFUSERS["num_layers"]):
        k, v = cache.get_double(i).get()
        np.testing.assert_allclose(np.asarray(kv.double[0][i]), k.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(kv.double[1][i]), v.numpy(), atol=1e-5, rtol=0)
    for i in range(TINY_DIFFUSERS["num_single_layers"]):
        k, v = cache.get_single(i).get()
        np.testing.assert_allclose(np.asarray(kv.single[0][i]), k.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(kv.single[1][i]), v.numpy(), atol=1e-5, rtol=0)

    # A later step reuses the cache: diffusers' cached mode at another timestep and noisy target.
    later = _inputs(seed=1) | {k: inp[k] for k in ("ref", "e", "g", "target_ids", "ref_ids", "txt_ids")}
    with torch.no_grad():
        want2 = theirs(
            hidden_states=torch.tensor(later["x"]),
            encoder_hidden_states=torch.tensor(later["e"]),
            timestep=torch.tensor(later["t"]),
            img_ids=torch.tensor(later["target_ids"]),
            txt_ids=torch.tensor(later["txt_ids"]),
            guidance=torch.tensor(later["g"]),
            return_dict=False,
            kv_cache=cache,
            kv_cache_mode="cached",
        )[0]
    got2, _ = _ours(ours, later)
    np.testing.assert_allclose(np.asarray(got2), want2.numpy(), atol=1e-5, rtol=0)
    # The cache is not the joint model: with references as joint tokens the output differs.
    joint = nnx.clone(ours)
    joint.config = joint.config.replace(reference_kv=False)
    img_ids = np.concatenate([inp["target_ids"], inp["ref_ids"]])
    plain = joint(
        jnp.concatenate([inp["x"], inp["ref"]], 1), inp["e"], inp["t"], img_ids, inp["txt_ids"], inp["g"]
    )
    assert np.abs(np.asarray(plain[:, : inp["x"].shape[1]]) - want.numpy()).max() > 1e-2


def test_gradients_through_the_cache_match_diffusers_autograd(kv_models):
    """d(loss)/d(reference tokens) and d(loss)/d(weights) of ours (reference pass + cached forward) equal
    torch autograd through diffusers' extract step: the cache carries gradient to every block's K/V."""
    theirs, ours, _ = kv_models
    inp = _inputs(seed=2)
    theirs.zero_grad()
    out, _, ref = _theirs_extract(theirs, inp, grad=True)
    (out**2).mean().backward()
    graphdef, state = nnx.split(ours)
    params = {k: jnp.asarray(v) for k, v in inp.items()}

    def loss(state, ref):
        m = nnx.merge(graphdef, state)
        kv = m.reference_kv(ref, params["ref_ids"], params["g"])
        out = m(
            params["x"], params["e"], params["t"], params["target_ids"], params["txt_ids"], params["g"], kv
        )
        return jnp.mean(out**2)

    g_state, g_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, params["ref"])
    np.testing.assert_allclose(np.asarray(g_ref), ref.grad.numpy(), atol=1e-6, rtol=1e-4)
    assert np.abs(ref.grad.numpy()).max() > 1e-4
    # Weights that only the reference path reaches through the cache in the last single block (its
    # K/V projection feeds the targets' attention) and the shared ones: ours are (layers, in, out).
    pairs = {
        ("single_transformer_blocks", "attn", "to_qkv_mlp_proj", "kernel"): [
            b.attn.to_qkv_mlp_proj.weight for b in theirs.single_transformer_blocks
        ],
        ("transformer_blocks", "attn", "to_k", "kernel"): [
            b.attn.to_k.weight for b in theirs.transformer_blocks
        ],
        ("transformer_blocks", "ff", "linear_in", "kernel"): [
            b.ff.linear_in.weight for b in theirs.transformer_blocks
        ],
    }
    for path, torch_weights in pairs.items():
        node = g_state
        for key in path:
            node = node[key]
        got = np.asarray(node.get_value() if hasattr(node, "get_value") else node)
        want = np.stack([w.grad.numpy().T for w in torch_weights])
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4, err_msg=str(path))
        assert np.abs(want).max() > 1e-5
    np.testing.assert_allclose(
        np.asarray(g_state["x_embedder"]["kernel"].get_value()),
        theirs.x_embedder.weight.grad.numpy().T,
        atol=1e-6,
        rtol=1e-4,
    )


def test_attention_implementations_and_mesh_match_xla(kv_models):
    """The cached forward and its LoRA gradient with blockwise and splash attention (more keys than
    queries) equal XLA attention's; blockwise on a 2 x 2 x 2 mesh (batch over data x fsdp, heads over
    tensor) equals one device's."""
    _, _, folder = kv_models
    inp = {k: jnp.asarray(v) for k, v in _inputs(seed=4).items()}
    inp = inp | {k: jnp.concatenate([inp[k]] * 4) for k in ("x", "ref", "e", "t", "g")}  # batch 8

    def sgd(graphdef, state, inp):
        def loss_fn(state):
            m = nnx.merge(graphdef, state)
            kv = m.reference_kv(inp["ref"], inp["ref_ids"], inp["g"])
            out = m(inp["x"], inp["e"], inp["t"], inp["target_ids"], inp["txt_ids"], inp["g"], kv)
            return jnp.mean(out**2), out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        return loss, out, jax.tree.map(lambda p, g: p - 0.1 * g, state, grads)

    results = {}
    for attn in ("xla", "splash", "blockwise"):
        model = flux2.from_pretrained(folder, attention=attn, remat="dots")
        model.config = model.config.replace(reference_kv=True)
        with runtime.use_mesh(runtime.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
            lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x + 0.01, state)  # non-zero LoRA B: gradient reaches A
            results[attn] = jax.jit(sgd, static_argnums=0)(graphdef, state, inp)
    mesh = runtime.make_mesh(2, 2, 2)
    sharded = jax.device_put(jax.tree.map(np.asarray, state), runtime.state_shardings(state, mesh))
    with runtime.use_mesh(mesh):
        batch_inp = {
            k: v if k.endswith("_ids") else jax.device_put(v, runtime.batch_sharding(mesh, v.ndim))
            for k, v in inp.items()
        }
        results["mesh"] = jax.jit(sgd, static_argnums=0)(graphdef, sharded, batch_inp)
    for name in ("splash", "blockwise", "mesh"):
        loss, out, new = results[name]
        np.testing.assert_allclose(float(loss), float(results["xla"][0]), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.asarray(out), np.asarray(results["xla"][1]), atol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(results["xla"][2]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)


def test_a_cache_for_a_joint_model_and_a_joint_call_of_a_kv_model_are_refused(kv_models):
    _, ours, _ = kv_models
    inp = {k: jnp.asarray(v) for k, v in _inputs().items()}
    joint = nnx.clone(ours)
    joint.config = joint.config.replace(reference_kv=False)
    with pytest.raises(ValueError, match="reference_kv=True"):
        joint.reference_kv(inp["ref"], inp["ref_ids"])
    kv = ours.reference_kv(inp["ref"], inp["ref_ids"], inp["g"])
    with pytest.raises(ValueError, match="Flux2KleinKVPipeline"):
        joint(inp["x"], inp["e"], inp["t"], inp["target_ids"], inp["txt_ids"], inp["g"], kv)
    with pytest.raises(ValueError, match="img_ids"):
        ours.reference_kv(inp["ref"], inp["target_ids"], inp["g"])
