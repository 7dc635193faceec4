"""Generates pipeline/tokenizer_unicode_data.inc, the Unicode tables of kiln's C++ tokenizers.

The tables are taken from the reference implementation itself (HF `tokenizers`, which backs
transformers' CLIPTokenizer and T5Tokenizer), by probing it over every code point, so the C++ side
follows the reference's Unicode versions rather than whatever version some other library has:

  letter / number / space   Oniguruma's \\p{L}, \\p{N}, \\s (CLIP's split regex and \\s+ rule)
  lowercase                 the Lowercase normalizer (Rust char::to_lowercase, full mappings)
  canonical decomposition,  the NFC normalizer (unicode-normalization tables); decomposition
  combining classes,        structure from unicodedata, every value checked against (or, for
  composition               the combining classes, measured from) the reference
  grapheme classes          which code points join the grapheme before / after them, measured
                            on the Precompiled (SentencePiece charsmap) normalizer; Control
                            from the `regex` module, checked on every charsmap key

Before writing, the generator replays the C++ algorithms (NFC, lowercase, the Precompiled
normalizer's grapheme rule) in Python on the emitted tables and checks them against the reference
on every code point and on random sequences; it refuses to write tables that disagree.

Run from the repository root with the project virtualenv (a developer tool, not a build step):
  PYTHONPATH=pipeline/python .venv/bin/python -m kiln.unicode_tables [OUT]
"""
from __future__ import annotations

import os
import random
import sys
import unicodedata

import regex
import tokenizers
from tokenizers import Regex, normalizers, pre_tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_OUT = os.path.join(REPO, "pipeline", "tokenizer_unicode_data.inc")

CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
NBSP = "\u00a0"


def _per_char(fn, cps: list[int]) -> list[str]:
    """fn applied to each code point separately (one call, NUL-separated; NUL itself apart)."""
    rest = [c for c in cps if c]
    out = iter(fn("\x00".join(chr(c) for c in rest)).split("\x00"))
    result = [fn("\x00") if c == 0 else next(out) for c in cps]
    assert next(out, None) is None
    return result


def _map(fn, strs: list[str]) -> list[str]:
    """fn applied to each string separately (one call, NUL-separated, for speed)."""
    plain = [t for t in strs if "\x00" not in t]
    out = iter(fn("\x00".join(plain)).split("\x00"))
    result = [fn(t) if "\x00" in t else next(out) for t in strs]
    assert next(out, None) is None
    return result


def _matching(pattern: str) -> set[int]:
    """Code points that the reference's regex engine matches with `pattern` (one char each)."""
    text = "".join(map(chr, CODE_POINTS))
    unmatched = set()
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    for _, (a, b) in split.pre_tokenize_str(text):
        unmatched.update(range(a, b))
    return {CODE_POINTS[i] for i in range(len(CODE_POINTS)) if i not in unmatched}


def _ranges(cps: set[int]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [tuple(r) for r in out]


# --------------------------------------------------------------------------------------------
# Lowercase


def lowercase_tables() -> tuple[list[tuple[int, int, int, int]], dict[int, str]]:
    """(runs, specials): runs of (first, last, stride, delta) for one-to-one mappings,
    specials for the mappings to several code points."""
    lowered = _per_char(normalizers.Lowercase().normalize_str, CODE_POINTS)
    single, specials = {}, {}
    for c, low in zip(CODE_POINTS, lowered):
        if low == chr(c):
            continue
        if len(low) == 1:
            single[c] = ord(low) - c
        else:
            specials[c] = low
    runs: list[list[int]] = []
    for c in sorted(single):
        d = single[c]
        if runs:
            first, last, stride, delta = runs[-1]
            if delta == d and (stride == 0 and c - last <= 2 or stride and c - last == stride):
                runs[-1][1], runs[-1][2] = c, c - last
                continue
        runs.append([c, c, 0, d])
    return [(a, b, s or 1, d) for a, b, s, d in runs], specials


def lower_char(c: int, runs, specials) -> str:
    if c in specials:
        return specials[c]
    for first, last, stride, delta in runs:  # the C++ side binary-searches
        if first <= c <= last and (c - first) % stride == 0:
            return chr(c + delta)
    return chr(c)


# --------------------------------------------------------------------------------------------
# NFC


def combining_classes(ref_nfd: dict[int, str]) -> dict[int, int]:
    """Canonical combining class of each non-decomposing code point, as the reference orders
    marks: measured by probing its NFD with one mark of each class, seeded from unicodedata."""
    nfd = normalizers.NFD().normalize_str
    py = {c: unicodedata.combining(chr(c)) for c in CODE_POINTS}
    # A probe for class k: a mark the reference itself orders as class k against U+0334 (class 1)
    # and U+0301 (class 230); marks newer than the reference's tables are class 0 there.
    def acts_as(c: int, k: int) -> bool:
        after_230 = nfd("a\u0301" + chr(c)) == "a" + chr(c) + "\u0301"
        before_1 = nfd("a" + chr(c) + "\u0334") == "a\u0334" + chr(c)
        return after_230 == (k < 230) and before_1 == (k > 1)

    probes: dict[int, int] = {}
    for c in CODE_POINTS:
        k = py[c]
        if k and k not in probes and ref_nfd[c] == chr(c) and acts_as(c, k):
            probes[k] = c
    marks = _matching(r"\p{M}") | {c for c in CODE_POINTS if py[c]}
    marks = sorted(c for c in marks if ref_nfd[c] == chr(c))
    ccc: dict[int, int] = {}
    values = sorted(probes)
    tests = []
    for m in marks:
        for k in values:
            p = probes[k]
            tests.append("a" + chr(p) + chr(m))
            tests.append("a" + chr(m) + chr(p))
    results = _map(nfd, tests)
    i = 0
    for m in marks:
        below, above = 0, 256  # ccc(m) is in (below, above)
        moved = False
        for k in values:
            p = probes[k]
            r1, r2 = results[i], results[i + 1]
            i += 2
            if p == m:
                continue
            if r1 == "a" + chr(m) + chr(p):  # p sorted after m: k > ccc(m) > 0
                above = min(above, k)
                moved = True
            if r2 == "a" + chr(p) + chr(m):  # m sorted after p: ccc(m) > k > 0
                below = max(below, k)
                moved = True
        if not moved:
            value = 0 if m not in probes.values() else py[m]
        elif below < py[m] < above:
            value = py[m]
        else:
            inside = [k for k in values if below < k < above]
            value = inside[0] if inside else below + 1
        if value:
            ccc[m] = value
    return ccc


def decomposition_tables(ref_nfd: dict[int, str], ref_nfc_of) -> tuple[dict, set]:
    """(one-level canonical decompositions {cp: (a, b or 0)} for non-Hangul code points,
    set of code points with a pair decomposition that do not recompose)."""
    decomp: dict[int, tuple[int, int]] = {}
    for c in CODE_POINTS:
        if HANGUL_FIRST <= c <= HANGUL_LAST or ref_nfd[c] == chr(c):
            continue
        d = unicodedata.decomposition(chr(c))
        assert d and not d.startswith("<"), f"U+{c:04X}: reference decomposes, unicodedata not"
        parts = [int(x, 16) for x in d.split()]
        assert 1 <= len(parts) <= 2
        decomp[c] = (parts[0], parts[1] if len(parts) == 2 else 0)
    pairs = [c for c, (a, b) in decomp.items() if b]
    recomposed = ref_nfc_of([ref_nfd[c] for c in pairs])
    excluded = {c for c, r in zip(pairs, recomposed) if r != chr(c)}
    return decomp, excluded


class Nfc:
    """Python replay of the C++ NFC (decompose, canonical order, compose) on the tables."""

    def __init__(self, decomp, excluded, ccc):
        self.decomp, self.ccc = decomp, ccc
        self.compose = {(a, b): c for c, (a, b) in decomp.items() if b and c not in excluded}

    def _decompose(self, c: int, out: list[int]) -> None:
        if HANGUL_FIRST <= c <= HANGUL_LAST:
            s = c - HANGUL_FIRST
            out.append(0x1100 + s // 588)
            out.append(0x1161 + (s % 588) // 28)
            if s % 28:
                out.append(0x11A7 + s % 28)
        elif c in self.decomp:
            a, b = self.decomp[c]
            self._decompose(a, out)
            if b:
                self._decompose(b, out)
        else:
            out.append(c)

    def _pair(self, a: int, b: int) -> int | None:
        if 0x1100 <= a < 0x1113 and 0x1161 <= b < 0x1176:
            return HANGUL_FIRST + ((a - 0x1100) * 21 + b - 0x1161) * 28
        if (HANGUL_FIRST <= a <= HANGUL_LAST and (a - HANGUL_FIRST) % 28 == 0
                and 0x11A7 < b < 0x11C3):
            return a + b - 0x11A7
        return self.compose.get((a, b))

    def nfd(self, text: str) -> str:
        d: list[int] = []
        for ch in text:
            self._decompose(ord(ch), d)
        return "".join(map(chr, self._order(d)))

    def _order(self, d: list[int]) -> list[int]:
        i = 0
        while i < len(d):  # stable sort of each run of non-starters
            if self.ccc.get(d[i], 0):
                j = i
                while j < len(d) and self.ccc.get(d[j], 0):
                    j += 1
                d[i:j] = sorted(d[i:j], key=lambda c: self.ccc[c])
                i = j
            else:
                i += 1
        return d

    def __call__(self, text: str) -> str:
        d: list[int] = []
        for ch in text:
            self._decompose(ord(ch), d)
        self._order(d)
        out: list[int] = []
        starter = -1
        last_ccc = -1  # ccc of the last char kept after the starter; -1: none yet
        for c in d:
            k = self.ccc.get(c, 0)
            if starter >= 0 and (last_ccc == -1 or 0 < last_ccc < k):
                p = self._pair(out[starter], c)
                if p is not None:
                    out[starter] = p
                    continue
            if k == 0:
                starter, last_ccc = len(out), -1
            else:
                last_ccc = k
            out.append(c)
        return "".join(map(chr, out))


# --------------------------------------------------------------------------------------------
# Grapheme classes (for the Precompiled normalizer's "whole grapheme if under 6 bytes" rule)


def grapheme_tables(charsmap: bytes) -> tuple[set[int], set[int], set[int]]:
    """(extend, prepend, control) grapheme classes as the reference's segmentation has them.

    Only what the Precompiled normalizer can observe matters: which code points join the grapheme
    before them (Grapheme_Cluster_Break Extend | ZWJ | SpacingMark), which join the one after
    (Prepend), and which start a grapheme that nothing joins (Control). The first two are measured
    on the reference with the nmt_nfkc charsmap, whose key "e\u0301" (-> U+00E9) is only applied
    to a whole grapheme under 6 bytes:
      extend:  "e\u0301" + c (or "\u03c9\u0301" + c for 2-byte c) is one grapheme of 6+ bytes,
               so the pair stays decomposed, iff c joins it;
      prepend: c + "e\u0301" leaves the pair decomposed iff c joins it.
    Control comes from the regex module (Unicode's data), checked on every charsmap key, the only
    code points whose class the normalizer can show: key + U+0301 is one grapheme (whose key
    replaces it whole, dropping the mark) iff the key is not Control.
    """
    pre = normalizers.Precompiled(charsmap)
    norm = pre.normalize_str
    assert norm("e\u0301") == "\u00e9" and norm("\u03c9\u0301") == "\u03ce"
    cps = [c for c in CODE_POINTS if c >= 0x80]
    alone = dict(zip(cps, _per_char(norm, cps)))
    base = lambda c: "\u03c9\u0301" if c < 0x800 else "e\u0301"
    joined_after = _map(norm, [base(c) + chr(c) for c in cps])
    extend = {c for c, r in zip(cps, joined_after) if r == base(c) + alone[c]}
    split = {c for c, r in zip(cps, joined_after) if r == norm(base(c)) + alone[c]}
    assert extend | split == set(cps), "extend test inconclusive"
    cps = [c for c in CODE_POINTS if c]
    alone[0x00] = "\x00"
    alone.update({c: norm(chr(c)) for c in range(1, 0x80)})
    joined_before = _map(norm, [chr(c) + "e\u0301" for c in cps])
    prepend = {c for c, r in zip(cps, joined_before) if r != alone[c] + "\u00e9"}

    control = {c for c in CODE_POINTS if regex.match(r"\p{Grapheme_Cluster_Break=Control}", chr(c))}
    probe = Precompiled(charsmap, extend, prepend, control)
    keys = [c for c in CODE_POINTS if c not in (0x0A, 0x0D) and c not in extend
            and probe._shortest(chr(c).encode()) is not None and len(chr(c).encode()) <= 3]
    with_mark = _map(norm, [chr(c) + "\u0301" for c in keys])
    for c, r in zip(keys, with_mark):
        assert (r == alone[c] + "\u0301") == (c in control) or alone[c] + "\u0301" == alone[c], \
            f"U+{c:04X}: Control class disagrees with the reference"
    return extend, prepend, control


class Precompiled:
    """Python replay of the C++ Precompiled normalizer: a grapheme under 6 bytes whose bytes start
    with a charsmap key is replaced whole by the shortest key's value; otherwise char by char."""

    def __init__(self, charsmap: bytes, extend, prepend, control):
        import struct
        size = struct.unpack("<I", charsmap[:4])[0]
        self.units = struct.unpack(f"<{size // 4}I", charsmap[4:4 + size])
        self.pool = charsmap[4 + size:]
        self.extend, self.prepend, self.control = extend, prepend, control

    def _shortest(self, key: bytes) -> bytes | None:
        u = self.units
        pos = 0
        pos ^= (u[0] >> 10) << ((u[0] & (1 << 9)) >> 6)
        for b in key:
            pos ^= b
            unit = u[pos]
            if unit & ((1 << 31) | 0xFF) != b:
                return None
            pos ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:
                value = u[pos] & ((1 << 31) - 1)
                return self.pool[value:self.pool.index(b"\x00", value)]
        return None

    def graphemes(self, text: str) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(text):
            j = i
            while j < len(text) and ord(text[j]) in self.prepend:
                j += 1
            if j < len(text) and ord(text[j]) in self.control or text[j:j + 1] in ("\r", "\n"):
                if j > i:  # prepends before a control end there
                    out.append(text[i:j])
                    i = j
                j = i + (2 if text[i:i + 2] == "\r\n" else 1)
                out.append(text[i:j])
                i = j
                continue
            j = min(j + 1, len(text))
            while j < len(text) and ord(text[j]) in self.extend:
                j += 1
            out.append(text[i:j])
            i = j
        return out

    def __call__(self, text: str) -> str:
        out = []
        for g in self.graphemes(text):
            b = g.encode()
            if len(b) < 6:
                n = self._shortest(b)
                if n is not None:
                    out.append(n.decode())
                    continue
            for ch in g:
                n = self._shortest(ch.encode())
                out.append(ch if n is None else n.decode())
        return "".join(out)


# --------------------------------------------------------------------------------------------


def _check(name: str, ours: list[str], ref: list[str], inputs: list[str]) -> None:
    bad = [(s, o, r) for s, o, r in zip(inputs, ours, ref) if o != r]
    if bad:
        for s, o, r in bad[:10]:
            print(f"{name}: {s!r}: ours {o!r}, reference {r!r}", file=sys.stderr)
        raise SystemExit(f"{name}: {len(bad)} of {len(inputs)} disagree with the reference")
    print(f"checked {name}: {len(inputs)} inputs agree", file=sys.stderr)


def _t5_charsmap() -> bytes:
    from sentencepiece import sentencepiece_model_pb2

    from kiln import tokenizer_files
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_files.train_t5_spiece(tokenizer_files.corpus_lines()))
    return proto.normalizer_spec.precompiled_charsmap


def _emit(name: str, ctype: str, values: list[int], per_line: int, comment: str) -> str:
    lines = [f"// {comment}", f"constexpr {ctype} {name}[] = {{"]
    for i in range(0, len(values), per_line):
        lines.append("    " + ",".join(str(v) for v in values[i:i + per_line]) + ",")
    lines.append("};")
    return "\n".join(lines) + "\n"


def generate() -> str:
    rng = random.Random(0)
    letters, numbers, spaces = _matching(r"\p{L}"), _matching(r"\p{N}"), _matching(r"\s")
    rust_ws = set(CODE_POINTS) - {CODE_POINTS[i] for _, (a, b) in pre_tokenizers.WhitespaceSplit()
                                  .pre_tokenize_str("".join(map(chr, CODE_POINTS)))
                                  for i in range(a, b)}
    assert spaces == rust_ws, "Oniguruma \\s and Rust White_Space differ; the C++ uses one table"

    runs, specials = lowercase_tables()
    ref_low = _per_char(normalizers.Lowercase().normalize_str, CODE_POINTS)
    _check("lowercase", [lower_char(c, runs, specials) for c in CODE_POINTS], ref_low,
           [chr(c) for c in CODE_POINTS])
    assert set(specials) == {0x130}, "the C++ side knows one multi-char lowercase mapping"

    nfd_all = _per_char(normalizers.NFD().normalize_str, CODE_POINTS)
    ref_nfd = dict(zip(CODE_POINTS, nfd_all))
    nfc_of = lambda strs: _map(normalizers.NFC().normalize_str, strs)
    decomp, excluded = decomposition_tables(ref_nfd, nfc_of)
    ccc = combining_classes(ref_nfd)
    nfc = Nfc(decomp, excluded, ccc)
    singles = [chr(c) for c in CODE_POINTS]
    _check("nfd (code points)", [nfc.nfd(s) for s in singles], nfd_all, singles)
    _check("nfc (code points)", [nfc(s) for s in singles], nfc_of(singles), singles)
    _check("nfd-then-nfc (decomposing code points)",
           [nfc(ref_nfd[c]) for c in sorted(decomp)], nfc_of([ref_nfd[c] for c in sorted(decomp)]),
           [ref_nfd[c] for c in sorted(decomp)])
    bases = [chr(c) for c in sorted(decomp)] + [chr(a) for a, _ in decomp.values()]
    bases += list("aeiouAZ")
    bases += [chr(c) for c in range(0x1100, 0x1113)] + [chr(c) for c in range(0xAC00, 0xAC40)]
    marks = [chr(c) for c in sorted(ccc)] + [chr(c) for c in range(0x1161, 0x1176)]
    marks += [chr(c) for c in range(0x11A8, 0x11C3)] + [chr(b) for _, b in decomp.values() if b]
    seqs = ["".join([rng.choice(bases)] + [rng.choice(marks) for _ in range(rng.randint(1, 4))])
            * rng.randint(1, 2) for _ in range(300000)]
    _check("nfc (random sequences)", [nfc(s) for s in seqs], nfc_of(seqs), seqs)

    charsmap = _t5_charsmap()
    extend, prepend, control = grapheme_tables(charsmap)
    pre = Precompiled(charsmap, extend, prepend, control)
    ref_pre = normalizers.Precompiled(charsmap).normalize_str
    _check("precompiled (code points)", [pre(s) for s in singles],
           _per_char(ref_pre, CODE_POINTS), singles)
    keyish = [chr(c) for c in CODE_POINTS if pre._shortest(chr(c).encode()) is not None]
    keyish += [chr(c) for c in sorted(decomp)][:3000] + list("aeiouxyz\r\n ") + [NBSP, "\u200b"]
    ext = [chr(c) for c in sorted(extend | prepend) if c <= 0xFFFF] + list("\r\n\x00 a")
    ext += [chr(c) for c in sorted(control)][:200]
    seqs = ["".join(rng.choice(keyish if rng.random() < 0.5 else ext)
                    for _ in range(rng.randint(1, 6))) for _ in range(300000)]
    _check("precompiled (random sequences)", [pre(s) for s in seqs],
           _map(ref_pre, seqs), seqs)

    flat = lambda rs: [v for r in rs for v in r]
    decomp_flat = [v for c in sorted(decomp) for v in (c, *decomp[c])]
    ccc_runs: list[list[int]] = []
    for c in sorted(ccc):
        if ccc_runs and ccc_runs[-1][1] == c - 1 and ccc_runs[-1][2] == ccc[c]:
            ccc_runs[-1][1] = c
        else:
            ccc_runs.append([c, c, ccc[c]])
    parts = [
        "// Generated by `python -m kiln.unicode_tables` (pipeline/python/kiln/unicode_tables.py)",
        f"// from tokenizers {tokenizers.__version__} and regex {regex.__version__}; do not edit.",
        "// Included once, by pipeline/tokenizer_unicode.cc. Ranges are inclusive [first, last].",
        "",
        _emit("kLetterRanges", "uint32_t", flat(_ranges(letters)), 16,
              "\\p{L} as the reference's Oniguruma matches it: first,last pairs"),
        _emit("kNumberRanges", "uint32_t", flat(_ranges(numbers)), 16,
              "\\p{N}: first,last pairs"),
        _emit("kSpaceRanges", "uint32_t", flat(_ranges(spaces)), 16,
              "\\s (Oniguruma) = White_Space (Rust char::is_whitespace): first,last pairs"),
        _emit("kLowercaseRuns", "int32_t", flat(runs), 16,
              "Lowercase: first,last,stride,delta runs (U+0130 -> i + U+0307 is coded apart)"),
        _emit("kCombiningClassRuns", "uint32_t", flat(ccc_runs), 15,
              "Canonical combining class: first,last,class runs (absent: 0)"),
        _emit("kDecompositions", "uint32_t", decomp_flat, 15,
              "One-level canonical decompositions, Hangul syllables excepted: cp,first,second "
              "(second 0: a singleton); sorted by cp"),
        _emit("kCompositionExclusions", "uint32_t", sorted(excluded), 16,
              "Code points with a two-char decomposition that NFC does not recompose; sorted"),
        _emit("kGraphemeExtendRanges", "uint32_t", flat(_ranges(extend)), 16,
              "Grapheme_Cluster_Break Extend | ZWJ | SpacingMark: first,last pairs"),
        _emit("kGraphemePrependRanges", "uint32_t", flat(_ranges(prepend)), 16,
              "Grapheme_Cluster_Break Prepend: first,last pairs"),
        _emit("kGraphemeControlRanges", "uint32_t", flat(_ranges(control)), 16,
              "Grapheme_Cluster_Break Control (CR and LF are coded apart): first,last pairs"),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else DEFAULT_OUT
    text = generate()
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {out} ({len(text)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
