"""
export_ane.py -- Core ML export for the Apple Neural Engine: palettize.py's lookup tables bit for bit, a
stateful KV cache and a pair of functions per LoRA adapter, in one multifunction .mlpackage (iOS18, fp16).

Follows section 5 (on-device optimization) of Gunter et al. 2024 (arXiv 2407.21075): palettized weights, an
8-bit embedding, adapters swapped at run time on one frozen base; the layout follows Apple's "Deploying
Transformers on the Apple Neural Engine" (2022), each principle named where applied. Functions: prefill(tokens
(1, P) int32 zero-padded, length (1,)), decode(token (1, 1), pos (1,)) -> logits (1, 1, V); prefill_<name>,
decode_<name> with adapter <name>; states k_cache, v_cache (layers, kv*hd, 1, context). verify_ane.py checks.

Run:  python export_ane.py                      # out/palettized.pt + out/adapter_*.pt -> out/afm.mlpackage
      python export_ane.py --ckpt out/ckpt.pt --adapters   # a float checkpoint: a plain fp16 export
"""
import argparse
import glob
import hashlib
import itertools
import operator
import os
import string
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import tokenizer_from_checkpoint
from lora import AdapterError, adapters, load_adapter, remove_adapters
from model import Attention, RMSNorm, Transformer
from plumbing import CheckpointError, save_json
from palettize import load_float_or_palettized, projection_names
from verify_ane import ct, mil_name, mil_types, package_report, quiet, read_package
# coremltools' own modules after verify_ane, which imports coremltools (ct) with its notices silenced
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

MASK_VALUE = -1e4   # additive attention mask: exp(-1e4) is 0 in fp16, and -1e4 + a score cannot overflow fp16


# -- model.Transformer in the Neural Engine layout: its own modules and parameters, other forwards -----------

def ane_rms_norm(x, weight, eps: float, dim: int):
    """RMSNorm of x over `dim` (model.RMSNorm's value), computed so that it cannot overflow in fp16."""
    # ANE principle (fp16 range): mean(x^2) overflows fp16 (max 65504) once |x| > ~256. Dividing by m >= |x|
    # first keeps each square <= 1, exactly: x / sqrt(mean(x^2) + eps) = (x/m) / sqrt(mean((x/m)^2) + eps/m^2)
    s = eps ** 0.5
    m = x.abs().amax(dim=dim, keepdim=True).clamp(min=s)              # m >= sqrt(eps): eps/m^2 <= 1
    xs, r = x / m, s / m
    return xs * torch.rsqrt((xs * xs).mean(dim=dim, keepdim=True) + r * r) * weight


class AneNorm(RMSNorm):
    """model.RMSNorm over the channel axis of a (B, C, 1, S) tensor."""

    def forward(self, x):
        return ane_rms_norm(x, self.weight.view(1, -1, 1, 1), self.eps, dim=1)


class Conv1x1(nn.Linear):
    """A bias-free nn.Linear applied as a 1x1 convolution: (B, in, 1, S) -> (B, out, 1, S)."""
    # ANE principle (linear layers as 1x1 convolutions): the Neural Engine's native op, no reshape around it.

    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None])


class AneAttention(Attention):
    """model.Attention on (1, dim, 1, S) activations; new keys/values go through a cache callback."""

    def _heads(self, x, n: int, cos, sin, gain):
        # (1, n*hd, 1, S) -> per head: RMSNorm with `gain` (hd,) unless None, then RoPE -> (1, n*hd, S)
        S = x.shape[-1]
        x = x.view(1, n, self.head_dim, S)
        if gain is not None:
            x = ane_rms_norm(x, gain.view(1, 1, -1, 1), self.q_norm.eps, dim=2)
        x1, x2 = x.chunk(2, dim=2)                                    # RoPE rotates each head's two halves
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=2).reshape(1, n * self.head_dim, S)

    def forward(self, x, cos, sin, cache, mask):
        """x (1, dim, 1, S); cos, sin (hd/2, S); cache(k, v) stores, returns k, v; additive mask (S_k, S)."""
        hd, H, KV = self.head_dim, self.n_heads, self.n_kv_heads
        # ANE principle (fp16 range): scale the queries before the dot product, not the scores after it: in
        # the query norm's gain, or after RoPE without one (right after q_proj, it would fuse into the LUT).
        if isinstance(self.q_norm, RMSNorm):
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


class AneTransformer(Transformer):
    """model.Transformer for the Neural Engine, batch 1, its KV cache in two buffers (the Core ML states)."""
    # ANE principle (channels-first data format): every activation is (B, C, 1, S), channels on the second
    # axis and the sequence on the last, the 4-D layout of the Neural Engine's buffers. model.Block and
    # model.FeedForward (SwiGLU) run as they are (Block hands its (cache, pos) on: here cache and mask).
    ane_classes = {nn.Linear: Conv1x1, RMSNorm: AneNorm, Attention: AneAttention}

    def __init__(self, cfg, context: int | None = None):
        super().__init__(cfg)
        for m in self.modules():                      # the same modules and parameters, the forwards above
            m.__class__ = self.ane_classes.get(type(m), type(m))
        T = self.context = context or cfg.max_seq_len
        self.mode = "prefill"                                               # what forward() runs
        self.rope_cos, self.rope_sin = (r[:T].t().contiguous() for r in (self.rope_cos, self.rope_sin))
        for name in ("k_cache", "v_cache"):                                     # (layers, kv*hd, 1, T)
            self.register_buffer(name, torch.zeros(cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, 1, T), False)

    def forward(self, tokens, length_or_pos):
        """Logits (1, 1, V): prefill(tokens, length) or decode(token, pos), as `mode` says (for jit.trace)."""
        prefill, S = self.mode == "prefill", tokens.shape[1]
        if prefill:                  # tokens (1, S), the first `length` (1,) true
            t = torch.arange(S, dtype=torch.int32)
            # key j is visible to query i when j <= i and j < length: (S_k, S_q)
            mask = torch.logical_or(t[:, None] > t[None, :], t[:, None] >= length_or_pos).float() * MASK_VALUE
            cos, sin = self.rope_cos[:, :S], self.rope_sin[:, :S]
        else:                        # token (1, 1) at position pos (1,), attending to the cache; cached there
            pos = length_or_pos
            cos, sin = torch.index_select(self.rope_cos, 1, pos), torch.index_select(self.rope_sin, 1, pos)
            mask = (torch.arange(self.context, dtype=torch.int32)[:, None] > pos).float() * MASK_VALUE
        x = self.tok_emb(tokens).transpose(1, 2).unsqueeze(2)                 # (1, dim, 1, S)
        for i, layer in enumerate(self.layers):
            def cache(k, v, i=i):    # stored at [0, S) (prefill: attends to this chunk's own keys) or at pos
                at = slice(None, S) if prefill else slice(pos, pos + 1)
                self.k_cache[i:i + 1, :, :, at], self.v_cache[i:i + 1, :, :, at] = k, v
                return (k, v) if prefill else (self.k_cache[i:i + 1], self.v_cache[i:i + 1])
            x = layer(x, cos, sin, cache, mask)
        if prefill:                  # keep only the last true token: (1, dim, 1, 1)
            x = torch.index_select(x, 3, length_or_pos - 1)
        x = self.norm(x).squeeze(2).transpose(1, 2)                    # (1, 1, dim) -> logits, the tied head:
        return F.linear(x, self.tok_emb.weight)    # the embedding as stored (V, dim): one constant, two uses


# -- What gets exported: the base model, its projections' LUTs, the embedding, the adapters ------------------

class ExportError(Exception):
    """Bad input or a failed step of the export; the message is one line."""


def load_base(path: str) -> tuple:
    """(model, "palettized" | "fp16", its tokenizer or None); a float checkpoint is exported in fp16."""
    if not os.path.isfile(path) and path.endswith("palettized.pt"):   # any other: load_palettized says so
        raise ExportError(f"{path}: no such file (run `python palettize.py` first, or pass --ckpt "
                          f"{os.path.join(os.path.dirname(path), 'ckpt.pt')} for an fp16 export)")
    model, ckpt = load_float_or_palettized(path)
    if is_float := ckpt["kind"] == "model":
        print(f"notice: {path} is a float checkpoint, not a palettized one: exporting plain fp16 weights "
              f"(about 4x larger). Run `python palettize.py` and export its palettized.pt for LUTs.")
    return model.eval(), "fp16" if is_float else "palettized", tokenizer_from_checkpoint(ckpt)


def projection_weights(model: Transformer) -> dict:
    """{projection: {"dense": fp16 (out, in), "lut": fp16 (out/16, K) or None, "indices", "bits"}}."""
    mods = {n: model.get_submodule(n) for n in projection_names(model)}    # PalettizedLinear or nn.Linear
    return {n: {"dense": m.weight.detach().half(), "lut": getattr(m, "lut", None),
                "indices": getattr(m, "indices", None), "bits": getattr(m, "bits", 16)}
            for n, m in mods.items()}


def embedding_weights(model: Transformer) -> dict:
    """The shared embedding: its fp16 value, and its int8 data and fp16 per-row scales (None if not int8)."""
    e, q = model.tok_emb, getattr(model.tok_emb, "weight_int8", None)
    return {"dense": e.weight.detach().half(), "int8": q,
            "scale": None if q is None else e.weight_scale.half().reshape(-1, 1)}


def read_adapter(path: str, base: Transformer) -> dict:
    """{"name", "path", "scale", "tensors": {projection: (A (r, in), B (out, r))}} of an adapter of `base`."""
    try:
        sd = load_adapter(path, base)["adapter"]
    except (AdapterError, CheckpointError) as e:
        hint = " -- train it on this base with lora.py, or leave it out with --adapters"
        raise ExportError(f"{e}{hint if 'different base' in str(e) else ''}") from None
    tensors = {n: (sd[f"{n}.lora_A"].half(), sd[f"{n}.lora_B"].half()) for n in adapters(base)}
    scale = {m.scale for m in adapters(base).values()}.pop()
    remove_adapters(base)
    # functions are named after the file (adapter_pydoc_zero.pt -> prefill_pydoc_zero): unique per folder
    name = mil_name(os.path.basename(path).removesuffix(".pt").removeprefix("adapter_"))
    return {"name": name, "path": path, "scale": float(scale), "tensors": tensors}


# -- PyTorch -> MIL: trace one function, put our weights in, add an adapter, save compacted ------------------

def mil_program(ane: AneTransformer, mode: str, prefill_len: int):
    """The MIL program of `ane` in `mode` ("prefill" | "decode"), traced and converted; caches as states."""
    ane.mode, S = mode, prefill_len if mode == "prefill" else 1
    inputs = [ct.TensorType(name=name, shape=shape, dtype=np.int32) for name, shape in
              zip(("tokens", "length") if mode == "prefill" else ("token", "pos"), ((1, S), (1,)))]
    cache = ct.TensorType(shape=tuple(ane.k_cache.shape), dtype=np.float16)
    states = [ct.StateType(wrapped_type=cache, name=n) for n in ("k_cache", "v_cache")]
    example = torch.zeros(1, S, dtype=torch.int32), torch.tensor([S if mode == "prefill" else 0]).int()
    with torch.no_grad(), quiet():
        return ct.convert(torch.jit.trace(ane, example, check_trace=False), inputs=inputs, states=states,
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)], convert_to="milinternal",
                          minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)


def pass_scope(name: str):
    """The scope that coremltools' own graph passes give the ops they add (Core ML wants one on every op)."""
    return mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=[name]))


def put_weights(prog, weights: dict, emb: dict) -> None:
    """Replace the traced weight constants (found by value) with ours, named after the PyTorch modules."""
    # a palettized projection -> one constexpr_lut_to_dense with palettize.py's LUT and indices, nothing
    # re-clustered; the embedding -> one int8 constexpr_blockwise_shift_scale feeding both the token lookup
    # (gather) and the tied head (linear); any other weight -> its fp16 constant, renamed
    key = lambda a: (a.shape, hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest())  # noqa: E731
    func = prog.functions["main"]
    todo = {key(w["dense"].numpy()[:, :, None, None]): name for name, w in weights.items()}
    todo[key(emb["dense"].numpy())] = "tok_emb"
    for op in list(func.operations):
        v = op.outputs[0]
        if op.op_type != "const" or v.dtype != mil_types.fp16 or key(v.val) not in todo:
            continue
        name = todo.pop(key(v.val))
        w, mil = weights.get(name, {"lut": None}), mil_name(f"{name}.weight")
        with pass_scope("put_weights"), func:
            if name == "tok_emb" and emb["int8"] is not None:
                new = mb.constexpr_blockwise_shift_scale(data=emb["int8"].numpy(), scale=emb["scale"].numpy(),
                                                         name=mil, before_op=op)
            elif w["lut"] is None:
                new = mb.const(val=v.val, name=mil, before_op=op)
            else:
                uint = mil_types.nptype_from_builtin(mil_types.string_to_builtin(f"uint{w['bits']}"))
                # rank 6: Core ML's per-grouped-channel LUT of a conv weight (out, in, 1, 1) is one table per
                # 16 output channels along axis 0, size 1 on the other weight axes, K entries, vector size 1
                new = mb.constexpr_lut_to_dense(indices=w["indices"].numpy()[:, :, None, None].astype(uint),
                                                lut=w["lut"].numpy()[:, None, None, None, :, None],
                                                name=mil, before_op=op)
            func.replace_uses_of_var_after_op(anchor_op=op, old_var=v, new_var=new)
            func.remove_ops([op])
    if todo:
        raise ExportError(f"the converted program has no constant equal to the weight of "
                          f"{next(iter(todo.values()))} ({len(todo)} missing)")


def add_lora(prog, adapter: dict) -> None:
    """Add the adapter's branches to its projections, unmerged: conv(x, W) + conv(s * conv(x, A), B)."""
    # W stays the very constant of the base functions, stored once in the package: the adapter costs about
    # its own fp16 bytes, where merging (W + s B A) would make a second full W.
    func, tag, scale = prog.functions["main"], adapter["name"], adapter["scale"]
    ops = list(func.operations)
    convs = {op.weight.op.name: op for op in ops if op.op_type == "conv"}
    for proj, (A, B) in adapter["tensors"].items():
        conv, p = convs[mil_name(f"{proj}.weight")], mil_name(f"{tag}.{proj}")
        Bs = B.float() * scale
        fold = torch.equal(Bs.half().float(), Bs)      # the scale folded into B where exact: one op less
        with pass_scope("add_lora"), func:
            at = ops[ops.index(conv) + 1]                                   # the op after the conv
            a = mb.const(val=A.numpy()[:, :, None, None], name=f"{p}_lora_A", before_op=at)
            b = mb.const(val=(Bs.half() if fold else B).numpy()[:, :, None, None], name=f"{p}_lora_B",
                         before_op=at)
            h = mb.conv(x=conv.x, weight=a, name=f"{p}_down", before_op=at)     # (1, r, 1, S)
            if not fold:
                h = mb.mul(x=h, y=np.float16(scale), name=f"{p}_scale", before_op=at)
            d = mb.conv(x=h, weight=b, name=f"{p}_up", before_op=at)            # (1, out, 1, S)
            y = mb.add(x=conv.outputs[0], y=d, name=f"{p}_sum", before_op=at)
            func.replace_uses_of_var_after_op(anchor_op=y.op, old_var=conv.outputs[0], new_var=y)


def save_program(prog, path: str) -> None:
    """MIL program -> one-function .mlpackage, its text compacted: one const per small value, short names."""
    # For a small model the op list, which every adapter function repeats, is much of the package; the
    # converter emits a const for every parameter of every op (strides, axes, ...), mostly the same few.
    func, first = prog.functions["main"], {}

    def ours(op):                                                     # named by put_weights or add_lora
        return op.op_type.startswith("constexpr_") or op.name.endswith(("_weight", "_lora_A", "_lora_B"))
    for op in list(func.operations):
        v = op.outputs[0]
        if op.op_type != "const" or ours(op) or v.val is None or np.size(v.val) > 256 or v in func.outputs \
                or any(c.op_type.startswith("constexpr_") for c in v.child_ops):
            continue
        key = (v.dtype, np.shape(v.val), np.asarray(v.val).tobytes())
        if first.setdefault(key, v) is not v:
            func.replace_uses_of_var_after_op(anchor_op=None, old_var=v, new_var=first[key])
            func.remove_ops([op])
    # a, b, ..., z, aa, ab, ...; inputs, outputs, states, our weights and the MIL text format's words are kept
    words = set("any bool program func tensor list dict tuple true false string state".split())
    keep = set(func.inputs) | {v.name for v in func.outputs} | words
    letters = (map("".join, itertools.product(string.ascii_lowercase, repeat=k)) for k in itertools.count(1))
    names = (n for n in itertools.chain.from_iterable(letters) if n not in keep)
    for op in (op for op in func.operations if not ours(op)):
        for v in op.outputs:
            v.name = v.name if v.name in keep else next(names)
        op.name = op.outputs[0].name
    with quiet():   # no further passes: the program is final
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
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dst)), prefix=".old-",
                                     ignore_cleanup_errors=True) as old:
        os.rename(dst, os.path.join(old, "previous"))
        try:
            os.rename(src, dst)
        except BaseException:
            os.rename(os.path.join(old, "previous"), dst)
            raise


# -- The export and its command line -------------------------------------------------------------------------

def export(a: argparse.Namespace) -> dict:
    """Write OUT_DIR/afm.mlpackage and OUT_DIR/export.json as the parsed arguments say; returns the report."""
    t0 = t = time.time()
    ckpt = a.ckpt or os.path.join(a.out_dir, "palettized.pt")
    model, compression, tokenizer = load_base(ckpt)
    cfg = model.config
    context = a.context or cfg.max_seq_len
    prefill_len = a.prefill_len or min(64, context // 2)
    if not 1 <= prefill_len <= context <= cfg.max_seq_len:
        raise ExportError(f"--prefill-len {prefill_len}, --context {context}: need 1 <= prefill length <= "
                          f"context <= the model's max_seq_len {cfg.max_seq_len}")
    files = sorted(glob.glob(os.path.join(a.out_dir, "adapter_*.pt"))) if a.adapters is None else a.adapters
    adapter_list = [read_adapter(p, model) for p in files]
    by_name = {ad["name"]: ad for ad in adapter_list}
    if len(by_name) < len(adapter_list):
        names = [ad["name"] for ad in adapter_list]
        raise ExportError(f"two adapters are both named {max(names, key=names.count)!r}")
    weights, emb = projection_weights(model), embedding_weights(model)
    ane = AneTransformer(cfg, context).eval()         # the Neural Engine twin; `.weight` decoded
    ane.load_state_dict({key: operator.attrgetter(key)(model) for key in ane.state_dict()})
    bits = [w["bits"] for w in weights.values()]
    print(f"base: {ckpt} ({cfg.name}, {compression}, {len(bits) - bits.count(16)}/{len(bits)} projections "
          f"palettized, {len(by_name)} adapter(s)); prefill {prefill_len} tokens, context {context}")
    stage_s, t = {"load": time.time() - t}, time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    dst = os.path.join(a.out_dir, "afm.mlpackage")
    fnames = ["prefill", "decode", *(f"{m}_{n}" for n in by_name for m in ("prefill", "decode"))]
    with tempfile.TemporaryDirectory(prefix=".tmp-export-", dir=a.out_dir,
                                     ignore_cleanup_errors=True) as work:
        paths = {f: os.path.join(work, f"{f}.mlpackage") for f in fnames}     # function -> its own package
        for fname in tqdm(fnames, desc="export", unit="function"):
            mode, adapter, name = fname.partition("_")
            if adapter:                                   # an adapter, on a fresh copy of its base function
                prog = read_package(paths[mode])
                add_lora(prog, by_name[name])
            else:
                prog = mil_program(ane, mode, prefill_len)
                put_weights(prog, weights, emb)
            save_program(prog, paths[fname])
            if fname == "decode":
                stage_s["convert"], t = time.time() - t, time.time()
        stage_s["adapters"], t = time.time() - t, time.time()
        save_package(paths, os.path.join(work, "afm.mlpackage"))
        replace_path(os.path.join(work, "afm.mlpackage"), dst)     # kept from here on, even if unverified
        stage_s["save"] = time.time() - t
    report = {"ckpt": ckpt, "config": cfg.name, "compression": compression, "prefill_len": prefill_len,
              "context": context, "functions": fnames,
              "states": {n: list(ane.k_cache.shape) for n in ("k_cache", "v_cache")},
              "bits": {str(b): bits.count(b) for b in sorted(set(bits))},
              **package_report(dst, model, weights, emb, adapter_list, prefill_len, context, tokenizer,
                               verify=not a.no_verify, stage_s=stage_s)}
    stage_s["total"] = time.time() - t0
    report.update(seconds=round(stage_s["total"], 2),
                  stage_seconds={k: round(x, 2) for k, x in stage_s.items()})
    save_json(os.path.join(a.out_dir, "export.json"), report)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; --help gives every default."""
    ap = argparse.ArgumentParser(description="Export the palettized model and its adapters to one Core ML "
                                 "package for the Neural Engine, and verify it.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out-dir", default="out", help="where the package and export.json go, inputs come from")
    ap.add_argument("--ckpt", help="palettized (or float, for fp16) checkpoint; None: OUT_DIR/palettized.pt")
    ap.add_argument("--adapters", nargs="*", help="adapter files, none if empty; None: OUT_DIR/adapter_*.pt")
    ap.add_argument("--prefill-len", type=int, help="prompt length of prefill; None: 64, or half the context")
    ap.add_argument("--context", type=int, help="KV-cache length; None: the model's max_seq_len")
    ap.add_argument("--no-verify", action="store_true", help="skip the checks, still count the bytes")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """Export, print a summary and return the report; or exit with a one-line error."""
    a = parse_args(argv)
    try:
        r = export(a)
    except (ExportError, CheckpointError, AdapterError) as e:
        raise SystemExit(f"error: {e}") from None
    pkg = os.path.join(a.out_dir, "afm.mlpackage")
    print(f"wrote {pkg}: {r['package_bytes']:,} bytes = {r['package_over_ideal']:.3f} x ideal (floor "
          f"{r['floor_over_ideal']:.3f} x: weights + declarations); functions {', '.join(r['functions'])}")
    for name, ad in r["adapters"].items():
        print(f"  adapter {name} adds {ad['added_bytes']:,} bytes = {ad['added_over_fp16']:.3f} x its fp16 "
              f"bytes (floor {ad['floor_over_fp16']:.3f} x)")
    if "verify_error" in r:
        raise SystemExit(f"error: {r['verify_error']} -- the package is kept, unverified: {pkg}")
    if r["verified"]:
        print(f"verified: LUTs exact {r['lut_exact']}; max |logit diff| {r['max_abs_logit_diff']:.4f} <= "
              f"{r['logit_tolerance']:.4f}; argmax agreement {r['argmax_agreement']:.1%} over "
              f"{r['argmax_judged']} of {r['compared_logits']} positions; predict(): {r['predict']}")
    print(f"{'' if r['verified'] else 'not verified (--no-verify); '}{r['seconds']:.1f} s; "
          f"report in {os.path.join(a.out_dir, 'export.json')}")
    return r


if __name__ == "__main__":
    main()
