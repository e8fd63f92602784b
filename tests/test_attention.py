"""The attention switch: blockwise and splash against XLA's reference (values and gradients), memory that
stays linear in the sequence, sharded runs on a data x fsdp x tensor mesh, and bad names refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfgrpo import runtime
from sfgrpo.models import attention


def _qkvg(b, lq, lk, n, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, n, d))
    k = jax.random.normal(ks[1], (b, lk, n, d))
    v = jax.random.normal(ks[2], (b, lk, n, d))
    g = jax.random.normal(ks[3], (b, lq, n, d))
    return tuple(x.astype(dtype) for x in (q, k, v, g))


def _value_and_grads(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(g))


def _reference(q, k, v, g):
    """XLA's attention in float32 (inputs upcast), values and (dq, dk, dv)."""
    up = [x.astype(jnp.float32) for x in (q, k, v, g)]
    return _value_and_grads(lambda *a: attention.attention(*a, "xla"), *up)


# (batch, query tokens, key tokens, heads, head dim, query block, key block): several query and key
# blocks, last blocks that need padding, blocks larger than the sequence, queries and keys of different
# lengths.
SHAPES = [
    (2, 40, 40, 2, 16, 16, 16),
    (1, 37, 70, 3, 8, 8, 32),
    (2, 24, 9, 2, 16, 256, 512),
    (1, 50, 33, 2, 8, 64, 8),
]


@pytest.mark.parametrize("b,lq,lk,n,d,block_q,block_kv", SHAPES)
def test_blockwise_matches_xla_values_and_gradients(b, lq, lk, n, d, block_q, block_kv):
    q, k, v, g = _qkvg(b, lq, lk, n, d)
    want = _reference(q, k, v, g)

    def blockwise(*x):
        return attention.blockwise_attention(*x, block_q=block_q, block_kv=block_kv)

    got = jax.jit(lambda *a: _value_and_grads(blockwise, *a))(q, k, v, g)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        assert x.shape == w.shape and x.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5, err_msg=name)
    assert float(jnp.abs(want[1]).max()) > 0.1  # the gradients are not trivially small


def test_blockwise_in_bfloat16_stays_close_to_float32():
    q, k, v, g = _qkvg(2, 48, 48, 2, 32, dtype=jnp.bfloat16)
    want = _reference(q, k, v, g)
    got = jax.jit(
        lambda *a: _value_and_grads(lambda *x: attention.blockwise_attention(*x, block_q=16, block_kv=16), *a)
    )(q, k, v, g)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        assert x.dtype == jnp.bfloat16, name
        scale = float(jnp.abs(w).max())
        assert float(jnp.abs(x.astype(jnp.float32) - w).max()) < 0.03 * scale, name


@pytest.mark.parametrize("b,lq,lk,n,d", [(2, 40, 40, 2, 16), (1, 130, 200, 2, 8)])
def test_splash_in_interpret_mode_matches_xla(b, lq, lk, n, d):
    """The Pallas TPU kernel, run by the Pallas interpreter on CPU: padding to 128 and the padded keys'
    segment mask included (130 and 200 tokens are not multiples of 128)."""
    q, k, v, g = _qkvg(b, lq, lk, n, d, seed=1)
    want = _reference(q, k, v, g)
    got = _value_and_grads(lambda *x: attention.attention(*x, "splash"), q, k, v, g)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        assert x.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5, err_msg=name)


def test_blockwise_memory_is_linear_in_the_sequence():
    """XLA's compiled temporaries for forward + backward: the reference holds (B, N, L, L) float32
    weights; blockwise stays well under one such matrix and grows ~linearly (4x the tokens, < 6x the
    bytes; quadratic growth would be 16x)."""

    def temp_bytes(impl, length):
        q, k, v, g = (jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32) for _ in range(4))
        fn = jax.jit(lambda *a: _value_and_grads(lambda *x: attention.attention(*x, impl), *a))
        return fn.lower(q, k, v, g).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla", 1024) >= 1 * 2 * 1024 * 1024 * 4
    small, large = temp_bytes("blockwise", 1024), temp_bytes("blockwise", 4096)
    assert large < (1 * 2 * 4096 * 4096 * 4) / 2
    assert large < 6 * small


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_sharded_attention_matches_one_device(impl):
    """Batch over data x fsdp, heads over tensor (2 x 2 x 2 mesh), under jit with explicit shardings."""
    q, k, v, g = _qkvg(4, 24, 24, 2, 8, seed=2)
    want = _value_and_grads(lambda *x: attention.attention(*x, "xla"), q, k, v, g)
    mesh = runtime.make_mesh(2, 2, 2)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    with runtime.use_mesh(mesh):
        args = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v, g)]
        got = jax.jit(lambda *a: _value_and_grads(lambda *x: attention.attention(*x, impl), *a))(*args)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        assert x.sharding.spec[0] == ("data", "fsdp"), name
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5, err_msg=name)


def _masked_reference(q, k, v, kv_len):
    """Attention with keys >= kv_len[b] dropped, one sequence at a time (no mask in the reference)."""
    outs = [
        attention.attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], "xla")
        for b, n in enumerate(np.asarray(kv_len))
    ]
    return jnp.concatenate(outs, axis=0)


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
def test_key_lengths_mask_the_keys_beyond_them(impl):
    """kv_len: each sequence sees its first kv_len[b] keys, values and all three gradients, including
    key blocks that are wholly masked (blockwise blocks of 8 over 40 keys, a length of 3)."""
    q, k, v, g = _qkvg(3, 20, 40, 2, 8, seed=3)
    kv_len = jnp.asarray([40, 3, 17], jnp.int32)
    want = _value_and_grads(lambda *x: _masked_reference(*x, kv_len), q, k, v, g)

    def fn(*x):
        if impl == "blockwise":
            return attention.blockwise_attention(*x, block_q=8, block_kv=8, kv_len=kv_len)
        return attention.attention(*x, impl, kv_len=kv_len)

    got = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, g)
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5, err_msg=name)
    assert float(jnp.abs(got[2][1, 3:]).max()) == 0.0  # masked keys get no gradient


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_key_lengths_on_a_mesh_match_one_device(impl):
    q, k, v, g = _qkvg(4, 24, 24, 2, 8, seed=4)
    kv_len = jnp.asarray([24, 5, 11, 1], jnp.int32)
    want = _value_and_grads(lambda *x: attention.attention(*x, "xla", kv_len=kv_len), q, k, v, g)
    mesh = runtime.make_mesh(2, 2, 2)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    with runtime.use_mesh(mesh):
        args = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v, g)]
        lens = jax.device_put(kv_len, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        got = jax.jit(lambda n, *a: _value_and_grads(lambda *x: attention.attention(*x, impl, kv_len=n), *a))(
            lens, *args
        )
    for name, w, x in zip(("out", "dq", "dk", "dv"), want, got, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5, err_msg=name)


def test_key_lengths_of_the_wrong_shape_are_refused():
    q = jnp.zeros((2, 4, 1, 8))
    with pytest.raises(ValueError, match="kv_len"):
        attention.attention(q, q, q, "blockwise", kv_len=jnp.asarray([1, 2, 3]))


def test_unknown_implementation_is_refused_by_name():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="'flash'.*blockwise"):
        attention.attention(q, q, q, "flash")
