"""Writes a full-size model repository with synthetic, seeded weights (no weights can be
downloaded), in the diffusers layout, generating the tensors on a GPU:

    python -m kiln.make_synthetic OUT_DIR [--config flux-dev] [--device cuda] [--dtype bf16]
        [--seed 0] [--components transformer,vae,text_encoder,text_encoder_2]
        [--transformer-layers DOUBLE,SINGLE]

--transformer-layers keeps the config's tensor shapes with fewer blocks (a smaller checkpoint of
the same shapes: bench/gpu/broadcast.sh's CPU dry run uses flux-dev with 1,2: 1.37 GB in bf16).

The configs are the published ones (kiln/configs.py); the tokenizers are the project's own small
ones (kiln/tokenizer_files.py), whose ids all fall inside the published vocabularies. Weights are
normal with std 1/sqrt(fan_in) (norm scales 1, biases small), one generator per tensor keyed by
(seed, component, name), so the bytes do not depend on device order. Used by bench/gpu/run.sh.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
from torch import nn

from kiln import configs as kiln_configs
from kiln import tokenizer_files
from kiln.models.clip import ClipTextModel
from kiln.models.flux import FluxTransformer
from kiln.models.t5 import T5Encoder
from kiln.models.vae import VaeDecoder

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_FILES = {"transformer": "transformer/diffusion_pytorch_model.safetensors",
          "vae": "vae/diffusion_pytorch_model.safetensors",
          "text_encoder": "text_encoder/model.safetensors",
          "text_encoder_2": "text_encoder_2/model.safetensors"}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _module(component: str, config: dict) -> nn.Module:
    with torch.device("meta"):
        if component == "transformer":
            return FluxTransformer(config)
        if component == "vae":
            return VaeDecoder(config)  # the decoder is all kiln runs; a real file also has the encoder
        if component == "text_encoder":
            return ClipTextModel(config)
        return T5Encoder(config)


def synthetic_state(module: nn.Module, component: str, seed: int, device: str,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in module.named_parameters():
        digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(
            int.from_bytes(digest[:8], "little") & (2**63 - 1))
        t = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        if p.ndim >= 2:
            t *= 1.0 / math.sqrt(max(1, p[0].numel()))
        elif name.endswith("weight"):  # norm scales
            t = 1.0 + 0.02 * t
        else:
            t *= 0.01
        state[name] = t.to(dtype).to("cpu", non_blocking=False)
    return state


def make_synthetic(out_dir: str, config_name: str = "flux-dev", seed: int = 0,
                   device: str = "cuda", dtype: str = "bf16",
                   components: tuple[str, ...] = COMPONENTS,
                   transformer_layers: tuple[int, int] | None = None) -> dict:
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    clip_vocab = tokenizer_files.write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    t5_vocab = tokenizer_files.write_t5_tokenizer(os.path.join(out_dir, "tokenizer_2"))
    if config_name == "flux-tiny":  # its vocabularies are sized to the project's tokenizers
        cfg = kiln_configs.flux_tiny(clip_vocab_size=clip_vocab, t5_vocab_size=t5_vocab)
    else:
        cfg = kiln_configs.CONFIGS[config_name]()
    if transformer_layers is not None:
        cfg["transformer"]["num_layers"], cfg["transformer"]["num_single_layers"] = transformer_layers
    for entry, rel in kiln_configs.CONFIG_FILES.items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(cfg[entry], f, indent=2, sort_keys=True)
    report = {}
    for component in components:
        t0 = time.monotonic()
        state = synthetic_state(_module(component, cfg[component]), component, seed, device,
                                _DTYPES[dtype])
        t1 = time.monotonic()
        path = os.path.join(out_dir, _FILES[component])
        save_file(state, path, metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        report[component] = {"bytes": nbytes, "generate_seconds": round(t1 - t0, 2),
                             "write_seconds": round(time.monotonic() - t1, 2)}
        del state
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.make_synthetic", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--config", default="flux-dev", choices=sorted(kiln_configs.CONFIGS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--components", default=",".join(COMPONENTS))
    p.add_argument("--transformer-layers", default="",
                   help="DOUBLE,SINGLE: blocks of the transformer (default: the config's)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    comps = tuple(c for c in args.components.split(",") if c)
    bad = [c for c in comps if c not in COMPONENTS]
    if bad:
        p.error(f"--components: unknown {bad}; expected some of {COMPONENTS}")
    layers = None
    if args.transformer_layers:
        try:
            double, single = (int(x) for x in args.transformer_layers.split(","))
        except ValueError:
            p.error(f"--transformer-layers: {args.transformer_layers!r} is not DOUBLE,SINGLE")
        if double < 0 or single < 0:
            p.error(f"--transformer-layers: {args.transformer_layers!r} has a negative count")
        layers = (double, single)
    print(json.dumps(make_synthetic(args.out_dir, args.config, args.seed, args.device,
                                    args.dtype, comps, layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
