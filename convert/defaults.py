"""The diffusers configs Mobile-O-0.5B loads, built in (docs/reference-model.md §1.1, §1.4).

The released checkpoint names ``Efficient-Large-Model/Sana_600M_512px_diffusers`` for its DiT,
VAE and scheduler instead of shipping their configs. These are that repo's files, value for
value: the converter falls back on them when no other copy is found, and the demo checkpoint
writes them (with its own sizes) as the repo's files. This module is their only copy.
"""

from __future__ import annotations

from typing import Any

# transformer/config.json: the SANA-600M DiT (diffusers SanaTransformer2DModel).
TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "SanaTransformer2DModel",
    "attention_bias": False,
    "attention_head_dim": 32,
    "caption_channels": 2304,
    "cross_attention_dim": 1152,
    "cross_attention_head_dim": 72,
    "dropout": 0.0,
    "in_channels": 32,
    "interpolation_scale": None,
    "mlp_ratio": 2.5,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "num_attention_heads": 36,
    "num_cross_attention_heads": 16,
    "num_layers": 28,
    "out_channels": 32,
    "patch_size": 1,
    "sample_size": 16,
}

# vae/config.json: the DC-AE f32c32 autoencoder (diffusers AutoencoderDC).
VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderDC",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}

# scheduler/scheduler_config.json: DPM-Solver++ 2M on flow sigmas (diffusers
# DPMSolverMultistepScheduler); mobileo_mlx.samplers implements the settings that matter.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": float("-inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

# By config section, as convert.layout.DIFFUSION_CONFIG_FILES names their files.
DIFFUSION_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": TRANSFORMER_CONFIG,
    "vae": VAE_CONFIG,
    "scheduler": SCHEDULER_CONFIG,
}
