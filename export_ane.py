"""
export_ane.py -- Core ML export for the Apple Neural Engine: our own lookup tables, a stateful KV cache and a
pair of functions per LoRA adapter, in one multifunction .mlpackage (coremltools 9, mlprogram, iOS18, fp16).

Follows section 5 ("Optimization") of Gunter et al. 2024 (arXiv 2407.21075): the on-device model runs on the
Neural Engine with palettized weights (palettize.py: a 4- or 2-bit LUT per 16 output channels), an 8-bit
embedding, and adapters swapped at run time on one frozen base (lora.py). The layout follows Apple's
"Deploying Transformers on the Apple Neural Engine" (2022); each principle is named where it is applied.

Functions (states k_cache, v_cache: (n_layers, n_kv_heads * head_dim, 1, context) fp16):
  prefill(tokens (1, P) int32, zero-padded; length (1,) int32) -> logits (1, 1, V) of the last true token;
  decode(token (1, 1) int32; pos (1,) int32) -> logits (1, 1, V); a generation runs prefill(prompt, n), then
      decode(next, n), decode(next, n + 1), ...;  prefill_<name>, decode_<name>: the same with adapter <name>.
Every palettized weight is one constexpr_lut_to_dense with palettize.py's LUT and indices, bit for bit.
verify_ane.py then checks the package without a Mac and counts its bytes into export.json.

Run:  python export_ane.py                      # out/palettized.pt + out/adapter_*.pt -> out/afm.mlpackage
      python export_ane.py --ckpt out/ckpt.pt   # a float checkpoint: a plain fp16 export (with a notice)
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import math
import os
import re
import shutil
import string
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lora import AdapterError, adapters, load_adapter, remove_adapters
from model import CheckpointError, ModelConfig, Transformer, load_model, rope_tables, save_json
from palettize import PROJECTIONS, load_palettized
from verify_ane import mil_name, package_report, quiet, read_package

with quiet():   # verify_ane has imported coremltools already, with its notices silenced
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types as mil_types
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

MASK_VALUE = -1e4   # additive attention mask: exp(-1e4) is 0 in fp16, and -1e4 + a score cannot overflow fp16


# ----------------------------------------------------------------------------------------------------------
# model.Transformer in the Neural Engine layout: the same parameter names and shapes (it loads that model's
# state dict unchanged), the computation laid out differently.

def ane_rms_norm(x, weight, eps: float, dim: int):
    """RMSNorm of x over `dim`, computed so that it cannot overflow in fp16 (same value as model.RMSNorm)."""
    # ANE principle (fp16 range): the Neural Engine computes in fp16 (max 65504), where mean(x^2) overflows
    # once |x| > ~256. Dividing by m >= max|x| first keeps every square <= 1, and is exact:
    # x / sqrt(mean(x^2) + eps) = (x/m) / sqrt(mean((x/m)^2) + eps/m^2); m >= sqrt(eps) keeps eps/m^2 <= 1.
    s = math.sqrt(eps)
    m = x.abs().amax(dim=dim, keepdim=True).clamp(min=s)
    xs, r = x / m, s / m
    return xs * torch.rsqrt((xs * xs).mean(dim=dim, keepdim=True) + r * r) * weight


class AneNorm(nn.Module):
    """RMSNorm gain over the channel axis of a channels-first (B, C, 1, S) tensor."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ane_rms_norm(x, self.weight.view(1, -1, 1, 1), self.eps, dim=1)


class Conv1x1(nn.Module):
    """A bias-free nn.Linear (weight (out, in), as nn.Linear stores it) applied as a 1x1 convolution."""
    # ANE principle (linear layers as 1x1 convolutions): on a (B, C, 1, S) tensor a Linear is a 1x1 conv,
    # the Neural Engine's native operation, with no reshape or transpose around it.

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x):                                             # (B, in, 1, S) -> (B, out, 1, S)
        return F.conv2d(x, self.weight[:, :, None, None])


def rope_rotated(x, cos, sin):
    """x (1, heads, head_dim, S) with each head's channel halves rotated (RoPE); cos, sin: (head_dim/2, S)."""
    x1, x2 = x.chunk(2, dim=2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=2)


class AneAttention(nn.Module):
    """model.Attention on (1, dim, 1, S) activations, the new keys/values handed to a cache callback."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps, hd = cfg.norm_eps, cfg.head_dim
        self.q_proj, self.k_proj = Conv1x1(cfg.dim, cfg.n_heads * hd), Conv1x1(cfg.dim, cfg.n_kv_heads * hd)
        self.v_proj, self.o_proj = Conv1x1(cfg.dim, cfg.n_kv_heads * hd), Conv1x1(cfg.n_heads * hd, cfg.dim)
        # query/key norm (AFM; none with qk_norm=False, as in Llama): only the gains are used, in _heads
        self.q_norm = AneNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = AneNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def _heads(self, x, n: int, cos, sin, gain):
        """(1, n*hd, 1, S) -> per head: RMSNorm with `gain` (hd,) unless None, then RoPE -> (1, n*hd, S)."""
        S = x.shape[-1]
        x = x.view(1, n, self.head_dim, S)
        if gain is not None:
            x = ane_rms_norm(x, gain.view(1, 1, -1, 1), self.eps, dim=2)
        return rope_rotated(x, cos, sin).reshape(1, n * self.head_dim, S)

    def forward(self, x, cos, sin, mask, cache):
        """x (1, dim, 1, S); cos, sin (hd/2, S); additive mask (S_k, S); cache(k, v) stores, returns k, v."""
        hd, H, KV = self.head_dim, self.n_heads, self.n_kv_heads
        # ANE principle (fp16 range): scale the queries before the dot product, not the scores after it:
        # folded into the query norm's gain (RoPE is linear), a constant at conversion; without a norm, the
        # rotated queries are scaled (a scale right after q_proj would be fused into its weight, the LUT).
        if self.q_norm is not None:
            q = self._heads(self.q_proj(x), H, cos, sin, self.q_norm.weight * hd ** -0.5)   # (1, H*hd, S)
            k = self._heads(self.k_proj(x), KV, cos, sin, self.k_norm.weight)               # (1, KV*hd, S)
        else:
            q = self._heads(self.q_proj(x), H, cos, sin, None) * hd ** -0.5
            k = self._heads(self.k_proj(x), KV, cos, sin, None)
        k, v = cache(k.unsqueeze(2), self.v_proj(x))                  # (1, KV*hd, 1, S_k) each
        # ANE principle (split attention per head): a small matmul + softmax per head on contiguous channel
        # slices, not one batched matmul behind reshapes/transposes that the Neural Engine handles poorly.
        qs = q.split(hd, dim=1)                                                 # H x (1, hd, S)
        ks, vs = k.squeeze(2).split(hd, dim=1), v.squeeze(2).split(hd, dim=1)   # KV x (1, hd, S_k)
        out = []
        for h in range(H):                                   # grouped-query attention: H/KV heads per K/V
            w = (torch.matmul(ks[h * KV // H].transpose(1, 2), qs[h]) + mask).softmax(dim=1)   # (1, S_k, S)
            out.append(torch.matmul(vs[h * KV // H], w))                                    # (1, hd, S)
        return self.o_proj(torch.cat(out, dim=1).unsqueeze(2))


class AneFeedForward(nn.Module):
    """model.FeedForward (SwiGLU) with 1x1 convolutions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj, self.up_proj = Conv1x1(cfg.dim, cfg.ffn_dim), Conv1x1(cfg.dim, cfg.ffn_dim)
        self.down_proj = Conv1x1(cfg.ffn_dim, cfg.dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AneBlock(nn.Module):
    """model.Block: pre-norm attention and feed-forward, each added to the residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = AneNorm(cfg.dim, cfg.norm_eps), AneAttention(cfg)
        self.ffn_norm, self.ffn = AneNorm(cfg.dim, cfg.norm_eps), AneFeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class AneTransformer(nn.Module):
    """model.Transformer for the Neural Engine, batch 1, the KV cache in two buffers (the Core ML states)."""
    # ANE principle (channels-first data format): every activation is (B, C, 1, S), channels on the second
    # axis and the sequence on the last, the 4-D layout of the Neural Engine's buffers.

    def __init__(self, config: ModelConfig, context: int | None = None):
        super().__init__()
        self.config = cfg = config
        self.context = context = context or cfg.max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(AneBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = AneNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, context, cfg.rope_base)            # (context, head_dim / 2)
        self.register_buffer("rope_cos", cos.t().contiguous(), persistent=False)
        self.register_buffer("rope_sin", sin.t().contiguous(), persistent=False)
        kv = (cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, 1, context)
        self.register_buffer("k_cache", torch.zeros(kv), persistent=False)
        self.register_buffer("v_cache", torch.zeros(kv), persistent=False)
        self.mode = "prefill"

    def logits(self, x):
        """Hidden states (1, dim, 1, S) -> logits (1, S, V) through the tied head."""
        x = self.norm(x).squeeze(2).transpose(1, 2)                    # (1, S, dim)
        return F.linear(x, self.tok_emb.weight)    # the embedding as stored (V, dim): one constant, two uses

    def hidden(self, tokens, cos, sin, mask, pos=None):
        """Hidden states (1, dim, 1, S) of tokens (1, S); keys/values are cached at [0, S), or at `pos`."""
        x = self.tok_emb(tokens).transpose(1, 2).unsqueeze(2)
        S = tokens.shape[1]
        for i, layer in enumerate(self.layers):
            def cache(k, v, i=i):
                if pos is None:   # prefill: attend to this chunk's own keys; store them at [0, S)
                    self.k_cache[i:i + 1, :, :, :S], self.v_cache[i:i + 1, :, :, :S] = k, v
                    return k, v
                self.k_cache[i:i + 1, :, :, pos:pos + 1], self.v_cache[i:i + 1, :, :, pos:pos + 1] = k, v
                return self.k_cache[i:i + 1], self.v_cache[i:i + 1]
            x = layer(x, cos, sin, mask, cache)
        return x

    def prefill_hidden(self, tokens, length):
        """Hidden states (1, dim, 1, P) of tokens (1, P) whose first `length` (1,) are true, then padding."""
        P = tokens.shape[1]
        t = torch.arange(P, dtype=torch.int32)
        # key j is visible to query i when j <= i and j < length: (S_k, S_q)
        mask = torch.logical_or(t[:, None] > t[None, :], t[:, None] >= length).float() * MASK_VALUE
        return self.hidden(tokens, self.rope_cos[:, :P], self.rope_sin[:, :P], mask)

    def prefill(self, tokens, length):
        """Logits (1, 1, V) of the last true token of tokens (1, P); caches positions [0, P)."""
        return self.logits(torch.index_select(self.prefill_hidden(tokens, length), 3, length - 1))

    def decode(self, token, pos):
        """Logits (1, 1, V) of token (1, 1) at position pos (1,), attending to the cache; caches it at pos."""
        cos, sin = torch.index_select(self.rope_cos, 1, pos), torch.index_select(self.rope_sin, 1, pos)
        blocked = torch.arange(self.context, dtype=torch.int32)[:, None] > pos
        return self.logits(self.hidden(token, cos, sin, blocked.float() * MASK_VALUE, pos=pos))

    def forward(self, tokens, length_or_pos):
        """prefill(tokens, length) or decode(token, pos), as `mode` says: torch.jit.trace sees one of them."""
        return (self.prefill if self.mode == "prefill" else self.decode)(tokens, length_or_pos)

    def reset_cache(self):
        """Zero both caches."""
        self.k_cache.zero_()
        self.v_cache.zero_()


# ----------------------------------------------------------------------------------------------------------
# What gets exported: the base model, its projections' LUTs, the embedding, the adapters

class ExportError(Exception):
    """Bad input or a failed step of the export; the message is one line."""


def load_base(path: str) -> tuple[Transformer, str]:
    """(model, "palettized" | "fp16"): a float checkpoint is exported in fp16, with a notice."""
    if not os.path.isfile(path):
        alt = os.path.join(os.path.dirname(path), "ckpt.pt")
        hint = f" (run `python palettize.py` first, or pass --ckpt {alt} for an fp16 export)"
        raise ExportError(f"{path}: no such file{hint if path.endswith('palettized.pt') else ''}")
    try:
        kind = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("kind")
    except Exception:
        kind = None   # load_palettized below names the problem
    if kind != "model":
        return load_palettized(path)[0].eval(), "palettized"
    print(f"notice: {path} is a float checkpoint, not a palettized one: exporting plain fp16 weights (about "
          f"4x larger). Run `python palettize.py` and export its palettized.pt for the LUT package.")
    return load_model(path)[0].eval(), "fp16"


def projection_weights(model: Transformer) -> dict:
    """{projection: {"dense": fp16 (out, in), "lut": fp16 (out/16, K) | None, "indices", "bits", ...}}."""
    found = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS or name.endswith(".base"):
            continue
        m = getattr(m, "base", m)                                       # a LoRALinear wraps the base
        if hasattr(m, "lut") and hasattr(m, "indices"):
            lut, idx, gs = m.lut.detach().cpu(), m.indices.detach().cpu(), int(m.group_size)
            dense = lut[(torch.arange(idx.shape[0]) // gs)[:, None], idx.long()]   # exact: LUT values only
            found[name] = {"dense": dense.half(), "lut": lut.half(), "indices": idx.to(torch.uint8),
                           "bits": int(m.bits), "group_size": gs}
        else:
            found[name] = {"dense": m.weight.detach().cpu().half(), "lut": None, "indices": None, "bits": 16,
                           "group_size": None}
    return found


def embedding_weights(model: Transformer) -> dict:
    """The shared embedding: its fp16 dense value, and its int8 data and fp16 per-row scales if quantized."""
    e = model.tok_emb
    if hasattr(e, "weight_int8") and hasattr(e, "weight_scale"):
        q, s = e.weight_int8.detach().cpu(), e.weight_scale.detach().cpu().half()
        return {"dense": (q.float() * s.float()).half(), "int8": q.to(torch.int8), "scale": s.reshape(-1, 1)}
    return {"dense": e.weight.detach().cpu().half(), "int8": None, "scale": None}


def ane_model(model: Transformer, context: int) -> AneTransformer:
    """The Neural-Engine-layout twin of `model`, float or palettized (dense weights come from `.weight`)."""
    ane, state = AneTransformer(model.config, context), {}
    for key in ane.state_dict():
        mod, _, attr = key.rpartition(".")
        sub = model.get_submodule(mod)
        state[key] = getattr(getattr(sub, "base", sub), attr).detach().float().cpu()
    ane.load_state_dict(state)
    return ane.eval()


def read_adapter(path: str, base: Transformer) -> dict:
    """{"name", "path", "scale", "tensors": {projection: (A (r, in), B (out, r))}} of an adapter of `base`."""
    try:
        sd = load_adapter(path, base)["adapter"]
    except (AdapterError, CheckpointError) as e:
        raise ExportError(f"{e}" + (" -- train it on this base with lora.py, or leave it out with --adapters"
                                    if "different base" in str(e) else "")) from None
    try:
        mods = adapters(base)
        tensors = {n: (sd[f"{n}.lora_A"].half(), sd[f"{n}.lora_B"].half()) for n in mods}
        scale = {m.scale for m in mods.values()}.pop()
    finally:
        remove_adapters(base)
    # functions are named after the file (adapter_pydoc_zero.pt -> prefill_pydoc_zero): unique per folder
    name = re.sub(r"\W", "_", os.path.basename(path).removesuffix(".pt").removeprefix("adapter_"))
    return {"name": name, "path": path, "scale": float(scale), "tensors": tensors}


# ----------------------------------------------------------------------------------------------------------
# PyTorch -> MIL: trace one function, put our weights in, add the adapters, compact, save

def mil_program(ane: AneTransformer, mode: str, prefill_len: int):
    """The MIL program of `ane` in `mode` ("prefill" | "decode"), traced and converted; caches as states."""
    S, idx = (prefill_len, prefill_len) if mode == "prefill" else (1, 0)
    names = ("tokens", "length") if mode == "prefill" else ("token", "pos")
    inputs = [ct.TensorType(name=names[0], shape=(1, S), dtype=np.int32),
              ct.TensorType(name=names[1], shape=(1,), dtype=np.int32)]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(ane.k_cache.shape), dtype=np.float16),
                           name=name) for name in ("k_cache", "v_cache")]
    example = (torch.zeros(1, S, dtype=torch.int32), torch.tensor([idx], dtype=torch.int32))
    ane.mode = mode
    ane.reset_cache()
    with torch.no_grad(), quiet():
        prog = ct.convert(torch.jit.trace(ane, example, check_trace=False), inputs=inputs, states=states,
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)], convert_to="milinternal",
                          minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)
    ane.reset_cache()                                                 # the trace wrote into the caches
    return prog


def as_graph_pass(fn):
    """`fn` run the way coremltools runs its own passes, so that the ops it adds get scope information."""
    def run(prog, *args):
        with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=[fn.__name__])):
            return fn(prog, *args)
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@as_graph_pass
def put_weights(prog, weights: dict, emb: dict) -> None:
    """Replace the traced weight constants (found by value) with ours, named after the PyTorch modules."""
    # a palettized projection -> one constexpr_lut_to_dense with palettize.py's LUT and indices, nothing
    # re-clustered; the embedding -> one int8 constexpr_blockwise_shift_scale feeding both the token lookup
    # (gather) and the tied head (linear); any other weight -> its fp16 constant, renamed
    key = lambda a: (a.shape, hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest())  # noqa: E731
    func = prog.functions["main"]
    wanted = {key(w["dense"].numpy()[:, :, None, None]): name for name, w in weights.items()}
    wanted[key(emb["dense"].numpy())] = "tok_emb"
    done = set()
    for op in list(func.operations):
        v = op.outputs[0]
        if op.op_type != "const" or v.dtype != mil_types.fp16 or not isinstance(v.val, np.ndarray) \
                or key(v.val) not in wanted:
            continue
        name = wanted[key(v.val)]
        w = weights.get(name, {"lut": None})
        with func:
            if name == "tok_emb" and emb["int8"] is not None:
                new = mb.constexpr_blockwise_shift_scale(data=emb["int8"].numpy(), scale=emb["scale"].numpy(),
                                                         name="tok_emb_weight", before_op=op)
            elif w["lut"] is None:
                new = mb.const(val=v.val, name=mil_name(f"{name}.weight"), before_op=op)
            else:
                lut = w["lut"].numpy()
                uint = mil_types.nptype_from_builtin(mil_types.string_to_builtin(f"uint{w['bits']}"))
                # rank 6: Core ML's per-grouped-channel LUT of a conv weight (out, in, 1, 1) is one table per
                # 16 output channels along axis 0, size 1 on the other weight axes, K entries, vector size 1
                new = mb.constexpr_lut_to_dense(indices=w["indices"].numpy()[:, :, None, None].astype(uint),
                                                lut=lut.reshape(lut.shape[0], 1, 1, 1, lut.shape[1], 1),
                                                name=mil_name(f"{name}.weight"), before_op=op)
        func.replace_uses_of_var_after_op(anchor_op=op, old_var=v, new_var=new)
        func.remove_ops([op])
        done.add(name)
    missing = [n for n in [*weights, "tok_emb"] if n not in done]
    if missing:
        raise ExportError(f"the converted program has no constant equal to the weight of {missing[0]} "
                          f"({len(missing)} missing)")


@as_graph_pass
def add_lora(prog, adapter: dict) -> None:
    """Add the adapter's branches to its projections, unmerged: conv(x, W) + conv(s * conv(x, A), B)."""
    # W stays the very same (palettized) constant as in the base functions, so the package stores it once and
    # the adapter costs about its own fp16 bytes; merging (W + s B A) would make a second full W.
    func = prog.functions["main"]
    ops = list(func.operations)
    following = {id(op): ops[i + 1] for i, op in enumerate(ops[:-1])}
    convs = {op.weight.op.name: op for op in ops if op.op_type == "conv"}
    tag, scale = adapter["name"], adapter["scale"]
    for proj, (A, B) in adapter["tensors"].items():
        conv, p = convs.get(mil_name(f"{proj}.weight")), mil_name(f"{tag}.{proj}")
        if conv is None:
            raise ExportError(f"adapter {tag}: no projection {proj} in the program")
        Bs = B.float() * scale
        fold = torch.equal(Bs.half().float(), Bs)      # the scale folded into B where exact: one op less
        with func:
            at = following[id(conv)]
            a = mb.const(val=A.numpy()[:, :, None, None], name=f"{p}_lora_A", before_op=at)
            b = mb.const(val=(Bs.half() if fold else B).numpy()[:, :, None, None], name=f"{p}_lora_B",
                         before_op=at)
            h = mb.conv(x=conv.x, weight=a, name=f"{p}_down", before_op=at)     # (1, r, 1, S)
            if not fold:
                h = mb.mul(x=h, y=np.float16(scale), name=f"{p}_scale", before_op=at)
            d = mb.conv(x=h, weight=b, name=f"{p}_up", before_op=at)            # (1, out, 1, S)
            y = mb.add(x=conv.outputs[0], y=d, name=f"{p}_sum", before_op=at)
        func.replace_uses_of_var_after_op(anchor_op=y.op, old_var=conv.outputs[0], new_var=y)


@as_graph_pass
def compact(prog) -> None:
    """Shrink the program's text, its computation unchanged: one const per small value, short names."""
    # For a small model the op list, which every adapter function repeats, is much of the package; the
    # converter emits a const for every parameter of every op (strides, axes, ...), mostly the same few.
    func = prog.functions["main"]

    def ours(op):                                                     # named by put_weights or add_lora
        return op.op_type.startswith("constexpr_") or op.name.endswith(("_weight", "_lora_A", "_lora_B"))
    first = {}
    for op in list(func.operations):
        v = op.outputs[0]
        if op.op_type != "const" or ours(op) or v.val is None or np.size(v.val) > 256 or v in func.outputs \
                or any(c.op_type.startswith("constexpr_") for c in v.child_ops):
            continue
        key = (v.dtype, np.shape(v.val), np.asarray(v.val).tobytes())
        if key in first:
            func.replace_uses_of_var_after_op(anchor_op=None, old_var=v, new_var=first[key])
            func.remove_ops([op])
        else:
            first[key] = v
    # a, b, ..., z, aa, ab, ...; inputs, outputs, states, our weights and the MIL text format's words are kept
    keep = set(func.inputs) | {v.name for v in func.outputs} | {"any", "bool", "program", "func", "tensor"}
    keep |= {"list", "dict", "tuple", "true", "false", "string", "state"}
    letters = (map("".join, itertools.product(string.ascii_lowercase, repeat=k)) for k in itertools.count(1))
    names = (n for n in itertools.chain.from_iterable(letters) if n not in keep)
    for op in func.operations:
        if ours(op):
            continue
        for v in op.outputs:
            if v.name not in keep:
                v.name = next(names)
        op.name = op.outputs[0].name


def save_program(prog, path: str) -> None:
    """MIL program -> a one-function .mlpackage (no further passes: the program is final)."""
    with quiet():
        ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                   pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True).save(path)


def save_package(paths: dict, path: str) -> None:
    """{function name: one-function .mlpackage} -> one .mlpackage at `path`; shared constants stored once."""
    desc = ct.utils.MultiFunctionDescriptor()
    for fname, p in paths.items():
        desc.add_function(p, src_function_name="main", target_function_name=fname)
    desc.default_function_name = next(iter(paths))
    with quiet():
        ct.utils.save_multifunction(desc, path)


def replace_path(src: str, dst: str) -> None:
    """Move `src` to `dst`: `dst` is always the old complete package or the new one, never half of one."""
    if not os.path.lexists(dst):
        return os.rename(src, dst)
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(dst)), prefix=".old-")
    aside = os.path.join(old, "previous")
    os.rename(dst, aside)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The export and its command line

def export(a) -> dict:
    """Write OUT_DIR/afm.mlpackage and OUT_DIR/export.json as the parsed arguments say; returns the report."""
    t0, stage_s = time.time(), {}
    ckpt = a.ckpt or os.path.join(a.out_dir, "palettized.pt")
    model, compression = load_base(ckpt)
    cfg = model.config
    context = a.context or cfg.max_seq_len
    prefill_len = a.prefill_len or min(64, context // 2)
    if not 1 <= prefill_len <= context:
        raise ExportError(f"--prefill-len {prefill_len} must be between 1 and --context {context}")
    if context > cfg.max_seq_len:
        raise ExportError(f"--context {context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    paths = sorted(glob.glob(os.path.join(a.out_dir, "adapter_*.pt"))) if a.adapters is None else a.adapters
    adapter_list = [read_adapter(p, model) for p in paths]
    names = [ad["name"] for ad in adapter_list]
    if len(set(names)) != len(names):
        raise ExportError(f"two adapters are both named {max(names, key=names.count)!r}")
    weights, emb, ane = projection_weights(model), embedding_weights(model), ane_model(model, context)
    stage_s["load"] = time.time() - t0
    print(f"base: {ckpt} ({cfg.name}, {compression}, {sum(w['lut'] is not None for w in weights.values())}/"
          f"{len(weights)} projections palettized, {len(adapter_list)} adapter(s)); prefill {prefill_len} "
          f"tokens, context {context}")
    os.makedirs(a.out_dir, exist_ok=True)
    dst = os.path.join(a.out_dir, "afm.mlpackage")
    work = tempfile.mkdtemp(dir=a.out_dir, prefix=".tmp-export-")
    paths = {}                                          # function name -> its one-function package
    try:
        with tqdm(total=3 + 2 * len(adapter_list), desc="export", unit="step") as bar:
            for mode in ("prefill", "decode"):
                bar.set_description(f"trace+convert {mode}")
                prog = mil_program(ane, mode, prefill_len)
                put_weights(prog, weights, emb)
                compact(prog)
                save_program(prog, paths.setdefault(mode, os.path.join(work, f"{mode}.mlpackage")))
                bar.update(1)
            stage_s["convert"], t = time.time() - t0 - stage_s["load"], time.time()
            for ad, mode in itertools.product(adapter_list, ("prefill", "decode")):
                bar.set_description(f"adapter {ad['name']}")
                prog = read_package(paths[mode])        # a fresh copy of the base function
                add_lora(prog, ad)
                compact(prog)
                fname = f"{mode}_{ad['name']}"
                save_program(prog, paths.setdefault(fname, os.path.join(work, f"{fname}.mlpackage")))
                bar.update(1)
            stage_s["adapters"], t = time.time() - t, time.time()
            bar.set_description("save package")
            save_package(paths, os.path.join(work, "afm.mlpackage"))
            replace_path(os.path.join(work, "afm.mlpackage"), dst)     # kept from here on, even if unverified
            stage_s["save"] = time.time() - t
            bar.update(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"ckpt": ckpt, "config": cfg.name, "compression": compression, "prefill_len": prefill_len,
              "context": context, "functions": list(paths),
              "states": {n: list(ane.k_cache.shape) for n in ("k_cache", "v_cache")},
              "bits": {str(b): sum(w["bits"] == b for w in weights.values())
                       for b in sorted({w["bits"] for w in weights.values()})},
              **package_report(dst, model, weights, emb, adapter_list, prefill_len, context,
                               verify=not a.no_verify, stage_s=stage_s)}
    stage_s["total"] = time.time() - t0
    report.update(seconds=round(stage_s["total"], 2),
                  stage_seconds={k: round(s, 2) for k, s in stage_s.items()})
    save_json(os.path.join(a.out_dir, "export.json"), report)
    return report


def export_parser() -> argparse.ArgumentParser:
    """The command line's parser; every flag says its default."""
    ap = argparse.ArgumentParser(description="Export the palettized model and its adapters to one Core ML "
                                             "package for the Neural Engine, and verify it.")
    ap.add_argument("--out-dir", default="out",
                    help="where afm.mlpackage and export.json go and default inputs come from (default: out)")
    ap.add_argument("--ckpt", help="palettized checkpoint (palettize.py); a float one (train.py) gives an "
                                   "fp16 export (default: OUT_DIR/palettized.pt)")
    ap.add_argument("--adapters", nargs="*", help="adapter files (lora.py); the flag alone exports none "
                                                  "(default: every OUT_DIR/adapter_*.pt)")
    ap.add_argument("--prefill-len", type=int,
                    help="fixed prompt length of `prefill` (default: 64, or half the context if less)")
    ap.add_argument("--context", type=int, help="KV-cache length (default: the model's max_seq_len)")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the bit-for-bit check and the numpy run, still count bytes (default: verify)")
    return ap


def cli(argv=None) -> dict:
    """The command line: export, print a summary, return the report; or exit with a one-line error."""
    a = export_parser().parse_args(argv)
    try:
        r = export(a)
    except (ExportError, CheckpointError, AdapterError) as e:
        raise SystemExit(f"error: {e}") from None
    pkg = os.path.join(a.out_dir, "afm.mlpackage")
    print(f"wrote {pkg}: {r['package_bytes']:,} bytes ({r['package_over_ideal']:.3f} x ideal "
          f"{r['ideal_bytes']:,}; floor {r['floor_over_ideal']:.3f} x: weight file + weight declarations); "
          f"functions {', '.join(r['functions'])}")
    for name, ad in r["adapters"].items():
        print(f"  adapter {name}: adds {ad['added_bytes']:,} bytes = {ad['added_over_fp16']:.3f} x its fp16 "
              f"{ad['fp16_bytes']:,} (floor {ad['floor_over_fp16']:.3f} x)")
    if "verify_error" in r:
        raise SystemExit(f"error: {r['verify_error']} -- the package is kept, unverified: {pkg}")
    if r["verified"]:
        print(f"verified: LUTs exact {r['lut_exact']} ({r['lut_layers']} layers); numpy vs PyTorch "
              f"max |logit diff| {r['max_abs_logit_diff']:.4f} (tolerance {r['logit_tolerance']:.4f}), "
              f"argmax agreement {r['argmax_agreement']:.1%} over {r['argmax_judged']} of "
              f"{r['compared_logits']} positions (top-2 margin > {r['argmax_margin_threshold']:.4f}); "
              f"predict(): {r['predict']}")
    print(f"{'' if r['verified'] else 'not verified (--no-verify); '}{r['seconds']:.1f} s; "
          f"report in {os.path.join(a.out_dir, 'export.json')}")
    return r


if __name__ == "__main__":
    cli()
