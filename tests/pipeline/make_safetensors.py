"""Writes safetensors fixtures for tests/pipeline/safetensors_test.cc with the real library.

    make_safetensors.py OUT_DIR

Creates, under OUT_DIR:
  all_dtypes.safetensors     one tensor per dtype (plus a scalar, an empty tensor, a 4-d one),
                             __metadata__ {"format": "pt", "note": "kiln ünïcode"}
  manifest.json              {file: {tensor: {"dtype", "shape", "hex"}}} for every file below:
                             the exact bytes safetensors wrote, as torch holds them
  sharded/                   diffusion_pytorch_model-0000{1,2}-of-00002.safetensors + index.json
  single/                    model.safetensors (and a stray other.safetensors that must be ignored)
  unindexed/                 a.safetensors, b.safetensors (no index)
  duplicate/                 a.safetensors, b.safetensors both holding "w"
  missing_shard/             index naming a shard that is not there
  wrong_shard/               index placing a tensor in the shard that does not hold it
"""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAME_OF = {v: k for k, v in DTYPES.items()}


def random_tensor(gen: torch.Generator, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def save(path: str, tensors: dict[str, torch.Tensor], manifest: dict, key: str,
         metadata: dict | None = None) -> None:
    save_file(tensors, path, metadata=metadata)
    manifest[key] = {
        name: {"dtype": NAME_OF[t.dtype], "shape": list(t.shape), "hex": raw_bytes(t).hex()}
        for name, t in tensors.items()
    }


def main(out: str) -> None:
    gen = torch.Generator().manual_seed(1234)
    manifest: dict = {}
    shapes = [[3, 5], [7], [2, 3, 4], [1, 1, 9]]
    tensors = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        tensors[f"t.{name.lower()}"] = random_tensor(gen, dtype, shapes[i % len(shapes)])
    tensors["scalar.f32"] = torch.tensor(1.5, dtype=torch.float32)
    tensors["empty.bf16"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["block.0.weight"] = random_tensor(gen, torch.float32, [2, 3, 4, 5])
    save(os.path.join(out, "all_dtypes.safetensors"), tensors, manifest, "all_dtypes",
         metadata={"format": "pt", "note": "kiln ünïcode"})

    def folder(name: str) -> str:
        path = os.path.join(out, name)
        os.makedirs(path, exist_ok=True)
        return path

    # Sharded, as diffusers writes a large transformer.
    d = folder("sharded")
    shard_names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    shards = [
        {"x_embedder.weight": random_tensor(gen, torch.bfloat16, [8, 4]),
         "x_embedder.bias": random_tensor(gen, torch.bfloat16, [8])},
        {"proj_out.weight": random_tensor(gen, torch.bfloat16, [4, 8]),
         "proj_out.bias": random_tensor(gen, torch.float32, [4])},
    ]
    weight_map = {}
    for shard_name, shard in zip(shard_names, shards):
        save(os.path.join(d, shard_name), shard, manifest, f"sharded/{shard_name}")
        weight_map.update({k: shard_name for k in shard})
    with open(os.path.join(d, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)

    d = folder("single")
    embedding = "text_model.embeddings.token_embedding.weight"
    save(os.path.join(d, "model.safetensors"),
         {embedding: random_tensor(gen, torch.float16, [10, 4])},
         manifest, "single/model.safetensors")
    save(os.path.join(d, "other.safetensors"),
         {embedding: random_tensor(gen, torch.float16, [1])},
         manifest, "single/other.safetensors")

    d = folder("unindexed")
    save(os.path.join(d, "a.safetensors"), {"a": random_tensor(gen, torch.float32, [2])},
         manifest, "unindexed/a.safetensors")
    save(os.path.join(d, "b.safetensors"), {"b": random_tensor(gen, torch.int64, [3])},
         manifest, "unindexed/b.safetensors")

    d = folder("duplicate")
    save(os.path.join(d, "a.safetensors"), {"w": random_tensor(gen, torch.float32, [2])},
         manifest, "duplicate/a.safetensors")
    save(os.path.join(d, "b.safetensors"), {"w": random_tensor(gen, torch.float32, [2])},
         manifest, "duplicate/b.safetensors")

    d = folder("missing_shard")
    save(os.path.join(d, "model-00001-of-00002.safetensors"),
         {"a": random_tensor(gen, torch.float32, [2])}, manifest, "missing_shard/1")
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                  "b": "model-00002-of-00002.safetensors"}}, f)

    d = folder("wrong_shard")
    save(os.path.join(d, "model-00001-of-00002.safetensors"),
         {"a": random_tensor(gen, torch.float32, [2])}, manifest, "wrong_shard/1")
    save(os.path.join(d, "model-00002-of-00002.safetensors"),
         {"b": random_tensor(gen, torch.float32, [2])}, manifest, "wrong_shard/2")
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00002-of-00002.safetensors",
                                  "b": "model-00002-of-00002.safetensors"}}, f)

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])
