"""The tiny diffusers ``Flux2Transformer2DModel`` config the model tests build their references from.

It is the diffusers side of the parity tests, spelled out independently of ``flux2_config.CONFIGS``.
"""

TINY_DIFFUSERS = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)
