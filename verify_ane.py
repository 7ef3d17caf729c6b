"""
verify_ane.py -- checks the Core ML package that export_ane.py writes, without a Mac, and counts its bytes.

Backs section 5 (on-device optimization) of Gunter et al. 2024 (arXiv 2407.21075): palettize.py's LUTs and
indices are in the package bit for bit (check_weights); each function computes what the PyTorch model does,
run op by op in numpy (NumpyProgram) and on macOS by Core ML too; an adapter costs ~its fp16 bytes.

Run: `python export_ane.py` calls package_report() (`--no-verify`: the bytes only).
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
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(action="ignore"):
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


def check_weights(prog, weights: dict, emb: dict) -> dict:
    """Every function's LUTs, indices, fp16 weights and embedding against ours, bit for bit."""
    def same(a, b):                                                   # bit for bit, shape and dtype included
        return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    lut_layers, problems = set(), []
    for fname, func in prog.functions.items():
        ops = {op.name: op for op in func.operations}
        for name, w in [*weights.items(), ("tok_emb", emb)]:
            op = ops.get(mil_name(f"{name}.weight"))
            kind = "0 ops" if op is None else op.op_type
            if w.get("lut") is not None:      # the LUT as put_weights shapes it; the indices as uint{bits}
                ok = kind == "constexpr_lut_to_dense" \
                    and same(op.lut.val, w["lut"].numpy()[:, None, None, None, :, None]) \
                    and mil_types.builtin_to_string(op.indices.dtype) == f"uint{w['bits']}" \
                    and same(np.asarray(op.indices.val, np.uint8), w["indices"].numpy()[:, :, None, None])
                lut_layers.update([name] if ok else [])
            elif w.get("int8") is not None:
                ok = kind == "constexpr_blockwise_shift_scale" and same(op.scale.val, w["scale"].numpy()) \
                    and same(op.data.val.astype(np.int8), w["int8"].numpy())
            else:
                ok = kind == "const" and same(op.val.val.reshape(w["dense"].shape), w["dense"].numpy())
            if ok and name == "tok_emb":      # one constant for the token lookup and the tied head
                ok = {"gather", "linear"} <= {c.op_type for c in op.outputs[0].child_ops}
            if not ok:
                problems.append(f"{fname}: {name}.weight ({kind}) is not ours bit for bit, or not shared")
    exact = not problems if any(w["lut"] is not None for w in weights.values()) else None
    return {"lut_exact": exact, "lut_layers": len(lut_layers), "problems": problems}


# -- One function of the program, run in numpy; against PyTorch ----------------------------------------------

class NumpyProgram:
    """One function of a MIL program, run op by op in numpy: program(inputs, states) -> outputs."""
    # Each op's own value_inference() (coremltools' numpy semantics), plus conv, silu and the state ops, which
    # have none. Every op reads fp16 values, computes in fp32 and rounds to the declared fp16: fp16 storage,
    # wider accumulation, as on the Neural Engine (its rounding is not reproduced).

    def __init__(self, func):
        self.func, self.consts = func, {}
        for op in func.operations:             # constants and decompressed constexpr weights, once
            if op.op_type == "const":
                val = op.outputs[0].val
                self.consts[op.outputs[0].name] = bool(val) if isinstance(val, np.bool_) else val
            elif op.op_type.startswith("constexpr_"):
                self.consts[op.outputs[0].name] = op.materialized_val_inference()

    def __call__(self, inputs: dict, states: dict) -> dict:
        """The function's outputs {name: array}; `states` ({name: array}) are read and updated in place."""
        env = dict(self.consts)
        cast = lambda var, val: np.asarray(val).astype(mil_types.nptype_from_builtin(var.dtype))  # noqa: E731
        f32 = lambda var: np.asarray(0 if var is None else env[var.name], np.float32)  # noqa: E731
        env.update((n, cast(var, inputs[n])) for n, var in self.func.inputs.items() if n in inputs)
        for op in self.func.operations:
            t = op.op_type
            if t == "const" or t.startswith("constexpr_"):
                continue
            if t == "read_state":
                out = states[op.input.name].copy()
            elif t == "coreml_update_state":
                states[op.state.name] = out = env[op.value.name].copy()
            elif t == "silu":                        # x * sigmoid(x)
                out = f32(op.x) * 0.5 * (1 + np.tanh(f32(op.x) / 2))
            elif t == "conv":                        # 1x1 only: squeeze((2, 3)) fails on a larger kernel
                w = f32(op.weight).squeeze((2, 3))                                  # (out, in)
                out = np.einsum("oi,bihw->bohw", w, f32(op.x)) + f32(op.bias).reshape(1, -1, 1, 1)
            else:
                bound = [(var, var._sym_val) for var in op.get_flattened_inputs()]   # restored below
                for var, _ in bound:                             # fp16 values are read in fp32
                    fp16 = getattr(env[var.name], "dtype", 0) == np.float16
                    var._sym_val = SimpleNamespace(val=f32(var) if fp16 else env[var.name])
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


def compare_logits(load, model, adapter_list, tokens, prefill_len: int, lengths, steps: int, bar) -> list:
    """Per position: (max |logit diff|, same argmax, PyTorch's top-2 margin, max |logit|) vs the model."""
    # load(function) -> (run, new_states). The base and each adapter, each prompt length L: prefill tokens[:L]
    # zero-padded, then decode the next `steps` true tokens; PyTorch, adapter attached, runs them all at once.
    rows = []
    for ad in [None, *adapter_list]:
        tag = f"_{ad['name']}" if ad else ""
        (run_pre, new_states), (run_dec, _) = load(f"prefill{tag}"), load(f"decode{tag}")
        if ad:
            load_adapter(ad["path"], model)
        try:
            for L in lengths:
                states, padded = new_states(), np.zeros((1, prefill_len), np.int32)
                padded[0, :L] = tokens[:L].numpy()
                got = [run_pre({"tokens": padded, "length": np.array([L], np.int32)}, states)["logits"]]
                for pos in range(L, L + steps):
                    got.append(run_dec({"token": np.array([[int(tokens[pos])]], np.int32),
                                        "pos": np.array([pos], np.int32)}, states)["logits"])
                    bar.update(1)
                with torch.no_grad():                           # logits at L-1 .. L-1+steps
                    want = model(tokens[None, :L + steps])[0, L - 1:]
                for g, w in zip(got, want):
                    g, w = np.asarray(g, np.float32).reshape(-1), w.reshape(-1).float().numpy()
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
    if max(diffs) > tol or agreement < 0.99:
        r["verify_error"] = (f"verification: numpy run of the package differs from PyTorch (max |logit diff| "
                             f"{max(diffs):.4f}, tolerance {tol:.4f}; argmax agreement {agreement:.1%} over "
                             f"{len(judged)} of {len(rows)} positions, those with top-2 margin > {tol:.4f})")
    return r


def logit_report(pkg, pkg_path: str, model, adapter_list, prefill_len: int, context: int, tokenizer) -> dict:
    """Every prefill/decode pair run in numpy against PyTorch (logit_verdict), and by Core ML on macOS."""
    steps = max(0, min(8, context - prefill_len))
    lengths = sorted({prefill_len, max(1, prefill_len // 2 + 1), max(1, prefill_len // 4)})
    tokens = verify_text(model.config.vocab_size, prefill_len + steps, tokenizer)
    shape = tuple(pkg.functions["prefill"].inputs["k_cache"].shape)
    new_states = lambda: {n: np.zeros(shape, np.float16) for n in ("k_cache", "v_cache")}  # noqa: E731
    with tqdm(total=(1 + len(adapter_list)) * len(lengths) * steps, desc="verify (numpy vs PyTorch)",
              unit="step") as bar:
        rows = compare_logits(lambda f: (NumpyProgram(pkg.functions[f]), new_states), model, adapter_list,
                              tokens, prefill_len, lengths, steps, bar)
    r = logit_verdict(rows)
    if platform.system() != "Darwin":
        return {**r, "predict": "skipped (Core ML predict() needs macOS; the numpy run stands in for it)"}

    def coreml(fname):                          # Core ML's own predict(); one prompt per function pair
        m = ct.models.MLModel(pkg_path, function_name=fname, compute_units=ct.ComputeUnit.CPU_AND_NE)
        return lambda inputs, states: m.predict(inputs, state=states), m.make_state
    try:
        rows = compare_logits(coreml, model, adapter_list, tokens, prefill_len, [max(1, prefill_len // 2)], 4,
                              tqdm(disable=True))
        return {**r, "predict": "ok", "predict_max_abs_logit_diff": max(row[0] for row in rows),
                "predict_argmax_agreement": sum(row[1] for row in rows) / len(rows)}
    except Exception as e:
        return {**r, "predict": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}


# -- Bytes ---------------------------------------------------------------------------------------------------

def ideal_bytes(model, weights: dict, emb: dict) -> int:
    """Bytes of the base as palettize.py stores it: packed indices, LUTs, int8 embedding + scales, norms."""
    n = sum((w["indices"].numel() * w["bits"] + 7) // 8 + 2 * w["lut"].numel() if w["lut"] is not None
            else 2 * w["dense"].numel() for w in weights.values())
    n += 2 * emb["dense"].numel() if emb["int8"] is None else emb["int8"].numel() + 2 * emb["scale"].numel()
    return n + sum(2 * v.numel() for k, v in model.state_dict().items() if k.endswith("norm.weight"))


def function_bytes(spec, path: str, fnames) -> tuple[int, int, int]:
    """(program bytes, bytes of the weight blobs only they use, weight-declaring op bytes) of `fnames`."""
    # A blob is a 64-byte header (its data size at byte 8) + its data, 64-aligned. Weight-declaring ops
    # (constexpr ops, blob-backed consts) are a floor: every function must declare the weights it reads.
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
    blob_file = np.memmap(_data(path, "weights", "weight.bin"), np.uint8, "r")   # mapped once for all blobs
    weights = sum(64 + (int(blob_file[off + 8:off + 16].view("<u8")[0]) + 63) // 64 * 64 for off in mine)
    return program, weights, sum(decl[f] for f in fnames)


def bytes_report(pkg_path: str, model, weights: dict, emb: dict, adapter_list) -> dict:
    """Package bytes against the ideal (palettize.py's + adapters in fp16) and the floor; adapters' bytes."""
    def size(path):                                                   # of all the files under `path`
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    r = {"package_bytes": size(pkg_path), "weight_bytes": size(_data(pkg_path, "weights")),
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
