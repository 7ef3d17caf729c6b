"""Tests for palettize.py: the k-means (against an exact DP optimum), LUT/index invariants, weighting, the
mixed-bit allocation, the packed checkpoint and the script's errors. Runs in well under a minute on 2 cores.
"""

import itertools
import math
import os

import numpy as np
import pytest
import torch

import palettize as P
from model import ModelConfig, Transformer
from plumbing import save_model

MICRO = ModelConfig(
    name="micro", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=64
)


def sample(kind: int, shape, seed: int, scale: float = 0.05) -> torch.Tensor:
    """Weights of several shapes of distribution: normal, uniform, Laplace, bimodal, heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == 0:
        x = torch.randn(n, generator=g)
    elif kind == 1:
        x = torch.rand(n, generator=g) * 2 - 1
    elif kind == 2:  # Laplace
        u = torch.rand(n, generator=g) - 0.5
        x = -u.sign() * torch.log1p(-2 * u.abs())
    elif kind == 3:  # two bumps of different widths
        x = torch.where(
            torch.rand(n, generator=g) < 0.5,
            torch.randn(n, generator=g) - 3,
            torch.randn(n, generator=g) * 0.3 + 2,
        )
    else:  # Student t, 3 degrees of freedom (outliers)
        z = torch.randn(n, generator=g)
        chi2 = torch.randn(n, 3, generator=g).pow(2).sum(1)
        x = z / (chi2 / 3).sqrt()
    return (x * scale).view(shape)


def optimal_sse(x: np.ndarray, k: int) -> float:
    """Exact 1-D k-means (at most k clusters) by dynamic programming over the sorted values, O(k n^2)."""
    x = np.sort(x.astype(np.float64))
    n = len(x)
    p1, p2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = p2[j] - p2[i] - (p1[j] - p1[i]) ** 2 / (j - i)
    cost[j <= i] = np.inf  # cost[i, j]: one cluster holding x[i:j]
    d = np.full(n + 1, np.inf)
    d[0] = 0.0
    best = np.inf
    for _ in range(k):
        d = (d[:, None] + cost).min(0)
        best = min(best, d[n])
    return max(best, 0.0)


def group_sse(w, lut, idx, gs=16):
    return ((P.dequantize(lut, idx, gs) - w.half().float()).double() ** 2).view(-1, gs * w.shape[1]).sum(1)


# ----------------------------------------------------------------------------------------------------------
# fp16 keys


def test_fp16_keys_are_order_preserving():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16)
    x = x[torch.isfinite(x)]
    keys = P.fp16_keys(x).to(torch.int32)
    order = keys.argsort()
    assert (x[order][1:].float() >= x[order][:-1].float()).all()  # sorting keys sorts values
    finite = (-31744, 31743)  # the keys of -65504 and +65504
    assert keys.min() >= finite[0] and keys.max() <= finite[1]
    assert torch.equal(P.key_values(*finite), x[order].double())


# ----------------------------------------------------------------------------------------------------------
# LUT and index invariants

CASES = [(bits, kind, seed) for seed, (bits, kind) in enumerate(itertools.product(P.BITS, range(5)))]


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("bits,kind,seed", CASES)
def test_lut_and_indices_invariants(bits, kind, seed, plain):
    rows = 16 * (1 + seed % 3)
    cols = [8, 24, 64, 100][seed % 4]
    w = sample(kind, (rows, cols), seed)
    lut, idx = P.palettize_weight(w, bits, plain=plain)
    K = 2**bits
    assert lut.dtype == torch.float16 and lut.shape == (rows // 16, K)
    assert idx.dtype == torch.uint8 and idx.shape == w.shape
    assert int(idx.max()) < K
    assert torch.isfinite(lut).all()
    assert (lut[:, 1:].float() > lut[:, :-1].float()).all(), "LUT sorted and distinct"
    w_hat = P.dequantize(lut, idx)
    assert w_hat.dtype == torch.float32
    for g in range(rows // 16):  # at most K values per group, each a LUT entry
        vals = w_hat[16 * g : 16 * (g + 1)].unique()
        assert len(vals) <= K
        assert torch.isin(vals, lut[g].float()).all()
    # every index points at the nearest LUT entry (so the stored LUT is used optimally)
    w16 = w.half().double().view(rows // 16, -1)
    dist = (w16[:, :, None] - lut.double()[:, None, :]).abs()
    chosen = dist.gather(2, idx.view(rows // 16, -1).long()[..., None])[..., 0]
    assert (chosen <= dist.min(2).values).all()


def test_dequantize_reproduces_lut_exactly():
    lut = torch.tensor([[-1.0, -0.25, 0.5, 3.0]], dtype=torch.float16).repeat(2, 1)
    lut[1] = lut[1] * 2
    idx = torch.randint(0, 4, (32, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    w = P.dequantize(lut, idx, 16)
    assert torch.equal(w[:16], lut[0].float()[idx[:16].long()])
    assert torch.equal(w[16:], lut[1].float()[idx[16:].long()])


def test_few_distinct_values_are_reproduced_exactly():
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor([-0.5, -0.1, 0.0, 0.2, 0.7])
    w = levels[torch.randint(0, 5, (32, 40), generator=g)]
    lut, idx = P.palettize_weight(w, 3)  # 8 entries >= 5 distinct values: exact
    assert torch.equal(P.dequantize(lut, idx), w.half().float())
    assert (lut[:, 1:].float() > lut[:, :-1].float()).all()
    c = torch.full((16, 8), 0.123)  # constant group: 1-bit still gives 2 distinct entries
    lut, idx = P.palettize_weight(c, 1)
    assert lut[0, 0] != lut[0, 1] and torch.equal(P.dequantize(lut, idx), c.half().float())


def test_extreme_fp16_values():
    w = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 0.0, -0.0] * 16).view(16, 6)
    for bits in (1, 2, 4):
        lut, idx = P.palettize_weight(w, bits)
        assert torch.isfinite(lut).all() and (lut[:, 1:].float() > lut[:, :-1].float()).all()


# ----------------------------------------------------------------------------------------------------------
# Quality of the k-means


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_within_one_percent_of_exact_optimum(bits):
    worst = 1.0
    for seed in range(12):
        kind = seed % 5
        w = sample(kind, (16, 8), 1000 * bits + seed)  # one group of 128 weights
        lut, idx = P.palettize_weight(w, bits)
        ours = group_sse(w, lut, idx).item()
        opt = optimal_sse(w.half().double().numpy().ravel(), 2**bits)
        ratio = ours / opt if opt > 0 else (1.0 if ours == 0 else math.inf)
        worst = max(worst, ratio)
        assert ratio <= 1.01, f"kind {kind} seed {seed}: {ours:.6g} vs optimum {opt:.6g}"
    assert worst >= 1.0 - 1e-9  # nothing beats the optimum (sanity of the DP)


def test_fast_path_never_worse_than_plain_kmeans():
    """The plain Lloyd k-means (section 1) is the oracle: over many seeded groups, weighted and not, the fast
    path's (weighted) squared error is never above the plain one's by more than 1e-4 (relative). The two start
    differently (plain: k quantiles; fast: both plain's start and half quantiles, half evenly spaced) and the
    fast path goes on past Lloyd's local optimum, so it is usually lower."""
    lower = 0
    for seed in range(120):
        bits, kind = [1, 2, 3, 4][seed % 4], seed % 5
        w = sample(kind, (16 * (1 + seed % 2), [8, 24, 64, 100][seed // 4 % 4]), 5000 + seed)
        imp = None if seed % 3 else sample(1, w.shape, 9000 + seed).abs()
        weight = (
            1.0 if imp is None else P.importance_weights(imp.reshape(w.shape[0] // 16, -1)).reshape(w.shape)
        )
        err = [
            (
                (
                    P.dequantize(*P.palettize_weight(w, bits, importance=imp, plain=plain)).double()
                    - w.half().double()
                )
                ** 2
                * weight
            )
            .sum()
            .item()
            for plain in (False, True)
        ]
        assert err[0] <= err[1] * (1 + 1e-4) + 1e-30, (seed, err)
        lower += err[0] < err[1] * (1 - 1e-3)
    assert lower >= 30  # and it is often clearly better


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_no_worse_than_uniform_min_max_levels(bits):
    K = 2**bits
    for seed in range(10):
        w = sample(seed % 5, (32, 48), 77 + seed)
        lut, idx = P.palettize_weight(w, bits)
        ours = group_sse(w, lut, idx)
        x = w.half().double().view(2, -1)
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        levels = lo + (hi - lo) * torch.linspace(0, 1, K, dtype=torch.float64)  # (2, K)
        uniform = (x[:, :, None] - levels[:, None, :]).abs().min(2).values.pow(2).sum(1)
        assert (ours <= uniform * (1 + 1e-9)).all(), (seed, ours, uniform)


def test_objective_never_increases():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        R = int(torch.randint(5, 3000, (1,), generator=g))
        G = int(torch.randint(1, 6, (1,), generator=g))
        values = torch.randn(R, generator=g, dtype=torch.float64).sort().values
        counts = torch.rand(G, R, generator=g, dtype=torch.float64) * (torch.rand(G, R, generator=g) < 0.5)
        history = []
        c = P.kmeans1d(counts, values, [2, 4, 8, 16, 64][seed % 5] if seed < 19 else 256, history=history)
        h = torch.stack(history)  # (steps, G)
        assert len(history) > 1
        assert (h[1:] <= h[:-1] * (1 + 1e-12) + 1e-12).all(), f"seed {seed}"
        assert (c[:, 1:] >= c[:, :-1]).all()


def test_deterministic():
    w = sample(0, (64, 96), 5)
    imp = sample(1, (64, 96), 6).abs()
    for kw in ({}, {"importance": imp}):
        a, b = P.palettize_weight(w, 4, **kw), P.palettize_weight(w.clone(), 4, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------
# Weighted k-means


def test_equal_importance_is_unweighted():
    for seed in range(6):
        w = sample(seed % 5, (32, 40), 300 + seed)
        plain = P.palettize_weight(w, [2, 4][seed % 2])
        for c in (1.0, 0.37, 1e3):
            weighted = P.palettize_weight(w, [2, 4][seed % 2], importance=torch.full_like(w, c))
            assert torch.equal(plain[0], weighted[0]) and torch.equal(plain[1], weighted[1])


def test_importance_lowers_error_where_it_is_high():
    for seed in range(5):
        w = sample(0, (16, 64), 400 + seed)
        g = torch.Generator().manual_seed(seed)
        hot = torch.rand(w.shape, generator=g) < 0.1
        imp = torch.where(hot, 100.0, 1.0)
        err = lambda r: (P.dequantize(*r) - w.half().float()).pow(2)
        plain, weighted = err(P.palettize_weight(w, 2)), err(P.palettize_weight(w, 2, importance=imp))
        assert weighted[hot].sum() < plain[hot].sum()
        # and the weighted objective itself is no worse
        assert (weighted * imp).sum() <= (plain * imp).sum() * 1.001


# ----------------------------------------------------------------------------------------------------------
# Bad input to the functions


def test_bad_weights_are_named():
    w = torch.randn(32, 8)
    with pytest.raises(P.PalettizeError, match="unsupported bits 5"):
        P.palettize_weight(w, 5)
    with pytest.raises(P.PalettizeError, match=r"30 output channels \(shape \(30, 8\)\)"):
        P.palettize_weight(torch.randn(30, 8), 4)
    bad = w.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(P.PalettizeError, match="NaN"):
        P.palettize_weight(bad, 4)
    bad[3, 4] = float("inf")
    with pytest.raises(P.PalettizeError, match="Inf"):
        P.palettize_weight(bad, 4)
    with pytest.raises(P.PalettizeError, match="Inf"):  # beyond fp16
        P.palettize_weight(w * 1e6, 4)
    with pytest.raises(P.PalettizeError, match="non-negative"):
        P.palettize_weight(w, 4, importance=-torch.ones_like(w))
    with pytest.raises(P.PalettizeError, match="importance shape"):
        P.palettize_weight(w, 4, importance=torch.ones(16, 8))
    m = Transformer(MICRO)
    with torch.no_grad():
        m.layers[1].ffn.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(P.PalettizeError, match="layers.1.ffn.up_proj"):
        P.palettize_model(m, 4)
    assert isinstance(m.layers[0].attn.q_proj, torch.nn.Linear), "nothing changed before the error"


# ----------------------------------------------------------------------------------------------------------
# Modules, embedding, storage


def test_quantize_embedding():
    w = sample(2, (300, 48), 9)
    w[7] = 0.0
    q, s = P.quantize_embedding(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (300, 1)
    assert q.abs().max() <= 127 and (s > 0).all()
    assert ((q.float() * s.float() - w).abs() <= s.float() / 2 + 1e-7).all()
    assert (q.abs().amax(1)[torch.arange(300) != 7] >= 126).all()  # the range is used


@pytest.mark.parametrize("bits", P.BITS)
def test_pack_bits_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in [(1, 1), (16, 3), (48, 37)]:
        idx = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)
        packed = P.pack_bits(idx, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(idx.numel() * bits / 8)
        assert torch.equal(P.unpack_bits(packed, bits, shape), idx)


def palettized_micro(seed=0):
    torch.manual_seed(seed)
    m = Transformer(MICRO).eval()
    names = P.projection_names(m)
    bits = {n: [4, 2, 3, 1, 6, 8, 4][i % 7] for i, n in enumerate(names)}
    report = P.palettize_model(m, bits)
    return m, bits, report


def test_palettize_model_and_linear():
    m, bits, report = palettized_micro()
    assert [r["name"] for r in report] == P.projection_names(m)
    for r in report:
        layer = m.get_submodule(r["name"])
        assert isinstance(layer, P.PalettizedLinear) and layer.bits == bits[r["name"]] == r["bits"]
        assert r["mse"] >= 0 and 0 <= r["rel_mse"] < 1
        x = torch.randn(3, layer.in_features)
        assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-6)
        assert not any(True for _ in layer.parameters())
    e = m.tok_emb
    assert e.weight_int8.dtype == torch.int8 and e.weight_scale.dtype == torch.float16
    assert (
        torch.equal(e.weight, e.weight_int8.float() * e.weight_scale.float()) and not e.weight.requires_grad
    )
    assert torch.isfinite(m(torch.randint(0, 256, (2, 9)))).all()


def test_checkpoint_round_trip(tmp_path):
    m, bits, _ = palettized_micro(1)
    path = str(tmp_path / "p.pt")
    P.save_palettized(path, m, note="hi")
    m2, ckpt = P.load_palettized(path)
    assert ckpt["kind"] == "palettized" and ckpt["note"] == "hi"
    for n in P.projection_names(m):
        a, b = m.get_submodule(n), m2.get_submodule(n)
        assert isinstance(b, P.PalettizedLinear) and (a.bits, a.group_size) == (b.bits, b.group_size)
        assert torch.equal(a.lut, b.lut) and torch.equal(a.indices, b.indices)
    assert torch.equal(m.tok_emb.weight_int8, m2.tok_emb.weight_int8)
    assert torch.equal(m.tok_emb.weight, m2.tok_emb.weight)
    x = torch.randint(0, 256, (2, 11))
    assert torch.allclose(m(x), m2(x), atol=1e-3)  # norms are stored in fp16
    stored = P.stored_bytes(P.stored_tensors(m))
    fp16 = 2 * sum(p.numel() for p in Transformer(MICRO).parameters())
    assert stored < fp16 / 2 and os.path.getsize(path) < fp16 / 1.5  # 6- and 8-bit layers in here
    with pytest.raises(P.CheckpointError):
        P.load_palettized(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------------------------------------
# Mixed-bit allocation

TINY_SHAPES = {
    f"layers.{i}.{n}": s
    for i in range(6)
    for n, s in [
        ("q_proj", (256, 256)),
        ("k_proj", (64, 256)),
        ("v_proj", (64, 256)),
        ("o_proj", (256, 256)),
        ("gate_proj", (768, 256)),
        ("up_proj", (768, 256)),
        ("down_proj", (256, 768)),
    ]
}


def test_allocation_lands_on_target():
    g = torch.Generator().manual_seed(0)
    for target in [2.2, 2.5, 3.0, 3.3, 3.5, 3.7, 3.9, 4.0]:
        cost = {n: float(torch.rand(1, generator=g)) for n in TINY_SHAPES}
        bits = P.allocate_bits(TINY_SHAPES, cost, target)
        assert set(bits.values()) <= {2, 4}
        assert abs(P.bits_per_weight(TINY_SHAPES, bits, 16) - target) <= 0.02


def test_allocation_is_the_cheapest_mix():
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        shapes = {f"l{i}": (16 * int(torch.randint(1, 9, (1,), generator=g)), 64) for i in range(9)}
        cost = {n: float(torch.rand(1, generator=g)) for n in shapes}
        target = 2.4 + 1.4 * float(torch.rand(1, generator=g))
        try:
            bits = P.allocate_bits(shapes, cost, target, tol=0.05)
        except P.PalettizeError:
            continue
        ours = sum(cost[n] for n in shapes if bits[n] == 2)
        best = math.inf
        for mask in range(2 ** len(shapes)):
            b = {n: 2 if mask >> i & 1 else 4 for i, n in enumerate(shapes)}
            if abs(P.bits_per_weight(shapes, b, 16) - target) <= 0.05 - 0.003:
                best = min(best, sum(cost[n] for n in shapes if b[n] == 2))
        assert abs(P.bits_per_weight(shapes, bits, 16) - target) <= 0.05 + 0.003
        assert ours <= best + 1e-9


def test_allocation_unreachable_target():
    with pytest.raises(P.PalettizeError, match="reach only"):
        P.allocate_bits(TINY_SHAPES, {n: 0.0 for n in TINY_SHAPES}, 1.5)
    with pytest.raises(P.PalettizeError, match="reach only"):
        P.allocate_bits(TINY_SHAPES, {n: 0.0 for n in TINY_SHAPES}, 4.5)


# ----------------------------------------------------------------------------------------------------------
# The script


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    path = d / "text.txt"
    g = torch.Generator().manual_seed(0)
    words = ["the", "lord", "said", "unto", "moses", "and", "it", "was", "good", "light", "day", "night"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=g).tolist())
    path.write_text(text)
    model_path = d / "ckpt.pt"
    torch.manual_seed(0)
    save_model(str(model_path), Transformer(MICRO))
    return str(path), str(model_path)


def run_script(corpus, out_dir, *flags):
    text, ckpt = corpus
    return P.main(
        [
            "--ckpt",
            ckpt,
            "--out-dir",
            str(out_dir),
            "--data",
            text,
            "--seq-len",
            "32",
            "--eval-windows",
            "4",
            "--calib-batches",
            "2",
            "--calib-batch-size",
            "2",
            *flags,
        ]
    )


def test_script_uniform_bits(corpus, tmp_path):
    out = run_script(corpus, tmp_path, "--bits", "4")
    for key in (
        "bits_per_weight",
        "embedding_bits",
        "model_bytes",
        "float_bytes",
        "layers",
        "val_bpb_float",
        "val_bpb_palettized",
        "seconds",
    ):
        assert key in out
    assert out["embedding_bits"] == 8 and out["model_bytes"] < out["float_bytes"] / 2.5
    assert {r["bits"] for r in out["layers"]} == {4} and len(out["layers"]) == 14
    assert 4 < out["bits_per_weight"] < 4 + 16 / 64  # LUTs add 2**bits * 16 / (16 * in) bits
    model, ckpt = P.load_palettized(str(tmp_path / "palettized.pt"))
    assert (
        os.path.exists(tmp_path / "palettize.json")
        and ckpt["report"]["bits_per_weight"] == out["bits_per_weight"]
    )


def test_script_mixed_bits_with_sensitivity(corpus, tmp_path):
    out = run_script(corpus, tmp_path, "--bpw", "3.2")
    assert abs(out["bits_per_weight"] - 3.2) <= 0.02
    assert {r["bits"] for r in out["layers"]} == {2, 4} and out["sensitivity"] and out["alloc"] == "fisher"
    out = run_script(corpus, tmp_path / "f", "--bpw", "3.2", "--alloc", "loss", "--no-sensitivity")
    assert abs(out["bits_per_weight"] - 3.2) <= 0.02 and not out["sensitivity"]


def test_script_plain_kmeans(corpus, tmp_path):
    fast = run_script(corpus, tmp_path / "fast", "--bits", "2", "--no-sensitivity")
    plain = run_script(corpus, tmp_path / "plain", "--bits", "2", "--no-sensitivity", "--kmeans", "plain")
    assert plain["kmeans"] == "plain" and plain["bits_per_weight"] == fast["bits_per_weight"]
    for f, p in zip(fast["layers"], plain["layers"]):
        assert f["mse"] <= p["mse"] * (1 + 1e-4)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bpw", "3.7", "--group-size", "0"], "must be positive"),
        (["--bpw", "1.0"], "reach only"),
        (["--bits", "4", "--bpw", "3.7"], "not both"),
        (
            ["--group-size", "48", "--bits", "4"],
            r"layers.0.attn.q_proj: 64 output channels \(shape \(64, 64\)\)",
        ),
    ],
)
def test_script_bad_flags(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run_script(corpus, tmp_path / "out", *flags)
    assert str(e.value).startswith("error: ") and len(str(e.value).splitlines()) == 1
    assert __import__("re").search(message, str(e.value))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_script_bad_checkpoints(corpus, tmp_path):
    text, _ = corpus
    m = Transformer(MICRO)
    with torch.no_grad():
        m.layers[0].ffn.down_proj.weight[1, 2] = float("inf")
    save_model(str(tmp_path / "inf.pt"), m)
    P.save_palettized(str(tmp_path / "pal.pt"), palettized_micro()[0])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for ckpt, message in [
        ("missing.pt", "no such file"),
        ("junk.pt", "not a readable checkpoint"),
        ("pal.pt", "expected 'model'"),
        ("inf.pt", "layers.0.ffn.down_proj: weight contains"),
    ]:
        out = tmp_path / ("out_" + ckpt)
        with pytest.raises(SystemExit) as e:
            P.main(["--ckpt", str(tmp_path / ckpt), "--out-dir", str(out), "--data", text, "--bits", "4"])
        assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
        assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_invariants():
    w = sample(0, (256, 128), 3)
    lut, idx = P.palettize_weight(w.cuda(), 4)
    assert lut.is_cuda and idx.is_cuda and (lut[:, 1:].float() > lut[:, :-1].float()).all()
    cpu = P.palettize_weight(w, 4)
    e_gpu, e_cpu = group_sse(w, lut.cpu(), idx.cpu()).sum(), group_sse(w, *cpu).sum()
    assert abs(e_gpu / e_cpu - 1) < 1e-3
