"""Reference tokenizations for tests/pipeline/tokenizer_test.cc.

Loads the tokenizer folders with transformers exactly as diffusers' FluxPipeline does
(tokenizer: CLIPTokenizer, tokenizer_2: T5TokenizerFast, which transformers 5 resolves to its
tokenizers-backed T5Tokenizer) and encodes as FluxPipeline does:
    tok(prompt, padding="max_length", max_length=L, truncation=True,
        return_overflowing_tokens=False, return_length=False)
It also reports how many content tokens each prompt has untruncated, so the test can check the
truncation counts.

  ref_tokenize.py tokenize CLIP_DIR T5_DIR IN.json OUT.json
      IN: {"strings": [...], "clip_max_length": 77, "t5_max_lengths": [512, 32]}
  ref_tokenize.py fuzz CLIP_DIR T5_DIR SEED COUNT OUT.json
      random strings (edge-case alphabet) plus their tokenizations, same OUT layout
  ref_tokenize.py unicode OUT.json
      the reference's Unicode behaviour the C++ tables reproduce: \\p{L} / \\p{N} / \\s ranges,
      lowercase changes, NFC of many sequences

OUT (tokenize, fuzz): {"strings": [...], "clip": [{"ids": [...], "content": n}, ...],
                       "t5": {"512": [{"ids": [...], "content": n}, ...], ...}}
"""
from __future__ import annotations

import json
import random
import sys
import warnings


def _load(clip_dir: str, t5_dir: str):
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import CLIPTokenizer, T5TokenizerFast
    return CLIPTokenizer.from_pretrained(clip_dir), T5TokenizerFast.from_pretrained(t5_dir)


def _encode(tok, text: str, max_length: int) -> dict:
    ids = tok(text, padding="max_length", max_length=max_length, truncation=True,
              return_overflowing_tokens=False, return_length=False)["input_ids"]
    content = len(tok(text, add_special_tokens=False)["input_ids"])
    return {"ids": ids, "content": content}


def tokenize(clip_dir: str, t5_dir: str, strings: list[str], clip_max_length: int = 77,
             t5_max_lengths: tuple[int, ...] = (512,)) -> dict:
    clip, t5 = _load(clip_dir, t5_dir)
    return {
        "strings": strings,
        "clip": [_encode(clip, s, clip_max_length) for s in strings],
        "t5": {str(n): [_encode(t5, s, n) for s in strings] for n in t5_max_lengths},
    }


# Pieces the fuzzer strings are made of: the edge cases of both pipelines, mixed.
_PIECES = (
    list("abcxyzABCXYZ0123456789 .,;:!?'\"-()[]<>|/_*#&%$@") + [" ", "  ", "\t", "\n", "\r\n"]
    + ["the ", "fox", "'s", "'T", "don't", "<|endoftext|>", "<|ENDOFTEXT|>", "<|startoftext|>",
       "<|endof", "text|>", "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_7>", "</s",
       "＜/s＞", "\u2581", "\u2581\u2581"]
    + list("éèêëàâäçñøåßüöœæıİΣσςΑΩωЖжЁё") + ["e\u0301", "a\u0308", "\u0301", "\u0323",
                                               "\u0308\u0301", "o\u0302\u0323", "\u1100\u1161",
                                               "\u11a8", "한국어", "가"]
    + list("日本語中文テスト") + ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "©️", "\u200d", "\ufe0f"]
    + list("ＡＢＣ１２３ﬁﬂ½²①℃™…—“”€") + ["\u00a0", "\u200b", "\u3000", "\u2028", "\x85",
                                         "\x00", "\x01", "\x1c", "\x7f", "\ufeff", "\u0600",
                                         "\u0600a", "\U0001d400", "\U00010400", "\U0001f3fb",
                                         "\u0e33", "\u0915\u094d\u0937", "\u0627\u0644"]
)


def fuzz_strings(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(0, 24)
        out.append("".join(rng.choice(_PIECES) for _ in range(n)))
    return out


def unicode_reference() -> dict:
    """What tokenizer_unicode.cc must reproduce, measured on the reference."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    text = "".join(map(chr, cps))

    def ranges(pattern: str) -> list[list[int]]:
        unmatched = set()
        split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
        for _, (a, b) in split.pre_tokenize_str(text):
            unmatched.update(range(a, b))
        out: list[list[int]] = []
        for i, c in enumerate(cps):
            if i in unmatched:
                continue
            if out and out[-1][1] == c - 1:
                out[-1][1] = c
            else:
                out.append([c, c])
        return out

    lower_fn = normalizers.Lowercase().normalize_str
    rest = [c for c in cps if c]
    lowered = lower_fn("\x00".join(chr(c) for c in rest)).split("\x00")
    lower = [[c, low] for c, low in zip(rest, lowered) if low != chr(c)]

    import unicodedata
    rng = random.Random(1)
    marks = [chr(c) for c in range(0x300, 0x370)] + ["\u0323", "\u0345", "\u05b0", "\u093c",
                                                      "\u0f71", "\u0f72", "\u302a", "\u3099",
                                                      "\U0001d165", "\U0001d16d", "\u1dfa",
                                                      "\U00016ff0"]
    marks += [chr(c) for c in range(0x1161, 0x1176)] + [chr(c) for c in range(0x11a8, 0x11c3)]
    bases = [chr(c) for c in cps if unicodedata.decomposition(chr(c))
             and not unicodedata.decomposition(chr(c)).startswith("<")]
    bases += list("aeiouAEIOUnNcCsSwWyY") + [chr(c) for c in range(0x1100, 0x1113)]
    nfc_in = [chr(c) for c in cps if unicodedata.decomposition(chr(c)) and c]
    nfc_in += ["".join([rng.choice(bases)] + [rng.choice(marks) for _ in range(rng.randint(0, 4))])
               * rng.randint(1, 2) for _ in range(20000)]
    nfc_out = normalizers.NFC().normalize_str("\x00".join(nfc_in)).split("\x00")
    return {"letters": ranges(r"\p{L}"), "numbers": ranges(r"\p{N}"), "spaces": ranges(r"\s"),
            "lower": lower, "nfc": [[a, b] for a, b in zip(nfc_in, nfc_out)]}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "tokenize":
        clip_dir, t5_dir, in_path, out_path = argv[1:5]
        with open(in_path, encoding="utf-8") as f:
            spec = json.load(f)
        result = tokenize(clip_dir, t5_dir, spec["strings"], spec.get("clip_max_length", 77),
                          tuple(spec.get("t5_max_lengths", [512])))
    elif mode == "fuzz":
        clip_dir, t5_dir, seed, count, out_path = argv[1:6]
        result = tokenize(clip_dir, t5_dir, fuzz_strings(int(seed), int(count)), 77, (512,))
    elif mode == "unicode":
        out_path = argv[1]
        result = unicode_reference()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
