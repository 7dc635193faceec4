"""Writes the flux-tiny model repository (diffusers layout, seeded weights):

    python -m kiln.make_tiny OUT_DIR [--seed 0]

OUT_DIR gets model_index.json, scheduler/, transformer/, vae/ (full AutoencoderKL state, encoder
included, as a real checkpoint has), text_encoder/, text_encoder_2/ (two shards plus
model.safetensors.index.json, to exercise sharded loading), tokenizer/ and tokenizer_2/. Weights
are float32 safetensors; the same seed gives byte-identical files. Used by tests and by anyone who
wants a prompt -> image model that runs in seconds on a CPU.

`write_repo` writes any repo config dict (kiln/configs.py layout), so tests can make other sizes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import torch
from torch import nn

from kiln import configs as kiln_configs
from kiln import tokenizer_files
from kiln.models.clip import LEGACY_EOS_TOKEN_ID, ClipTextModel
from kiln.models.flux import FluxTransformer, RMSNorm
from kiln.models.t5 import T5Encoder, T5LayerNorm
from kiln.models.vae import VaeDecoder, VaeEncoder

T5_SHARDS = 2
_WEIGHT_GAIN = 1.0   # std of linear / conv weights is gain / sqrt(fan_in): unit-variance outputs
_BIAS_STD = 0.1
_NORM_STD = 0.1      # norm scales are 1 + N(0, 0.1^2), shifts N(0, 0.1^2)
_EMBED_STD = 1.0
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, RMSNorm, T5LayerNorm)


def _generator(seed: int, component: str, name: str) -> torch.Generator:
    """One generator per tensor, keyed by name: a tensor's values do not depend on which other
    tensors exist or on iteration order."""
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def seeded_state(module: nn.Module, seed: int, component: str) -> dict[str, torch.Tensor]:
    """float32 values for every parameter of `module`: small-std normals scaled so activations
    stay near unit variance, norms near identity, and nothing zero (final projections and AdaLN
    modulations included), so every output depends on every input."""
    state: dict[str, torch.Tensor] = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            gen = _generator(seed, component, name)
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if isinstance(mod, _NORM_TYPES):
                value = (1.0 + _NORM_STD * noise) if p_name == "weight" else _NORM_STD * noise
            elif isinstance(mod, nn.Embedding):
                value = _EMBED_STD * noise
            elif p_name == "bias":
                value = _BIAS_STD * noise
            else:
                fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
                value = (_WEIGHT_GAIN / math.sqrt(fan_in)) * noise
            state[name] = value.contiguous()
    return state


def _component_states(cfg: dict[str, dict], seed: int) -> dict[str, dict[str, torch.Tensor]]:
    vae = {**seeded_state(VaeEncoder(cfg["vae"]), seed, "vae"),
           **seeded_state(VaeDecoder(cfg["vae"]), seed, "vae")}
    return {
        "transformer": seeded_state(FluxTransformer(cfg["transformer"]), seed, "transformer"),
        "vae": vae,
        "text_encoder": seeded_state(ClipTextModel(cfg["text_encoder"]), seed, "text_encoder"),
        "text_encoder_2": seeded_state(T5Encoder(cfg["text_encoder_2"]), seed, "text_encoder_2"),
    }


def _write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates 0600; the repository is meant to be shared


def _save_sharded(tensors: dict[str, torch.Tensor], folder: str, stem: str, shards: int) -> None:
    """Splits the sorted names into `shards` contiguous groups of equal count and writes them
    with the Hugging Face index file (`metadata.total_size`, `weight_map`)."""
    names = sorted(tensors)
    if len(names) < shards:
        raise ValueError(f"make_tiny: {len(names)} tensors cannot fill {shards} shards")
    weight_map = {}
    for i in range(shards):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        _save({n: tensors[n] for n in group}, os.path.join(folder, file))
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(folder, f"{stem}.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_repo(out_dir: str, cfg: dict[str, dict], seed: int = 0, t5_shards: int = T5_SHARDS
               ) -> None:
    """Writes the configs of `cfg` (kiln.configs layout) and seeded float32 weights."""
    for entry, rel in kiln_configs.CONFIG_FILES.items():
        _write_json(os.path.join(out_dir, rel), cfg[entry])
    states = _component_states(cfg, seed)
    _save(states["transformer"],
          os.path.join(out_dir, "transformer", "diffusion_pytorch_model.safetensors"))
    _save(states["vae"], os.path.join(out_dir, "vae", "diffusion_pytorch_model.safetensors"))
    _save(states["text_encoder"], os.path.join(out_dir, "text_encoder", "model.safetensors"))
    if t5_shards > 1:
        _save_sharded(states["text_encoder_2"], os.path.join(out_dir, "text_encoder_2"), "model",
                      t5_shards)
    else:
        _save(states["text_encoder_2"], os.path.join(out_dir, "text_encoder_2",
                                                     "model.safetensors"))


def _clip_special_ids(tokenizer_dir: str) -> dict[str, int]:
    """bos/eos/pad ids of the CLIP BPE vocabulary written to tokenizer_dir."""
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    ids = {"clip_bos_token_id": vocab["<|startoftext|>"],
           "clip_eos_token_id": vocab["<|endoftext|>"]}
    ids["clip_pad_token_id"] = ids["clip_eos_token_id"]  # Flux pads CLIP input with EOS
    return ids


def make_tiny(out_dir: str, seed: int = 0) -> dict[str, dict]:
    """Writes the flux-tiny repository to out_dir and returns its configs."""
    os.makedirs(out_dir, exist_ok=True)
    clip_dir = os.path.join(out_dir, "tokenizer")
    t5_dir = os.path.join(out_dir, "tokenizer_2")
    clip_vocab = tokenizer_files.write_clip_tokenizer(clip_dir)
    t5_vocab = tokenizer_files.write_t5_tokenizer(t5_dir)
    ids = _clip_special_ids(clip_dir)
    # eos_token_id 2 selects the legacy argmax(input_ids) pooling, right only if EOS is the
    # highest id; refuse a tokenizer that would make that ambiguous.
    if (ids["clip_eos_token_id"] == LEGACY_EOS_TOKEN_ID
            and ids["clip_eos_token_id"] != clip_vocab - 1):
        raise ValueError("make_tiny: the CLIP tokenizer's EOS id is 2, which CLIP configs "
                         "reserve for the legacy pooling rule")
    cfg = kiln_configs.flux_tiny(clip_vocab_size=clip_vocab, t5_vocab_size=t5_vocab, **ids)
    write_repo(out_dir, cfg, seed)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.make_tiny",
                                description="Write the seeded flux-tiny model repository.")
    p.add_argument("out_dir", help="repository directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    make_tiny(args.out_dir, args.seed)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
