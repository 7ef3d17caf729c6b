"""
export_ane.py -- Core ML export for the Apple Neural Engine, carrying our own lookup tables, with a stateful
KV cache and one pair of functions per adapter, verified on Linux without a Mac.

Follows section 5 ("Optimization") of Gunter et al. 2024 (arXiv 2407.21075): the on-device model runs on the
Neural Engine with palettized weights (a 4- or 2-bit lookup table per 16 output channels, from palettize.py), an
8-bit embedding, and LoRA adapters that are swapped at run time on top of the one frozen base (lora.py). The
layout follows Apple's "Deploying Transformers on the Apple Neural Engine" (2022); each principle is named in a
comment where it is applied.

What it writes (one multifunction .mlpackage, coremltools 9, mlprogram, iOS18, fp16):
  * `prefill(tokens (1, P) int32 padded, length (1,) int32, 1 <= length <= P)` -> logits (1, 1, V) of the last
    true token; writes keys/values of positions [0, P) into the states `k_cache`, `v_cache`, each
    (n_layers, n_kv_heads*head_dim, 1, context); padding after `length` is masked and later overwritten.
  * `decode(token (1, 1) int32, pos (1,) int32, length <= pos < context)` -> logits (1, 1, V) of that token;
    writes position `pos`. A generation loop: prefill(prompt, n), then decode(next, n), decode(next, n+1), ...
  * `prefill_<name>` / `decode_<name>` per adapter: the same program plus the unmerged LoRA branches, so the base
    constants are stored once in the package; an adapter's weights add about their own fp16 bytes, and its two
    functions' op lists come on top (export.json breaks the bytes down and gives the floor).
  Every palettized projection weight is one `constexpr_lut_to_dense` holding exactly palettize.py's LUT and
  indices (no re-clustering by coremltools); the embedding is one int8 `constexpr_blockwise_shift_scale` shared
  by the token lookup and the tied output head.

Verification (skip with --no-verify): the saved package is read back, every LUT and index tensor is compared bit
for bit with the checkpoint's, and the program is run in numpy op by op (prefill + decode steps) against the
PyTorch model; on macOS Core ML's predict() runs too.

Run:  python export_ane.py                      # out/palettized.pt + out/adapter_*.pt -> out/afm.mlpackage
      python export_ane.py --ckpt out/ckpt.pt   # a float checkpoint: plain fp16 export (with a notice)
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import logging
import math
import os
import platform
import re
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm import tqdm

from data import DataError, encode, load_text
from lora import AdapterError, adapters, load_adapter, remove_adapters
from model import CheckpointError, ModelConfig, Transformer, load_model, rope_tables, save_json
from palettize import PROJECTIONS, load_palettized

# coremltools announces at import (and on every conversion) that torch 2.13 is untested, that scikit-learn is
# too new and that its macOS runtime library is missing: all harmless here, so keep them off the terminal.
with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load as _load_mil_proto
    from coremltools.converters.mil.mil import types as mil_types
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource
logging.getLogger("coremltools").setLevel(logging.ERROR)

MASK_VALUE = -1e4   # additive attention mask: exp(-1e4) is 0 in fp16, and -1e4 + a score cannot overflow fp16


# ----------------------------------------------------------------------------------------------------------
# The Neural-Engine-layout model (PyTorch). Same parameter names and shapes as model.Transformer, so it loads
# that model's state dict unchanged; only the computation is laid out differently.

def ane_rms_norm(x, weight, eps: float, dim: int):
    """RMSNorm over `dim` that cannot overflow in fp16.

    ANE principle (fp16 range): the Neural Engine computes in fp16 (largest value 65504), where the plain
    mean(x^2) overflows as soon as |x| exceeds ~256. Dividing by m >= max|x| first keeps every square <= 1.
    It is exact: x / sqrt(mean(x^2) + eps) = (x/m) / sqrt(mean((x/m)^2) + eps/m^2) for any m > 0, and
    m >= sqrt(eps) keeps eps/m^2 <= 1 (no overflow either when x is all zeros)."""
    s = math.sqrt(eps)
    m = x.abs().amax(dim=dim, keepdim=True).clamp(min=s)
    xs = x / m
    r = s / m
    return xs * torch.rsqrt((xs * xs).mean(dim=dim, keepdim=True) + r * r) * weight


class AneNorm(nn.Module):
    """RMSNorm gain over the channel axis of a channels-first (B, C, 1, S) tensor."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                            # (B, C, 1, S)
        return ane_rms_norm(x, self.weight.view(1, -1, 1, 1), self.eps, dim=1)


class Conv1x1(nn.Module):
    """A bias-free nn.Linear, stored as the Linear stores it (out, in), applied as a 1x1 convolution.

    ANE principle (linear layers as 1x1 convolutions): on a channels-first (B, C, 1, S) tensor a Linear is a
    1x1 conv, the Neural Engine's native, fastest operation; no reshapes or transposes around it.
    An adapter, when attached, stays unmerged: y = W x + scale * B (A x), so the base weight W is the same
    constant in every function of the package and is stored once."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))   # (out, in) like nn.Linear
        self.lora_A = self.lora_B = None                                     # (r, in), (out, r) when attached
        self.lora_scale = 1.0

    def forward(self, x):                                            # (B, in, 1, S) -> (B, out, 1, S)
        y = F.conv2d(x, self.weight[:, :, None, None])
        if self.lora_A is not None:
            h = F.conv2d(x, self.lora_A[:, :, None, None]) * self.lora_scale   # (B, r, 1, S)
            y = y + F.conv2d(h, self.lora_B[:, :, None, None])
        return y


def rope(x, cos, sin):
    """Rotate the halves of each head's channels. x: (1, heads, head_dim, S); cos, sin: (head_dim // 2, S)."""
    x1, x2 = x.chunk(2, dim=2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=2)


class AneAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.q_proj = Conv1x1(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = Conv1x1(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = Conv1x1(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = Conv1x1(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.q_norm = AneNorm(cfg.head_dim, cfg.norm_eps)     # only its gain is used, per head in _heads
        self.k_norm = AneNorm(cfg.head_dim, cfg.norm_eps)

    def _heads(self, x, gain, n, cos, sin):
        """(1, n*hd, 1, S) -> per-head RMSNorm (gain (hd,)) and RoPE -> (1, n*hd, S)."""
        S = x.shape[-1]
        x = x.view(1, n, self.head_dim, S)
        x = ane_rms_norm(x, gain.view(1, 1, -1, 1), self.eps, dim=2)
        return rope(x, cos, sin).reshape(1, n * self.head_dim, S)

    def forward(self, x, cos, sin, mask, cache):
        """x: (1, dim, 1, S); cos, sin: (head_dim // 2, S); mask: (S_k, S) additive; cache(k, v) writes this
        step's keys/values (1, n_kv*hd, 1, S) into the KV cache and returns the keys/values to attend to."""
        S, hd = x.shape[-1], self.head_dim
        # ANE principle (fp16 range): scale the queries before the dot product, not the scores after it -- here
        # folded into the query norm's gain (RoPE is linear), a constant at conversion, so no extra op.
        q = self._heads(self.q_proj(x), self.q_norm.weight * hd ** -0.5, self.n_heads, cos, sin)  # (1, H*hd, S)
        k = self._heads(self.k_proj(x), self.k_norm.weight, self.n_kv_heads, cos, sin)           # (1, KV*hd, S)
        k, v = cache(k.unsqueeze(2), self.v_proj(x))                             # (1, KV*hd, 1, S_k) each
        # ANE principle (split attention per head): one small matmul + softmax per head on contiguous channel
        # slices, instead of one batched matmul behind reshapes/transposes the Neural Engine handles poorly.
        qs = q.split(hd, dim=1)                                       # H x (1, hd, S)
        ks = k.squeeze(2).split(hd, dim=1)                            # KV x (1, hd, S_k)
        vs = v.squeeze(2).split(hd, dim=1)                            # KV x (1, hd, S_k)
        group = self.n_heads // self.n_kv_heads                       # grouped-query attention
        out = []
        for h in range(self.n_heads):
            kh, vh = ks[h // group], vs[h // group]
            w = torch.matmul(kh.transpose(1, 2), qs[h]) + mask       # (1, S_k, S): keys along channels
            w = w.softmax(dim=1)
            out.append(torch.matmul(vh, w))                           # (1, hd, S)
        y = torch.cat(out, dim=1).unsqueeze(2)                        # (1, H*hd, 1, S)
        return self.o_proj(y)


class AneFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Conv1x1(cfg.dim, cfg.ffn_dim)
        self.up_proj = Conv1x1(cfg.dim, cfg.ffn_dim)
        self.down_proj = Conv1x1(cfg.ffn_dim, cfg.dim)

    def forward(self, x):                                             # (1, dim, 1, S)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AneBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = AneNorm(cfg.dim, cfg.norm_eps)
        self.attn = AneAttention(cfg)
        self.ffn_norm = AneNorm(cfg.dim, cfg.norm_eps)
        self.ffn = AneFeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class AneTransformer(nn.Module):
    """model.Transformer in the Neural Engine layout, batch 1, with the KV cache as two state buffers.

    ANE principle (channels-first data format): every activation is (B, C, 1, S) -- channels in the second
    axis, the sequence in the last, the 4-D layout the Neural Engine's buffers are built for.
    `mode` picks what forward() computes, so that torch.jit.trace sees one function at a time:
      "prefill": forward(tokens (1, P), length (1,)) -> logits (1, 1, V) at position length-1; fills cache [0, P)
      "decode":  forward(token (1, 1), pos (1,))    -> logits (1, 1, V); writes cache position pos
    """

    def __init__(self, config: ModelConfig, context: int | None = None):
        super().__init__()
        self.config = cfg = config
        self.context = context = context or cfg.max_seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(AneBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = AneNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, context, cfg.rope_base)        # (context, head_dim // 2)
        self.register_buffer("rope_cos", cos.t().contiguous(), persistent=False)  # (head_dim // 2, context)
        self.register_buffer("rope_sin", sin.t().contiguous(), persistent=False)
        kv = (cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, 1, context)
        self.register_buffer("k_cache", torch.zeros(kv), persistent=False)      # the Core ML states
        self.register_buffer("v_cache", torch.zeros(kv), persistent=False)
        self.mode = "prefill"

    def embed(self, tokens):                                          # (1, S) -> (1, dim, 1, S)
        return self.tok_emb(tokens).transpose(1, 2).unsqueeze(2)

    def head(self, x):                                                # (1, dim, 1, S) -> (1, S, V)
        x = self.norm(x).squeeze(2).transpose(1, 2)                   # (1, S, dim)
        # The tied head reads the embedding matrix as stored (V, dim): one int8 constant serves both uses.
        return F.linear(x, self.tok_emb.weight)

    def body(self, tokens, cos, sin, mask, pos=None):
        """Run the blocks on tokens (1, S); keys/values go to cache positions [0, S) or, with `pos`, to pos."""
        x = self.embed(tokens)
        S = tokens.shape[1]
        for i, layer in enumerate(self.layers):
            def cache(k, v, i=i):
                if pos is None:   # prefill: attend to this chunk's own keys; store them at [0, S)
                    self.k_cache[i:i + 1, :, :, :S] = k
                    self.v_cache[i:i + 1, :, :, :S] = v
                    return k, v
                self.k_cache[i:i + 1, :, :, pos:pos + 1] = k
                self.v_cache[i:i + 1, :, :, pos:pos + 1] = v
                return self.k_cache[i:i + 1], self.v_cache[i:i + 1]
            x = layer(x, cos, sin, mask, cache)
        return x

    def prefill_hidden(self, tokens, length):
        P = tokens.shape[1]
        t = torch.arange(P, dtype=torch.int32)
        # key j is visible to query i when j <= i and j < length (padding after `length` is masked)
        blocked = torch.logical_or(t[:, None] > t[None, :], t[:, None] >= length)     # (S_k, S_q)
        mask = blocked.float() * MASK_VALUE
        return self.body(tokens, self.rope_cos[:, :P], self.rope_sin[:, :P], mask)

    def forward(self, tokens, where):
        if self.mode == "prefill":
            x = self.prefill_hidden(tokens, where)
            x = torch.index_select(x, 3, where - 1)                  # (1, dim, 1, 1): the last true token
        elif self.mode == "decode":
            cos = torch.index_select(self.rope_cos, 1, where)        # (head_dim // 2, 1)
            sin = torch.index_select(self.rope_sin, 1, where)
            blocked = torch.arange(self.context, dtype=torch.int32)[:, None] > where
            x = self.body(tokens, cos, sin, blocked.float() * MASK_VALUE, pos=where)
        else:
            raise ValueError(f"unknown mode {self.mode!r}")
        return self.head(x)                                           # (1, 1, V)

    def reset_cache(self):
        self.k_cache.zero_()
        self.v_cache.zero_()


# ----------------------------------------------------------------------------------------------------------
# What gets exported: the base model, its projections' LUTs, the embedding, the adapters

class ExportError(Exception):
    """Bad input or a failed check; the message is one line."""


@contextlib.contextmanager
def quiet():
    """Silence coremltools' own progress bars and warnings (our stages report progress instead)."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_base(path: str) -> tuple[Transformer, str]:
    """(model, "palettized" | "fp16"). A float checkpoint is accepted and exported in fp16, with a notice."""
    if not os.path.isfile(path):
        hint = " (run `python palettize.py` first, or pass --ckpt out/ckpt.pt for an fp16 export)" \
            if path.endswith("palettized.pt") else ""
        raise ExportError(f"{path}: no such file{hint}")
    try:
        kind = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("kind")
    except Exception:
        kind = None   # load_checkpoint below names the problem
    if kind == "model":
        model, _ = load_model(path)
        print(f"notice: {path} is a float checkpoint, not a palettized one: exporting plain fp16 weights "
              f"(about 4x larger). Run `python palettize.py` and export out/palettized.pt for the LUT package.")
        return model.eval(), "fp16"
    model, _ = load_palettized(path)
    return model.eval(), "palettized"


def projection_weights(model: Transformer) -> dict:
    """{module name: {"dense": fp16 (out, in), "lut": fp16 (out/gs, K) | None, "indices": uint8 | None, ...}}
    for every projection, in module order. Palettized layers are recognised by their `lut`/`indices` buffers."""
    found = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS or name.endswith(".base"):
            continue
        m = getattr(m, "base", m)                                         # a LoRALinear wraps the base
        if hasattr(m, "lut") and hasattr(m, "indices"):
            lut, idx, gs = m.lut.detach().cpu(), m.indices.detach().cpu(), int(m.group_size)
            rows = torch.arange(idx.shape[0]) // gs
            dense = lut[rows[:, None], idx.long()]                        # exact: every entry is a LUT value
            found[name] = {"dense": dense.half(), "lut": lut.half(), "indices": idx.to(torch.uint8),
                           "bits": int(m.bits), "group_size": gs}
        else:
            found[name] = {"dense": m.weight.detach().cpu().half(), "lut": None, "indices": None,
                           "bits": 16, "group_size": None}
    return found


def embedding_weights(model: Transformer) -> dict:
    """The shared embedding: fp16 dense value plus its int8 data and fp16 per-row scales when quantized."""
    e = model.tok_emb
    if hasattr(e, "weight_int8") and hasattr(e, "weight_scale"):
        q, s = e.weight_int8.detach().cpu(), e.weight_scale.detach().cpu().half()
        return {"dense": (q.float() * s.float()).half(), "int8": q.to(torch.int8), "scale": s.reshape(-1, 1)}
    return {"dense": e.weight.detach().cpu().half(), "int8": None, "scale": None}


def ane_model(model: Transformer, context: int) -> AneTransformer:
    """The Neural-Engine-layout twin of `model` (float or palettized: dense weights are taken from `.weight`)."""
    ane = AneTransformer(model.config, context)
    state = {}
    for key in ane.state_dict():
        mod, _, attr = key.rpartition(".")
        sub = model.get_submodule(mod)
        sub = getattr(sub, "base", sub)
        state[key] = getattr(sub, attr).detach().float().cpu()
    ane.load_state_dict(state)
    return ane.eval()


def adapter_files(paths) -> list[str]:
    return sorted(glob.glob(os.path.join("out", "adapter_*.pt"))) if paths is None else list(paths)


def read_adapter(path: str, base: Transformer) -> dict:
    """Check the adapter against `base` with lora.load_adapter (which refuses another base), then detach it.
    Returns {"name", "path", "scale", "tensors": {"layers.0.attn.q_proj": (A fp16 (r, in), B fp16 (out, r))}}."""
    try:
        ckpt = load_adapter(path, base)
    except (AdapterError, CheckpointError) as e:
        raise ExportError(f"{e}" + (" -- train it on this base with lora.py, or leave it out with --adapters"
                                    if "different base" in str(e) else "")) from None
    try:
        mods = adapters(base)
        tensors = {n: (ckpt["adapter"][f"{n}.lora_A"].half(), ckpt["adapter"][f"{n}.lora_B"].half()) for n in mods}
        scale = {m.scale for m in mods.values()}.pop()
    finally:
        remove_adapters(base)
    # functions are named after the file (adapter_pydoc_zero.pt -> prefill_pydoc_zero): unique per folder
    name = re.sub(r"\W", "_", os.path.basename(path).removesuffix(".pt").removeprefix("adapter_"))
    return {"name": name, "path": path, "scale": float(scale), "tensors": tensors}


# ----------------------------------------------------------------------------------------------------------
# PyTorch -> MIL: trace one function, then put our weights in

def convert_function(ane: AneTransformer, mode: str, prefill_len: int):
    """Trace `ane` in `mode` and convert it to a MIL program (coremltools' default passes, fp16)."""
    ane.mode = mode
    ane.reset_cache()
    if mode == "prefill":
        example = (torch.zeros(1, prefill_len, dtype=torch.int32), torch.tensor([prefill_len], dtype=torch.int32))
        inputs = [ct.TensorType(name="tokens", shape=(1, prefill_len), dtype=np.int32),
                  ct.TensorType(name="length", shape=(1,), dtype=np.int32)]
    else:
        example = (torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
        inputs = [ct.TensorType(name="token", shape=(1, 1), dtype=np.int32),
                  ct.TensorType(name="pos", shape=(1,), dtype=np.int32)]
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(ane.k_cache.shape), dtype=np.float16), name=n)
              for n in ("k_cache", "v_cache")]
    with torch.no_grad(), quiet():
        traced = torch.jit.trace(ane, example, check_trace=False)
        prog = ct.convert(traced, inputs=inputs, states=states,
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                          convert_to="milinternal", minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16)
    ane.reset_cache()
    return prog


def mil_name(name: str) -> str:
    """The name Core ML keeps for an op: "layers.0.attn.q_proj.weight" -> "layers_0_attn_q_proj_weight"."""
    return re.sub(r"\W", "_", name)


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a)
    return a.shape, hashlib.sha1(a.view(np.uint8)).hexdigest()


def as_graph_pass(fn):
    """Run a program edit the way coremltools runs its own passes, so the new ops get scope information."""
    def run(prog, *args):
        with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=[fn.__name__])):
            return fn(prog, *args)
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@as_graph_pass
def put_weights(prog, weights: dict, emb: dict) -> None:
    """Replace the weight constants that tracing produced with our own, named after the PyTorch modules:

      * a palettized projection -> one constexpr_lut_to_dense(indices uint{bits} (out, in, 1, 1),
        lut fp16 (out/16, 1, 1, 1, K, 1)): palettize.py's LUT and indices exactly, nothing re-clustered;
      * the embedding -> one constexpr_blockwise_shift_scale(int8 (V, d), fp16 scale (V, 1)) that feeds both
        the token lookup (gather) and the tied output head (linear);
      * anything not palettized stays an fp16 constant, renamed.
    The traced constants are found by value (the fp16 dense weight), so nothing depends on tracer names."""
    func = prog.functions["main"]
    wanted = {_key(w["dense"].numpy()[:, :, None, None]): name for name, w in weights.items()}
    wanted[_key(emb["dense"].numpy())] = "tok_emb"
    done = set()
    for op in list(func.operations):
        v = op.outputs[0]
        if op.op_type != "const" or v.dtype != mil_types.fp16 or not isinstance(v.val, np.ndarray) \
                or _key(v.val) not in wanted:
            continue
        name = wanted[_key(v.val)]
        with func:
            if name == "tok_emb" and emb["int8"] is not None:
                new = mb.constexpr_blockwise_shift_scale(data=emb["int8"].numpy(), scale=emb["scale"].numpy(),
                                                         name="tok_emb_weight", before_op=op)
            elif name == "tok_emb" or weights[name]["lut"] is None:
                new = mb.const(val=v.val, name=mil_name(f"{name}.weight"), before_op=op)
            else:
                w, lut = weights[name], weights[name]["lut"].numpy()
                uint = mil_types.nptype_from_builtin(mil_types.string_to_builtin(f"uint{w['bits']}"))
                new = mb.constexpr_lut_to_dense(indices=w["indices"].numpy()[:, :, None, None].astype(uint),
                                                lut=lut.reshape(lut.shape[0], 1, 1, 1, lut.shape[1], 1),
                                                name=mil_name(f"{name}.weight"), before_op=op)
        func.replace_uses_of_var_after_op(anchor_op=op, old_var=v, new_var=new)
        func.remove_ops([op])
        done.add(name)
    missing = [n for n in list(weights) + ["tok_emb"] if n not in done]
    if missing:
        raise ExportError(f"the converted program has no constant equal to the weight of {missing[0]} "
                          f"({len(missing)} missing)")


@as_graph_pass
def add_lora(prog, adapter: dict) -> None:
    """Add the adapter's branches next to every adapted projection, unmerged:

        y = conv(x, W) + conv(scale * conv(x, A), B)        A: (r, in, 1, 1), B: (out, r, 1, 1)

    (with scale folded into B when that is exact.)
    W stays the very same (palettized) constant as in the base functions, so the package stores it once and
    the adapter costs about its own fp16 bytes; merging (W + scale B A) would make a second full W."""
    func = prog.functions["main"]
    ops = list(func.operations)
    following = {id(op): ops[i + 1] for i, op in enumerate(ops[:-1])}
    convs = {op.weight.op.name: op for op in ops if op.op_type == "conv"}
    tag, scale = adapter["name"], adapter["scale"]
    for proj, (A, B) in adapter["tensors"].items():
        # fold the scale into B where that is exact (alpha / rank a power of two), saving an op per branch
        Bs = B.float() * scale
        fold = torch.equal(Bs.half().float(), Bs)
        conv = convs.get(mil_name(f"{proj}.weight"))
        p = mil_name(f"{tag}.{proj}")
        if conv is None:
            raise ExportError(f"adapter {tag}: no projection {proj} in the program")
        with func:
            at = following[id(conv)]
            a = mb.const(val=A.numpy()[:, :, None, None], name=f"{p}_lora_A", before_op=at)
            b = mb.const(val=(Bs.half() if fold else B).numpy()[:, :, None, None], name=f"{p}_lora_B", before_op=at)
            h = mb.conv(x=conv.x, weight=a, name=f"{p}_down", before_op=at)     # (1, r, 1, S)
            if not fold:
                h = mb.mul(x=h, y=np.float16(scale), name=f"{p}_scale", before_op=at)
            d = mb.conv(x=h, weight=b, name=f"{p}_up", before_op=at)            # (1, out, 1, S)
            y = mb.add(x=conv.outputs[0], y=d, name=f"{p}_sum", before_op=at)
        func.replace_uses_of_var_after_op(anchor_op=y.op, old_var=conv.outputs[0], new_var=y)


def _short_names():
    """a, b, ..., z, aa, ab, ...: names for values nobody reads."""
    i = 0
    while True:
        i, n, s = i + 1, i + 1, ""
        while n:
            n, r = divmod(n - 1, 26)
            s = chr(97 + r) + s
        yield s


@as_graph_pass
def compact(prog) -> None:
    """Shrink the program's description (its computation is unchanged). For a small model the op list, not the
    weights, would otherwise be a good part of the package, and every adapter function repeats it:
      * one const op per distinct small value: the converter emits a separate const for every parameter of
        every op (strides, axes, masks, ...), mostly the same few values;
      * short names for intermediate values; inputs, outputs, states and our weights keep their names."""
    func = prog.functions["main"]

    def ours(op):                                                      # named by put_weights / add_lora
        return op.op_type.startswith("constexpr_") or op.name.endswith(("_weight", "_lora_A", "_lora_B"))

    first = {}
    for op in list(func.operations):
        if op.op_type != "const" or ours(op):
            continue
        v = op.outputs[0]
        if v.val is None or np.size(v.val) > 256 or v in func.outputs \
                or any(c.op_type.startswith("constexpr_") for c in v.child_ops):
            continue
        key = (v.dtype, np.shape(v.val), np.asarray(v.val).tobytes())
        if key in first:
            func.replace_uses_of_var_after_op(anchor_op=None, old_var=v, new_var=first[key])
            func.remove_ops([op])
        else:
            first[key] = v
    # and never a word of the MIL text format (coremltools' own name sanitizer avoids the same list)
    keep = set(func.inputs) | {v.name for v in func.outputs} | {
        "any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false", "string", "state"}
    names = (n for n in _short_names() if n not in keep)
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
        m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
        m.save(path)


def save_package(paths: dict, path: str) -> None:
    """{function name: one-function .mlpackage} -> one multifunction .mlpackage at `path`; save_multifunction
    stores every constant that several functions share only once."""
    desc = ct.utils.MultiFunctionDescriptor()
    for fname, p in paths.items():
        desc.add_function(p, src_function_name="main", target_function_name=fname)
    desc.default_function_name = next(iter(paths))
    with quiet():
        ct.utils.save_multifunction(desc, path)


def replace_path(src: str, dst: str) -> None:
    """Move the finished package `src` to `dst`. An existing `dst` is moved aside first and deleted only once
    `src` is in place, so `dst` is always either the old complete package or the new one, never half of one."""
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
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
# Reading a package back, and running its program in numpy

def read_package(path: str):
    """The saved .mlpackage as a MIL program with all its functions (no Core ML runtime needed)."""
    with quiet():
        spec = ct.utils.load_spec(path)
        wdir = os.path.join(path, "Data", "com.apple.CoreML", "weights")
        return _load_mil_proto(spec, spec.specificationVersion, wdir)


def check_weights(prog, weights: dict, emb: dict) -> dict:
    """Compare every constexpr_lut_to_dense's LUT and indices in every function with ours, bit for bit, and
    the int8 embedding; also that each weight is one op, named after its module. Returns a summary."""
    lut_layers, problems = set(), []
    for fname, func in prog.functions.items():
        seen = {}
        for op in func.operations:
            if op.op_type in ("constexpr_lut_to_dense", "const", "constexpr_blockwise_shift_scale"):
                seen.setdefault(op.name, []).append(op)
        for name, w in list(weights.items()) + [("tok_emb", None)]:
            ops = seen.get(mil_name(f"{name}.weight"), [])
            if len(ops) != 1:
                problems.append(f"{fname}: {len(ops)} ops hold {name}.weight")
                continue
            op = ops[0]
            if name == "tok_emb":
                if emb["int8"] is not None:
                    ok = op.op_type == "constexpr_blockwise_shift_scale" \
                        and np.array_equal(op.data.val.astype(np.int8), emb["int8"].numpy()) \
                        and np.array_equal(op.scale.val.view(np.uint16), emb["scale"].numpy().view(np.uint16))
                else:
                    ok = np.array_equal(op.outputs[0].val.view(np.uint16), emb["dense"].numpy().view(np.uint16))
                users = {c.op_type for c in op.outputs[0].child_ops}
                if not ok or not {"gather", "linear"} <= users:
                    problems.append(f"{fname}: tok_emb differs or is not shared by lookup and head ({sorted(users)})")
            elif w["lut"] is None:
                if not np.array_equal(op.outputs[0].val.reshape(w["dense"].shape).view(np.uint16),
                                      w["dense"].numpy().view(np.uint16)):
                    problems.append(f"{fname}: {name} fp16 weight differs")
            else:
                lut, idx = op.lut.val, op.indices.val
                K = w["lut"].shape[1]
                ok = (op.op_type == "constexpr_lut_to_dense" and lut.dtype == np.float16
                      and lut.shape == (w["lut"].shape[0], 1, 1, 1, K, 1)
                      and np.array_equal(lut.reshape(-1, K).view(np.uint16), w["lut"].numpy().view(np.uint16))
                      and op.indices.dtype == mil_types.string_to_builtin(f"uint{w['bits']}")
                      and np.array_equal(np.asarray(idx, dtype=np.uint8).reshape(w["indices"].shape),
                                         w["indices"].numpy()))
                if ok:
                    lut_layers.add(name)
                else:
                    problems.append(f"{fname}: {name} LUT or indices differ from palettize.py's")
    n_lut = sum(w["lut"] is not None for w in weights.values())
    return {"lut_exact": (not problems and len(lut_layers) == n_lut) if n_lut else None,
            "lut_layers": len(lut_layers), "problems": problems}


class _Bound:
    """Stands in for a MIL var's symbolic value so that an op's own value_inference() computes on our arrays."""
    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


def _conv(op, x, w):
    """1x1, stride 1, no padding, one group: all this exporter emits. fp32 accumulation."""
    if w.shape[2:] != (1, 1) or (op.groups is not None and op.groups.val != 1) or \
            (op.strides is not None and any(s != 1 for s in op.strides.val)):
        raise ExportError(f"numpy run: conv {op.name} is not a plain 1x1 convolution")
    y = np.einsum("oi,bihw->bohw", w[:, :, 0, 0].astype(np.float32), x.astype(np.float32))
    if op.bias is not None:
        y = y + op.bias.val.astype(np.float32).reshape(1, -1, 1, 1)
    return y


def _matmul(op, x, y):
    x, y = x.astype(np.float32), y.astype(np.float32)
    if op.transpose_x.val:
        x = np.swapaxes(x, -1, -2)
    if op.transpose_y.val:
        y = np.swapaxes(y, -1, -2)
    return x @ y


def _linear(op, x, w):
    y = x.astype(np.float32) @ w.astype(np.float32).T
    return y if op.bias is None else y + op.bias.val.astype(np.float32)


class NumpyProgram:
    """Runs one function of a MIL program op by op in numpy: each op's own value_inference() (coremltools'
    numpy semantics), plus our own conv / matmul / linear / silu and the state ops, which have none.
    Arithmetic: every op reads fp16 values, computes in fp32 and rounds its result to the declared fp16 --
    fp16 storage with wider accumulation, as on the Neural Engine (its exact rounding is not reproduced)."""

    OWN = {"conv": lambda op, v: _conv(op, v(op.x), v(op.weight)),
           "matmul": lambda op, v: _matmul(op, v(op.x), v(op.y)),
           "linear": lambda op, v: _linear(op, v(op.x), v(op.weight)),
           "silu": lambda op, v: (lambda x: x * 0.5 * (1 + np.tanh(x / 2)))(v(op.x).astype(np.float32))}

    def __init__(self, func):
        self.func = func
        self.consts = {}
        for op in func.operations:             # constants and decompressed constexpr weights, once
            if op.op_type == "const":
                val = op.outputs[0].val
                self.consts[op.outputs[0].name] = bool(val) if isinstance(val, np.bool_) else val
            elif op.op_type.startswith("constexpr_"):
                self.consts[op.outputs[0].name] = op.materialized_val_inference()

    def __call__(self, inputs: dict, states: dict) -> dict:
        env = dict(self.consts)
        for name, var in self.func.inputs.items():
            if name in inputs:
                env[name] = np.asarray(inputs[name]).astype(mil_types.nptype_from_builtin(var.dtype))
        v = lambda var: env[var.name]                                    # noqa: E731
        for op in self.func.operations:
            t = op.op_type
            if t == "const" or t.startswith("constexpr_"):
                continue
            if t == "read_state":
                out = states[op.input.name].copy()
            elif t == "coreml_update_state":
                states[op.state.name] = out = v(op.value).copy()
            elif t in self.OWN:
                out = self.OWN[t](op, v)
            else:
                bound = []                     # bind our values to the inputs; restore afterwards
                for var in op.get_flattened_inputs():
                    val = env[var.name]
                    if isinstance(val, np.ndarray) and val.dtype == np.float16:
                        val = val.astype(np.float32)
                    bound.append((var, var._sym_val))
                    var._sym_val = _Bound(val)
                try:
                    out = op.value_inference()
                finally:
                    for var, old in bound:
                        var._sym_val = old
                if out is None:
                    raise ExportError(f"numpy run: no numpy semantics for op {t} ({op.name})")
            outs = out if len(op.outputs) > 1 else (out,)
            for var, val in zip(op.outputs, outs):
                env[var.name] = np.asarray(val).astype(mil_types.nptype_from_builtin(var.dtype))
        return {var.name: env[var.name] for var in self.func.outputs}


# ----------------------------------------------------------------------------------------------------------
# Verification against PyTorch, and sizes

def verify_text(vocab_size: int, n: int) -> torch.Tensor:
    """n tokens of real text (the Bible, or Python's docs when that package is missing) to run both models on."""
    try:
        text = load_text("bible")
    except DataError:
        text = load_text("pydoc")
    tokens = encode(text[len(text) // 3:len(text) // 3 + 4 * n])[:n].long()
    return tokens % vocab_size


def compare_logits(run_pre, run_dec, new_states, model: Transformer, tokens, prefill_len: int, lengths,
                   steps: int, bar=None) -> dict:
    """For each prompt length L: prefill tokens[:L] (padded to prefill_len), then `steps` decode steps fed with
    the next true tokens, on the exported program (run_pre/run_dec(inputs, states) -> logits) and in PyTorch on
    `model` (one forward over the whole sequence, no KV cache). Logits of every step are compared: largest
    absolute difference, argmax agreement."""
    diffs, agree, count, ref_max = [], 0, 0, 0.0
    for L in lengths:
        states = new_states()
        padded = np.zeros((1, prefill_len), np.int32)
        padded[0, :L] = tokens[:L].numpy()
        got = [run_pre({"tokens": padded, "length": np.array([L], np.int32)}, states)]
        for s in range(steps):
            tok, pos = int(tokens[L + s]), L + s
            got.append(run_dec({"token": np.array([[tok]], np.int32), "pos": np.array([pos], np.int32)}, states))
            if bar is not None:
                bar.update(1)
        with torch.no_grad():   # the plain model on the whole sequence, no cache: logits at L-1 .. L-1+steps
            want = model(tokens[None, :L + steps])[0, L - 1:]
        for g, w in zip(got, want):
            g, w = g.reshape(-1).astype(np.float32), w.reshape(-1).float().numpy()
            diffs.append(float(np.abs(g - w).max()))
            ref_max = max(ref_max, float(np.abs(w).max()))
            agree += int(g.argmax() == w.argmax())
            count += 1
    return {"max_abs_logit_diff": max(diffs), "argmax_agree": agree, "compared": count, "max_abs_logit": ref_max}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def ideal_bytes(ane: AneTransformer, weights: dict, emb: dict) -> int:
    """Bytes of the base as palettize.py stores it: packed indices + fp16 LUTs + int8 embedding and fp16
    scales + every other tensor (the norm gains) in fp16. An fp16 export: every weight in fp16."""
    n = sum(math.ceil(w["indices"].numel() * w["bits"] / 8) + 2 * w["lut"].numel() if w["lut"] is not None
            else 2 * w["dense"].numel() for w in weights.values())
    n += emb["int8"].numel() + 2 * emb["scale"].numel() if emb["int8"] is not None else 2 * emb["dense"].numel()
    return n + sum(2 * v.numel() for k, v in ane.state_dict().items() if k.endswith("norm.weight"))


def function_bytes(spec, path: str, fnames) -> tuple[int, int, int]:
    """What the functions `fnames` of the package at `path` (its model spec already loaded: `spec`) add to it:
    (their program and description in the model file,
    the weight blobs -- 64-byte header + data, 64-aligned -- that no other function uses, and the part of
    their programs that only declares weights: the constexpr ops and blob-backed consts). The last is a floor:
    every function must declare the weights it reads, however few compute ops it has."""
    blobs, decl = {}, {}
    for name, f in spec.mlProgram.functions.items():
        offs, decl[name] = set(), 0
        for block in f.block_specializations.values():
            for op in block.operations:
                vals = list(op.attributes.values()) + [b.value for arg in op.inputs.values() for b in arg.arguments]
                backed = [val.blobFileValue.offset for val in vals if val.HasField("blobFileValue")]
                offs.update(backed)
                if backed or op.type.startswith("constexpr_"):
                    decl[name] += op.ByteSize()
        blobs[name] = offs
    mine = set().union(*(blobs[f] for f in fnames))
    others = set().union(*(b for f, b in blobs.items() if f not in fnames))
    program = sum(spec.mlProgram.functions[f].ByteSize() for f in fnames)
    program += sum(d.ByteSize() for d in spec.description.functions if d.name in fnames)
    weights = 0
    with open(os.path.join(path, "Data", "com.apple.CoreML", "weights", "weight.bin"), "rb") as fh:
        for off in mine - others:
            fh.seek(off + 8)
            weights += 64 + (int.from_bytes(fh.read(8), "little") + 63) // 64 * 64
    return program, weights, sum(decl[f] for f in fnames)


def predict_check(path: str, pairs, model, tokens, prefill_len: int) -> dict:
    """Core ML's own predict() on macOS, on one prompt per function pair; elsewhere it is skipped."""
    if platform.system() != "Darwin":
        return {"predict": "skipped (Core ML predict() needs macOS; the numpy run stands in for it)"}
    try:
        worst, agree, count = 0.0, 0, 0
        for pre, dec, ad in pairs:
            mp = ct.models.MLModel(path, function_name=pre, compute_units=ct.ComputeUnit.CPU_AND_NE)
            md = ct.models.MLModel(path, function_name=dec, compute_units=ct.ComputeUnit.CPU_AND_NE)
            if ad is not None:
                load_adapter(ad["path"], model)
            try:
                r = compare_logits(lambda i, st: mp.predict(i, state=st)["logits"],
                                   lambda i, st: md.predict(i, state=st)["logits"], mp.make_state,
                                   model, tokens, prefill_len, [max(1, prefill_len // 2)], 4)
            finally:
                if ad is not None:
                    remove_adapters(model)
            worst, agree, count = max(worst, r["max_abs_logit_diff"]), agree + r["argmax_agree"], count + r["compared"]
        return {"predict": "ok", "predict_max_abs_logit_diff": worst, "predict_argmax_agreement": agree / count}
    except Exception as e:
        return {"predict": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}


# ----------------------------------------------------------------------------------------------------------
# The export

def export(a) -> dict:
    t0, stage_s = time.time(), {}
    out_dir = a.out_dir
    dst = os.path.join(out_dir, "afm.mlpackage")
    model, compression = load_base(a.ckpt)
    cfg = model.config
    context = a.context or cfg.max_seq_len
    prefill_len = a.prefill_len or min(64, context // 2)
    if not 1 <= prefill_len <= context:
        raise ExportError(f"--prefill-len {prefill_len} must be between 1 and --context {context}")
    if context > cfg.max_seq_len:
        raise ExportError(f"--context {context} exceeds the model's max_seq_len {cfg.max_seq_len}")
    adapter_list = [read_adapter(p, model) for p in adapter_files(a.adapters)]
    names = [ad["name"] for ad in adapter_list]
    if len(set(names)) != len(names):
        raise ExportError(f"two adapters are both named {max(names, key=names.count)!r}")
    weights, emb = projection_weights(model), embedding_weights(model)
    ane = ane_model(model, context)
    stage_s["load"] = time.time() - t0
    lut_n = sum(w["lut"] is not None for w in weights.values())
    print(f"base: {a.ckpt} ({cfg.name}, {compression}, {lut_n}/{len(weights)} projections palettized, "
          f"{len(adapter_list)} adapter(s)); prefill {prefill_len} tokens, context {context}")

    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-export-")
    try:
        steps = 2 + 2 * len(adapter_list) + 1
        with tqdm(total=steps, desc="export", unit="step") as bar:
            t = time.time()
            paths = {}                                 # function name -> its one-function package
            for mode in ("prefill", "decode"):
                bar.set_description(f"trace+convert {mode}")
                prog = convert_function(ane, mode, prefill_len)
                put_weights(prog, weights, emb)
                compact(prog)
                paths[mode] = os.path.join(work, f"{mode}.mlpackage")
                save_program(prog, paths[mode])
                bar.update(1)
            stage_s["convert"] = time.time() - t
            t = time.time()
            for ad in adapter_list:
                bar.set_description(f"adapter {ad['name']}")
                for mode in ("prefill", "decode"):
                    prog = read_package(paths[mode])         # a fresh copy of the base function
                    add_lora(prog, ad)
                    compact(prog)
                    paths[f"{mode}_{ad['name']}"] = os.path.join(work, f"{mode}_{ad['name']}.mlpackage")
                    save_program(prog, paths[f"{mode}_{ad['name']}"])
                    bar.update(1)
            stage_s["adapters"] = time.time() - t
            t = time.time()
            bar.set_description("save package")
            pkg_path = os.path.join(work, "afm.mlpackage")
            save_package(paths, pkg_path)
            bar.update(1)
            stage_s["save"] = time.time() - t

        report = {"ckpt": a.ckpt, "config": cfg.name, "compression": compression, "prefill_len": prefill_len,
                  "context": context, "functions": list(paths),
                  "states": {n: list(ane.k_cache.shape) for n in ("k_cache", "v_cache")}}
        core = os.path.join(pkg_path, "Data", "com.apple.CoreML")
        report["package_bytes"] = dir_bytes(pkg_path)
        report["weight_bytes"] = dir_bytes(os.path.join(core, "weights"))       # weight.bin
        report["program_bytes"] = os.path.getsize(os.path.join(core, "model.mlmodel"))
        report["other_bytes"] = report["package_bytes"] - report["weight_bytes"] - report["program_bytes"]
        ideal = ideal_bytes(ane, weights, emb)
        report["adapters"] = {}
        spec = ct.utils.load_spec(pkg_path)                                # parsed once for every count below
        for ad in adapter_list:
            fp16 = sum(2 * (A.numel() + B.numel()) for A, B in ad["tensors"].values())
            prog_b, blob_b, decl_b = function_bytes(spec, pkg_path, [f"prefill_{ad['name']}",
                                                                        f"decode_{ad['name']}"])
            report["adapters"][ad["name"]] = {
                "path": ad["path"], "fp16_bytes": fp16, "added_bytes": prog_b + blob_b,
                "added_over_fp16": round((prog_b + blob_b) / fp16, 4), "added_weight_bytes": blob_b,
                "added_program_bytes": prog_b, "added_floor_bytes": blob_b + decl_b,
                "floor_over_fp16": round((blob_b + decl_b) / fp16, 4)}
            ideal += fp16
        report["ideal_bytes"] = ideal
        report["package_over_ideal"] = round(report["package_bytes"] / ideal, 4)
        report["weights_over_ideal"] = round(report["weight_bytes"] / ideal, 4)
        # The smallest package these functions allow: the weight file plus, in every function, the ops that
        # declare its weights (a function cannot read another's). When this floor is above 1.03 x ideal, as on
        # `tiny` with 8 functions, no rewrite of the compute ops can meet that bound.
        report["weight_declaration_bytes"] = function_bytes(spec, pkg_path, list(paths))[2]
        report["floor_bytes"] = report["weight_bytes"] + report["weight_declaration_bytes"]
        report["floor_over_ideal"] = round(report["floor_bytes"] / ideal, 4)
        report["bits"] = {str(b): sum(w["bits"] == b for w in weights.values())
                          for b in sorted({w["bits"] for w in weights.values()})}

        if a.no_verify:
            report.update(verified=False, lut_exact=None, lut_layers=None, max_abs_logit_diff=None,
                          argmax_agreement=None, predict="skipped (--no-verify)")
        else:
            report.update(verify(pkg_path, model, weights, emb, adapter_list, prefill_len, context, stage_s))
        replace_path(pkg_path, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stage_s["total"] = time.time() - t0
    report["seconds"] = round(stage_s["total"], 2)
    report["stage_seconds"] = {k: round(v, 2) for k, v in stage_s.items()}
    save_json(os.path.join(out_dir, "export.json"), report)
    return report


def verify(pkg_path, model, weights, emb, adapter_list, prefill_len, context, stage_s) -> dict:
    """Read the package back: LUTs and indices bit for bit, then numpy vs PyTorch logits for every function pair."""
    t = time.time()
    pkg = read_package(pkg_path)
    check = check_weights(pkg, weights, emb)
    if check["problems"]:
        raise ExportError(f"verification: {check['problems'][0]} ({len(check['problems'])} problem(s))")
    stage_s["verify_weights"] = time.time() - t
    t = time.time()
    steps = max(0, min(8, context - prefill_len))
    lengths = sorted({prefill_len, max(1, prefill_len // 2 + 1), max(1, prefill_len // 4)})
    tokens = verify_text(model.config.vocab_size, prefill_len + steps)
    pairs = [("prefill", "decode", None)] + [(f"prefill_{ad['name']}", f"decode_{ad['name']}", ad)
                                              for ad in adapter_list]
    worst, agree, count, ref_max, models = 0.0, 0, 0, 0.0, []
    shape = tuple(pkg.functions["prefill"].inputs["k_cache"].shape)
    new_states = lambda: {"k_cache": np.zeros(shape, np.float16), "v_cache": np.zeros(shape, np.float16)}  # noqa
    with tqdm(total=len(pairs) * len(lengths) * steps, desc="verify (numpy vs PyTorch)", unit="step") as bar:
        for pre, dec, ad in pairs:
            if ad is not None:
                load_adapter(ad["path"], model)
            try:
                rp, rd = NumpyProgram(pkg.functions[pre]), NumpyProgram(pkg.functions[dec])
                r = compare_logits(lambda i, s: rp(i, s)["logits"], lambda i, s: rd(i, s)["logits"], new_states,
                                   model, tokens, prefill_len, lengths, steps, bar)
            finally:
                if ad is not None:
                    remove_adapters(model)
            worst, ref_max = max(worst, r["max_abs_logit_diff"]), max(ref_max, r["max_abs_logit"])
            agree, count = agree + r["argmax_agree"], count + r["compared"]
    stage_s["verify_numpy"] = time.time() - t
    # fp16 keeps 11 significant bits; a few dozen layers of fp16 rounding stay within ~1% of the logit scale.
    tol = 0.02 * max(1.0, ref_max)
    out = {"verified": True, "lut_exact": check["lut_exact"], "lut_layers": check["lut_layers"],
           "max_abs_logit_diff": worst, "logit_tolerance": tol, "max_abs_logit": ref_max,
           "argmax_agreement": agree / count, "compared_logits": count}
    out.update(predict_check(pkg_path, pairs, model, tokens, prefill_len))
    if worst > tol or agree / count < 0.99:
        raise ExportError(f"verification: numpy run of the package differs from PyTorch (max |logit diff| "
                          f"{worst:.4f}, tolerance {tol:.4f}; argmax agreement {agree / count:.1%} over {count})")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Export the palettized model and its adapters to one Core ML package "
                                             "for the Neural Engine, and verify it (see the docstring).")
    ap.add_argument("--ckpt", default=os.path.join("out", "palettized.pt"),
                    help="palettized checkpoint (palettize.py); a float one (train.py) gives an fp16 export")
    ap.add_argument("--out-dir", default="out", help="writes afm.mlpackage and export.json here")
    ap.add_argument("--adapters", nargs="*", default=None,
                    help="adapter files (lora.py); default: every out/adapter_*.pt; give none to export none")
    ap.add_argument("--prefill-len", type=int, default=None, help="fixed prompt length of `prefill` (default: 64, or half the context if less)")
    ap.add_argument("--context", type=int, default=None, help="KV-cache length (default: the model's max_seq_len)")
    ap.add_argument("--no-verify", action="store_true", help="skip reading the package back and the numpy run")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        r = export(a)
    except (ExportError, CheckpointError, AdapterError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {os.path.join(a.out_dir, 'afm.mlpackage')}: {r['package_bytes']:,} bytes "
          f"({r['package_over_ideal']:.3f} x ideal {r['ideal_bytes']:,}; floor {r['floor_over_ideal']:.3f} x: "
          f"weight file + weight declarations); functions {', '.join(r['functions'])}")
    for name, ad in r["adapters"].items():
        print(f"  adapter {name}: adds {ad['added_bytes']:,} bytes = {ad['added_over_fp16']:.3f} x its fp16 "
              f"{ad['fp16_bytes']:,} (floor {ad['floor_over_fp16']:.3f} x)")
    if r["verified"]:
        print(f"verified: LUTs exact {r['lut_exact']} ({r['lut_layers']} layers); numpy vs PyTorch max |logit diff| "
              f"{r['max_abs_logit_diff']:.4f} (tolerance {r['logit_tolerance']:.4f}), argmax agreement "
              f"{r['argmax_agreement']:.1%} over {r['compared_logits']}; predict(): {r['predict']}")
    else:
        print("not verified (--no-verify)")
    print(f"{r['seconds']:.1f} s; report in {os.path.join(a.out_dir, 'export.json')}")


if __name__ == "__main__":
    main()
