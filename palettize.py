"""
palettize.py -- every projection weight becomes a lookup table per 16 output channels plus a few-bit index per
weight; 2- and 4-bit layers mix to 3.7 bits per weight as in AFM-on-device; the tied embedding goes to 8 bits.

Follows section 5 (its optimizations) of Gunter et al. 2024, "Apple Intelligence Foundation Language Models"
(arXiv 2407.21075). A group is 16 consecutive rows of a weight (out, in), as Core ML's per-grouped-channel
tables group them; its lookup table (LUT) holds 2**bits fp16 values chosen by k-means over its weights, and
a weight keeps only the index of its nearest entry; the norm gains stay float. Sections 1-5 in reading order;
`kmeans` is the plain k-means (`--kmeans plain`); by default the appendix runs the same k-means on fp16
histograms, all groups of many layers at once (2.6B weights in half a second on one GPU).

    python palettize.py                       # out/ckpt.pt -> out/palettized.pt + palettize.json, 3.7 bpw
    python palettize.py --bits 4              # uniform 4-bit
    python palettize.py --bpw 3.5 --no-sensitivity --kmeans plain    # 3.5 bpw, unweighted, plain k-means
"""
import argparse
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (DataError, corpus_from_checkpoint, evaluate, get_batch, load_splits,
                  tokenizer_from_checkpoint)
from model import Transformer, count_params
from plumbing import (CheckpointError, config_from_dict, init_distributed, load_checkpoint, load_model,
                      save_checkpoint, save_json)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = (1, 2, 3, 4, 6, 8)          # what Core ML's constexpr_lut_to_dense stores (uint1 ... uint8)


class PalettizeError(ValueError):
    """Bad input to palettization; the message is one line naming the layer."""


# -- 1. k-means for one group, and a LUT per group of 16 output channels -------------------------------------

def kmeans(values: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 100):
    """Lloyd's k-means of the values (n,): k sorted centres (k,), each value counted with its weight."""
    x = values.double().flatten()                                            # (n,)
    w = torch.ones_like(x) if weights is None else weights.double().flatten()
    c = x.sort().values[((torch.arange(k, dtype=torch.float64) + 0.5) * len(x) / k).long()]   # k quantiles
    for _ in range(iters):
        nearest = (x[:, None] - c[None, :]).abs().argmin(1)                 # (n,) each value's nearest centre
        total = torch.zeros(k, dtype=x.dtype).index_add_(0, nearest, w * x)
        count = torch.zeros(k, dtype=x.dtype).index_add_(0, nearest, w)
        new = torch.where(count > 0, total / count, c)                       # the means; empty ones stay
        if torch.equal(new, c):                                              # converged: a local optimum
            break
        c = new
    return c.sort().values


def lut_from_centres(centres: torch.Tensor) -> torch.Tensor:
    """Centres (G, K) -> fp16 LUTs (G, K), sorted and strictly increasing: a repeated value moves one fp16
    step up (down at the top of the fp16 range), so no two indices decode to the same weight."""
    lut = centres.clamp(-65504, 65504).half().sort(1).values + 0.0          # + 0.0 turns -0 into +0
    for j in range(1, lut.shape[1]):
        lut[:, j] = torch.maximum(lut[:, j], torch.nextafter(lut[:, j - 1], lut.new_tensor(math.inf)))
    lut[:, -1] = lut[:, -1].clamp_max(65504)
    for j in reversed(range(lut.shape[1] - 1)):
        lut[:, j] = torch.minimum(lut[:, j], torch.nextafter(lut[:, j + 1], lut.new_tensor(-math.inf)))
    return lut


def dequantize(lut: torch.Tensor, indices: torch.Tensor, group_size: int = 16) -> torch.Tensor:
    """LUTs (G, K) and indices (out, in) -> dense float32 weight (out, in) with exactly the LUT values."""
    return lut.float().repeat_interleave(group_size, 0).gather(1, indices.long())   # (out, K) -> (out, in)


def importance_weights(importance: torch.Tensor) -> torch.Tensor:
    """Per-group importance (G, n) -> k-means weights: scaled to a maximum of 1 per group, at least 1e-6."""
    imp = importance.detach().double()
    return (imp / imp.amax(1, keepdim=True).clamp_min(1e-300)).clamp_min(1e-6)


def palettize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 16, importance=None, plain=False):
    """w (out, in) -> (fp16 LUTs (out // group_size, 2**bits), uint8 indices (out, in)), a LUT per group_size
    rows; `importance` (like w, >= 0) weights the k-means: `kmeans` per group if plain, else the fast path."""
    if not plain:
        return palettize_weights([w], bits, group_size, [importance])[0]
    _check_weight(w, bits, group_size, "weight", importance)
    G = w.shape[0] // group_size
    x = w.detach().half().reshape(G, -1)                            # the LUT is fp16: cluster fp16 values
    imp = [None] * G if importance is None else importance_weights(importance.reshape(G, -1))
    lut = lut_from_centres(torch.stack([kmeans(x[g], 2 ** bits, imp[g]) for g in range(G)]))
    # each weight's index: the number of midpoints between entries at or below it (its nearest; a tie goes up)
    mid = ((lut.double()[:, 1:] + lut.double()[:, :-1]) / 2).repeat_interleave(group_size, 0)   # (out, K-1)
    return lut, (x.double().view(w.shape)[:, :, None] >= mid[:, None, :]).sum(2).to(torch.uint8)


def _check_weight(w: torch.Tensor, bits: int, group_size: int, name: str, importance=None):
    shape = tuple(w.shape)
    if bits not in BITS:
        raise PalettizeError(f"{name}: unsupported bits {bits} (choose from {', '.join(map(str, BITS))})")
    if group_size < 1 or shape[0] % group_size:
        raise PalettizeError(f"{name}: {shape[0]} output channels (shape {shape}) are not divisible by the "
                             f"group size {group_size}")
    if not bool(torch.isfinite(w).all()) or w.detach().abs().max() > 65504:
        raise PalettizeError(f"{name}: weight contains "
                             + ("NaN" if torch.isnan(w).any() else "Inf (or beyond the fp16 range)"))
    if importance is not None and importance.shape != w.shape:
        raise PalettizeError(f"{name}: importance shape {tuple(importance.shape)} != weight shape {shape}")
    if importance is not None and not bool((torch.isfinite(importance) & (importance >= 0)).all()):
        raise PalettizeError(f"{name}: importance must be finite and non-negative")


# -- 2. Mixed 2/4-bit: which layers go to 2 bits -------------------------------------------------------------

def bits_per_weight(shapes: dict, bits: dict, group_size: int) -> float:
    """Average bits per weight of the layers {name: (out, in)} at {name: bits}: indices plus fp16 LUTs."""
    total = sum(bits[k] * o * i + 16 * (o // group_size) * 2 ** bits[k] for k, (o, i) in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def allocate_bits(shapes: dict, cost: dict, target: float, group_size: int = 16, low: int = 2, high: int = 4,
                  tol: float = 0.015) -> dict:
    """{name: low or high bits} with bits_per_weight within `tol` of `target` at the least total `cost`
    (cost[name]: the price of that layer at low bits, e.g. its loss rise): an exact 0/1 knapsack, by DP."""
    names, n = list(shapes), sum(a * b for a, b in shapes.values())
    hi, lo = (bits_per_weight(shapes, dict.fromkeys(names, b), group_size) for b in (high, low))
    if not lo - tol <= target <= hi + tol:
        raise PalettizeError(f"--bpw {target}: {low}/{high}-bit layers reach only {lo:.3f} .. {hi:.3f} bits "
                             f"per weight with group size {group_size}")
    step = 0.004 / len(names) * n                                     # DP resolution, in bits
    save = [round(((high - low) * o * i + 16 * (o // group_size) * (2 ** high - 2 ** low)) / step)
            for o, i in shapes.values()]                              # the bits each layer saves at low
    S = sum(save)
    best = torch.tensor([0.0] + [math.inf] * S, dtype=torch.float64)   # best[s]: least cost of saving s steps
    took = torch.zeros(len(names), S + 1, dtype=torch.bool)
    for i, (k, s) in enumerate(zip(names, save)):
        cand = torch.cat([best.new_full((s,), math.inf), best[:S + 1 - s] + max(float(cost[k]), 0.0)])
        took[i] = cand < best
        best = torch.minimum(best, cand)
    ok = (torch.arange(S + 1, dtype=torch.float64) - (hi - target) * n / step).abs() <= tol * n / step
    if not bool((ok & best.isfinite()).any()):
        raise PalettizeError(f"--bpw {target}: no mix of {low}- and {high}-bit layers lands within {tol}")
    s, bits = int(torch.where(ok, best, math.inf).argmin()), {}
    for i in reversed(range(len(names))):                             # walk the choices back
        if took[i, s]:
            bits[names[i]], s = low, s - save[i]
    return {k: bits.get(k, high) for k in names}


# -- 3. Sensitivity: the diagonal Fisher information weights the k-means and prices each layer's 2-bit move --

def calibration_loss(model: nn.Module, batches) -> torch.Tensor:
    """Mean next-token cross entropy over the batches (a tensor, so that it can be differentiated)."""
    return sum(F.cross_entropy(model(x).float().flatten(0, 1), y.ravel()) for x, y in batches) / len(batches)


def fisher_information(model: nn.Module, batches, names) -> dict:
    """{name: float32 tensor like the weight}: squared gradients of the loss, summed over the batches."""
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in zip(names, weights)}
    for x, y in batches:
        for n, g in zip(names, torch.autograd.grad(calibration_loss(model, [(x, y)]), weights)):
            fisher[n] += g.float() ** 2
    for n, p in model.named_parameters():
        p.requires_grad_(was[n])
    return fisher


@torch.no_grad()
def loss_rise(model: nn.Module, names, bits: int, group_size: int, importance: dict | None, fisher=None,
              batches=None) -> dict:
    """{name: the rise of the loss when that layer alone is palettized to `bits`}: with `fisher` the estimate
    1/2 sum F (w_hat - w)^2 from the Fisher information F, else measured on the calibration `batches`."""
    ws = [model.get_submodule(n).weight for n in names]
    res = palettize_weights(ws, bits, group_size, importance and [importance[n] for n in names], names)
    if fisher is not None:
        return {n: 0.5 * (fisher[n] * (dequantize(lut, idx, group_size) - w.float()) ** 2).sum().item()
                for n, w, (lut, idx) in zip(names, ws, res)}
    base, rise = calibration_loss(model, batches).item(), {}
    for n, w, (lut, idx) in tqdm(list(zip(names, ws, res)), desc=f"loss rise at {bits} bits", unit="layer"):
        keep, w.data = w.data, dequantize(lut, idx, group_size).to(w.dtype)
        rise[n] = calibration_loss(model, batches).item() - base
        w.data = keep
    return rise


# -- 4. A whole model: PalettizedLinear in place of every projection, the int8 embedding, the checkpoint -----

class PalettizedLinear(nn.Module):
    """Frozen stand-in for nn.Linear (no bias): weight = lut[row // group_size][indices]."""

    def __init__(self, lut: torch.Tensor, indices: torch.Tensor, bits: int, group_size: int = 16):
        super().__init__()
        self.register_buffer("lut", lut.half())                       # (out // group_size, 2**bits)
        self.register_buffer("indices", indices.to(torch.uint8))      # (out, in)
        self.bits, self.group_size = int(bits), int(group_size)
        self.out_features, self.in_features = indices.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dense float32 weight (out, in) the LUT and indices decode to."""
        return dequantize(self.lut, self.indices, self.group_size)

    def forward(self, x):                                             # (..., in) -> (..., out)
        return F.linear(x, self.weight.to(x.dtype))


def projection_names(model: nn.Module) -> list[str]:
    """Names of the projection modules (float or palettized), in model order."""
    return [n for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, (nn.Linear, PalettizedLinear))]


def quantize_embedding(w: torch.Tensor):
    """Symmetric 8-bit quantization per row: w ~= q * scale, q int8 in [-127, 127], scale fp16 (V, 1)."""
    amax = w.detach().float().abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, 1.0).half().clamp_min(2 ** -24)     # no fp16 underflow to 0
    return (w.detach().float() / scale.float()).round().clamp(-127, 127).to(torch.int8), scale


def set_embedding(model: nn.Module, q: torch.Tensor, scale: torch.Tensor):
    """Make tok_emb carry the int8 embedding: buffers weight_int8, weight_scale; weight = their product."""
    e = model.tok_emb
    e.register_buffer("weight_int8", q.to(e.weight.device))
    e.register_buffer("weight_scale", scale.to(e.weight.device))
    e.weight.data = e.weight_int8.float() * e.weight_scale.float()
    e.weight.requires_grad_(False)


@torch.no_grad()
def palettize_model(model: nn.Module, bits, group_size: int = 16, importance: dict | None = None,
                    progress: bool = False, plain: bool = False) -> list[dict]:
    """Palettize every float projection in place (bits: int or {layer: bits}; importance: {layer: tensor like
    the weight}) after checking all, and the embedding to 8 bits. Returns [{name, bits, mse, rel_mse}]."""
    importance = importance or {}
    layers = {n: model.get_submodule(n) for n in projection_names(model)}
    layers = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}      # the float ones, not yet done
    bits_of = {n: bits if isinstance(bits, int) else bits.get(n) for n in layers}
    for n, m in layers.items():                             # a layer missing from bits: unsupported bits None
        _check_weight(m.weight, bits_of[n], group_size, n, importance.get(n))
    report, bar = {}, tqdm(total=len(layers), desc="palettize", unit="layer", disable=not progress)
    for b in sorted(set(bits_of.values())):        # layers of equal bits go through one fast k-means together
        part = [n for n in layers if bits_of[n] == b]
        ws, imps = [layers[n].weight for n in part], [importance.get(n) for n in part]
        if plain:
            res = [palettize_weight(w, b, group_size, imp, plain=True) for w, imp in zip(ws, imps)]
            bar.update(len(part))
        else:                                                     # the fast path reports its own progress
            res = palettize_weights(ws, b, group_size, imps, part, progress=bar.update)
        for n, w, (lut, idx) in zip(part, ws, res):
            err = (dequantize(lut, idx, group_size) - w.float()).pow(2).mean().item()
            power = w.float().pow(2).mean().item()
            report[n] = {"name": n, "bits": b, "mse": err, "rel_mse": err / power if power > 0 else 0.0}
            model.set_submodule(n, PalettizedLinear(lut, idx, b, group_size))
    bar.close()
    if not hasattr(model.tok_emb, "weight_int8"):
        set_embedding(model, *quantize_embedding(model.tok_emb.weight))
    return [report[n] for n in layers]


def pack_bits(idx: torch.Tensor, bits: int, width: int = 8) -> torch.Tensor:
    """uint8 values < 2**bits -> their little-endian bit stream, zero-padded, as flat `width`-bit values
    (width 8: a uint8 stream of ceil(numel * bits / 8) bytes)."""
    bitstream = ((idx.reshape(-1, 1).to(torch.uint8) >> torch.arange(bits, dtype=torch.uint8)) & 1).view(-1)
    bitstream = torch.cat([bitstream, bitstream.new_zeros(-bitstream.numel() % width)]).view(-1, width)
    return (bitstream << torch.arange(width, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """The inverse of pack_bits: the bytes' bit stream regrouped `bits` at a time, as indices of `shape`."""
    return pack_bits(packed, 8, bits)[:math.prod(shape)].view(shape)


def stored_tensors(model: nn.Module) -> dict:
    """What a palettized checkpoint stores: {"layers": {name: {bits, group_size, shape, lut, indices}},
    "embedding": {"q", "scale"}, "float": {name: fp16 tensor} (the norm gains)}."""
    layers, covered, e = {}, {"tok_emb.weight", "tok_emb.weight_int8", "tok_emb.weight_scale"}, model.tok_emb
    for n in projection_names(model):
        m = model.get_submodule(n)                      # a PalettizedLinear (a float one has no .bits: fails)
        layers[n] = {"bits": m.bits, "group_size": m.group_size, "shape": list(m.indices.shape),
                     "lut": m.lut.cpu().half(), "indices": pack_bits(m.indices.cpu(), m.bits)}
        covered |= {f"{n}.lut", f"{n}.indices"}
    floats = {k: v.detach().cpu().half() for k, v in model.state_dict().items() if k not in covered}
    return {"layers": layers, "embedding": {"q": e.weight_int8.detach().cpu(),
                                            "scale": e.weight_scale.detach().cpu()}, "float": floats}


def stored_bytes(stored: dict) -> int:
    """Bytes of everything needed to run: packed indices, LUTs, int8 embedding and scales, fp16 norms."""
    t = [v for L in stored["layers"].values() for v in (L["lut"], L["indices"])]
    t += list(stored["embedding"].values()) + list(stored["float"].values())
    return sum(x.numel() * x.element_size() for x in t)


def save_palettized(path: str, model: nn.Module, **extra) -> None:
    """Write a palettized model (kind "palettized", config inside), atomically."""
    save_checkpoint(path, kind="palettized", config=asdict(model.config), **stored_tensors(model), **extra)


def load_palettized(path: str):
    """-> (Transformer whose projections are PalettizedLinear, checkpoint dict)."""
    ckpt = load_checkpoint(path, "palettized", map_location="cpu")
    try:
        model = Transformer(config_from_dict(ckpt["config"]))
        for n, L in ckpt["layers"].items():
            if list(model.get_submodule(n).weight.shape) != list(L["shape"]):
                raise ValueError(f"{n} has shape {L['shape']}, the config says another")
            idx = unpack_bits(L["indices"], L["bits"], L["shape"])
            model.set_submodule(n, PalettizedLinear(L["lut"], idx, L["bits"], L["group_size"]))
        set_embedding(model, ckpt["embedding"]["q"], ckpt["embedding"]["scale"])
        bad = model.load_state_dict({k: v.float() for k, v in ckpt["float"].items()}, strict=False)
        lost = [k for k in bad.missing_keys            # the LUTs, indices and embedding came in above
                if not k.endswith((".lut", ".indices")) and not k.startswith("tok_emb.")]
        if lost or bad.unexpected_keys:               # (a projection missing from the file: its .weight)
            raise ValueError(f"float tensors do not match the config ({(lost + bad.unexpected_keys)[0]})")
    except (KeyError, ValueError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid palettized checkpoint ({str(e).splitlines()[0]})") \
            from None
    return model, ckpt


def load_float_or_palettized(path: str):
    """-> (model, checkpoint dict) of a float checkpoint (train.py, pretrained.py), else a palettized one."""
    try:       # a peek at the kind alone: the file memory-mapped, no tensor read
        is_float = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("kind") == "model"
    except Exception:
        is_float = False                                        # load_palettized names the problem
    return (load_model if is_float else load_palettized)(path)


# -- 5. The command line -------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run the script; returns the report it writes to palettize.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    add("--ckpt", help="float checkpoint from train.py (default: OUT_DIR/ckpt.pt)")
    add("--out-dir", default="out", help="where palettized.pt and palettize.json go")
    add("--bits", type=int, choices=BITS, help="uniform bits of every projection (default: a 2/4-bit mix)")
    add("--bpw", type=float, help="bits per weight of the 2/4-bit mix, LUTs included (default: 3.7)")
    add("--group-size", type=int, default=16, help="output channels sharing one LUT")
    add("--kmeans", choices=("fast", "plain"), default="fast", help="the fast path, or plain Lloyd (slower)")
    add("--sensitivity", action=argparse.BooleanOptionalAction, default=True,
        help="weight the k-means by the diagonal Fisher information of the calibration batches")
    add("--alloc", choices=("fisher", "loss"), default="fisher",
        help="--bpw: a layer's 2-bit cost is the Fisher estimate, or the measured calibration loss rise")
    add("--calib-batches", type=int, default=4, help="calibration batches of the training text")
    add("--calib-batch-size", type=int, default=8, help="sequences per calibration batch")
    add("--data", help="corpus (default: the checkpoint's training corpus)")
    add("--seq-len", type=int, help="tokens per sequence (default: the checkpoint's)")
    add("--eval-windows", type=int, default=256, help="validation windows per evaluation")
    add("--seed", type=int, default=0, help="seed of the calibration batches")
    add("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    try:
        return palettize_checkpoint(ap.parse_args(argv), time.time())
    except (CheckpointError, DataError, ValueError, OSError) as e:          # a PalettizeError is a ValueError
        raise SystemExit(f"error: {e}")


def val_bpb(model: nn.Module, val: torch.Tensor, a: argparse.Namespace) -> float:
    """Validation bits per byte of `model` on `val`, with the script's settings."""
    return evaluate(model, val, a.seq_len, batch_size=16, max_windows=a.eval_windows, device=a.device,
                    tokenizer=a.tokenizer)["bpb"]


def palettize_checkpoint(a: argparse.Namespace, t_start: float) -> dict:
    """Everything the command line does; returns the report. Every check comes before any work."""
    if a.bits is not None and a.bpw is not None:
        raise PalettizeError("give --bits or --bpw, not both")
    a.bpw = 3.7 if a.bits is None and a.bpw is None else a.bpw
    if min(a.group_size, a.calib_batches, a.calib_batch_size, a.eval_windows) < 1:
        raise PalettizeError("--group-size, --calib-*, --eval-windows must be positive")
    a.device, a.ckpt = str(init_distributed(a.device)[2]), a.ckpt or os.path.join(a.out_dir, "ckpt.pt")
    model, ckpt = load_model(a.ckpt)
    settings = (ckpt.get("train_state") or {}).get("settings") or {}
    a.data = a.data or corpus_from_checkpoint(ckpt)
    a.seq_len = a.seq_len or settings.get("seq_len") or model.config.max_seq_len
    if a.seq_len > model.config.max_seq_len:
        raise PalettizeError(f"--seq-len {a.seq_len} exceeds the model's {model.config.max_seq_len}")
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in projection_names(model)}
    for n in shapes:
        _check_weight(model.get_submodule(n).weight, a.bits or 4, a.group_size, n)
    if not bool(torch.isfinite(model.tok_emb.weight).all()):
        raise PalettizeError("tok_emb: weight contains NaN or Inf")
    if a.bpw is not None:
        allocate_bits(shapes, dict.fromkeys(shapes, 0.0), a.bpw, a.group_size)        # reachable at all?
    a.tokenizer = tokenizer_from_checkpoint(ckpt)                                 # None: byte-level tokens
    train, val = load_splits(a.data, a.seq_len, a.tokenizer)
    names, model, rise = list(shapes), model.to(a.device).eval(), None
    bpb_float = val_bpb(model, val, a)
    print(f"{a.ckpt}: {model.config.name}, {len(names)} projections, {sum(map(math.prod, shapes.values())):,}"
          f" weights; data {a.data}, seq_len {a.seq_len}; val bpb {bpb_float:.4f}")
    g = torch.Generator().manual_seed(a.seed)                    # seeded calibration batches of training text
    batches = [get_batch(train, a.calib_batch_size, a.seq_len, g, a.device) for _ in range(a.calib_batches)]
    importance = fisher_information(model, batches, names) if a.sensitivity else None
    if a.bpw is not None and a.alloc == "loss":
        rise = loss_rise(model, names, 2, a.group_size, importance, batches=batches)
    elif a.bpw is not None:                                         # the estimated rise from 4 to 2 bits
        fisher = importance if importance is not None else fisher_information(model, batches, names)
        s2, s4 = (loss_rise(model, names, b, a.group_size, importance, fisher=fisher) for b in (2, 4))
        rise = {n: s2[n] - s4[n] for n in names}
    bits = allocate_bits(shapes, rise, a.bpw, a.group_size) if rise else dict.fromkeys(names, a.bits)
    t = time.time()
    report = palettize_model(model, bits, a.group_size, importance, progress=True, plain=a.kmeans == "plain")
    t_pal, bpb_pal = time.time() - t, val_bpb(model, val, a)      # (palettize_model's .item() synchronised)
    out = {"ckpt": a.ckpt, "config": model.config.name, "data": a.data, "seq_len": a.seq_len,
           "group_size": a.group_size, "target_bpw": a.bpw, "uniform_bits": a.bits,
           "sensitivity": a.sensitivity, "alloc": a.alloc if a.bpw is not None else None, "kmeans": a.kmeans,
           "calib_batches": a.calib_batches, "calib_batch_size": a.calib_batch_size,
           "eval_windows": a.eval_windows, "bits_per_weight": bits_per_weight(shapes, bits, a.group_size),
           "embedding_bits": 8, "model_bytes": stored_bytes(stored_tensors(model)),
           "float_bytes": 2 * count_params(model.config)["params"],
           "layers": [dict(r, **({"cost_2bit": rise[r["name"]]} if rise else {})) for r in report],
           "val_bpb_float": bpb_float, "val_bpb_palettized": bpb_pal,
           "val_bpb_rise": (bpb_pal - bpb_float) / bpb_float, "palettize_seconds": t_pal, "device": a.device,
           "seconds": time.time() - t_start}
    for r in out["layers"]:                                         # name, bits, mse, rel_mse (, cost_2bit)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    path = os.path.join(a.out_dir, "palettized.pt")
    save_palettized(path, model.cpu(), report=out, tokenizer=ckpt.get("tokenizer"))
    save_json(os.path.join(a.out_dir, "palettize.json"), out)
    print(f"bits per weight {out['bits_per_weight']:.3f} ({list(bits.values()).count(2)} of {len(bits)} "
          f"layers 2-bit), embedding 8-bit: {out['model_bytes']:,} bytes (fp16: {out['float_bytes']:,}); val "
          f"bpb {bpb_float:.4f} -> {bpb_pal:.4f} ({out['val_bpb_rise']:+.2%}); k-means {t_pal:.1f} s; wrote "
          f"{path} and palettize.json in {out['seconds']:.1f} s")
    return out


# ==========================================================================================================
# Appendix: the fast path -- the same k-means, solved exactly in 1-D, for every group of many layers at once
#
# The LUT is fp16, so every weight is first rounded to fp16, and an fp16 tensor holds at most 65,536 distinct
# values. Their 16 bits read as an integer, with the magnitude bits of negative numbers flipped, are keys in
# the order of the values (`fp16_keys`); one `index_add_` turns a weight matrix into one histogram per group
# over its keys, and k-means on the histogram is k-means on the weights. In 1-D a k-means clustering is k
# runs of consecutive sorted values (k - 1 boundaries); with prefix sums of count, count * value and count *
# value^2 a run's mean and squared error cost two lookups: a Lloyd step is O(k log R) per group, not O(k n).
# Each group runs plain `kmeans` itself this way (its start, its steps) and an over-relaxed Lloyd from a start
# reaching the tails; a large-neighbourhood search solved exactly by DP over the boundaries (`_band_refine`)
# then moves all boundaries jointly past Lloyd's local optimum. Each group keeps the best: never worse than
# plain `kmeans`, usually the optimum (tests/test_palettize.py holds it to both: within 1% of an exact DP).

def fp16_keys(w16: torch.Tensor) -> torch.Tensor:
    """fp16 tensor -> int16 keys in the order of the values (-0 -> -1, +0 -> 0): positive numbers keep their
    bits; negative ones flip their 15 magnitude bits, so a larger magnitude gives a smaller key."""
    b = w16.view(torch.int16)
    return ((b >> 15) & 0x7FFF) ^ b


def key_values(kmin: int, kmax: int, device=None) -> torch.Tensor:
    """The float64 values of keys kmin..kmax (inclusive), sorted ascending: the table every histogram uses."""
    s = torch.arange(kmin, kmax + 1, dtype=torch.int32, device=device).to(torch.int16)
    return (s ^ ((s >> 15) & 0x7FFF)).view(torch.float16).double()


def _at(P: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """P (3, G, R+1) at positions i (G, ...) -> (3, G, ...)."""
    return P.gather(2, i.reshape(1, i.shape[0], -1).expand(3, -1, -1)).view(3, *i.shape)


def _sse(n: torch.Tensor) -> torch.Tensor:
    """Squared error of runs around their means from their (count, sum, sum of squares) n (3, ...)."""
    return torch.addcdiv(n[2], n[1] * n[1], n[0].clamp_min(1e-300), value=-1.0)


def _boundaries(values: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Sorted centres (G, k) -> inner boundaries (G, k-1): each value goes to its nearest centre (ties up)."""
    return torch.searchsorted(values, ((c[:, 1:] + c[:, :-1]) * 0.5).contiguous())


def _means(P, values: torch.Tensor, b: torch.Tensor, old: torch.Tensor | None = None):
    """(means (G, k), total squared error (G,)) of the runs between boundaries b (G, k-1). An empty run keeps
    its `old` centre, or takes the value where it sits (either keeps the centres sorted)."""
    e = F.pad(F.pad(b, (1, 0)), (0, 1), value=values.numel())               # (G, k+1) edges: 0, b..., R
    n = _at(P, e[:, 1:]) - _at(P, e[:, :-1])                                 # (3, G, k)
    old = values[e[:, :-1].clamp_max(values.numel() - 1)] if old is None else old
    return torch.where(n[0] > 0, n[1] / n[0].clamp_min(1e-300), old), _sse(n).sum(1)


def _lloyd(P, values, c, max_iters: int, record, relax: bool = True):
    """Lloyd's iteration on the histograms until no group changes; the error never increases. Over-relaxed
    unless relax=False: each step also tries omega times as far (then a Lloyd step) and keeps the lower error,
    omega doubling on a success (to 16) and back to 2 on a failure: ~60 steps where plain Lloyd takes ~250."""
    c, obj = _means(P, values, _boundaries(values, c), c)
    omega = c.new_full((c.shape[0], 1), 2.0)
    for _ in range(max_iters):
        c_new, new = _means(P, values, _boundaries(values, c), c)               # one plain Lloyd step
        if relax:
            c2 = (c + omega * (c_new - c)).sort(1).values
            c2, err2 = _means(P, values, _boundaries(values, c2), c2)
            ok = err2 < new
            c_new, new = torch.where(ok[:, None], c2, c_new), torch.where(ok, err2, new)
            omega = torch.where(ok[:, None], (omega * 2).clamp_max(16.0), 2.0)
        c = c_new
        record(new)
        if torch.equal(new, obj):
            break
        obj = new
    return c


def _band_dp(P, cand: torch.Tensor):
    """Best boundaries with boundary j restricted to cand[:, j, :] (sorted), exactly, by DP over j.
    cand (G, k-1, C) -> (chosen position (G, k-1), chosen candidate number (G, k-1), objective (G,))."""
    Pc = _at(P, cand)                                                         # (3, G, k-1, C)
    D, back = _sse(Pc[:, :, 0] - P[:, :, :1]), []   # (G, C): least error left of boundary 0 at each candidate
    for j in range(cand.shape[1] - 1):
        T = _sse(Pc[:, :, j + 1, None, :] - Pc[:, :, j, :, None]) + D[:, :, None]   # (G, C_j, C_j+1)
        T.masked_fill_(cand[:, j, :, None] > cand[:, j + 1, None, :], math.inf)
        D, arg = T.min(1)
        back.append(arg)
    obj, w = (D + _sse(P[:, :, -1:] - Pc[:, :, -1])).min(1)
    picks = [w]
    for arg in reversed(back):                                                   # walk the choices back
        picks.append(w := arg.gather(1, w[:, None])[:, 0])
    pick = torch.stack(picks[::-1], 1)                                           # (G, k-1)
    return cand.gather(2, pick[..., None])[..., 0], pick, obj


def _band_refine(P, values: torch.Tensor, b: torch.Tensor, width: int, record, levels: int):
    """Large-neighbourhood search: every boundary may move anywhere between its neighbours, to one of `width`
    candidates spread evenly in value (reaching sparse tails), `width` spread evenly in cumulative count
    (resolving dense regions), or its current position; the DP picks the best joint move. Then each window
    shrinks to the candidates either side of the pick, for `levels` rounds. The error never increases."""
    G, K1 = b.shape
    lo, hi = F.pad(b[:, :-1], (1, 0)), F.pad(b[:, 1:], (0, 1), value=P.shape[2] - 1)   # (G, k-1) windows
    u = torch.linspace(0, 1, width, dtype=torch.float64, device=b.device)
    vals = torch.cat([values, values[-1:]])                                      # value at each position 0..R
    for _ in range(levels):
        v0, v1, c0, c1 = vals[lo], vals[hi], P[0].gather(1, lo), P[0].gather(1, hi)
        by_value = torch.searchsorted(values, (v0[..., None] + (v1 - v0)[..., None] * u).reshape(G, -1))
        by_count = torch.searchsorted(P[0], (c0[..., None] + (c1 - c0)[..., None] * u).reshape(G, -1))
        cand = torch.cat([by_value.view(G, K1, width), by_count.view(G, K1, width)], 2)
        cand = torch.cat([cand.clamp(lo[..., None], hi[..., None]), b[..., None]], 2).sort(2).values
        b, pick, obj = _band_dp(P, cand)
        record(obj)
        near = torch.stack([(pick - 1).clamp_min(0), (pick + 1).clamp_max(cand.shape[2] - 1)], -1)
        near = cand.gather(2, near)                                 # the candidates either side of the picks
        if torch.equal(near[..., 0], lo) and torch.equal(near[..., 1], hi):
            break
        lo, hi = near[..., 0], near[..., 1]
    return b


def _starts(P, values, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two starts (G, k): half the centres at quantiles of the weighted histogram, half evenly spaced between
    its smallest and largest occupied value (reaching the tails); and plain `kmeans`'s own k quantiles."""
    def at(t, right=False):                     # the value where each group's cumulative count reaches t
        return values[(torch.searchsorted(P[0], t, right=right) - 1).clamp(0, values.numel() - 1)]
    total, j = P[0, :, -1:].contiguous(), torch.arange(k, dtype=torch.float64, device=values.device) + 0.5
    nq, nu = k - k // 2, k // 2
    lo, hi = at(torch.zeros_like(total), right=True), at(total)                    # (G, 1)
    cq, cu = at(j[:nq] / nq * total), lo + (hi - lo) * j[:nu] / max(nu, 1)         # (G, nq), (G, nu)
    return torch.cat([cq, cu], 1).sort(1).values, at((j * total / k).floor(), right=True)


def kmeans1d(counts: torch.Tensor, values: torch.Tensor, k: int, lloyd_iters: int = 20, max_rounds=None,
             width: int = 13, polish_iters: int = 20, levels: int = 3, tol: float = 2e-3,
             history: list | None = None) -> torch.Tensor:
    """Sorted centres (G, k), float64: weighted 1-D k-means of G histograms, counts (G, R) over the sorted
    `values` (R,); `history`, if a list, receives the error (G,) after every step. The better of the two
    Lloyds, then rounds of `_band_refine` and Lloyd while a round lowers the total error by over `tol`
    (relative), at most `max_rounds` (8 for k <= 64, else 1: a round costs k sequential DP steps)."""
    # (G, k)-sized tensors: on a CPU a thread pool only adds synchronisation (and stalls on shared cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if counts.device.type == "cpu" else threads)
    try:
        values, counts = values.double().contiguous(), counts.double()
        P = counts.new_zeros(3, counts.shape[0], counts.shape[1] + 1)    # (3, G, R + 1): prefix sums of
        torch.cumsum(counts, 1, out=P[0, :, 1:])                          # count, count * v, count * v^2
        torch.cumsum(cv := counts * values, 1, out=P[1, :, 1:])
        torch.cumsum(cv.mul_(values), 1, out=P[2, :, 1:])
        del cv
        record = history.append if history is not None else (lambda errors: None)
        tails, plain = _starts(P, values, k)
        c = _lloyd(P, values, tails, lloyd_iters, record)
        c2 = _lloyd(P, values, plain, 100, lambda errors: None, relax=False)   # plain `kmeans` itself
        err, err2 = (_means(P, values, _boundaries(values, x), x)[1] for x in (c, c2))
        c, err = torch.where((err2 < err)[:, None], c2, c), torch.minimum(err, err2)
        record(err)
        total = err.sum().item()
        for _ in range((max_rounds or (8 if k <= 64 else 1)) if k > 1 else 0):
            b = _band_refine(P, values, _boundaries(values, c), width, record, levels)
            c = _lloyd(P, values, _means(P, values, b)[0], polish_iters, record)
            new_total = _means(P, values, _boundaries(values, c), c)[1].sum().item()
            if not new_total < total * (1 - tol):
                break
            total = new_total
        return c.sort(1).values            # (a mean can stray by an ulp past its run's neighbour)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def palettize_weights(ws, bits: int = 4, group_size: int = 16, importances=None, names=None,
                      max_bins: int | None = None, progress=None) -> list:
    """[palettize_weight(w) for w in ws], all their groups through one k-means per chunk of at most `max_bins`
    histogram bins (~100 GPU ops per chunk); `progress`, if given, gets the number of layers done."""
    importances = importances or [None] * len(ws)
    for i, (w, imp) in enumerate(zip(ws, importances)):
        _check_weight(w, bits, group_size, names[i] if names else f"weight {i}", imp)
    device, Gs = ws[0].device, [w.shape[0] // group_size for w in ws]
    if max_bins is None:   # a histogram bin costs ~48 bytes (counts, 3 prefix sums, temporaries, index table)
        max_bins = int(0.4 * torch.cuda.mem_get_info(device)[0] / 48) if device.type == "cuda" else 2 ** 24
    max_bins = min(max_bins, 2 ** 31 - 2 ** 24)            # bin numbers are int32
    keys = [fp16_keys(w.detach().to(torch.float16)) for w in ws]                 # (out, in) int16
    lim = torch.stack([torch.stack(torch.aminmax(k)) for k in keys]).int().tolist()  # one sync
    chunks = [[]]                              # runs of consecutive weights whose histograms fit in max_bins
    for i in range(len(ws)):
        trial = chunks[-1] + [i]
        span = max(lim[j][1] for j in trial) - min(lim[j][0] for j in trial) + 1
        fits = not chunks[-1] or sum(Gs[j] for j in trial) * span <= max_bins
        chunks[-1:] = [trial] if fits else [chunks[-1], [i]]
    out = [None] * len(ws)
    for chunk in chunks:
        kmin, kmax = min(lim[j][0] for j in chunk), max(lim[j][1] for j in chunk)
        R, values, G = kmax - kmin + 1, key_values(kmin, kmax, device), sum(Gs[j] for j in chunk)   # (R,)
        counts, bins, g0 = torch.zeros(G * R, dtype=torch.float64, device=device), [], 0
        for j in chunk:
            off = torch.arange(g0, g0 + Gs[j], dtype=torch.int32, device=device)[:, None] * R - kmin
            bins.append((keys[j].view(Gs[j], -1) + off).view(-1))     # int32: chunk group * R + key - kmin
            imp, g0 = importances[j], g0 + Gs[j]
            counts.index_add_(0, bins[-1], counts.new_ones(1).expand(bins[-1].numel()) if imp is None
                              else importance_weights(imp.to(device).view(Gs[j], -1)).view(-1))
        lut = lut_from_centres(kmeans1d(counts.view(G, R), values, 2 ** bits))  # (G, K)
        del counts
        # index of the nearest LUT entry for every key of the table: count the midpoints at or below each key
        mid = _boundaries(values, lut.double())                                    # (G, K-1) positions
        table = torch.zeros(G, R + 1, dtype=torch.int32, device=device)
        table.scatter_add_(1, mid, torch.ones_like(mid, dtype=torch.int32))
        table = table[:, :R].cumsum(1, dtype=torch.int32).to(torch.uint8).view(-1)   # (G * R,)
        for j, lut_j, bj in zip(chunk, lut.split([Gs[j] for j in chunk]), bins):
            out[j] = (lut_j, table.index_select(0, bj).view(ws[j].shape))
        if progress:
            progress(len(chunk))
    return out


if __name__ == "__main__":
    main()
