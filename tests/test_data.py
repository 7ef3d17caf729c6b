"""data.py: corpora, the split (bytes and BPE tokens), an empty corpus, bits per byte."""
import math

import pytest
import torch

import bpe
import data
from model import ModelConfig, Transformer
from test_bpe import MERGES, random_strings, small_tokenizer


def test_bytes_stay_the_default():
    t = data.encode("héllo")
    assert t.dtype == torch.uint8 and t.tolist() == list("héllo".encode())
    assert data.decode(t) == "héllo"


def test_load_splits_tokenizes_each_byte_part(tmp_path):
    text = "a" + "é" * (21 * data.BLOCK // 2)       # block boundaries cut "é" in two
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    byte_parts = data.load_splits(str(tmp_path / "c.txt"))
    tok = small_tokenizer()
    parts = data.load_splits(str(tmp_path / "c.txt"), tokenizer=tok)
    for b, t in zip(byte_parts, parts):
        assert t.dtype == torch.long and b"".join(tok.token_bytes[i] for i in t.tolist()) == bytes(b.tolist())
    with pytest.raises(data.DataError, match="tokens"):
        data.load_splits(str(tmp_path / "c.txt"), min_len=10 ** 6, tokenizer=tok)


def test_empty_corpus_is_one_line_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="empty") as e:
        data.load_splits(str(tmp_path / "empty.txt"))
    assert "\n" not in str(e.value) and str(tmp_path / "empty.txt") in str(e.value)
    assert data.encode("").tolist() == [] and data.encode("").dtype == torch.uint8


def test_evaluate_thins_windows_evenly():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(*x.shape, 256)
    r = data.evaluate(Spy(), torch.arange(10 * 16 + 1).to(torch.uint8), 16, batch_size=3, max_windows=4)
    assert torch.cat(seen)[:, 0].tolist() == [0, 48, 96, 144]           # windows 0, 3, 6, 9 of 10
    assert math.isclose(r["loss"], math.log(256), rel_tol=1e-6) and math.isclose(r["bpb"], 8, rel_tol=1e-6)


def test_bpb_counts_bytes_of_target_tokens():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(name="t", vocab_size=256 + 3 + len(MERGES), dim=32, n_layers=1, n_heads=2,
                                n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=32, qk_norm=False))
    text = "".join(random_strings(60, seed=1)).replace("<|endoftext|>", "")
    byte_tok = bpe.BPETokenizer(bpe.gpt2_byte_chars(), [])       # one token per byte: id = byte value
    assert data.encode(text, byte_tok).tolist() == data.encode(text).tolist()
    as_bytes = data.evaluate(m, data.encode(text), 16, max_windows=8)
    as_tokens = data.evaluate(m, data.encode(text, byte_tok), 16, max_windows=8, tokenizer=byte_tok)
    assert as_tokens["loss"] == as_bytes["loss"]
    assert math.isclose(as_tokens["bpb"], as_bytes["bpb"], rel_tol=1e-12)
    tok = small_tokenizer()
    ids = data.encode(text + " abab" * 50, tok)
    r = data.evaluate(m, ids, 16, max_windows=None, tokenizer=tok)
    targets = ids[1:1 + (len(ids) - 1) // 16 * 16].tolist()       # every window's targets, end to end
    n_bytes = sum(len(tok.token_bytes[i]) for i in targets)
    assert n_bytes > len(targets)
    assert math.isclose(r["bpb"], r["loss"] * len(targets) / math.log(2) / n_bytes, rel_tol=1e-9)
