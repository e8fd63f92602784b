"""How much noise one rollout step leaves in x, against what the flow marginal at its end holds.

Usage: python docs/credit_study/sampler_gap/excess_noise.py [--steps 8] [--schedule linear] [--eta 0.8]
For x = (1 - s) x0 + s e0 and a perfect velocity v = e0 - x0, one step from s to s' leaves x' = (1 - s') x0 +
c e0 + std e with fresh e; the marginal at s' has noise s'. This prints, per step, the noise std
sqrt(c^2 + std^2) of the 'sde' (Flow-GRPO) and 'cps' steps of ``sfgrpo.sampling.sde.sde_step`` against s'.
The step itself is run (on the scalar coefficients), so the figures are the sampler's, not a re-derivation.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from sfgrpo.sampling.schedule import schedule_sigmas
from sfgrpo.sampling.sde import sde_step


def noise_std(kind: str, s: float, s_next: float, eta: float, sigma_max: float) -> float:
    """The std of the noise in x' (the carried e0 and the fresh draw, combined), with x0 = 0."""
    # With x0 = 0 the state is s * e0. Two probes separate the carried e0 from the fresh draw:
    # e0 = 1 with no fresh noise gives c; e0 = 0 with fresh noise 1 gives std.
    one = jnp.ones((1, 1, 1), jnp.float32)
    zero = jnp.zeros((1, 1, 1), jnp.float32)

    def step(e0: jnp.ndarray, fresh: jnp.ndarray) -> float:
        x = s * e0
        v = e0  # the perfect velocity e0 - x0, x0 = 0
        return float(sde_step(v, x, s, s_next, eta, fresh, kind=kind, sigma_max=sigma_max).next[0, 0, 0])

    c = step(one, zero)
    std = step(zero, one)
    return float(np.hypot(c, std))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--eta", type=float, default=0.8)
    args = p.parse_args()
    sig = np.asarray(schedule_sigmas(args.steps, 64, args.schedule), np.float64)
    print(f"{args.steps} steps, {args.schedule} schedule, eta {args.eta}")
    print(
        "| step | sigma -> sigma' | marginal noise sigma' | sde: noise left | x marginal | cps: noise left |"
    )
    print("|---|---|---|---|---|---|")
    for i in range(args.steps - 1):  # the last step lands on 0 and is never in the window
        s, s_next = float(sig[i]), float(sig[i + 1])
        sde = noise_std("sde", s, s_next, args.eta, float(sig[1]))
        cps = noise_std("cps", s, s_next, args.eta, float(sig[1]))
        print(
            f"| {i} | {s:.3f} -> {s_next:.3f} | {s_next:.3f} | {sde:.3f} | {sde / s_next:.2f} | {cps:.3f} |"
        )


if __name__ == "__main__":
    main()
