"""Seeded test LoRAs for a model repository's transformer, and the reference merge kiln's is
checked against (no LoRA can be downloaded):

    python -m kiln.make_lora make --model REPO --out DIR --name NAME [--layout peft|kohya]
        [--rank 4] [--alpha A] [--seed 0] [--std 0.5] [--dtype float32|bfloat16]
        [--targets attention,mlp]
    python -m kiln.make_lora merge --model REPO --out MERGED_REPO --lora FILE[:SCALE] ...
    python -m kiln.make_lora digest FILE

`make` writes DIR/NAME.safetensors and its digest DIR/NAME.safetensors.sha256 (sha256sum's
format, which kiln checks before it reads the file); `digest` records the digest of any file. The factors are normal, one generator per
module keyed by (seed, module): A with std 1/sqrt(in), B with std `std`/sqrt(rank), so the merged
weight moves by about `std` times the size of a unit-variance projection. Layouts (the key names
of diffusers/PEFT and of kohya's sd-scripts):
  peft   "transformer.<module>.lora_A.weight" [r, in], ".lora_B.weight" [out, r], and
         ".alpha" when --alpha is given (absent, alpha = r);
  kohya  Black Forest Labs' Flux names, "lora_unet_double_blocks_<i>_img_attn_qkv.lora_down.weight"
         [r, in], ".lora_up.weight" [3*out, r], ".alpha" (always written): fused projections
         (qkv; a single block's linear1 = q, k, v and proj_mlp) whose up factor covers several
         diffusers weights by rows.
Targets: `attention` (q, k, v and output projections of both streams and the single blocks),
`mlp` (the feed-forward projections and the single blocks' proj_mlp and proj_out).

`merge` writes MERGED_REPO: the model with W' = W + sum_i scale_i * (alpha_i / r_i) * B_i A_i (in
float32, in the order given, then cast back to W's dtype) in its transformer checkpoint, every
other file linked to REPO's. This reads the LoRA files by its own code, independent of kiln's
C++ reader, and is the reference kiln's merged image is compared with.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"

# Diffusers module names relative to a block, by target kind.
_DOUBLE = {
    "attention": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                  "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "mlp": ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}
_SINGLE = {
    "attention": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "mlp": ["proj_mlp", "proj_out"],
}
# kohya (Black Forest Labs) names → the diffusers modules they fuse, in row order.
_BFL_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
_BFL_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"lora/{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def checkpoint_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the transformer checkpoint's tensors (single file or sharded)."""
    folder = os.path.join(model, "transformer")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    files = ([os.path.join(folder, f) for f in sorted(set(json.load(open(index))["weight_map"].values()))]
             if os.path.exists(index) else [os.path.join(model, TRANSFORMER_FILE)])
    shapes = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _blocks(shapes: dict, prefix: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in shapes if k.startswith(prefix + ".")})


def make_lora(model: str, layout: str, rank: int, seed: int, std: float, alpha: float | None,
              targets: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The LoRA's tensors, keyed as `layout` writes them."""
    shapes = checkpoint_shapes(model)
    out: dict[str, torch.Tensor] = {}

    def factors(name: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = _generator(seed, name)
        a = torch.randn((rank, cols), generator=gen) / cols ** 0.5
        b = torch.randn((rows, rank), generator=gen) * (std / rank ** 0.5)
        return a.to(dtype), b.to(dtype)

    if layout == "peft":
        for block, table in (("transformer_blocks", _DOUBLE), ("single_transformer_blocks", _SINGLE)):
            for i in _blocks(shapes, block):
                for kind in targets:
                    for m in table[kind]:
                        module = f"{block}.{i}.{m}"
                        rows, cols = shapes[module + ".weight"]
                        a, b = factors(module, rows, cols)
                        out[f"transformer.{module}.lora_A.weight"] = a
                        out[f"transformer.{module}.lora_B.weight"] = b
                        if alpha is not None:
                            out[f"transformer.{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out
    wanted = {m for kind in targets for m in (_DOUBLE[kind] + _SINGLE[kind])}
    for block, bfl, table in (("transformer_blocks", "double_blocks", _BFL_DOUBLE),
                              ("single_transformer_blocks", "single_blocks", _BFL_SINGLE)):
        for i in _blocks(shapes, block):
            for name, modules in table.items():
                if not wanted.intersection(modules):
                    continue
                rows = sum(shapes[f"{block}.{i}.{m}.weight"][0] for m in modules)
                cols = shapes[f"{block}.{i}.{modules[0]}.weight"][1]
                key = f"lora_unet_{bfl}_{i}_{name}"
                a, b = factors(key, rows, cols)
                out[key + ".lora_down.weight"] = a
                out[key + ".lora_up.weight"] = b
                out[key + ".alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return out


def record_digest(path: str) -> str:
    """Writes PATH.sha256 as sha256sum does ("HEX  NAME"); returns the digest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with open(path + ".sha256", "w") as f:
        f.write(f"{h.hexdigest()}  {os.path.basename(path)}\n")
    return h.hexdigest()


def write_lora(tensors: dict[str, torch.Tensor], out_dir: str, name: str) -> str:
    """DIR/NAME.safetensors and its digest file; returns the file's path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    record_digest(path)
    return path


def read_deltas(path: str, shapes: dict, scale: float) -> dict[str, torch.Tensor]:
    """The reference reader: checkpoint weight name → scale * (alpha / r) * B A (float32)."""
    tensors = load_file(path)
    by_stem = {k[: -len(".weight")].replace(".", "_"): k for k in shapes if k.endswith(".weight")}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"),
                             (".lora_up.weight", "B"), (".alpha", "alpha")):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA tensor")
    deltas: dict[str, torch.Tensor] = {}
    for module, g in groups.items():
        a, b = g["A"].float(), g["B"].float()
        rank = a.shape[0]
        alpha = float(g["alpha"].float().item()) if "alpha" in g else float(rank)
        factor = scale * (alpha / rank)
        if module.startswith("lora_unet_"):
            stem = module[len("lora_unet_"):]
            if stem in by_stem:
                names = [by_stem[stem]]
            else:
                kind, _, rest = stem.partition("_blocks_")
                index, _, bfl = rest.partition("_")
                block, table = (("transformer_blocks", _BFL_DOUBLE) if kind == "double"
                                else ("single_transformer_blocks", _BFL_SINGLE))
                names = [f"{block}.{index}.{m}.weight" for m in table[bfl]]
        else:
            names = [module.removeprefix("transformer.").removeprefix("base_model.model.") + ".weight"]
        row = 0
        for n in names:
            rows = shapes[n][0]
            d = torch.matmul(b[row:row + rows].contiguous(), a).mul_(factor)
            deltas[n] = deltas[n].add_(d) if n in deltas else d
            row += rows
    return deltas


def merge(model: str, out: str, loras: list[tuple[str, float]]) -> None:
    """MERGED_REPO = REPO with the LoRAs merged into its transformer (see the module doc)."""
    state = load_file(os.path.join(model, TRANSFORMER_FILE))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    total: dict[str, torch.Tensor] = {}
    for path, scale in loras:
        for n, d in read_deltas(path, shapes, float(np.float32(scale))).items():
            total[n] = total[n].add_(d) if n in total else d
    for n, d in total.items():
        state[n] = (state[n].float() + d).to(state[n].dtype)
    os.makedirs(out, exist_ok=True)
    for entry in os.listdir(model):
        if entry != "transformer" and not os.path.exists(os.path.join(out, entry)):
            os.symlink(os.path.abspath(os.path.join(model, entry)), os.path.join(out, entry))
    os.makedirs(os.path.join(out, "transformer"), exist_ok=True)
    for entry in os.listdir(os.path.join(model, "transformer")):
        if not entry.endswith(".safetensors") and not entry.endswith(".index.json"):
            dst = os.path.join(out, "transformer", entry)
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(os.path.join(model, "transformer", entry)), dst)
    save_file(state, os.path.join(out, TRANSFORMER_FILE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.make_lora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a seeded LoRA and its digest")
    m.add_argument("--model", required=True, help="model repository (diffusers layout)")
    m.add_argument("--out", required=True, help="LoRA directory to write into")
    m.add_argument("--name", required=True, help="LoRA name (file NAME.safetensors)")
    m.add_argument("--layout", choices=("peft", "kohya"), default="peft")
    m.add_argument("--rank", type=int, default=4)
    m.add_argument("--alpha", type=float, default=None, help="alpha (default: none stored, = rank)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--std", type=float, default=0.5, help="size of the delta (default 0.5)")
    m.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    m.add_argument("--targets", default="attention,mlp", help="attention, mlp or both")
    d = sub.add_parser("digest", help="record FILE's digest in FILE.sha256")
    d.add_argument("file")
    g = sub.add_parser("merge", help="write the model with LoRAs merged (the reference)")
    g.add_argument("--model", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--lora", action="append", required=True, help="FILE[:SCALE], repeatable, in order")
    args = p.parse_args(argv)
    if args.command == "make":
        targets = [t for t in args.targets.split(",") if t]
        bad = [t for t in targets if t not in _DOUBLE]
        if bad or not targets:
            p.error(f"--targets: {bad or 'empty'}: expected attention and/or mlp")
        tensors = make_lora(args.model, args.layout, args.rank, args.seed, args.std, args.alpha,
                            targets, _DTYPES[args.dtype])
        print(write_lora(tensors, args.out, args.name))
        return 0
    if args.command == "digest":
        print(record_digest(args.file))
        return 0
    loras = []
    for spec in args.lora:
        path, sep, scale = spec.rpartition(":")
        loras.append((path, float(scale)) if sep and path.endswith(".safetensors") else (spec, 1.0))
    merge(args.model, args.out, loras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
