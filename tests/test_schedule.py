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


def test_linear_schedule_is_unshifted():
    np.testing.assert_allclose(flux2_sigmas(4, 64, "linear"), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    # FLUX.2's shift at 8 steps and 64 tokens ends with one step from about 0.49 to 0; linear from 0.125.
    assert flux2_sigmas(8, 64)[-2] == pytest.approx(0.493, abs=1e-3)
    assert flux2_sigmas(8, 64, "linear")[-2] == pytest.approx(0.125)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
@pytest.mark.parametrize("schedule", ["flux2", "linear"])
def test_bad_arguments(bad, schedule):
    with pytest.raises(ValueError, match="num_steps"):
        flux2_sigmas(bad, 256, schedule)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux2_sigmas(4, bad, schedule)
    with pytest.raises(ValueError, match="schedule"):
        flux2_sigmas(4, 256, "cosine")
