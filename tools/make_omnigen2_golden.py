"""Writes the OmniGen2 transformer parity goldens from the upstream PyTorch code (test oracles only).

    PYTHONPATH=../shared/reference/omnigen2 python tools/make_omnigen2_golden.py \
        --reference ../shared/reference/omnigen2 --out tests/goldens/omnigen2

The upstream ``omnigen2`` package has no installable release, so the tests cannot import it: this script
runs it once on tiny random configs and commits what it computed. It writes
``<out>/<model>/transformer/`` (config.json and safetensors, exactly as upstream's ``save_pretrained``
does) for each model, and for each case ``<out>/<case>/case.json`` (which model, text lengths, latent
sizes) and ``<out>/<case>/io.npz``: the forward's inputs in upstream's layout (latents (B, C, H, W), each
reference image's latents (B, C, h, w), text features, text mask, timesteps) and its output (B, C, H, W).

Weights are random with every parameter perturbed, because upstream initialises the output projection
and every modulation to zero, which would make the output identically zero and the test vacuous.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Each case: a config, the batch's text lengths (padded to the longest, plus `extra_pad`), the target
# latent (H, W), and the reference images' latent sizes (shared by the batch).
CASES = {
    # Grouped-query attention (4 heads, 2 K/V), non-square target, no reference image (text-to-image).
    "gqa_no_reference": dict(
        config=dict(
            in_channels=4,
            hidden_size=48,
            num_layers=2,
            num_refiner_layers=1,
            num_attention_heads=4,
            num_kv_heads=2,
            multiple_of=8,
            ffn_dim_multiplier=0.5,
            axes_dim_rope=[4, 4, 4],
            axes_lens=[64, 32, 32],
            text_feat_dim=24,
            timestep_scale=1000.0,
        ),
        text_lens=[9, 5],
        extra_pad=0,
        latent_hw=(8, 12),
        refs=[],
    ),
    # The same model (its weights are not written twice), one reference image of another shape, other
    # text lengths.
    "gqa_one_reference": dict(
        config="gqa_no_reference",
        text_lens=[6, 8],
        extra_pad=0,
        latent_hw=(12, 8),
        refs=[(8, 10)],
    ),
    # Another architecture: 3 heads sharing one K/V head, an MLP width rounded up (int(0.6 * 192) = 115 ->
    # 128), 2 refiner layers, eps 1e-6,
    # timestep_scale 1; two reference images of different shapes; text with padding beyond the longest.
    "mqa_two_references": dict(
        config=dict(
            in_channels=4,
            hidden_size=48,
            num_layers=1,
            num_refiner_layers=2,
            num_attention_heads=3,
            num_kv_heads=1,
            multiple_of=32,
            ffn_dim_multiplier=0.6,
            norm_eps=1e-6,
            axes_dim_rope=[4, 6, 6],
            axes_lens=[80, 40, 40],
            text_feat_dim=40,
            timestep_scale=1.0,
        ),
        text_lens=[3, 11],
        extra_pad=2,
        latent_hw=(10, 6),
        refs=[(8, 8), (6, 10)],
    ),
}


def _perturb(model: object, torch: object, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and "linear" not in name:
                p.copy_(1.0 + 0.2 * noise)  # RMSNorm scales
            elif p.ndim == 1:
                p.copy_(0.1 * noise)  # biases
            elif name == "image_index_embedding":
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="the folder holding the upstream omnigen2 package")
    parser.add_argument("--out", required=True, help="where to write the goldens")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.reference).resolve()))
    import torch  # noqa: PLC0415 - test extra only
    from omnigen2.models.transformers.repo import OmniGen2RotaryPosEmbed  # noqa: PLC0415
    from omnigen2.models.transformers.transformer_omnigen2 import OmniGen2Transformer2DModel  # noqa: PLC0415

    torch.manual_seed(0)
    out_root = Path(args.out)
    for index, (case, spec) in enumerate(CASES.items()):
        config, model_case = spec["config"], case
        if isinstance(config, str):
            model_case, config = config, CASES[config]["config"]
        model = OmniGen2Transformer2DModel(**config).eval()
        _perturb(model, torch, seed=100 + list(CASES).index(model_case))
        folder = out_root / case
        folder.mkdir(parents=True, exist_ok=True)
        if model_case == case:
            model.save_pretrained(folder / "transformer")

        gen = torch.Generator().manual_seed(200 + index)
        b, c = len(spec["text_lens"]), config["in_channels"]
        t_len = max(spec["text_lens"]) + spec["extra_pad"]
        latents = torch.randn(b, c, *spec["latent_hw"], generator=gen)
        refs = [torch.randn(b, c, h, w, generator=gen) for h, w in spec["refs"]]
        text = torch.randn(b, t_len, config["text_feat_dim"], generator=gen)
        mask = torch.zeros(b, t_len, dtype=torch.long)
        for i, n in enumerate(spec["text_lens"]):
            mask[i, :n] = 1
        t = torch.rand(b, generator=gen)
        freqs_cis = OmniGen2RotaryPosEmbed.get_freqs_cis(
            model.config.axes_dim_rope, model.config.axes_lens, theta=10000
        )
        ref_lists = [[r[i] for r in refs] for i in range(b)] if refs else None
        with torch.no_grad():
            out = model(latents, t, text, freqs_cis, mask, ref_image_hidden_states=ref_lists)
        arrays = dict(latents=latents, text=text, text_mask=mask, timestep=t, out=out)
        arrays.update({f"ref_{j}": r for j, r in enumerate(refs)})
        np.savez_compressed(folder / "io.npz", **{k: v.numpy() for k, v in arrays.items()})
        meta = {k: v for k, v in spec.items() if k != "config"}
        meta["model"] = model_case
        (folder / "case.json").write_text(json.dumps(meta, indent=1))
        print(f"{case}: out {tuple(out.shape)}, |out| {float(out.abs().mean()):.3f}, written to {folder}")


if __name__ == "__main__":
    main()
