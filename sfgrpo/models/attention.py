"""Multi-head attention behind one switch, the transformer config's ``attention`` option.

- ``None`` / ``"xla"``: ``jax.nn.dot_product_attention``'s XLA path. It materialises the (B, N, L, L)
  weights, so its memory grows with L².
- ``"cudnn"``: cuDNN's fused kernel through the same function (NVIDIA GPUs only).
- ``"blockwise"``: flash-style attention in plain JAX, the portable default for long sequences. Keys are
  visited in blocks of ``block_kv`` with an online softmax; the backward pass (a ``custom_vjp``)
  recomputes each block's weights from the saved log-sum-exp, so forward and backward memory are
  O(L · block_kv), never O(L²).
- ``"splash"``: the Pallas TPU splash-attention kernel, one call per (batch, head) shard through
  ``shard_map``. Off TPU it runs in Pallas interpret mode (tests only: slow).

Every implementation takes (B, L, N, D) arrays, scales scores by 1/sqrt(D) and returns (B, Lq, N, D) in
q's dtype; scores and softmax statistics are float32. The one mask is a valid-key length per sequence
(``kv_len`` (B,) int32, at least 1): keys at index >= kv_len are ignored, which is how OmniGen2 masks its
padded text (kept last in the sequence for that reason). FLUX.2 passes none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ATTENTION_IMPLS", "attention", "blockwise_attention", "splash_attention"]

ATTENTION_IMPLS = (None, "xla", "cudnn", "blockwise", "splash")
# Scores are computed a (B, N, block_q, block_kv) float32 tile at a time; blocks are balanced so that
# padding stays under 8 tokens a block. Measured on this CPU in the klein-shaped forward (2112 tokens):
# 1.73 s with all queries in one block and 424-key blocks, 1.98 s with 424 x 240 tiles; so queries are
# tiled only beyond 4096.
BLOCK_Q, BLOCK_KV = 4096, 512
SPLASH_BLOCK = 128  # splash's sequence tiling (TPU lanes); sequences are padded to a multiple of it


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None, kv_len: jax.Array | None = None
) -> jax.Array:
    """(B, Lq, N, D), (B, Lk, N, D), (B, Lk, N, D) -> (B, Lq, N, D) with implementation ``impl``; with
    ``kv_len`` (B,) int32, sequence b attends to its first kv_len[b] keys only."""
    if impl in (None, "xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=kv_len, implementation=impl
        ).astype(q.dtype)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, kv_len=kv_len)
    if impl == "splash":
        return splash_attention(q, k, v, kv_len=kv_len)
    raise ValueError(f"attention implementation {impl!r}: expected one of {ATTENTION_IMPLS}")


# --- blockwise (flash-style) attention ------------------------------------------------------------


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, L, N, D) -> (nb, B, N, block, D) head-major blocks of the sequence, zero-padded to nb * block."""
    b, length, n, d = x.shape
    nb = -(-length // block)
    x = jnp.pad(x, ((0, 0), (0, nb * block - length), (0, 0), (0, 0)))
    return jnp.einsum("bjknd->jbnkd", x.reshape(b, nb, block, n, d))


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """(nb, B, N, block, D) -> (B, length, N, D): the inverse of :func:`_blocks`."""
    x = jnp.einsum("jbnkd->bjknd", x)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _key_bias(lk: int, block: int, kv_len: jax.Array | None) -> jax.Array:
    """(nb, B or 1, 1, 1, block) float32: 0 for keys attended to, -inf for the padding of the last block
    and for keys at index >= kv_len[b]."""
    nb = -(-lk // block)
    index = np.arange(nb * block).reshape(nb, 1, 1, 1, block)
    if kv_len is None:
        return jnp.asarray(np.where(index < lk, 0.0, -np.inf).astype(np.float32))
    valid = index < kv_len.astype(jnp.int32)[None, :, None, None, None]
    return jnp.where(valid, jnp.float32(0), -jnp.inf)


def _scores(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """(B, N, bq, D) x (B, N, bk, D) -> (B, N, bq, bk) float32 scaled scores (+ key bias (B|1, 1, 1, bk))."""
    s = jnp.einsum("bnqd,bnkd->bnqk", q, k, preferred_element_type=jnp.float32)
    return s * (q.shape[-1] ** -0.5) + bias


def _forward_tile(
    qi: jax.Array, kb: jax.Array, vb: jax.Array, bias: np.ndarray
) -> tuple[jax.Array, jax.Array]:
    """One query block (B, N, bq, D) against every key block: (out (B, N, bq, D) f32, lse (B, N, bq))."""

    def step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        m, total, acc = carry
        kj, vj, bj = xs
        s = _scores(qi, kj, bj)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bnqk,bnkd->bnqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
        return (m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv), None

    # zeros_like keeps q's sharding, so the carry's type matches the body's output on a mesh.
    stats = jnp.zeros_like(qi[..., 0], jnp.float32)
    init = (stats - jnp.inf, stats, jnp.zeros_like(qi, jnp.float32))
    (m, total, acc), _ = jax.lax.scan(step, init, (kb, vb, bias))
    return acc / total[..., None], m + jnp.log(total)


def _blockwise_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None, block_q: int, block_kv: int
) -> tuple[jax.Array, jax.Array]:
    """Output (B, Lq, N, D) in q's dtype and log-sum-exp (B, N, Lq) float32.

    Query blocks run one after another (``lax.map``); each scans the key blocks with an online softmax.
    The first key block holds a key every sequence attends to (kv_len >= 1), so the running maximum is
    finite before any fully masked block arrives.
    """
    lq = q.shape[1]
    kb, vb, bias = _blocks(k, block_kv), _blocks(v, block_kv), _key_bias(k.shape[1], block_kv, kv_len)
    out, lse = jax.lax.map(lambda qi: _forward_tile(qi, kb, vb, bias), _blocks(q, block_q))
    lse = jnp.einsum("jbnq->bnjq", lse)
    return _unblock(out, lq).astype(q.dtype), lse.reshape(*lse.shape[:2], -1)[..., :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None, block_q: int, block_kv: int
) -> jax.Array:
    return _blockwise_forward(q, k, v, kv_len, block_q, block_kv)[0]


def _blockwise_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None, block_q: int, block_kv: int
) -> tuple[jax.Array, tuple]:
    out, lse = _blockwise_forward(q, k, v, kv_len, block_q, block_kv)
    return out, (q, k, v, kv_len, out, lse)


def _blockwise_bwd(
    block_q: int, block_kv: int, res: tuple, g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    # Every query in one block, whatever block_q: measured faster on CPU than tiling queries (no dK/dV
    # accumulators to carry across query blocks); the working set is still O(Lq * block_kv).
    del block_q
    q, k, v, kv_len, out, lse = res
    lk = k.shape[1]
    scale = q.shape[-1] ** -0.5
    qh, gh = jnp.einsum("bqnd->bnqd", q), jnp.einsum("bqnd->bnqd", g)
    # softmax backward: dS = P * (dP - rowsum(dO * O))
    delta = jnp.einsum("bqnd,bqnd->bnq", g.astype(jnp.float32), out.astype(jnp.float32))
    kb, vb, bias = _blocks(k, block_kv), _blocks(v, block_kv), _key_bias(lk, block_kv, kv_len)

    def key_block(dq: jax.Array, ys: tuple) -> tuple[jax.Array, tuple]:
        kj, vj, bj = ys
        p = jnp.exp(_scores(qh, kj, bj) - lse[..., None])
        dv = jnp.einsum("bnqk,bnqd->bnkd", p.astype(g.dtype), gh, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bnqd,bnkd->bnqk", gh, vj, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bnqk,bnkd->bnqd", ds, kj, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bnqk,bnqd->bnkd", ds, qh, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros_like(qh, jnp.float32), (kb, vb, bias))
    return (
        jnp.einsum("bnqd->bqnd", dq).astype(q.dtype),
        _unblock(dk, lk).astype(k.dtype),
        _unblock(dv, lk).astype(v.dtype),
        None,  # kv_len: integer lengths have no cotangent
    )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _batch_like(kv_len: jax.Array | None, q: jax.Array) -> jax.Array | None:
    """kv_len as (B,) int32 with q's batch sharding, so that the key bias broadcasts against the scores."""
    if kv_len is None:
        return None
    from sfgrpo.models.layers import _spec_of  # noqa: PLC0415 - avoids an import cycle

    kv_len = jnp.asarray(kv_len, jnp.int32)
    if kv_len.shape != q.shape[:1]:
        raise ValueError(f"kv_len {kv_len.shape} must be (B,) = {q.shape[:1]}, one length per sequence")
    if jax.sharding.get_abstract_mesh().empty:
        return kv_len
    return jax.sharding.reshard(kv_len, jax.sharding.PartitionSpec(_spec_of(q)[0]))


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_q: int = BLOCK_Q,
    block_kv: int = BLOCK_KV,
    *,
    kv_len: jax.Array | None = None,
) -> jax.Array:
    """Flash-style attention: (B, Lq, N, D), (B, Lk, N, D) x2 -> (B, Lq, N, D), memory O(L · block);
    ``kv_len`` (B,) int32 >= 1 masks keys at index >= kv_len[b]."""
    kv_len = _batch_like(kv_len, q)
    return _blockwise(q, k, v, kv_len, _balanced(q.shape[1], block_q), _balanced(k.shape[1], block_kv))


def _balanced(length: int, target: int) -> int:
    """The block size (a multiple of 8, at most ``length``) that covers ``length`` in as many blocks as
    ``target`` would, with the least padding: 2112 tokens at 512 -> 5 blocks of 424, not 5 of 512 (21% of
    the work on padding)."""
    per_block = -(-length // -(-length // target))
    return min(length, -(-per_block // 8) * 8)


# --- Pallas splash attention (TPU) -------------------------------------------------------------------


def _splash_block(length: int) -> int:
    """The largest of 512, 256, 128 dividing ``length`` (a multiple of SPLASH_BLOCK)."""
    return next(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array | None, lk: int) -> jax.Array:
    """Splash on one shard: (b, Lq_p, n, D), (b, Lk_p, n, D) x2, padded to SPLASH_BLOCK -> (b, Lq_p, n, D).

    Padded keys (index >= lk, or >= kv_len[b] when given) get segment id 1 and real ones 0; every query
    has segment 0, so no query attends to padding.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415 - TPU-only module
        splash_attention_kernel as kernel_lib,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_mask as mask_lib,
    )

    _, lq_p, n, d = q.shape
    lk_p = k.shape[1]
    bq, bk = _splash_block(lq_p), _splash_block(lk_p)
    sizes = kernel_lib.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        use_fused_bwd_kernel=True,
    )
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((lq_p, lk_p))] * n)
    kernel = kernel_lib.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=jax.default_backend() != "tpu",
    )

    def segments(length: jax.Array | int) -> kernel_lib.SegmentIds:
        return kernel_lib.SegmentIds(
            q=jnp.zeros((lq_p,), jnp.int32), kv=(jnp.arange(lk_p) >= length).astype(jnp.int32)
        )

    # splash does not scale the scores; it takes head-major (n, L, D) arrays for one sequence.
    qh = jnp.einsum("bqnd->bnqd", q * jnp.asarray(d**-0.5, q.dtype))
    kh, vh = jnp.einsum("bknd->bnkd", k), jnp.einsum("bknd->bnkd", v)
    if kv_len is not None:
        out = jax.vmap(lambda qi, ki, vi, n: kernel(qi, ki, vi, segment_ids=segments(n)))(qh, kh, vh, kv_len)
    else:
        seg = segments(lk) if lk_p != lk else None
        out = jax.vmap(lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=seg))(qh, kh, vh)
    return jnp.einsum("bnqd->bqnd", out)


def splash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_len: jax.Array | None = None
) -> jax.Array:
    """Pallas splash attention: (B, Lq, N, D), (B, Lk, N, D) x2 -> (B, Lq, N, D); ``kv_len`` (B,) int32
    masks keys at index >= kv_len[b] (through segment ids, as the padding is).

    Sequences are padded to a multiple of 128. On a mesh, the kernel runs per shard (``shard_map``) with
    the batch split as the activations are ("batch") and the heads as the projections are ("heads"); the
    sequence stays whole.
    """
    from sfgrpo.models.layers import _fitting_spec, _spec_of, shard  # noqa: PLC0415 - avoids an import cycle

    lq, lk = q.shape[1], k.shape[1]
    spec_in = _spec_of(q)

    def pad(x: jax.Array) -> jax.Array:
        extra = -x.shape[1] % SPLASH_BLOCK
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x

    axes = ("batch", None, "heads", None)
    q, k, v = (pad(shard(x, axes)) for x in (q, k, v))
    kv_len = _batch_like(kv_len, q)
    local = functools.partial(_splash_local, lk=lk)
    spec = _fitting_spec(q.shape, axes)
    if spec is None:
        out = local(q, k, v, kv_len)
    else:
        len_spec = None if kv_len is None else jax.sharding.PartitionSpec(spec[0])
        out = jax.shard_map(local, in_specs=(spec, spec, spec, len_spec), out_specs=spec, check_vma=False)(
            q, k, v, kv_len
        )
        # Back to the caller's layout: XLA's and blockwise attention keep q's sharding too.
        return jax.sharding.reshard(out[:, :lq], jax.sharding.PartitionSpec(*spec_in)).astype(q.dtype)
    return out[:, :lq].astype(q.dtype)
