"""Project-made tokenizer files for flux-tiny, trained on the corpus the project ships.

Called by kiln.make_tiny (tokenizer/ and tokenizer_2/ of the tiny repository) and by the tokenizer
tests. Both writers are deterministic: the same corpus gives byte-identical files on every run and
machine (tests/pipeline/python/test_tokenizer_files.py checks it).

  write_t5_tokenizer(out_dir)    SentencePiece unigram model with T5's conventions
                                 (spiece.model + tokenizer_config.json + special_tokens_map.json)
  write_clip_tokenizer(out_dir)  byte-level BPE with CLIP's conventions, trained by the small BPE
                                 trainer below (vocab.json + merges.txt + the two JSON configs)

The JSON configs follow the shape of FLUX.1-dev's tokenizer/ and tokenizer_2/ configs, so the same
loaders (transformers, and the C++ tokenizers in pipeline/) read ours and the published ones.
"""
from __future__ import annotations

import collections
import heapq
import io
import json
import os
import unicodedata
from typing import Iterable

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "corpus.txt")

# T5: SentencePiece pieces (pad 0, eos 1, unk 2, then the trained pieces), then 100 sentinels
# <extra_id_99> .. <extra_id_0>; the embedding is padded to a multiple of 128 as T5's 32128 is.
T5_PIECES = 1000
T5_EXTRA_IDS = 100
T5_EMBEDDING_MULTIPLE = 128
T5_MODEL_MAX_LENGTH = 512

# CLIP: 256 byte symbols + 256 end-of-word variants + merges + <|startoftext|> + <|endoftext|>.
CLIP_MERGES = 1000
CLIP_MODEL_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_END_OF_WORD = "</w>"


def corpus_lines() -> list[str]:
    """The shipped corpus, one sentence per line (empty lines dropped)."""
    with open(CORPUS_PATH, encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


# --------------------------------------------------------------------------------------------
# T5 (SentencePiece unigram)


def train_t5_spiece(lines: Iterable[str], vocab_size: int = T5_PIECES) -> bytes:
    """Serialized SentencePiece ModelProto: unigram, nmt_nfkc normalization, T5's special ids.

    Deterministic: one trainer thread, fixed seed, sentences fed from memory so that no input path
    ends up in the stored trainer spec.
    """
    import sentencepiece as spm  # pinned in requirements.txt

    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,  # every corpus character is a piece; the rest is <unk>
        normalization_rule_name="nmt_nfkc",
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>",
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_t5_tokenizer(out_dir: str) -> int:
    """Writes tokenizer_2/ files to out_dir; returns the T5 embedding size they need.

    Files: spiece.model, tokenizer_config.json (T5Tokenizer, model_max_length 512, extra_ids 100,
    legacy true as FLUX.1-dev's), special_tokens_map.json. Ids: pieces 0..T5_PIECES-1, then
    <extra_id_99> = T5_PIECES .. <extra_id_0> = T5_PIECES + 99 (T5's reversed sentinel order).
    The returned size is pieces + sentinels rounded up to a multiple of 128 (T5's 32128).
    """
    os.makedirs(out_dir, exist_ok=True)
    model = train_t5_spiece(corpus_lines())
    with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
        f.write(model)

    pieces = T5_PIECES
    sentinels = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    added = {"0": _added_token("<pad>", False), "1": _added_token("</s>", False),
             "2": _added_token("<unk>", False)}
    for i in reversed(range(T5_EXTRA_IDS)):
        added[str(pieces + T5_EXTRA_IDS - 1 - i)] = _added_token(sentinels[i], False)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": True,
        "added_tokens_decoder": added,
        "additional_special_tokens": sentinels,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": T5_MODEL_MAX_LENGTH,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    })
    plain = lambda s: {k: v for k, v in _added_token(s, False).items() if k != "special"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "additional_special_tokens": sentinels,
        "eos_token": plain("</s>"),
        "pad_token": plain("<pad>"),
        "unk_token": plain("<unk>"),
    })
    used = pieces + T5_EXTRA_IDS
    return -(-used // T5_EMBEDDING_MULTIPLE) * T5_EMBEDDING_MULTIPLE


# --------------------------------------------------------------------------------------------
# CLIP (byte-level BPE)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character map, in CLIP's vocab order."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pretokenize(line: str) -> list[str]:
    """Training-side approximation of CLIP's pre-tokenizer: NFC, lower case, then the pieces of
    <'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+>, whitespace dropped."""
    text = " ".join(unicodedata.normalize("NFC", line).lower().split())
    kind = lambda ch: ("s" if ch.isspace() else unicodedata.category(ch)[0]
                       if unicodedata.category(ch)[0] in "LN" else "o")
    words, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            for c in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"):
                if text.startswith(c, i):
                    break
            else:
                c = None
            if c is not None:
                words.append(c)
                i += len(c)
                continue
        k = kind(ch)
        if k == "s":
            i += 1
            continue
        if k == "N":
            words.append(ch)
            i += 1
            continue
        j = i + 1
        while j < len(text) and kind(text[j]) == k:
            j += 1
        words.append(text[i:j])
        i = j
    return words


def train_clip_bpe(lines: Iterable[str], num_merges: int = CLIP_MERGES) -> list[tuple[str, str]]:
    """Byte-level BPE merges with CLIP's end-of-word suffix.

    Each round merges the most frequent adjacent pair (ties: the smallest pair in string order),
    left to right and without overlaps, as CLIP's encoder applies a merge; stops early when no
    pair occurs twice.
    """
    byte_map = bytes_to_unicode()
    counts = collections.Counter(w for line in lines for w in _clip_pretokenize(line))
    words: list[list[str]] = []
    freqs: list[int] = []
    for w in sorted(counts):
        syms = [byte_map[b] for b in w.encode("utf-8")]
        syms[-1] += CLIP_END_OF_WORD
        words.append(syms)
        freqs.append(counts[w])

    pair_counts: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for idx, syms in enumerate(words):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += freqs[idx]
            where[pair].add(idx)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < 2:
            break
        merges.append(pair)
        a, b = pair
        touched: dict[tuple[str, str], int] = {}
        for idx in sorted(where.pop(pair, ())):
            syms, f = words[idx], freqs[idx]
            for p in zip(syms, syms[1:]):
                pair_counts[p] -= f
                touched[p] = pair_counts[p]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[idx] = out
            for p in zip(out, out[1:]):
                pair_counts[p] += f
                touched[p] = pair_counts[p]
                where[p].add(idx)
        for p, c in touched.items():
            if c <= 0:
                pair_counts.pop(p, None)
            else:
                heapq.heappush(heap, (-c, p))
    return merges


def write_clip_tokenizer(out_dir: str) -> int:
    """Writes tokenizer/ files to out_dir; returns the vocabulary size (CLIP embedding rows).

    Files: vocab.json, merges.txt (#version: 0.2 header), tokenizer_config.json (CLIPTokenizer,
    model_max_length 77, pad/unk = <|endoftext|> as FLUX.1-dev's), special_tokens_map.json.
    Ids: 256 byte symbols, their 256 </w> variants, one id per new merged symbol, then
    <|startoftext|> and <|endoftext|> (the highest id, as in CLIP's 49407).
    """
    os.makedirs(out_dir, exist_ok=True)
    merges = train_clip_bpe(corpus_lines())
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in symbols + [s + CLIP_END_OF_WORD for s in symbols] + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)

    _write_json(os.path.join(out_dir, "vocab.json"), vocab)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[CLIP_BOS]): _added_token(CLIP_BOS, True),
                                 str(vocab[CLIP_EOS]): _added_token(CLIP_EOS, True)},
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": CLIP_MODEL_MAX_LENGTH,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    })
    plain = lambda s: {k: v for k, v in _added_token(s, True).items() if k != "special"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": plain(CLIP_BOS),
        "eos_token": plain(CLIP_EOS),
        "pad_token": CLIP_EOS,
        "unk_token": plain(CLIP_EOS),
    })
    return len(vocab)
