"""Writes the OmniGen2 LoRA goldens: a LoRA file our exporter wrote, loaded by upstream's pipeline loader,
and upstream's forward with it (test oracles only).

    PYTHONPATH=../shared/reference/omnigen2 python tools/make_omnigen2_lora_golden.py \\
        --reference ../shared/reference/omnigen2 --out tests/goldens/omnigen2_lora

It loads the tiny transformer of ``tests/goldens/omnigen2/<case>`` twice: into our model, where it
attaches a LoRA to the default OmniGen2 targets (every block's attention and SwiGLU projections), fills
A and B with seeded random values (``fill_lora`` below, repeated in tests/test_lora_omnigen2.py) and
exports it with ``lora.export_lora``; and into upstream's ``OmniGen2Transformer2DModel``, which loads that
file through ``OmniGen2LoraLoaderMixin.load_lora_weights`` (the ``OmniGen2Pipeline`` method) and runs the
case's forward. It writes ``<out>/adapter.safetensors`` (the exported file), ``<out>/io.npz`` (``out``:
upstream's LoRA forward (B, C, H, W) on the case's inputs; ``base``: without the LoRA) and
``<out>/case.json`` (case, rank, alpha, seed, fill scale).

The pipeline loader is run as written, with one shim: upstream's ``lora_state_dict`` was written for a
diffusers whose ``_fetch_state_dict`` returned the state dict alone; newer ones return
``(state_dict, metadata)``, so the shim keeps the first element (the pipeline never sees the metadata
either way). The file is also loaded with diffusers' metadata-aware ``transformer.load_lora_adapter(path,
prefix="transformer")`` on a second copy, which must give the same output (our OmniGen2 export folds
``alpha / r`` into ``lora_B`` and writes ``lora_alpha = r``, so both loaders agree).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CASE = "mqa_two_references"  # one main layer, two refiner layers per stack, two reference images
RANK, ALPHA, SEED, SCALE = 4, 12.0, 11, 0.3


def fill_lora(model: object, seed: int, scale: float) -> None:
    """Sets every attached LoRA's A (*stack, in, r) to N(0, 1/in) and B (*stack, r, out) to
    N(0, scale^2/r), in the order of the sorted module paths (keep in step with the test's copy)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from sfgrpo.models import lora  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    for _, lin in sorted(lora.linear_paths(model).items()):
        if lin.lora is None:
            continue
        a, b = lin.lora.a.get_value(), lin.lora.b.get_value()
        new_a = rng.standard_normal(a.shape, np.float32) / np.sqrt(a.shape[-2])
        new_b = rng.standard_normal(b.shape, np.float32) * np.float32(scale / np.sqrt(b.shape[-2]))
        lin.lora.a.set_value(jnp.asarray(new_a, a.dtype))
        lin.lora.b.set_value(jnp.asarray(new_b, b.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="the folder holding the upstream omnigen2 package")
    parser.add_argument("--out", default="tests/goldens/omnigen2_lora", help="where to write the goldens")
    parser.add_argument("--goldens", default="tests/goldens/omnigen2", help="the transformer goldens")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.reference).resolve()))
    import torch  # noqa: PLC0415 - test extra only
    from flax import nnx  # noqa: PLC0415
    from omnigen2.models.transformers.repo import OmniGen2RotaryPosEmbed  # noqa: PLC0415
    from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel  # noqa: PLC0415
    from omnigen2.pipelines import lora_pipeline  # noqa: PLC0415

    from sfgrpo.models import lora, omnigen2  # noqa: PLC0415

    case_dir = Path(args.goldens) / CASE
    meta = json.loads((case_dir / "case.json").read_text())
    folder = Path(args.goldens) / meta["model"]
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    file = out_root / "adapter.safetensors"

    # Ours: attach, fill, export.
    ours = omnigen2.from_pretrained(folder)
    lora.apply_lora(ours, lora.LoRAConfig(rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(0))
    fill_lora(ours, SEED, SCALE)
    lora.export_lora(ours, file)

    # Upstream: the pipeline's loader on a pipeline-like holder of the transformer.
    fetch = lora_pipeline._fetch_state_dict

    def fetch_state_dict(*a: object, **k: object) -> object:
        got = fetch(*a, **k)
        return got[0] if isinstance(got, tuple) else got

    lora_pipeline._fetch_state_dict = fetch_state_dict

    class Pipeline(lora_pipeline.OmniGen2LoraLoaderMixin):
        # What load_lora_adapter's offloading check reads of a DiffusionPipeline.
        hf_device_map = None

        def __init__(self, transformer: torch.nn.Module) -> None:
            self.transformer = transformer

        @property
        def components(self) -> dict:
            return {"transformer": self.transformer}

    def load() -> torch.nn.Module:
        return OmniGen2Transformer2DModel.from_pretrained(folder / "transformer").eval()

    upstream = load()
    Pipeline(upstream).load_lora_weights(str(file))
    config = next(iter(upstream.peft_config.values()))
    print(
        f"pipeline loader: r {config.r}, lora_alpha {config.lora_alpha}, {len(config.target_modules)} targets"
    )
    aware = load()
    aware.load_lora_adapter(str(file), prefix="transformer")

    io = dict(np.load(case_dir / "io.npz"))
    refs = [torch.from_numpy(io[f"ref_{j}"]) for j in range(len(meta["refs"]))]
    b = io["latents"].shape[0]
    freqs_cis = OmniGen2RotaryPosEmbed.get_freqs_cis(
        upstream.config.axes_dim_rope, upstream.config.axes_lens, theta=10000
    )
    inputs = (
        torch.from_numpy(io["latents"]),
        torch.from_numpy(io["timestep"]),
        torch.from_numpy(io["text"]),
        freqs_cis,
        torch.from_numpy(io["text_mask"]),
    )
    ref_lists = [[r[i] for r in refs] for i in range(b)] if refs else None
    with torch.no_grad():
        out = upstream(*inputs, ref_image_hidden_states=ref_lists).numpy()
        out_aware = aware(*inputs, ref_image_hidden_states=ref_lists).numpy()
        upstream.disable_lora()
        base = upstream(*inputs, ref_image_hidden_states=ref_lists).numpy()
    np.testing.assert_allclose(out_aware, out, rtol=0, atol=1e-6 * np.abs(out).max())
    np.testing.assert_allclose(base, io["out"], rtol=0, atol=1e-6 * np.abs(base).max())
    change = float(np.abs(out - base).max() / np.abs(base).max())
    assert change > 0.05, f"the LoRA barely changes the output ({change:.3g})"
    np.savez_compressed(out_root / "io.npz", out=out, base=base)
    spec = dict(case=CASE, rank=RANK, alpha=ALPHA, seed=SEED, scale=SCALE, lora_init_rngs=0)
    (out_root / "case.json").write_text(json.dumps(spec, indent=1))
    print(f"{CASE}: out {out.shape}, LoRA changes it by {change:.3f} (relative max), written to {out_root}")


if __name__ == "__main__":
    main()
