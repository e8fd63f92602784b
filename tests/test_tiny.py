"""The demo's pixel autoencoder and word text encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfgrpo.models.tiny import PixelAutoencoder, WordTextEncoder, images_to_uint8


def test_pixel_autoencoder_round_trip_and_token_layout():
    ae = PixelAutoencoder()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    tokens = ae.encode(jnp.asarray(images))
    assert tokens.shape == (2, 2 * 3, 768) and ae.latent_channels == 768
    # Token p = i * w + j holds the 16x16 cell at row i, column j, scaled to [-1, 1].
    cell = images[1, 16:32, 32:48].astype(np.float32) / 255.0 * 2 - 1
    np.testing.assert_allclose(tokens[1, 1 * 3 + 2], cell.reshape(-1), atol=1e-6)
    decoded = ae.decode(tokens, ae.grid(32, 48))
    np.testing.assert_array_equal(images_to_uint8(decoded), images)


def test_pixel_autoencoder_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        PixelAutoencoder().grid(30, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        PixelAutoencoder().encode(jnp.zeros((1, 20, 16, 3), jnp.uint8))


def test_word_text_encoder():
    enc = WordTextEncoder(10, 8, 5, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 2, 0, 0, 0], [3, 3, 3, 0, 0]])
    out = enc(ids)
    assert out.shape == (2, 5, 8)
    np.testing.assert_allclose(out[1, 0] - enc.positions[...][0], enc.words[...][3], atol=1e-6)
    with pytest.raises(ValueError, match="length 5"):
        enc(ids[:, :4])
    # Differentiable with respect to its tables.
    grads = jax.grad(lambda m: m(ids).sum())(enc)
    assert float(jnp.abs(grads.words[...]).sum()) > 0


def test_pooled_autoencoder_averages_blocks():
    ae = PixelAutoencoder(pool=4)
    assert ae.latent_channels == 48
    images = np.random.default_rng(1).integers(0, 256, (1, 16, 32, 3), dtype=np.uint8)
    tokens = ae.encode(jnp.asarray(images))
    assert tokens.shape == (1, 2, 48)
    block = images[0, 4:8, 16 + 8 : 16 + 12].astype(np.float32).mean(axis=(0, 1)) / 255.0 * 2 - 1
    # Token 1 (column 1), pooled row 1, pooled column 2.
    np.testing.assert_allclose(tokens[0, 1].reshape(4, 4, 3)[1, 2], block, atol=1e-5)
    decoded = np.asarray(ae.decode(tokens, (1, 2)))
    assert decoded.shape == (1, 16, 32, 3)
    np.testing.assert_allclose(decoded[0, 4:8, 24:28], np.broadcast_to((block + 1) / 2, (4, 4, 3)), atol=1e-5)
    # Encoding a decoded image is exact: pooling a constant block returns the constant.
    np.testing.assert_allclose(ae.encode(jnp.asarray(decoded)), tokens, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        PixelAutoencoder(pool=3)
