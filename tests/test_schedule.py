"""The FLUX.2 schedule against diffusers' Flux2KleinPipeline + FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from sfgrpo.sampling import schedule
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


def test_omnigen2_schedule_is_its_scheduler_in_sigma():
    """OmniGen2's scheduler: t = k/N shifted by m = sqrt(latent pixels)/40, then t = 1; sigma = 1 - t.
    At 320 px (a 40 x 40 latent) m = 1, no shift; at 1024 px m = 3.2: t_1 = 0.25 / (3.2 - 0.8 + 0.25)."""
    np.testing.assert_allclose(schedule.omnigen2_sigmas(4, 40 * 40), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    sig = schedule.omnigen2_sigmas(4, 128 * 128)
    assert sig.dtype == np.float32 and sig[0] == 1.0 and sig[-1] == 0.0
    np.testing.assert_allclose(sig[1], 1 - 0.25 / 2.65, rtol=1e-6)
    assert np.all(np.diff(sig) < 0)
    # 16-px tokens are 2 x 2 latent pixels: 64 x 64 tokens is the 1024 px image.
    np.testing.assert_array_equal(schedule.schedule_sigmas(4, 64 * 64, "omnigen2"), sig)
    with pytest.raises(ValueError, match="latent_pixels"):
        schedule.omnigen2_sigmas(4, 0)
