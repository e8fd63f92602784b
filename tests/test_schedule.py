"""The FLUX.2 schedule against diffusers' Flux2KleinPipeline + FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from sfgrpo.sampling.schedule import empirical_mu, flux2_sigmas


def _diffusers_sigmas(num_steps: int, image_seq_len: int) -> np.ndarray:
    # The scheduler settings of the FLUX.2-klein folders: dynamic exponential shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.numpy()


@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096, 4301, 8192])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 28, 50])
def test_matches_diffusers(num_steps, image_seq_len):
    ours = flux2_sigmas(num_steps, image_seq_len)
    ref = _diffusers_sigmas(num_steps, image_seq_len)
    assert ours.dtype == np.float32
    assert ours.shape == (num_steps + 1,)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
    assert empirical_mu(image_seq_len, num_steps) == pytest.approx(
        compute_empirical_mu(image_seq_len, num_steps), rel=1e-12
    )


def test_endpoints_and_monotone():
    sigmas = flux2_sigmas(10, 1024)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert np.all(np.diff(sigmas) < 0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flux2_sigmas(bad, 256)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux2_sigmas(4, bad)
