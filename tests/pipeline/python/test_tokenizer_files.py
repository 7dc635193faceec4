"""kiln.tokenizer_files: byte-identical output on every run, the files transformers loads the way
FluxPipeline does, and the conventions (ids, configs) the C++ tokenizers and make_tiny rely on.

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
       tests/pipeline/python/test_tokenizer_files.py
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest

from kiln import tokenizer_files as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _digests(directory: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _write_in_fresh_process(out: str) -> list[int]:
    code = ("import sys, kiln.tokenizer_files as t; "
            "print(t.write_clip_tokenizer(sys.argv[1]), t.write_t5_tokenizer(sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "pipeline", "python"))
    done = subprocess.run([sys.executable, "-c", code, os.path.join(out, "clip"),
                           os.path.join(out, "t5")], env=env, check=True, capture_output=True,
                          text=True)
    return [int(v) for v in done.stdout.split()]


def test_writers_are_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    sizes_a = _write_in_fresh_process(a)
    sizes_b = _write_in_fresh_process(b)
    sizes_c = [tf.write_clip_tokenizer(os.path.join(c, "clip")),
               tf.write_t5_tokenizer(os.path.join(c, "t5"))]
    assert sizes_a == sizes_b == sizes_c
    for sub in ("clip", "t5"):
        da = _digests(os.path.join(a, sub))
        assert da == _digests(os.path.join(b, sub)) == _digests(os.path.join(c, sub)), sub
    assert set(_digests(os.path.join(a, "t5"))) == {"spiece.model", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    assert set(_digests(os.path.join(a, "clip"))) == {"vocab.json", "merges.txt",
                                                      "tokenizer_config.json",
                                                      "special_tokens_map.json"}


def test_corpus_is_small_and_varied():
    size = os.path.getsize(tf.CORPUS_PATH)
    lines = tf.corpus_lines()
    assert size < 100_000 and len(lines) >= 300
    text = "".join(lines)
    assert any(ch.isdigit() for ch in text) and any(ord(ch) > 127 for ch in text)


def test_t5_tokenizer_files(tmp_path):
    import sentencepiece as spm

    out = str(tmp_path / "t5")
    size = tf.write_t5_tokenizer(out)
    assert size == 1152 and size % 128 == 0 and size >= tf.T5_PIECES + tf.T5_EXTRA_IDS

    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spiece.model"))
    assert sp.get_piece_size() == tf.T5_PIECES
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)

    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "T5Tokenizer"
    assert (config["model_max_length"], config["extra_ids"], config["legacy"]) == (512, 100, True)
    assert config["added_tokens_decoder"]["1099"]["content"] == "<extra_id_0>"

    warnings.filterwarnings("ignore")
    from transformers import T5TokenizerFast  # what FluxPipeline loads tokenizer_2 with
    tok = T5TokenizerFast.from_pretrained(out)
    assert len(tok) == tf.T5_PIECES + tf.T5_EXTRA_IDS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [1099, 1000]
    ids = tok("A red fox in the snow.", padding="max_length", max_length=16,
              truncation=True)["input_ids"]
    assert len(ids) == 16 and 1 in ids and ids[-1] == 0 and 2 not in ids


def test_clip_tokenizer_files(tmp_path):
    out = str(tmp_path / "clip")
    size = tf.write_clip_tokenizer(out)
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == size == 256 * 2 + tf.CLIP_MERGES + 2
    assert sorted(vocab.values()) == list(range(size))
    assert vocab["<|startoftext|>"] == size - 2 and vocab["<|endoftext|>"] == size - 1
    symbols = list(tf.bytes_to_unicode().values())
    assert [vocab[s] for s in symbols] == list(range(256))
    assert [vocab[s + "</w>"] for s in symbols] == list(range(256, 512))

    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + tf.CLIP_MERGES
    for line in lines[1:]:
        a, b = line.split(" ")
        assert a in vocab and b in vocab and a + b in vocab

    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert config["pad_token"] == config["unk_token"] == config["eos_token"] == "<|endoftext|>"

    warnings.filterwarnings("ignore")
    from transformers import CLIPTokenizer  # what FluxPipeline loads tokenizer with
    tok = CLIPTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (size - 2, size - 1, size - 1)
    ids = tok("A Red FOX, in the snow!", padding="max_length", max_length=77,
              truncation=True)["input_ids"]
    assert len(ids) == 77 and ids[0] == size - 2 and ids[-1] == size - 1
    assert tok.decode(ids, skip_special_tokens=True) == "a red fox , in the snow !"


@pytest.mark.parametrize("line,pieces", [
    ("It's a RED fox!!", ["it", "'s", "a", "red", "fox", "!!"]),
    ("x9y 12", ["x", "9", "y", "1", "2"]),
    ("a.'s b", ["a", ".'", "s", "b"]),
])
def test_clip_training_pretokenizer(line, pieces):
    assert tf._clip_pretokenize(line) == pieces
