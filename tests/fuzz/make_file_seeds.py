"""Writes the seed corpora of the file-format targets under CORPUS_DIR (tests/fuzz/corpus):
safetensors_fuzz, json_readers_fuzz, clip_tokenizer_fuzz, t5_tokenizer_fuzz,
tokenizer_encode_fuzz and png_fuzz. Small inputs cut from the real formats: the tokenizer seeds
are the flux-tiny tokenizers (kiln.tokenizer_files) reduced to a few dozen pieces. Run by hand
with the project Python when a format changes; its output is committed.

  PYTHONPATH=pipeline/python .venv/bin/python tests/fuzz/make_file_seeds.py tests/fuzz/corpus
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile

SEP = b"\n--8<--\n"  # fuzz_support.h kFileSeparator


def write(root: str, target: str, name: str, data: bytes) -> None:
    os.makedirs(os.path.join(root, target), exist_ok=True)
    with open(os.path.join(root, target, name), "wb") as f:
        f.write(data)


def safetensors(tensors: dict, metadata: dict | None = None, pad: int = 8) -> bytes:
    header, data = {}, b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % pad)
    return struct.pack("<Q", len(text)) + text + data


def main(root: str) -> None:
    st = "safetensors_fuzz"
    write(root, st, "f32_bf16", safetensors({
        "w": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
        "b": ("BF16", [3], b"\x80\x3f" * 3)}, {"format": "pt"}))
    write(root, st, "every_dtype", safetensors({
        f"t{i}": (d, [2], b"\x01" * 2 * n) for i, (d, n) in enumerate(
            [("F64", 8), ("F16", 2), ("I64", 8), ("I32", 4), ("I16", 2), ("I8", 1), ("U64", 8),
             ("U32", 4), ("U16", 2), ("U8", 1), ("BOOL", 1), ("F8_E4M3", 1), ("F8_E5M2", 1)])}))
    write(root, st, "scalar_and_empty", safetensors({
        "s": ("F32", [], struct.pack("<f", 0.5)), "e": ("F32", [0, 4], b"")}))
    write(root, st, "empty_header", safetensors({}))

    js = "json_readers_fuzz"
    key = {"component": "transformer",
           "architecture": "a" * 64, "weights": "b" * 64, "compile": "c" * 64,
           "precision": "fp32", "batch": 1, "height": 256, "width": 256,
           "device": {"kind": "cpu", "arch": ""},
           "toolchain": {"torch": "2.13.0+cpu", "cuda": "", "triton": ""}}
    write(root, js, "artifact_key", json.dumps(key).encode())
    write(root, js, "canonical", json.dumps(
        {"b": [1, -0.0, 1e-05, 0.0001, 1e15, 1e16, 3.14159, 18446744073709551615, -9223372036854775808],
         "a": {"z": None, "y": True, "x": "h\u00e9llo \u2603 \\\"q\\\" \n\t"}, "": []},
        ensure_ascii=False).encode())
    manifest = {"key": key, "digest": "0" * 64, "package_file": "model.pt2",
                "package_sha256": "1" * 64, "package_bytes": 123, "extra_constants": "",
                "constants": {"w": {"shape": [4, 4], "dtype": "float32", "source": "checkpoint",
                                    "derive": {"op": "concat0", "from": ["q", "k"]}}},
                "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
                "outputs": [{"name": "y", "shape": [1, 4], "dtype": "bfloat16"}],
                "compile_seconds": 1.5, "built_by": "kiln-compile", "built_at": "2026-01-01T00:00:00Z"}
    write(root, js, "manifest", json.dumps(manifest, indent=1).encode())

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "python"))
    from kiln import tokenizer_files
    from sentencepiece import sentencepiece_model_pb2

    with tempfile.TemporaryDirectory() as tmp:
        clip_dir, t5_dir = os.path.join(tmp, "clip"), os.path.join(tmp, "t5")
        tokenizer_files.write_clip_tokenizer(clip_dir)
        tokenizer_files.write_t5_tokenizer(t5_dir)
        read = lambda d, n: open(os.path.join(d, n), "rb").read()

        # CLIP: the 512 byte symbols, 40 merges (and what they make), the specials.
        vocab = json.loads(read(clip_dir, "vocab.json"))
        merges = read(clip_dir, "merges.txt").decode().splitlines()
        kept = merges[:41]  # "#version" line + 40 merges
        names = [n for n, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512]
        names += ["".join(m.split(" ")) for m in kept[1:]] + ["<|startoftext|>", "<|endoftext|>"]
        small_vocab = {n: i for i, n in enumerate(dict.fromkeys(names))}
        config = json.loads(read(clip_dir, "tokenizer_config.json"))
        config["added_tokens_decoder"] = {
            str(small_vocab[t["content"]]): t for t in config["added_tokens_decoder"].values()}
        clip = SEP.join([json.dumps(small_vocab, ensure_ascii=False).encode(),
                         ("\n".join(kept) + "\n").encode(), json.dumps(config).encode(),
                         "A Lighthouse on the cliff, at dusk! 1234 <|endoftext|> \u00e9t\u00e9".encode()])
        write(root, "clip_tokenizer_fuzz", "flux_tiny_small", clip)

        # T5: pad, eos, unk and 37 pieces; with no charsmap, and with the real one's trie cut off.
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(read(t5_dir, "spiece.model"))
        del model.pieces[40:]
        charsmap = model.normalizer_spec.precompiled_charsmap
        model.normalizer_spec.precompiled_charsmap = b""
        config = json.loads(read(t5_dir, "tokenizer_config.json"))
        config["added_tokens_decoder"] = {
            k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
        config["additional_special_tokens"] = []
        config["extra_ids"] = 0
        prompt = "A  lighthouse\u3000on a cliff at dusk, ﬁne \u2460 </s> <unk>".encode()
        t5 = SEP.join([model.SerializeToString(), json.dumps(config).encode(), prompt])
        write(root, "t5_tokenizer_fuzz", "flux_tiny_small", t5)
        model.normalizer_spec.precompiled_charsmap = charsmap[:4] + b"\0" * 64
        write(root, "t5_tokenizer_fuzz", "cut_charsmap",
              SEP.join([model.SerializeToString(), json.dumps(config).encode(), prompt]))
        # A hand-made darts-clone trie with one key, "A" -> replacement 0 ("a"): the root's
        # offset is 1, so "A" (0x41) sits at unit 1 ^ 0x41 = 64 with a leaf; its value unit is
        # 64 ^ 1 = 65.
        units = [0] * 66
        units[0] = 1 << 10
        units[64] = 1 << 10 | 1 << 8 | 0x41
        units[65] = 0x80000000
        trie = b"".join(struct.pack("<I", u) for u in units)
        for name, replacement in (("one_key_charsmap", b"a\0"), ("bad_utf8_charsmap", b"\xff\0")):
            model.normalizer_spec.precompiled_charsmap = struct.pack("<I", len(trie)) + trie + replacement
            write(root, "t5_tokenizer_fuzz", name,
                  SEP.join([model.SerializeToString(), json.dumps(config).encode(), b"A cAt"]))

    enc = "tokenizer_encode_fuzz"
    prompts = ["a lighthouse on a cliff at dusk", "A PHOTO of Ⅻ cats’ “quotes” — ﬁ ß İ Σ",
               "<|startoftext|>x<|ENDOFTEXT|> don't we'll", "<extra_id_0> </s> <pad> t5  ",
               "日本語のテキスト 😀🏳️‍🌈 e\u0301 \u200b\ufeff", "word " * 120]
    for i, p in enumerate(prompts):
        for first in (0, 2, 1, 3):
            write(root, enc, f"p{i}_{first}", bytes([first]) + p.encode())

    png = "png_fuzz"
    write(root, png, "2x2", bytes([1, 1, 8]) + bytes(range(12)))
    write(root, png, "16x9_level0", bytes([15, 8, 2]) + bytes(range(0, 256, 7)))
    write(root, png, "bad_size", bytes([250, 3, 8, 1, 2, 3]))
    write(root, png, "bad_level", bytes([3, 3, 13, 9]))


if __name__ == "__main__":
    main(sys.argv[1])
