"""The two first-class model configs, `flux-dev` and `flux-tiny`, as the config.json dicts of a
diffusers-layout repository (pipeline/README.md "Model repository").

A repo config is a dict keyed by the repository file it is written to, without the `.json`:
`model_index`, `scheduler` (scheduler/scheduler_config.json), `transformer`, `vae`,
`text_encoder`, `text_encoder_2` (each <folder>/config.json). Key names are the ones the real
diffusers / transformers config.json files use, so the reference libraries load them as they are.

`flux-dev` holds the published FLUX.1-dev shapes; `flux-tiny` has the same architecture families
at toy sizes (prompt -> image in seconds on a CPU) and keeps latent_channels 16, in_channels 64
and an 8x VAE so latent packing is identical to dev. Its text encoder vocabulary sizes and CLIP
special-token ids come from the tokenizers make_tiny generates.
"""
from __future__ import annotations

import copy

# Config file of each repo entry, relative to the repository root.
CONFIG_FILES = {
    "model_index": "model_index.json",
    "scheduler": "scheduler/scheduler_config.json",
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}

_DIFFUSERS_VERSION = "0.30.0.dev0"
_TRANSFORMERS_VERSION = "4.43.3"

_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

FLUX_DEV: dict[str, dict] = {
    "model_index": _MODEL_INDEX,
    "scheduler": _SCHEDULER,
    "transformer": {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "bfloat16",
        "transformers_version": _TRANSFORMERS_VERSION,
        "vocab_size": 49408,
    },
    "text_encoder_2": {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 24,
        "num_heads": 64,
        "num_layers": 24,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": 32128,
    },
}

# flux-tiny: 2 double + 2 single blocks of width 32 (2 heads x 16), VAE [32]*4 (8x), CLIP and T5
# of width 32 and 2 layers. Vocabulary sizes and CLIP special ids below are placeholders that
# make_tiny replaces with the generated tokenizers' values.
FLUX_TINY: dict[str, dict] = {
    "model_index": _MODEL_INDEX,
    "scheduler": _SCHEDULER,
    "transformer": {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 32,
        "num_attention_heads": 2,
        "num_layers": 2,
        "num_single_layers": 2,
        "patch_size": 1,
        "pooled_projection_dim": 32,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [32, 32, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 1,
        "mid_block_add_attention": True,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 256,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 1,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
        "vocab_size": 1000,
    },
    "text_encoder_2": {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 64,
        "d_kv": 16,
        "d_model": 32,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 2,
        "num_heads": 2,
        "num_layers": 2,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": 1000,
    },
}


def flux_dev() -> dict[str, dict]:
    """A fresh copy of the FLUX.1-dev repository configs."""
    return copy.deepcopy(FLUX_DEV)


def flux_tiny(clip_vocab_size: int | None = None, t5_vocab_size: int | None = None,
              clip_bos_token_id: int | None = None, clip_eos_token_id: int | None = None,
              clip_pad_token_id: int | None = None) -> dict[str, dict]:
    """A fresh copy of the flux-tiny configs, with the tokenizer-dependent fields filled in."""
    cfg = copy.deepcopy(FLUX_TINY)
    clip, t5 = cfg["text_encoder"], cfg["text_encoder_2"]
    for field, value in (("vocab_size", clip_vocab_size), ("bos_token_id", clip_bos_token_id),
                         ("eos_token_id", clip_eos_token_id),
                         ("pad_token_id", clip_pad_token_id)):
        if value is not None:
            clip[field] = int(value)
    if t5_vocab_size is not None:
        t5["vocab_size"] = int(t5_vocab_size)
    return cfg


CONFIGS = {"flux-dev": flux_dev, "flux-tiny": flux_tiny}
