"""
verify_ane.py -- checks the Core ML package that export_ane.py writes, without a Mac, and counts its bytes.

Backs section 5 (on-device optimization) of Gunter et al. 2024 (arXiv 2407.21075): palettize.py's LUTs and
indices are in the package bit for bit (check_weights); each function computes what the PyTorch model
computes, run op by op in numpy (NumpyProgram), on macOS by Core ML too (compare_logits); an adapter costs
~its fp16 bytes.

Run: `python export_ane.py` calls package_report() (`--no-verify`: the bytes only); tests: `python -m pytest
-q tests/test_verify_ane.py`.
"""
import contextlib
import io
import logging
import os
import platform
import re
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from data import DataError, encode, load_text
from lora import load_adapter, remove_adapters

TOLERANCE = 0.02   # x the largest |logit|: fp16 keeps 11 bits; dozens of layers of rounding stay within ~1%


@contextlib.contextmanager
def quiet():
    """Silence coremltools' notices, warnings and progress bars (our stages report progress instead)."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


with quiet():   # at import: "torch 2.13 is untested", "libcoremlpython is missing": both harmless here
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as _load_mil_proto
    from coremltools.converters.mil.mil import types as mil_types
logging.getLogger("coremltools").setLevel(logging.ERROR)


class VerifyError(Exception):
    """The package cannot be checked (an op without numpy semantics); the message is one line."""


def mil_name(name: str) -> str:
    """The name Core ML keeps for an op: "layers.0.attn.q_proj.weight" -> "layers_0_attn_q_proj_weight"."""
    return re.sub(r"\W", "_", name)


def _data(pkg_path: str, *parts) -> str:
    return os.path.join(pkg_path, "Data", "com.apple.CoreML", *parts)


def read_package(path: str):
    """The saved .mlpackage as a MIL program with all its functions (no Core ML runtime needed)."""
    with quiet():
        spec = ct.utils.load_spec(path)
        return _load_mil_proto(spec, spec.specificationVersion, _data(path, "weights"))


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)                 # bit for bit, shape and dtype included
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def check_weights(prog, weights: dict, emb: dict) -> dict:
    """Every function's LUTs, indices, fp16 weights and embedding against ours, bit for bit."""
    lut_layers, problems = set(), []
    for fname, func in prog.functions.items():
        held = {}
        for op in func.operations:
            held.setdefault(op.name, []).append(op)
        for name, w in [*weights.items(), ("tok_emb", emb)]:
            ops = held.get(mil_name(f"{name}.weight"), [])
            op, kind = (ops[0], ops[0].op_type) if len(ops) == 1 else (None, f"{len(ops)} ops")
            if w.get("lut") is not None:      # the LUT as put_weights shapes it; the indices as uint{bits}
                lut = w["lut"].numpy()
                ok = kind == "constexpr_lut_to_dense" \
                    and _same(op.lut.val, lut.reshape(-1, 1, 1, 1, lut.shape[1], 1)) \
                    and mil_types.builtin_to_string(op.indices.dtype) == f"uint{w['bits']}" \
                    and _same(np.asarray(op.indices.val, np.uint8), w["indices"].numpy()[:, :, None, None])
                lut_layers.update([name] if ok else [])
            elif w.get("int8") is not None:
                ok = kind == "constexpr_blockwise_shift_scale" and _same(op.scale.val, w["scale"].numpy()) \
                    and _same(op.data.val.astype(np.int8), w["int8"].numpy())
            else:
                dense = w["dense"].numpy()
                ok = kind == "const" and _same(op.outputs[0].val.reshape(dense.shape), dense)
            if ok and name == "tok_emb":      # one constant for the token lookup and the tied head
                ok = {"gather", "linear"} <= {c.op_type for c in op.outputs[0].child_ops}
            if not ok:
                problems.append(f"{fname}: {name}.weight ({kind}) is not ours bit for bit, or not shared")
    n_lut = sum(w["lut"] is not None for w in weights.values())
    return {"lut_exact": (not problems and len(lut_layers) == n_lut) if n_lut else None,
            "lut_layers": len(lut_layers), "problems": problems}


# ----------------------------------------------------------------------------------------------------------
# One function of the program, run in numpy; against PyTorch

def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class NumpyProgram:
    """One function of a MIL program, run op by op in numpy: program(inputs, states) -> outputs."""
    # Each op's own value_inference() (coremltools' numpy semantics), plus conv / matmul / linear / silu and
    # the state ops, which have none. Every op reads fp16 values, computes in fp32 and rounds to the declared
    # fp16: fp16 storage, wider accumulation, as on the Neural Engine (its rounding is not reproduced).

    def __init__(self, func):
        self.func, self.consts = func, {}
        for op in func.operations:             # constants and decompressed constexpr weights, once
            if op.op_type == "const":
                val = op.outputs[0].val
                self.consts[op.outputs[0].name] = bool(val) if isinstance(val, np.bool_) else val
            elif op.op_type.startswith("constexpr_"):
                self.consts[op.outputs[0].name] = op.materialized_val_inference()

    @staticmethod
    def own_op_value(op, v) -> np.ndarray:
        """conv (1x1), matmul, linear or silu, which have no value_inference(); v(var) -> its array."""
        t, x = op.op_type, _f32(v(op.x))
        if t == "silu":
            return x * 0.5 * (1 + np.tanh(x / 2))
        if t == "matmul":
            x, y = [a.swapaxes(-1, -2) if flag.val else a for a, flag in
                    ((x, op.transpose_x), (_f32(v(op.y)), op.transpose_y))]
            return x @ y
        w, bias = _f32(v(op.weight)), _f32(0 if op.bias is None else op.bias.val)
        if t == "linear":
            return x @ w.T + bias
        if w.shape[2:] != (1, 1) or np.any(getattr(op.groups, "val", 1) != 1) \
                or np.any(getattr(op.strides, "val", 1) != 1):
            raise VerifyError(f"numpy run: conv {op.name} is not a plain 1x1 convolution")
        return np.einsum("oi,bihw->bohw", w[:, :, 0, 0], x) + bias.reshape(1, -1, 1, 1)

    def __call__(self, inputs: dict, states: dict) -> dict:
        """The function's outputs {name: array}; `states` ({name: array}) are read and updated in place."""
        env = dict(self.consts)
        cast = lambda var, val: np.asarray(val).astype(mil_types.nptype_from_builtin(var.dtype))  # noqa: E731
        env.update((n, cast(var, inputs[n])) for n, var in self.func.inputs.items() if n in inputs)
        for op in self.func.operations:
            t = op.op_type
            if t == "const" or t.startswith("constexpr_"):
                continue
            if t == "read_state":
                out = states[op.input.name].copy()
            elif t == "coreml_update_state":
                states[op.state.name] = out = env[op.value.name].copy()
            elif t in ("conv", "matmul", "linear", "silu"):
                out = self.own_op_value(op, lambda var: env[var.name])
            else:
                bound = [(var, var._sym_val) for var in op.get_flattened_inputs()]   # restored below
                for var, _ in bound:
                    val = env[var.name]
                    var._sym_val = SimpleNamespace(val=_f32(val) if getattr(val, "dtype", 0) == np.float16
                                                   else val)
                try:
                    out = op.value_inference()
                finally:
                    for var, old in bound:
                        var._sym_val = old
                if out is None:
                    raise VerifyError(f"numpy run: no numpy semantics for op {t} ({op.name})")
            env.update((var.name, cast(var, val)) for var, val in
                       zip(op.outputs, out if len(op.outputs) > 1 else (out,)))
        return {var.name: env[var.name] for var in self.func.outputs}


def verify_text(vocab_size: int, n: int, tokenizer=None) -> torch.Tensor:
    """n tokens (the tokenizer's, else bytes) of real text: the Bible, or Python's docs without it."""
    try:
        text = load_text("bible")
    except DataError:
        text = load_text("pydoc")
    return encode(text[len(text) // 3:len(text) // 3 + 16 * n], tokenizer)[:n].long() % vocab_size


def compare_logits(runs, model, tokens, prefill_len: int, lengths, steps: int, bar=None) -> list[tuple]:
    """Per position: (max |logit diff|, same argmax, PyTorch's top-2 margin, max |logit|) of runs vs model."""
    # runs: (run_prefill, run_decode, new_states, adapter) per function pair; run(inputs, states)["logits"].
    # For each prompt length L: prefill tokens[:L] (zero-padded), then `steps` decode steps fed the next true
    # tokens; the PyTorch model, with the adapter file attached, runs the whole sequence at once.
    rows = []
    for run_pre, run_dec, new_states, adapter in runs:
        if adapter is not None:
            load_adapter(adapter["path"], model)
        try:
            for L in lengths:
                states, padded = new_states(), np.zeros((1, prefill_len), np.int32)
                padded[0, :L] = tokens[:L].numpy()
                got = [run_pre({"tokens": padded, "length": np.array([L], np.int32)}, states)["logits"]]
                for pos in range(L, L + steps):
                    got.append(run_dec({"token": np.array([[int(tokens[pos])]], np.int32),
                                        "pos": np.array([pos], np.int32)}, states)["logits"])
                    if bar is not None:
                        bar.update(1)
                with torch.no_grad():                           # logits at L-1 .. L-1+steps
                    want = model(tokens[None, :L + steps])[0, L - 1:]
                for g, w in zip(got, want):
                    g, w = _f32(g).reshape(-1), w.reshape(-1).float().numpy()
                    second, first = np.partition(w, -2)[-2:]
                    rows.append((float(np.abs(g - w).max()), bool(g.argmax() == w.argmax()),
                                 float(first - second), float(np.abs(w).max())))
        finally:
            remove_adapters(model)
    return rows


def logit_verdict(rows) -> dict:
    """export.json's logit figures from compare_logits' rows, with "verify_error" when they fail."""
    # The argmax is judged only where PyTorch's top-2 margin exceeds the tolerance: a near-tie may flip under
    # fp16 rounding without anything being wrong.
    diffs, agrees, margins, refs = zip(*rows)
    tol = TOLERANCE * max(1.0, *refs)
    judged = [a for a, m in zip(agrees, margins) if m > tol]
    agreement = sum(judged) / len(judged) if judged else 1.0   # nothing to judge: nothing disagreed
    r = {"max_abs_logit_diff": max(diffs), "logit_tolerance": tol, "max_abs_logit": max(refs),
         "argmax_agreement": agreement, "argmax_judged": len(judged), "argmax_margin_threshold": tol,
         "compared_logits": len(rows)}
    if r["max_abs_logit_diff"] > tol or agreement < 0.99:
        r["verify_error"] = (f"verification: numpy run of the package differs from PyTorch (max |logit diff| "
                             f"{max(diffs):.4f}, tolerance {tol:.4f}; argmax agreement {agreement:.1%} over "
                             f"{len(judged)} of {len(rows)} positions, those with top-2 margin > {tol:.4f})")
    return r


def logit_report(pkg, pkg_path: str, model, adapter_list, prefill_len: int, context: int,
                 tokenizer=None) -> dict:
    """Every prefill/decode pair run in numpy against PyTorch (logit_verdict), and by Core ML on macOS."""
    steps = max(0, min(8, context - prefill_len))
    lengths = sorted({prefill_len, max(1, prefill_len // 2 + 1), max(1, prefill_len // 4)})
    tokens = verify_text(model.config.vocab_size, prefill_len + steps, tokenizer)
    pairs = [("prefill", "decode", None)] + [(f"prefill_{a['name']}", f"decode_{a['name']}", a)
                                              for a in adapter_list]
    shape = tuple(pkg.functions["prefill"].inputs["k_cache"].shape)
    new_states = lambda: {n: np.zeros(shape, np.float16) for n in ("k_cache", "v_cache")}  # noqa: E731
    with tqdm(total=len(pairs) * len(lengths) * steps, desc="verify (numpy vs PyTorch)", unit="step") as bar:
        runs = ((NumpyProgram(pkg.functions[pre]), NumpyProgram(pkg.functions[dec]), new_states, ad)
                for pre, dec, ad in pairs)
        r = logit_verdict(compare_logits(runs, model, tokens, prefill_len, lengths, steps, bar))
    if platform.system() != "Darwin":
        return {**r, "predict": "skipped (Core ML predict() needs macOS; the numpy run stands in for it)"}

    def coreml_runs():                          # Core ML's own predict(), one prompt per function pair
        for pre, dec, ad in pairs:
            mp, md = (ct.models.MLModel(pkg_path, function_name=f, compute_units=ct.ComputeUnit.CPU_AND_NE)
                      for f in (pre, dec))
            yield lambda i, s: mp.predict(i, state=s), lambda i, s: md.predict(i, state=s), mp.make_state, ad
    try:
        rows = compare_logits(coreml_runs(), model, tokens, prefill_len, [max(1, prefill_len // 2)], 4)
        return {**r, "predict": "ok", "predict_max_abs_logit_diff": max(row[0] for row in rows),
                "predict_argmax_agreement": sum(row[1] for row in rows) / len(rows)}
    except Exception as e:
        return {**r, "predict": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}


# ----------------------------------------------------------------------------------------------------------
# Bytes

def dir_bytes(path: str) -> int:
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def ideal_bytes(model, weights: dict, emb: dict) -> int:
    """Bytes of the base as palettize.py stores it: packed indices, LUTs, int8 embedding + scales, norms."""
    n = sum((w["indices"].numel() * w["bits"] + 7) // 8 + 2 * w["lut"].numel() if w["lut"] is not None
            else 2 * w["dense"].numel() for w in weights.values())
    n += 2 * emb["dense"].numel() if emb["int8"] is None else emb["int8"].numel() + 2 * emb["scale"].numel()
    return n + sum(2 * v.numel() for k, v in model.state_dict().items() if k.endswith("norm.weight"))


def function_bytes(spec, path: str, fnames) -> tuple[int, int, int]:
    """(program bytes, bytes of the weight blobs only they use, weight-declaring op bytes) of `fnames`."""
    # A blob is a 64-byte header + its data, 64-aligned. Weight-declaring ops (constexpr ops, blob-backed
    # consts) are a floor: every function must declare the weights it reads.
    blobs, decl = {}, {}
    for name, f in spec.mlProgram.functions.items():
        blobs[name], decl[name] = set(), 0
        for op in (op for block in f.block_specializations.values() for op in block.operations):
            vals = [*op.attributes.values(), *(b.value for arg in op.inputs.values() for b in arg.arguments)]
            backed = [val.blobFileValue.offset for val in vals if val.HasField("blobFileValue")]
            blobs[name].update(backed)
            decl[name] += op.ByteSize() if backed or op.type.startswith("constexpr_") else 0
    mine = set().union(*(blobs[f] for f in fnames))
    mine -= set().union(*(b for f, b in blobs.items() if f not in fnames))
    program = sum(spec.mlProgram.functions[f].ByteSize() for f in fnames)
    program += sum(d.ByteSize() for d in spec.description.functions if d.name in fnames)
    weights = 0
    with open(_data(path, "weights", "weight.bin"), "rb") as fh:
        for off in mine:
            fh.seek(off + 8)                                        # the blob's data size, after its header
            weights += 64 + (int.from_bytes(fh.read(8), "little") + 63) // 64 * 64
    return program, weights, sum(decl[f] for f in fnames)


def bytes_report(pkg_path: str, model, weights: dict, emb: dict, adapter_list) -> dict:
    """Package bytes against the ideal (palettize.py's + adapters in fp16) and the floor; adapters' bytes."""
    r = {"package_bytes": dir_bytes(pkg_path), "weight_bytes": dir_bytes(_data(pkg_path, "weights")),
         "program_bytes": os.path.getsize(_data(pkg_path, "model.mlmodel")), "adapters": {}}
    r["other_bytes"] = r["package_bytes"] - r["weight_bytes"] - r["program_bytes"]
    ideal, spec = ideal_bytes(model, weights, emb), ct.utils.load_spec(pkg_path)
    for ad in adapter_list:
        fp16 = sum(2 * (A.numel() + B.numel()) for A, B in ad["tensors"].values())
        prog, blob, decl = function_bytes(spec, pkg_path, [f"prefill_{ad['name']}", f"decode_{ad['name']}"])
        r["adapters"][ad["name"]] = {
            "path": ad["path"], "fp16_bytes": fp16, "added_bytes": prog + blob,
            "added_over_fp16": round((prog + blob) / fp16, 4), "added_weight_bytes": blob,
            "added_program_bytes": prog, "added_floor_bytes": blob + decl,
            "floor_over_fp16": round((blob + decl) / fp16, 4)}
        ideal += fp16
    # A function cannot read another's weight declarations: when the floor is above 1.03 x ideal, as on `tiny`
    # with 8 functions, no rewrite of the compute ops can meet that bound.
    decl = function_bytes(spec, pkg_path, [f.name for f in spec.description.functions])[2]
    return {**r, "ideal_bytes": ideal, "package_over_ideal": round(r["package_bytes"] / ideal, 4),
            "weights_over_ideal": round(r["weight_bytes"] / ideal, 4), "weight_declaration_bytes": decl,
            "floor_bytes": r["weight_bytes"] + decl,
            "floor_over_ideal": round((r["weight_bytes"] + decl) / ideal, 4)}


def package_report(pkg_path: str, model, weights: dict, emb: dict, adapter_list, prefill_len: int,
                   context: int, tokenizer=None, verify: bool = True, stage_s: dict | None = None) -> dict:
    """The export's entry point: bytes_report, then (verify) check_weights and logit_report; stages timed."""
    r, stage_s = bytes_report(pkg_path, model, weights, emb, adapter_list), {} if stage_s is None else stage_s
    if not verify:
        return {**r, "verified": False, "lut_exact": None, "lut_layers": None, "max_abs_logit_diff": None,
                "argmax_agreement": None, "predict": "skipped (--no-verify)"}
    t = time.time()
    pkg = read_package(pkg_path)
    check = check_weights(pkg, weights, emb)
    r.update(lut_exact=check["lut_exact"], lut_layers=check["lut_layers"])
    stage_s["verify_weights"], t = time.time() - t, time.time()
    if check["problems"]:
        return {**r, "verified": False,
                "verify_error": f"verification: {check['problems'][0]} ({len(check['problems'])} problem(s))"}
    try:
        r.update(logit_report(pkg, pkg_path, model, adapter_list, prefill_len, context, tokenizer))
    except VerifyError as e:
        r["verify_error"] = str(e)
    stage_s["verify_numpy"] = time.time() - t
    return {**r, "verified": "verify_error" not in r}
