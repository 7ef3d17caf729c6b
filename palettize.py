"""
palettize.py -- grouped k-means palettization: 4-bit / mixed 2-4-bit lookup tables, an 8-bit embedding.

Follows section 5.1 ("Optimizations") of Gunter et al. 2024, "Apple Intelligence Foundation Language Models"
(arXiv 2407.21075): every projection weight is palettized -- each group of 16 consecutive output channels
(rows of `nn.Linear.weight`, as Core ML's per-grouped-channel LUTs group them) shares a lookup table (LUT) of
2**bits fp16 values found by k-means, and every weight is stored as a `bits`-bit index into its group's LUT.
AFM-on-device mixes 2-bit and 4-bit layers to about 3.7 bits per weight; the embedding (tied with the output
head) is quantized to 8 bits per channel (symmetric, one fp16 scale per row); norm weights stay float.

The k-means (written here, in torch; CPU or CUDA; no Python loop over groups; deterministic)
---------------------------------------------------------------------------------------------------
The LUT is fp16, so the weights are cast to fp16 first, and an fp16 tensor holds at most 65,536 distinct
values. Reinterpreting the 16 bits as an integer and flipping the magnitude bits of negative numbers gives a
key whose integer order is the order of the values (`fp16_keys`). One `bincount` over
(group * R + key - min_key) turns a whole weight into one histogram per group over the R keys it spans
(R is about 24,000 for N(0, 0.02^2) weights); with `importance` the bins sum importance instead of counting
(weighted k-means). From here on a group of 16 x 3072 weights is a histogram, and k-means is 1-D:

  * In 1-D the clusters k-means can end in are contiguous runs of the sorted values, so a clustering is just
    k - 1 boundaries. With prefix sums P0, P1, P2 of count, count*value and count*value^2 over the sorted
    values, any run's count, sum and squared error (S2 - S1^2 / S0) cost two lookups each. Nothing touches
    the individual weights again until the final gather.
  * Lloyd's iteration becomes: boundaries = midpoints of the sorted centres, located in the sorted value
    table by `searchsorted`; new centres = (P1 difference) / (P0 difference); an empty cluster keeps its
    centre. O(groups * k * log R) per step, for all groups at once. Plain Lloyd creeps towards its fixed point
    (~250 steps for N(0, 1) samples at k = 16), so each step also tries going further along the same
    direction and keeps whichever result has less error (over-relaxation; ~60 steps).
  * Lloyd stops at a local optimum, and on real samples a poor one is common: on 4,096 N(0, 1) samples it
    ends 1-9% above the optimum at k = 16. So next comes a large-neighbourhood search solved exactly by
    dynamic programming (`_band_refine`): every boundary may move anywhere between its two neighbours, to
    one of ~27 candidate positions (spread evenly in value, which reaches into sparse tails, and in
    cumulative count, which resolves the dense middle), and a DP over the boundaries (k - 1 steps of a
    (27 x 27) min-plus product, all groups at once) picks the best joint move. The windows then zoom in
    around the picks; Lloyd polishes; rounds repeat while they still pay. The current solution is always a
    candidate, so the error never increases.
  * Initialisation: half the centres at quantiles of the (weighted) distribution, half evenly spaced between
    the smallest and largest value, so that some reach the tails, where squared error piles up.
Quality: within 0.6% of the exact optimum on every one of ~1,000 random small groups (normal, uniform,
Laplace, bimodal, Student-t; 2 to 16 clusters; tests/test_palettize.py checks against an O(k n^2) DP), and
within ~0.02% on average for 16 x 3072 N(0, 0.02^2) groups.

Finally the centres are rounded to fp16, sorted and made strictly increasing (a duplicate is bumped to the
next fp16 value), and every weight gets the index of its nearest final LUT entry: k - 1 thresholds per group
in key space become a (group, key) -> index table, gathered by key. So `dequantize(lut, indices)` reproduces
LUT values exactly, and the indices are optimal for the stored LUT. Cost: a few passes over the weights and
O(groups * R) for the prefix sums, plus the small k-means; see bench.py for ours against coremltools.

Run
---
    python palettize.py                      # out/ckpt.pt -> out/palettized.pt + out/palettize.json
    python palettize.py --bits 4             # uniform 4-bit
    python palettize.py --bpw 3.5 --no-sensitivity   # mixed 2/4-bit at 3.5 bits per weight, plain k-means
Defaults: --bpw 3.7 (the paper's shipped setting; 2-bit layers chosen by their Fisher-estimated loss rise)
and --sensitivity (Fisher-weighted k-means), from a few calibration batches of the training text.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (CheckpointError, Transformer, config_from_dict, load_checkpoint, load_model, save_checkpoint,
                   save_json)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = (1, 2, 3, 4, 6, 8)          # what Core ML's constexpr_lut_to_dense stores (uint1 ... uint8)


class PalettizeError(ValueError):
    """Bad input to palettization; the message is one line naming the layer."""


# ----------------------------------------------------------------------------------------------------------
# fp16 values as order-preserving integer keys

FINITE_KEYS = (-31744, 31743)      # keys of -65504 and +65504; beyond them lie +-inf and NaN


def fp16_keys(w16: torch.Tensor) -> torch.Tensor:
    """fp16 tensor -> int16 keys with the same order as the values (-0 -> -1, +0 -> 0).
    Positive numbers keep their bits; negative ones flip their 15 magnitude bits, so a larger magnitude
    gives a smaller key."""
    b = w16.view(torch.int16)
    k = b >> 15                          # -1 for negative numbers, 0 otherwise
    k &= 0x7FFF
    k ^= b
    return k


def key_values(kmin: int, kmax: int, device=None) -> torch.Tensor:
    """The float64 values of keys kmin..kmax (inclusive), sorted ascending: the shared table of fp16 values."""
    s = torch.arange(kmin, kmax + 1, dtype=torch.int32, device=device).to(torch.int16)
    return (s ^ ((s >> 15) & 0x7FFF)).view(torch.float16).double()


def _fp16_from_ordinals(o: torch.Tensor) -> torch.Tensor:
    """Ordinals (consecutive integers over the distinct finite fp16 values, 0 = zero) -> fp16."""
    s = (o - (o < 0).to(o.dtype)).to(torch.int16)
    return (s ^ ((s >> 15) & 0x7FFF)).view(torch.float16)


def _ordinals(x16: torch.Tensor) -> torch.Tensor:
    """fp16 -> int32 ordinals (-0 and +0 both 0, the next value up is 1, the next down -1)."""
    s = fp16_keys(x16).to(torch.int32)
    return s + (s < 0).to(torch.int32)


def _locate(values: torch.Tensor, x: torch.Tensor, kmin: int | None = None) -> torch.Tensor:
    """Position of the first entry of the sorted table `values` that is >= x (torch.searchsorted). When the
    table is every fp16 key from kmin up, arithmetic finds it without a search: round x to fp16, take its
    key, step up one if the rounded value is below x."""
    if kmin is None:
        return torch.searchsorted(values, x.contiguous())
    h = x.to(torch.float16)
    k = fp16_keys(h).to(torch.int64) + (h.double() < x).long()
    k = torch.where(h == 0, torch.where(x <= 0, -1, k), k)         # -0 (key -1) comes first among the zeros
    return (k - kmin).clamp(0, values.numel())


# ----------------------------------------------------------------------------------------------------------
# 1-D k-means on histograms

def _prefix(counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """counts (G, R), values (R,) -> P (3, G, R + 1): prefix sums of count, count*v, count*v^2."""
    G, R = counts.shape
    P = counts.new_empty(3, G, R + 1)
    P[:, :, 0] = 0
    torch.cumsum(counts, 1, out=P[0, :, 1:])
    cv = counts * values
    torch.cumsum(cv, 1, out=P[1, :, 1:])
    torch.cumsum(cv.mul_(values), 1, out=P[2, :, 1:])
    return P


def _at(P: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """P (3, G, R+1) at positions i (G, ...) -> (3, G, ...)."""
    G = i.shape[0]
    return P.gather(2, i.reshape(1, G, -1).expand(3, G, -1)).view(3, *i.shape)


def _sse(n: torch.Tensor) -> torch.Tensor:
    """Squared error of runs around their means from their (count, sum, sum of squares) n (3, ...);
    0 for an empty run (its sums are exactly 0)."""
    return torch.addcdiv(n[2], n[1] * n[1], n[0].clamp_min(1e-300), value=-1.0)


def _edges(b: torch.Tensor, R: int) -> torch.Tensor:
    """Inner boundaries (G, k-1) -> all boundaries (G, k+1): 0, b..., R."""
    G = b.shape[0]
    return torch.cat([b.new_zeros(G, 1), b, b.new_full((G, 1), R)], 1)


def _boundaries(values: torch.Tensor, c: torch.Tensor, kmin: int | None = None) -> torch.Tensor:
    """Sorted centres (G, k) -> inner boundaries (G, k-1): each value goes to its nearest centre
    (a value exactly at a midpoint goes up)."""
    return _locate(values, (c[:, 1:] + c[:, :-1]) * 0.5, kmin)


def _means(P, values: torch.Tensor, b: torch.Tensor, old: torch.Tensor | None = None):
    """(means (G, k), total squared error (G,)) of the runs between boundaries b (G, k-1). An empty run keeps
    its `old` centre, or takes the value where it sits (either keeps the centres sorted)."""
    e = _edges(b, values.numel())
    n = _at(P, e[:, 1:]) - _at(P, e[:, :-1])                                 # (3, G, k)
    if old is None:
        old = values[e[:, :-1].clamp_max(values.numel() - 1)]
    return torch.where(n[0] > 0, n[1] / n[0].clamp_min(1e-300), old), _sse(n).sum(1)


def _lloyd(P, values, c, max_iters: int, history: list | None, kmin: int | None = None):
    """Lloyd's iteration, over-relaxed: each step also tries going omega times as far as plain Lloyd
    (c + omega * (lloyd(c) - c), then a Lloyd step from there) and keeps whichever ends with less error,
    doubling omega after a success (at most 16) and resetting it to 2 after a failure. Plain Lloyd creeps
    towards its fixed point (~250 steps on N(0, 1) samples at k = 16); this gets there in ~60. Each group
    keeps the better of two Lloyd results, so the error still never increases. Stops when no group changes."""
    c, obj = _means(P, values, _boundaries(values, c, kmin), c)
    omega = c.new_full((c.shape[0], 1), 2.0)
    for _ in range(max_iters):
        c1, obj1 = _means(P, values, _boundaries(values, c, kmin), c)
        c2 = (c + omega * (c1 - c)).sort(1).values
        c2, obj2 = _means(P, values, _boundaries(values, c2, kmin), c2)
        ok = obj2 < obj1
        c = torch.where(ok[:, None], c2, c1)
        new = torch.where(ok, obj2, obj1)
        omega = torch.where(ok[:, None], (omega * 2).clamp_max(16.0), 2.0)
        if history is not None:
            history.append(new)
        if torch.equal(new, obj):
            break
        obj = new
    return c


def _band_dp(P, cand: torch.Tensor):
    """Best boundaries with boundary j restricted to cand[:, j, :] (sorted), exactly, by DP over j.
    cand (G, k-1, C) -> (chosen position (G, k-1), chosen candidate number (G, k-1), objective (G,))."""
    G, K1, C = cand.shape
    Pc = _at(P, cand)                                                         # (3, G, k-1, C)
    # D[g, w]: least error of the runs left of boundary j when boundary j sits at cand[g, j, w]
    D = _sse(Pc[:, :, 0] - P[:, :, :1])                                      # (G, C)
    back = []
    for j in range(K1 - 1):
        T = _sse(Pc[:, :, j + 1, None, :] - Pc[:, :, j, :, None])             # (G, C_j, C_j+1): run j+1
        T += D[:, :, None]
        T.masked_fill_(cand[:, j, :, None] > cand[:, j + 1, None, :], math.inf)
        D, arg = T.min(1)
        back.append(arg)
    D = D + _sse(P[:, :, -1:] - Pc[:, :, -1])
    obj, w = D.min(1)
    picks = [w]
    for arg in reversed(back):
        w = arg.gather(1, w[:, None])[:, 0]
        picks.append(w)
    pick = torch.stack(picks[::-1], 1)                                           # (G, k-1)
    return cand.gather(2, pick[..., None])[..., 0], pick, obj


def _band_refine(P, values: torch.Tensor, b: torch.Tensor, width: int, history: list | None, levels: int = 64,
                 kmin: int | None = None):
    """Large-neighbourhood search: every boundary may move anywhere between its neighbours; the DP picks the
    best joint move among `width` candidates per boundary spread evenly in value (they reach into sparse
    tails), `width` spread evenly in cumulative count (they resolve dense regions), and the current position.
    Then zoom: each window shrinks to the candidates either side of the one picked, until no window changes.
    Never increases the objective."""
    G, K1 = b.shape
    R = P.shape[2] - 1
    e = _edges(b, R)
    lo, hi = e[:, :-2], e[:, 2:]                                                 # (G, k-1) windows
    u = torch.linspace(0, 1, width, dtype=torch.float64, device=b.device)
    top = values[-1:].expand(1)
    vals = torch.cat([values, top])                                              # value at each position 0..R
    obj = None
    for _ in range(levels):
        v0, v1 = vals[lo], vals[hi]
        by_value = _locate(values, v0[..., None] + (v1 - v0)[..., None] * u, kmin)
        c0, c1 = P[0].gather(1, lo), P[0].gather(1, hi)
        target = (c0[..., None] + (c1 - c0)[..., None] * u).reshape(G, -1)
        by_count = torch.searchsorted(P[0], target).view(G, K1, width)
        cand = torch.cat([by_value, by_count], 2)
        cand = torch.minimum(torch.maximum(cand, lo[..., None]), hi[..., None])
        cand = torch.cat([cand, b[..., None]], 2).sort(2).values
        b, pick, obj = _band_dp(P, cand)
        if history is not None:
            history.append(obj)
        C = cand.shape[2]
        new_lo = cand.gather(2, (pick - 1).clamp_min(0)[..., None])[..., 0]
        new_hi = cand.gather(2, (pick + 1).clamp_max(C - 1)[..., None])[..., 0]
        if torch.equal(new_lo, lo) and torch.equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    return b, obj


def _init(P, values, k: int, how: str) -> torch.Tensor:
    """Initial centres (G, k): quantiles of the weighted distribution at (j + 1/2) / k ("quantile"), evenly
    spaced between the smallest and largest occupied value ("uniform"), or half of each ("mixed": the
    quantiles cover the mass, the even spacing reaches the tails where squared error piles up)."""
    G, R = P.shape[1], P.shape[2] - 1
    dev = values.device
    nq = {"quantile": k, "uniform": 0, "mixed": k - k // 2}[how]
    t = (torch.arange(nq, dtype=torch.float64, device=dev) + 0.5) / nq * P[0, :, -1:]
    cq = values[(torch.searchsorted(P[0], t) - 1).clamp(0, R - 1)]                  # (G, nq)
    total = P[0, :, -1:].contiguous()
    first = (torch.searchsorted(P[0], torch.zeros_like(total), right=True) - 1).clamp(0, R - 1)
    last = (torch.searchsorted(P[0], total) - 1).clamp(0, R - 1)
    lo, hi = values[first], values[last]                                             # (G, 1)
    nu = k - nq
    cu = lo + (hi - lo) * (torch.arange(nu, dtype=torch.float64, device=dev) + 0.5) / max(nu, 1)
    return torch.cat([cq, cu], 1).sort(1).values


def kmeans1d(counts: torch.Tensor, values: torch.Tensor, k: int, lloyd_iters: int = 20, max_rounds: int | None = None,
             width: int = 13, polish_iters: int = 20, levels: int = 3, tol: float = 2e-3,
             init: str = "mixed", kmin: int | None = None, history: list | None = None) -> torch.Tensor:
    """Weighted 1-D k-means of G histograms at once.

    counts: (G, R) non-negative weights of the R sorted `values` (R,), float64 (any table of sorted values:
    all fp16 keys of a range, or `torch.unique` of a sample; pass `kmin` when it is `key_values(kmin, ...)`,
    which replaces binary searches by arithmetic). Returns sorted centres (G, k), float64.
    `history`, if a list, receives the objective (G,) (weighted squared error) after every step; it never
    increases. Steps: `init` ("mixed": half quantiles, half evenly spaced) -> over-relaxed Lloyd (at most
    `lloyd_iters` steps) -> rounds of (band DP refinement with `width` candidates of each kind and `levels` zoom
    levels -> Lloyd, at most `polish_iters`) while a round lowers the total error by more than `tol`
    (relative), at most `max_rounds` (default 8 for k <= 64; 1 above, where each round costs k sequential DP
    steps and the clusters are narrow)."""
    # Every tensor here is (groups, k)-sized or a gather from the prefix sums: on a CPU a thread pool only
    # adds synchronisation (and stalls badly when other processes share the cores), so use one thread.
    threads = torch.get_num_threads()
    if counts.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        counts, values = counts.double(), values.double().contiguous()
        G, R = counts.shape
        P = _prefix(counts, values)
        c = _init(P, values, k, init)
        c = _lloyd(P, values, c, lloyd_iters, history, kmin)
        total = _means(P, values, _boundaries(values, c, kmin), c)[1].sum().item()
        if max_rounds is None:
            max_rounds = 8 if k <= 64 else 1
        for _ in range(max_rounds if k > 1 else 0):
            b, _ = _band_refine(P, values, _boundaries(values, c, kmin), width, history, levels, kmin)
            c = _lloyd(P, values, _means(P, values, b)[0], polish_iters, history, kmin)
            new_total = _means(P, values, _boundaries(values, c, kmin), c)[1].sum().item()
            if not new_total < total * (1 - tol):
                break
            total = new_total
        return c.sort(1).values            # (a mean can stray by an ulp past its run's neighbour)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Palettizing weights

def _check_weight(w: torch.Tensor, bits: int, group_size: int, name: str = "weight", importance=None):
    if bits not in BITS:
        raise PalettizeError(f"{name}: unsupported bits {bits} (choose from {', '.join(map(str, BITS))})")
    if w.dim() != 2:
        raise PalettizeError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    if group_size < 1 or w.shape[0] % group_size:
        raise PalettizeError(f"{name}: {w.shape[0]} output channels (shape {tuple(w.shape)}) are not divisible "
                             f"by the group size {group_size}")
    if importance is not None:
        if importance.shape != w.shape:
            raise PalettizeError(f"{name}: importance shape {tuple(importance.shape)} != weight shape "
                                 f"{tuple(w.shape)}")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise PalettizeError(f"{name}: importance must be finite and non-negative")


def _lut_from_centres(c: torch.Tensor) -> torch.Tensor:
    """float centres (G, K) -> fp16 LUT (G, K): rounded, sorted, strictly increasing (duplicates are bumped
    to the next fp16 value up, or down at the top of the range)."""
    K = c.shape[1]
    o = _ordinals(c.half()).sort(1).values
    j = torch.arange(K, dtype=torch.int32, device=c.device)
    o = (o - j).cummax(1).values + j                         # o[j] >= o[j-1] + 1
    top = _ordinals(torch.tensor(65504.0, dtype=torch.float16)).item()
    o = torch.minimum(o, top - (K - 1) + j)                  # keep it finite (still strictly increasing)
    return _fp16_from_ordinals(o)


def _index_table(lut: torch.Tensor, values: torch.Tensor, kmin: int | None = None) -> torch.Tensor:
    """(G, R) uint8: index of the nearest LUT entry for every value of the table (ties go up)."""
    G, K = lut.shape
    R = values.numel()
    l = lut.double()
    b = _locate(values, (l[:, 1:] + l[:, :-1]) * 0.5, kmin)                       # (G, K-1) in [0, R]
    t = torch.zeros(G, R + 1, dtype=torch.int32, device=lut.device)
    t.scatter_add_(1, b, torch.ones_like(b, dtype=torch.int32))
    return t[:, :R].cumsum(1, dtype=torch.int32).to(torch.uint8)


@torch.no_grad()
def palettize_weights(ws, bits: int = 4, group_size: int = 16, importances=None, names=None,
                      max_bins: int | None = None, progress=None, **kmeans_args):
    """Palettize several 2-D weights at once: all their groups go through one k-means per chunk (at most
    `max_bins` histogram bins; a GPU sees ~100 ops per chunk instead of per layer).
    Returns a list of (lut fp16 (out // group_size, 2**bits), indices uint8 (out, in)). `progress`, if given,
    is called with the number of weights finished after each chunk."""
    names = names or [f"weight {i}" for i in range(len(ws))]
    importances = importances or [None] * len(ws)
    K = 2 ** bits
    for w, imp, name in zip(ws, importances, names):
        _check_weight(w, bits, group_size, name, imp)
    if not ws:
        return []
    device = ws[0].device
    if max_bins is None:   # each histogram bin costs ~48 bytes (counts, 3 prefix sums, temporaries, index table)
        max_bins = int(0.4 * torch.cuda.mem_get_info(device)[0] / 48) if device.type == "cuda" else 2 ** 24
    max_bins = min(max_bins, 2 ** 31 - 2 ** 24)            # bin numbers are int32
    keys = [fp16_keys(w.detach().to(torch.float16)) for w in ws]                 # (out, in) int16
    lim = torch.stack([torch.stack(torch.aminmax(k)) for k in keys]).int().tolist()  # one sync
    for (lo, hi), name, w in zip(lim, names, ws):
        if lo < FINITE_KEYS[0] or hi > FINITE_KEYS[1]:
            bad = "NaN" if torch.isnan(w).any() else "Inf (or beyond the fp16 range)"
            raise PalettizeError(f"{name}: weight contains {bad}")
    # chunks of consecutive weights whose histograms fit in max_bins
    chunks, cur = [], []
    for i in range(len(ws)):
        trial = cur + [i]
        lo, hi = min(lim[j][0] for j in trial), max(lim[j][1] for j in trial)
        if cur and sum(ws[j].shape[0] // group_size for j in trial) * (hi - lo + 1) > max_bins:
            chunks.append(cur)
            trial = [i]
        cur = trial
    chunks.append(cur)

    out = [None] * len(ws)
    for chunk in chunks:
        kmin, kmax = min(lim[j][0] for j in chunk), max(lim[j][1] for j in chunk)
        R = kmax - kmin + 1
        values = key_values(kmin, kmax, device)                                     # (R,)
        Gs = [ws[j].shape[0] // group_size for j in chunk]
        counts = torch.zeros(sum(Gs) * R, dtype=torch.float64, device=device)
        bins, g0 = [], 0
        for j, G in zip(chunk, Gs):
            off = torch.arange(g0, g0 + G, dtype=torch.int32, device=device)[:, None] * R - kmin
            bj = (keys[j].view(G, -1) + off).view(-1)          # int32: chunk group * R + key - kmin
            imp = importances[j]
            if imp is None:
                counts.index_add_(0, bj, torch.ones(1, dtype=torch.float64, device=device).expand(bj.numel()))
            else:   # weighted: scale each group's importance to max 1 (equal importance == unweighted)
                imp = imp.detach().to(device, torch.float64).view(G, -1)
                imp = (imp / imp.amax(1, keepdim=True).clamp_min(1e-300)).clamp_min(1e-6)
                counts.index_add_(0, bj, imp.view(-1))
            bins.append(bj)
            g0 += G
        counts = counts.view(g0, R)
        centres = kmeans1d(counts, values, K, kmin=kmin, **kmeans_args)
        del counts
        lut = _lut_from_centres(centres)                                           # (G_chunk, K) fp16
        table = _index_table(lut, values, kmin).view(-1)                                 # (G_chunk * R,)
        g0 = 0
        for j, G, bj in zip(chunk, Gs, bins):
            idx = table.index_select(0, bj).view(ws[j].shape)
            out[j] = (lut[g0:g0 + G].contiguous(), idx)
            g0 += G
        if progress:
            progress(len(chunk))
    return out


def palettize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 16, importance=None, **kmeans_args):
    """w (out, in) -> (lut fp16 (out // group_size, 2**bits) sorted and distinct, indices uint8 (out, in)).
    Rows g*group_size ... (g+1)*group_size - 1 share LUT g. `importance` (same shape, >= 0) weights the
    k-means (e.g. the diagonal Fisher information)."""
    return palettize_weights([w], bits, group_size, None if importance is None else [importance],
                             **kmeans_args)[0]


def dequantize(lut: torch.Tensor, indices: torch.Tensor, group_size: int = 16) -> torch.Tensor:
    """LUTs (G, K) and indices (out, in) -> dense float32 weight (out, in) with exactly the LUT values."""
    rows = lut.float().repeat_interleave(group_size, 0)                            # (out, K)
    return rows.gather(1, indices.long())


def quantize_embedding(w: torch.Tensor):
    """Symmetric 8-bit quantization per row: w ~= q * scale, q int8 in [-127, 127], scale fp16 (V, 1)."""
    amax = w.detach().float().abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).half()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2 ** -24))       # no fp16 underflow to 0
    q = (w.detach().float() / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return q, scale


# ----------------------------------------------------------------------------------------------------------
# Modules

class PalettizedLinear(nn.Module):
    """Frozen stand-in for nn.Linear (no bias): weight = lut[row // group_size][indices]."""

    def __init__(self, lut: torch.Tensor, indices: torch.Tensor, bits: int, group_size: int = 16):
        super().__init__()
        self.register_buffer("lut", lut.half())           # (out // group_size, 2**bits)
        self.register_buffer("indices", indices.to(torch.uint8))  # (out, in)
        self.bits, self.group_size = int(bits), int(group_size)
        self.out_features, self.in_features = indices.shape

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.lut, self.indices, self.group_size)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"


def projection_names(model: nn.Module) -> list[str]:
    """Names of the projection modules (float or palettized), in model order."""
    return [n for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in PROJECTIONS and isinstance(m, (nn.Linear, PalettizedLinear))]


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def set_embedding(model: nn.Module, q: torch.Tensor, scale: torch.Tensor):
    """Make tok_emb carry the int8 embedding: buffers weight_int8, weight_scale; weight = their product."""
    e = model.tok_emb
    e.register_buffer("weight_int8", q.to(e.weight.device))
    e.register_buffer("weight_scale", scale.to(e.weight.device))
    e.weight.data = q.to(e.weight.device).float() * scale.to(e.weight.device).float()
    e.weight.requires_grad_(False)


@torch.no_grad()
def palettize_model(model: nn.Module, bits, group_size: int = 16, importance: dict | None = None,
                    progress: bool = False) -> list[dict]:
    """Palettize every projection of `model` in place (and quantize the embedding to 8 bits).
    bits: an int or {layer name: bits}; importance: optional {layer name: tensor like the weight}.
    Returns [{name, bits, mse, rel_mse}] per layer. Checks every layer before changing anything."""
    names = projection_names(model)
    layers = {n: model.get_submodule(n) for n in names}
    todo = [n for n in names if isinstance(layers[n], nn.Linear)]
    bits_of = {n: bits if isinstance(bits, int) else bits.get(n) for n in todo}
    importance = importance or {}
    for n in todo:
        if bits_of[n] is None:
            raise PalettizeError(f"{n}: no bits given for this layer")
        _check_weight(layers[n].weight, bits_of[n], group_size, n, importance.get(n))
        if not bool(torch.isfinite(layers[n].weight).all()):
            raise PalettizeError(f"{n}: weight contains NaN or Inf")
    report = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="palettize", unit="layer")
    # layers of equal bits go through the k-means together (palettize_weights splits them into chunks)
    for b in sorted(set(bits_of.values())):
        part = [n for n in todo if bits_of[n] == b]
        ws = [layers[n].weight for n in part]
        imps = [importance.get(n) for n in part] if any(n in importance for n in part) else None
        if imps is not None:
            imps = [torch.ones_like(w) if m is None else m for w, m in zip(ws, imps)]
        res = palettize_weights(ws, b, group_size, imps, names=part, progress=bar.update if bar else None)
        for n, w, (lut, idx) in zip(part, ws, res):
            err = (dequantize(lut, idx, group_size) - w.float()).pow(2).mean().item()
            power = w.float().pow(2).mean().item()
            report[n] = {"name": n, "bits": b, "mse": err, "rel_mse": err / power if power > 0 else 0.0}
            _set_module(model, n, PalettizedLinear(lut, idx, b, group_size))
    if bar:
        bar.close()
    if not hasattr(model.tok_emb, "weight_int8"):
        set_embedding(model, *quantize_embedding(model.tok_emb.weight))
    return [report[n] for n in todo]


# ----------------------------------------------------------------------------------------------------------
# Storage: indices packed to their bit width

def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2**bits -> a flat uint8 stream of len ceil(numel * bits / 8) (little-endian bits)."""
    flat = idx.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    bitstream = ((flat[:, None] >> shifts) & 1).reshape(-1)                       # (numel * bits,)
    pad = (-bitstream.numel()) % 8
    bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)]).view(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    n = math.prod(shape)
    if bits == 8:
        return packed[:n].view(shape).clone()
    bitstream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    b = bitstream[:n * bits].view(n, bits)
    return (b << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(1, dtype=torch.uint8).view(shape)


def stored_tensors(model: nn.Module) -> dict:
    """What a palettized checkpoint stores: {"layers": {name: {bits, group_size, shape, lut, indices}},
    "embedding": {"q", "scale"}, "float": {name: fp16 tensor} (norm weights)}."""
    layers = {}
    covered = set()
    for n in projection_names(model):
        m = model.get_submodule(n)
        if not isinstance(m, PalettizedLinear):
            raise PalettizeError(f"{n}: not palettized (run palettize_model first)")
        layers[n] = {"bits": m.bits, "group_size": m.group_size, "shape": list(m.indices.shape),
                     "lut": m.lut.detach().cpu().half(), "indices": pack_bits(m.indices.detach().cpu(), m.bits)}
        covered |= {f"{n}.lut", f"{n}.indices"}
    e = model.tok_emb
    if not hasattr(e, "weight_int8"):
        raise PalettizeError("tok_emb: embedding not quantized (run palettize_model first)")
    covered |= {"tok_emb.weight", "tok_emb.weight_int8", "tok_emb.weight_scale"}
    floats = {k: v.detach().cpu().half() for k, v in model.state_dict().items() if k not in covered}
    return {"layers": layers, "embedding": {"q": e.weight_int8.detach().cpu(), "scale": e.weight_scale.detach().cpu()},
            "float": floats}


def stored_bytes(stored: dict) -> int:
    """Bytes of everything needed to run: packed indices, LUTs, int8 embedding and scales, fp16 norms."""
    t = [v for L in stored["layers"].values() for v in (L["lut"], L["indices"])]
    t += list(stored["embedding"].values()) + list(stored["float"].values())
    return sum(x.numel() * x.element_size() for x in t)


def save_palettized(path: str, model: nn.Module, **extra) -> None:
    """Write a palettized model (kind "palettized", config inside), atomically."""
    stored = stored_tensors(model)
    save_checkpoint(path, kind="palettized", config=asdict(model.config), **stored, **extra)


def load_palettized(path: str, map_location="cpu"):
    """-> (Transformer whose projections are PalettizedLinear, checkpoint dict)."""
    ckpt = load_checkpoint(path, "palettized", map_location="cpu")
    try:
        model = Transformer(config_from_dict(ckpt["config"]))
        for n, L in ckpt["layers"].items():
            m = model.get_submodule(n)
            if list(m.weight.shape) != list(L["shape"]):
                raise ValueError(f"{n} has shape {L['shape']}, the config says {list(m.weight.shape)}")
            idx = unpack_bits(L["indices"], L["bits"], L["shape"])
            _set_module(model, n, PalettizedLinear(L["lut"], idx, L["bits"], L["group_size"]))
        missing = [n for n in projection_names(model) if n not in ckpt["layers"]]
        if missing:
            raise ValueError(f"no palettized weight for {missing[0]}")
        set_embedding(model, ckpt["embedding"]["q"], ckpt["embedding"]["scale"])
        floats = {k: v.float() for k, v in ckpt["float"].items()}
        bad = model.load_state_dict(floats, strict=False)
        lost = [k for k in bad.missing_keys if not k.endswith((".lut", ".indices")) and not k.startswith("tok_emb.")]
        if lost or bad.unexpected_keys:
            raise ValueError(f"float tensors do not match the config ({(lost + bad.unexpected_keys)[0]})")
    except (KeyError, ValueError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid palettized checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(map_location), ckpt


# ----------------------------------------------------------------------------------------------------------
# Sensitivity and mixed-bit allocation

def layer_bits_cost(shape, bits: int, group_size: int) -> int:
    """Bits to store one palettized weight: indices plus fp16 LUTs."""
    out_f, in_f = shape
    return bits * out_f * in_f + 16 * (out_f // group_size) * 2 ** bits


def bits_per_weight(shapes: dict, bits: dict, group_size: int) -> float:
    """Average bits per projection weight, LUT bytes included. shapes, bits: {name: (out, in)}, {name: bits}."""
    n = sum(a * b for a, b in shapes.values())
    return sum(layer_bits_cost(shapes[k], bits[k], group_size) for k in shapes) / n


def allocate_bits(shapes: dict, cost: dict, target: float, group_size: int = 16, low: int = 2, high: int = 4,
                  tol: float = 0.015) -> dict:
    """Give each layer `low` or `high` bits so that bits_per_weight lands within `tol` of `target`, at the least
    total `cost` (cost[name] = what moving that layer from high to low bits costs, e.g. its loss rise). A 0/1
    knapsack solved exactly by DP over the bits saved, in steps of ~0.002 / len(shapes) bits per weight.
    Raises PalettizeError when no assignment gets within tol."""
    names = list(shapes)
    n = sum(a * b for a, b in shapes.values())
    hi = bits_per_weight(shapes, {k: high for k in names}, group_size)
    lo = bits_per_weight(shapes, {k: low for k in names}, group_size)
    if not lo - tol <= target <= hi + tol:
        raise PalettizeError(f"--bpw {target}: {low}/{high}-bit layers reach only {lo:.3f} .. {hi:.3f} bits per "
                             f"weight with group size {group_size}")
    step = 0.004 / len(names) * n                                     # DP resolution, in bits
    save = [round((layer_bits_cost(shapes[k], high, group_size) - layer_bits_cost(shapes[k], low, group_size))
                  / step) for k in names]
    S = sum(save)
    best = torch.full((S + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    took = torch.zeros(len(names), S + 1, dtype=torch.bool)
    for i, (k, s) in enumerate(zip(names, save)):
        cand = torch.full_like(best, math.inf)
        cand[s:] = best[:S + 1 - s] + max(float(cost[k]), 0.0)
        took[i] = cand < best
        best = torch.minimum(best, cand)
    need = (hi - target) * n / step                                   # bits to save, in steps
    sums = torch.arange(S + 1, dtype=torch.float64)
    ok = (sums - need).abs() <= (tol * n / step)
    if not bool((ok & best.isfinite()).any()):
        raise PalettizeError(f"--bpw {target}: no mix of {low}- and {high}-bit layers lands within {tol} of it")
    s = int(torch.where(ok, best, math.inf).argmin())
    bits = {}
    for i in reversed(range(len(names))):
        if took[i, s]:
            bits[names[i]] = low
            s -= save[i]
        else:
            bits[names[i]] = high
    return {k: bits[k] for k in names}


def calibration_batches(train: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int, device):
    from data import get_batch
    g = torch.Generator().manual_seed(seed)
    return [get_batch(train, batch_size, seq_len, g, device) for _ in range(n)]


def fisher_information(model: nn.Module, batches, names) -> dict:
    """Diagonal Fisher information of the projection weights: squared gradients of the training loss,
    summed over the calibration batches. {name: float32 tensor like the weight}."""
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    for x, y in batches:
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(weights, grads):
            fisher[n] += g.float() ** 2
    for n, p in model.named_parameters():
        p.requires_grad_(was[n])
    return fisher


@torch.no_grad()
def calibration_loss(model: nn.Module, batches) -> float:
    total = 0.0
    for x, y in batches:
        logits = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    return total / len(batches)


@torch.no_grad()
def loss_rise_at(model: nn.Module, names, batches, bits: int, group_size: int, importance: dict | None,
                 progress: bool = False) -> dict:
    """Rise of the calibration loss when each layer alone is palettized to `bits` (the others float)."""
    ws = [model.get_submodule(n).weight for n in names]
    res = palettize_weights(ws, bits, group_size, None if importance is None else [importance[n] for n in names],
                            names=names)
    base = calibration_loss(model, batches)
    it = zip(names, ws, res)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(names), desc=f"sensitivity ({bits}-bit)", unit="layer")
    rise = {}
    for n, w, (lut, idx) in it:
        keep = w.data.clone()
        w.data = dequantize(lut, idx, group_size).to(w.dtype)
        rise[n] = calibration_loss(model, batches) - base
        w.data = keep
    return rise


def fisher_score(model: nn.Module, names, fisher: dict, bits: int, group_size: int, weighted: bool) -> dict:
    """Second-order estimate of the loss rise when each layer alone goes to `bits`: 1/2 sum F * (w_hat - w)^2."""
    ws = [model.get_submodule(n).weight for n in names]
    res = palettize_weights(ws, bits, group_size, [fisher[n] for n in names] if weighted else None, names=names)
    return {n: 0.5 * (fisher[n] * (dequantize(lut, idx, group_size) - w.float()) ** 2).sum().item()
            for n, w, (lut, idx) in zip(names, ws, res)}


# ----------------------------------------------------------------------------------------------------------
# Script

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description="Palettize a trained model: every projection weight -> per-16-channel k-means LUTs "
                    "(uniform --bits, or a 2/4-bit mix hitting --bpw), the embedding -> 8-bit per row. "
                    "Writes OUT_DIR/palettized.pt and OUT_DIR/palettize.json.")
    ap.add_argument("--ckpt", default=None, help="float model checkpoint from train.py [OUT_DIR/ckpt.pt]")
    ap.add_argument("--out-dir", default="out", help="where palettized.pt and palettize.json go (default: out)")
    ap.add_argument("--bits", type=int, default=None,
                    help=f"uniform bits for every projection ({', '.join(map(str, BITS))})")
    ap.add_argument("--bpw", type=float, default=None,
                    help="target average bits per projection weight (LUTs included), mixing 2- and 4-bit layers "
                         "where the model is least sensitive (default 3.7, the paper's shipped setting, when "
                         "--bits is not given)")
    ap.add_argument("--group-size", type=int, default=16, help="output channels sharing one LUT (default 16)")
    ap.add_argument("--sensitivity", action=argparse.BooleanOptionalAction, default=True,
                    help="weight the k-means by the diagonal Fisher information (squared gradients of the "
                         "training loss over the calibration batches); on by default (it never hurt in our "
                         "runs and costs a few calibration passes); --no-sensitivity for plain k-means")
    ap.add_argument("--calib-batches", type=int, default=4,
                    help="calibration batches of the training text, for --sensitivity and the --bpw allocation "
                         "(default 4)")
    ap.add_argument("--calib-batch-size", type=int, default=8, help="sequences per calibration batch (default 8)")
    ap.add_argument("--alloc", choices=("fisher", "loss"), default="fisher",
                    help="--bpw: what moving a layer from 4 to 2 bits costs: 'fisher' = the rise of 1/2 sum F "
                         "(w_hat - w)^2 (default; no extra passes), 'loss' = measured rise of the calibration "
                         "loss with that layer alone at 2 bits (one pass over the calibration batches per layer)")
    ap.add_argument("--data", default=None, help="corpus (default: the one the checkpoint was trained on, else bible)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the checkpoint's)")
    ap.add_argument("--eval-windows", type=int, default=256, help="validation windows per evaluation (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration batches (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    a = ap.parse_args(argv)
    t_start = time.time()
    try:
        return run(a, t_start)
    except (PalettizeError, CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")


def run(a, t_start) -> dict:
    from data import DataError, evaluate, load_splits

    if a.bits is not None and a.bpw is not None:
        raise PalettizeError("give --bits or --bpw, not both")
    if a.bits is not None and a.bits not in BITS:
        raise PalettizeError(f"--bits {a.bits}: unsupported (choose from {', '.join(map(str, BITS))})")
    if a.bits is None and a.bpw is None:
        a.bpw = 3.7
    if a.group_size < 1:
        raise PalettizeError(f"--group-size {a.group_size}: must be positive")
    if a.calib_batches < 1 or a.calib_batch_size < 1 or a.eval_windows < 1:
        raise PalettizeError("--calib-batches, --calib-batch-size and --eval-windows must be positive")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PalettizeError(f"--device {device}: CUDA is not available")
    ckpt_path = a.ckpt or os.path.join(a.out_dir, "ckpt.pt")
    model, ckpt = load_model(ckpt_path)
    settings = (ckpt.get("train_state") or {}).get("settings") or {}
    data_name = a.data or settings.get("data") or "bible"
    seq_len = a.seq_len or settings.get("seq_len") or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise PalettizeError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    names = projection_names(model)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    # every check before any work, so that bad input writes nothing
    for n in names:
        w = model.get_submodule(n).weight
        _check_weight(w, a.bits or 4, a.group_size, n)
        if not bool(torch.isfinite(w).all()):
            raise PalettizeError(f"{n}: weight contains NaN or Inf")
    if not bool(torch.isfinite(model.tok_emb.weight).all()):
        raise PalettizeError("tok_emb: weight contains NaN or Inf")
    if a.bpw is not None:   # reachable at all?
        allocate_bits(shapes, {n: 0.0 for n in names}, a.bpw, a.group_size)
    try:
        train, val = load_splits(data_name, seq_len)
    except DataError as e:
        raise PalettizeError(str(e)) from None
    model.to(device).eval()
    print(f"{ckpt_path}: {model.config.name}, {len(names)} projections, "
          f"{sum(a_ * b_ for a_, b_ in shapes.values()):,} projection weights; data {data_name}, seq_len {seq_len}")

    bpb_float = evaluate(model, val, seq_len, batch_size=16, max_windows=a.eval_windows, device=device)["bpb"]
    print(f"val bpb float: {bpb_float:.4f}")
    batches = None
    importance = None
    if a.sensitivity or a.bpw is not None:
        batches = calibration_batches(train, a.calib_batches, a.calib_batch_size, seq_len, a.seed, device)
    if a.sensitivity:
        t = time.time()
        importance = fisher_information(model, batches, names)
        print(f"Fisher information from {a.calib_batches} x {a.calib_batch_size} sequences: {time.time() - t:.1f} s")
    rise = None
    if a.bpw is not None:
        t = time.time()
        if a.alloc == "loss":
            rise = loss_rise_at(model, names, batches, 2, a.group_size, importance, progress=True)
        else:
            fisher = importance if importance is not None else fisher_information(model, batches, names)
            s2 = fisher_score(model, names, fisher, 2, a.group_size, a.sensitivity)
            s4 = fisher_score(model, names, fisher, 4, a.group_size, a.sensitivity)
            rise = {n: s2[n] - s4[n] for n in names}
        bits = allocate_bits(shapes, rise, a.bpw, a.group_size)
        print(f"bit allocation ({a.alloc}): {time.time() - t:.1f} s")
    else:
        bits = {n: a.bits for n in names}
    bpw = bits_per_weight(shapes, bits, a.group_size)

    t = time.time()
    report = palettize_model(model, bits, a.group_size, importance, progress=True)
    t_pal = time.time() - t
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    bpb_pal = evaluate(model, val, seq_len, batch_size=16, max_windows=a.eval_windows, device=device)["bpb"]
    stored = stored_tensors(model)
    model_bytes = stored_bytes(stored)
    float_bytes = 2 * sum(p.numel() for p in Transformer(model.config).to("meta").parameters())

    width = max(len(n) for n in names)
    print(f"{'layer':<{width}}  bits  {'mse':>10}  {'rel_mse':>8}" + (f"  2-bit cost ({a.alloc})" if rise else ""))
    for r in report:
        print(f"{r['name']:<{width}}  {r['bits']:>4}  {r['mse']:>10.3e}  {r['rel_mse']:>8.4f}"
              + (f"  {rise[r['name']]:+.3e}" if rise else ""))
    rel = (bpb_pal - bpb_float) / bpb_float
    print(f"bits per weight {bpw:.3f} ({sum(b == 2 for b in bits.values())} of {len(bits)} layers 2-bit), "
          f"embedding 8-bit; model {model_bytes:,} bytes vs fp16 {float_bytes:,} ({float_bytes / model_bytes:.2f}x)")
    print(f"val bpb: float {bpb_float:.4f} -> palettized {bpb_pal:.4f} ({100 * rel:+.2f}%); "
          f"k-means {t_pal:.1f} s")

    out = {
        "ckpt": ckpt_path, "config": model.config.name, "data": data_name, "seq_len": seq_len,
        "group_size": a.group_size, "target_bpw": a.bpw, "uniform_bits": a.bits, "sensitivity": a.sensitivity,
        "alloc": a.alloc if a.bpw is not None else None, "calib_batches": a.calib_batches, "calib_batch_size": a.calib_batch_size, "eval_windows": a.eval_windows,
        "bits_per_weight": bpw, "embedding_bits": 8, "model_bytes": model_bytes, "float_bytes": float_bytes,
        "layers": [dict(r, **({"cost_2bit": rise[r["name"]]} if rise else {})) for r in report],
        "val_bpb_float": bpb_float, "val_bpb_palettized": bpb_pal, "val_bpb_rise": rel,
        "palettize_seconds": t_pal, "device": device,
    }
    out["seconds"] = time.time() - t_start
    os.makedirs(a.out_dir, exist_ok=True)
    save_palettized(os.path.join(a.out_dir, "palettized.pt"), model.cpu(), report=out)
    save_json(os.path.join(a.out_dir, "palettize.json"), out)
    print(f"wrote {os.path.join(a.out_dir, 'palettized.pt')} and palettize.json in {out['seconds']:.1f} s")
    return out


if __name__ == "__main__":
    main()
