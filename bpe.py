"""
bpe.py -- the byte-level BPE tokenizer a pretrained model brings (pretrained.py); our own models use bytes.

Not in the paper's recipe (Gunter et al. 2024, arXiv 2407.21075; AFM has its own 49K BPE). A regex cuts the
text into pieces whose bytes, as printable characters, merge pairwise, lowest rank first; specials stay whole.

    python bpe.py --ckpt out/smollm2/ckpt.pt "Hello, world"        # the ids and pieces of a text
"""
import argparse
import functools
import re
import unicodedata


def gpt2_byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level BPE writes for each byte 0..255 (index = byte)."""
    keep, extra = {*range(33, 127), *range(161, 173), *range(174, 256)}, iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@functools.cache
def pretokenizer_regex(pre: str) -> re.Pattern:
    """llama.cpp's pre-tokenizer `pre` ('gpt2', or 'smollm': every digit apart first) as one stdlib regex."""
    if pre not in ("gpt2", "smollm"):
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (only 'gpt2' and 'smollm')")
    cat = "".join(unicodedata.category(chr(cp))[0] for cp in range(0x110000))    # re lacks \p{L}, \p{N}
    L, N = ("".join(f"{chr(m.start())}-{chr(m.end() - 1)}" for m in re.finditer(k + "+", cat)) for k in "LN")
    S = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space (is \s)
    words = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+"
    return re.compile({"gpt2": rf"{words}| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+",
                       "smollm": rf"[{N}]|{words}| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}{N}])|[{S}]+"}[pre])


class BPETokenizer:
    """Byte-level BPE: tokens (id -> byte characters), merges ("a b" by rank), token_types (3, 4: special)."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list | None = None, pre="gpt2"):
        self.tokens, self.merges, self.pre = list(tokens), list(merges), pre
        self.token_types = [1] * len(self.tokens) if token_types is None else list(token_types)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(self.merges)}
        self.byte_chars, self.pre_re = gpt2_byte_chars(), pretokenizer_regex(pre)
        self.cache = {t: [i] for i, (t, k) in enumerate(zip(self.tokens, self.token_types)) if k in (3, 4)}
        special = sorted(self.cache, key=len, reverse=True)   # cache: pre-token -> ids, first the specials
        byte_of = {c: b for b, c in enumerate(self.byte_chars)}
        self.token_bytes = [t.encode() if t in self.cache or not set(t) <= byte_of.keys()
                            else bytes(byte_of[c] for c in t) for t in self.tokens]
        self.special_re = re.compile(f"({'|'.join(map(re.escape, special)) or '(?!)'})")  # (?!): no match

    def to_dict(self) -> dict:
        """Plain lists and strings (BPETokenizer's arguments), for torch.load(weights_only=True)."""
        return dict(tokens=self.tokens, merges=self.merges, token_types=self.token_types, pre=self.pre)

    def encode(self, text: str) -> list[int]:
        """str -> token ids; bytes that are not UTF-8, kept as surrogate escapes, round-trip too."""
        parts = self.special_re.split(text)                              # special tokens at odd places
        pieces = [p for n, part in enumerate(parts) for p in ([part] if n % 2 else self.pre_re.findall(part))]
        for piece in set(pieces) - self.cache.keys():    # merge its bytes: lowest rank (then leftmost) first
            syms = [self.byte_chars[b] for b in piece.encode("utf-8", "surrogateescape")]
            while known := [(self.ranks[p], i) for i, p in enumerate(zip(syms, syms[1:])) if p in self.ranks]:
                _, i = min(known)                                        # (rank, position) of the next merge
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            self.cache[piece] = [self.ids[s] for s in syms if s in self.ids]   # unknown bytes: dropped
        return [i for p in pieces for i in self.cache[p]]

    def decode(self, ids) -> str:
        """Token ids -> str (bytes that are not UTF-8 become U+FFFD)."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


def main(argv=None):
    """Print the token ids and pieces of a text under a checkpoint's tokenizer."""
    ap = argparse.ArgumentParser(description="Tokenize a text with the BPE tokenizer a checkpoint carries.")
    ap.add_argument("--ckpt", default="out/smollm2/ckpt.pt", help="from pretrained.py (default: %(default)s)")
    ap.add_argument("text", help="the text to tokenize")
    a = ap.parse_args(argv)
    import torch
    try:
        tok = BPETokenizer(**torch.load(a.ckpt, "cpu", weights_only=True, mmap=True)["tokenizer"])
    except (OSError, RuntimeError, KeyError, TypeError):
        raise SystemExit(f"error: {a.ckpt}: not a checkpoint with a BPE tokenizer (pretrained.py writes one)")
    print(ids := tok.encode(a.text), [tok.decode([i]) for i in ids], sep="\n")


if __name__ == "__main__":
    main()
