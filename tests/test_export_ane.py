"""Tests for export_ane.py: a small palettized model with one adapter is exported once (module fixture) and the
package is checked from every side; the Neural-Engine-layout model is checked against model.Transformer."""
import json
import os

import numpy as np
import pytest
import torch

import export_ane as E
import lora
import palettize
from model import ModelConfig, Transformer, save_model

# dims multiples of 16 (LUT groups of 16 rows); two layers so that the export takes seconds
MICRO = ModelConfig(name="micro", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    ffn_dim=128, max_seq_len=64)
NANO = ModelConfig(name="nano", vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                   ffn_dim=64, max_seq_len=32)


def random_model(cfg, seed, spread=0.05):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * spread)   # norms away from 1, weights a bit larger: a less trivial model
    return m


def palettized_model(cfg, seed):
    """A palettized model with mixed bits: every third projection 2-bit, the rest 4-bit."""
    m = random_model(cfg, seed)
    names = [n for n, _ in m.named_modules() if n.rsplit(".", 1)[-1] in palettize.PROJECTIONS]
    palettize.palettize_model(m, {n: 2 if i % 3 == 2 else 4 for i, n in enumerate(names)})
    return m


def write_adapter(path, base_path, name, seed):
    base, _ = palettize.load_palettized(base_path)
    torch.manual_seed(seed)
    lora.add_adapters(base, rank=16, alpha=32)
    with torch.no_grad():
        for m in lora.adapters(base).values():
            m.lora_B.normal_(0, 0.05)             # a trained-looking adapter (a fresh one is zero)
    lora.save_adapter(path, base, name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    palettize.save_palettized(str(d / "palettized.pt"), palettized_model(MICRO, 0))
    write_adapter(str(d / "adapter_demo.pt"), str(d / "palettized.pt"), "demo", 1)
    out = d / "out"
    stale = out / "afm.mlpackage"
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("an older export")   # must be replaced, not merged into
    E.main(["--ckpt", str(d / "palettized.pt"), "--out-dir", str(out), "--adapters", str(d / "adapter_demo.pt"),
            "--prefill-len", "16", "--context", "48"])
    with open(out / "export.json") as f:
        report = json.load(f)
    model, _ = palettize.load_palettized(str(d / "palettized.pt"))
    return {"dir": d, "pkg": str(out / "afm.mlpackage"), "report": report, "model": model.eval()}


# ----------------------------------------------------------------------------------------------------------
# The Neural-Engine-layout model

@pytest.mark.parametrize("seed", range(4))
def test_ane_model_equals_training_model(seed):
    """Same float state dict -> same logits: all prompt positions, the prefill's last token, decode steps."""
    cfg = [MICRO, NANO, ModelConfig(name="gqa4", dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16,
                                    ffn_dim=96, max_seq_len=40)][seed % 3]
    ref = random_model(cfg, seed)
    ane = E.AneTransformer(cfg).eval()
    ane.load_state_dict(ref.state_dict())        # unchanged: same names, same shapes
    g = torch.Generator().manual_seed(seed)
    P = cfg.max_seq_len // 2
    L = int(torch.randint(1, P + 1, (1,), generator=g))
    toks = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len), generator=g)
    with torch.no_grad():
        want = ref(toks)                                                       # (1, T, V)
        scale = want.abs().max()
        padded = torch.cat([toks[:, :L], torch.zeros(1, P - L, dtype=torch.long)], 1)
        every = ane.head(ane.prefill_hidden(padded, torch.tensor([L])))[:, :L]  # all true prompt positions
        assert (every - want[:, :L]).abs().max() <= 1e-5 * scale
        ane.mode = "prefill"
        got = [ane(padded, torch.tensor([L]))]
        ane.mode = "decode"
        for p in range(L, min(L + 6, cfg.max_seq_len)):
            got.append(ane(toks[:, p:p + 1], torch.tensor([p])))
        got = torch.cat(got, 1)
        assert (got - want[:, L - 1:L - 1 + got.shape[1]]).abs().max() <= 1e-5 * scale


def test_rms_norm_cannot_overflow_in_fp16():
    """Activations far beyond sqrt(65504) ~ 256: the plain fp16 RMSNorm overflows, ours matches fp32."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = torch.randn(1, 512, 1, 3, generator=g) * 10 ** (trial % 5)   # up to |x| ~ 4e4
        w = torch.rand(512, generator=g) + 0.5
        want = torch.nn.functional.rms_norm(x.transpose(1, 3), (512,), w, 1e-5).transpose(1, 3)
        got = E.ane_rms_norm(x.half(), w.half().view(1, -1, 1, 1), 1e-5, dim=1)
        assert torch.isfinite(got).all()
        assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    x = torch.full((1, 512, 1, 1), 300.0).half()
    naive = x * torch.rsqrt((x * x).mean(1, keepdim=True) + 1e-5)
    assert not torch.isfinite(naive).all() or naive.abs().max() < 0.5   # what the rewrite avoids
    assert torch.equal(E.ane_rms_norm(torch.zeros(1, 16, 1, 2).half(), torch.ones(1, 16, 1, 1).half(), 1e-5, 1),
                       torch.zeros(1, 16, 1, 2).half())                 # all-zero input: no 0/0


# ----------------------------------------------------------------------------------------------------------
# The exported package

def test_functions_and_states(exported):
    r = exported["report"]
    assert r["functions"] == ["prefill", "decode", "prefill_demo", "decode_demo"]
    spec = E.ct.utils.load_spec(exported["pkg"])
    funcs = {f.name: f for f in spec.description.functions}
    assert set(funcs) == set(r["functions"]) and spec.description.defaultFunctionName == "prefill"
    for name, f in funcs.items():
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in f.state}
        assert states == {"k_cache": [2, 32, 1, 48], "v_cache": [2, 32, 1, 48]}   # (layers, kv*hd, 1, context)
        ins = {i.name: list(i.type.multiArrayType.shape) for i in f.input}
        want = {"tokens": [1, 16], "length": [1]} if name.startswith("prefill") else {"token": [1, 1], "pos": [1]}
        assert ins == want
        assert [o.name for o in f.output] == ["logits"]
    assert not os.path.exists(os.path.join(exported["pkg"], "stale.txt"))      # the old package was replaced
    assert not [p for p in os.listdir(os.path.dirname(exported["pkg"])) if p.startswith(".")]  # no temp left


def test_luts_and_indices_exact(exported):
    """Every projection in every function is one constexpr_lut_to_dense holding palettize.py's LUT and indices."""
    prog = E.read_package(exported["pkg"])
    pal = {n: m for n, m in exported["model"].named_modules() if isinstance(m, palettize.PalettizedLinear)}
    assert len(pal) == 14 and {m.bits for m in pal.values()} == {2, 4}
    for fname, func in prog.functions.items():
        luts = {op.name: op for op in func.operations if op.op_type == "constexpr_lut_to_dense"}
        assert len(luts) == len(pal), fname
        for name, m in pal.items():
            op = luts[E.mil_name(f"{name}.weight")]
            K = 2 ** m.bits
            lut = op.lut.val
            assert lut.dtype == np.float16 and lut.shape == (m.out_features // 16, 1, 1, 1, K, 1)
            assert np.array_equal(lut.reshape(-1, K).view(np.uint16), m.lut.half().numpy().view(np.uint16))
            assert E.mil_types.builtin_to_string(op.indices.dtype) == f"uint{m.bits}"
            assert np.array_equal(np.asarray(op.indices.val, np.uint8)[:, :, 0, 0], m.indices.numpy())
            assert all(c.op_type == "conv" for c in op.outputs[0].child_ops)
        emb = [op for op in func.operations if op.op_type == "constexpr_blockwise_shift_scale"]
        assert len(emb) == 1 and {c.op_type for c in emb[0].outputs[0].child_ops} == {"gather", "linear"}
        assert np.array_equal(emb[0].data.val, exported["model"].tok_emb.weight_int8.numpy())
    r = exported["report"]
    assert r["lut_exact"] is True and r["lut_layers"] == 14


def test_numpy_run_agrees_with_pytorch(exported):
    r = exported["report"]
    assert r["verified"] and r["compared_logits"] >= 40            # base and adapter functions
    assert r["argmax_agreement"] >= 0.99 and r["max_abs_logit_diff"] <= r["logit_tolerance"]
    # independently: a random prompt through the numpy runner vs the PyTorch palettized model
    prog = E.read_package(exported["pkg"])
    pre, dec = E.NumpyProgram(prog.functions["prefill"]), E.NumpyProgram(prog.functions["decode"])
    g = torch.Generator().manual_seed(5)
    for L in (3, 16):
        toks = torch.randint(0, 256, (L + 4,), generator=g)
        states = {k: np.zeros((2, 32, 1, 48), np.float16) for k in ("k_cache", "v_cache")}
        padded = np.zeros((1, 16), np.int32)
        padded[0, :L] = toks[:L].numpy()
        got = [pre({"tokens": padded, "length": np.array([L], np.int32)}, states)["logits"]]
        for p in range(L, L + 4):
            got.append(dec({"token": np.array([[int(toks[p])]], np.int32), "pos": np.array([p], np.int32)},
                           states)["logits"])
        got = np.concatenate([x.reshape(1, -1) for x in got])
        with torch.no_grad():
            want = exported["model"](toks[None])[0, L - 1:].numpy()
        assert np.abs(got - want).max() <= 0.02 * max(1.0, np.abs(want).max())
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99


def test_sizes(exported):
    """Constants are stored once across the four functions: the weight file is the ideal bytes (packed indices,
    LUTs, int8 embedding, fp16 norms and adapter) within 3%, plus fixed costs that do not grow with the model
    (RoPE tables, a 64-byte header per blob). The op lists (program_bytes) are reported, not bounded here: for
    a model this small they outweigh the weights (see the report)."""
    r = exported["report"]
    ad = r["adapters"]["demo"]
    # 2 layers x 2 bytes x rank 16 x (in + out) of q, o; k, v; gate, up, down
    assert ad["fp16_bytes"] == 2 * 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    stored = palettize.stored_bytes(palettize.stored_tensors(exported["model"]))   # palettize.py's own count
    assert r["ideal_bytes"] == stored + ad["fp16_bytes"]
    assert r["weight_bytes"] <= 1.03 * r["ideal_bytes"] + 16 * 1024
    # the adapter's blobs add about its own fp16 bytes (headers/alignment aside), not another copy of the base
    assert ad["added_weight_bytes"] <= 1.1 * ad["fp16_bytes"]
    assert r["package_bytes"] == r["weight_bytes"] + r["program_bytes"] + r["other_bytes"]
    # the floor (weight file + weight-declaring ops) lies between the ideal and the package, and so does an
    # adapter's: its blobs plus its functions' declarations, at most everything its functions add
    assert r["ideal_bytes"] < r["floor_bytes"] < r["package_bytes"]
    assert r["weight_declaration_bytes"] < r["program_bytes"]
    assert ad["fp16_bytes"] < ad["added_floor_bytes"] < ad["added_bytes"]


# ----------------------------------------------------------------------------------------------------------
# Bad input

def test_float_checkpoint_exports_fp16_with_notice(tmp_path, capsys):
    save_model(str(tmp_path / "ckpt.pt"), random_model(NANO, 3))
    E.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out-dir", str(tmp_path), "--adapters", "--prefill-len", "8"])
    assert "notice:" in capsys.readouterr().out
    r = json.load(open(tmp_path / "export.json"))
    assert r["compression"] == "fp16" and r["lut_layers"] == 0 and r["lut_exact"] is None
    assert r["argmax_agreement"] >= 0.99 and r["functions"] == ["prefill", "decode"]
    prog = E.read_package(str(tmp_path / "afm.mlpackage"))
    assert not any(op.op_type.startswith("constexpr_") for f in prog.functions.values() for op in f.operations)


def test_bad_inputs(tmp_path, capsys):
    palettize.save_palettized(str(tmp_path / "a.pt"), palettized_model(NANO, 0))
    palettize.save_palettized(str(tmp_path / "b.pt"), palettized_model(NANO, 1))
    write_adapter(str(tmp_path / "adapter_other.pt"), str(tmp_path / "b.pt"), "other", 0)
    cases = [(["--ckpt", str(tmp_path / "a.pt"), "--adapters", str(tmp_path / "adapter_other.pt")], "different base"),
             (["--ckpt", str(tmp_path / "missing" / "palettized.pt")], "palettize.py"),
             (["--ckpt", str(tmp_path / "a.pt"), "--adapters", str(tmp_path / "nope.pt")], "no such file"),
             (["--ckpt", str(tmp_path / "a.pt"), "--adapters", "--prefill-len", "99"], "--prefill-len")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            E.main(argv + ["--out-dir", str(tmp_path / "out")])
        msg = str(e.value)
        assert msg.startswith("error: ") and words in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "out" / "afm.mlpackage")


def test_replace_is_atomic(tmp_path, monkeypatch):
    """The destination is the old complete package or the new one, never a mix, and a failed export leaves the
    old one untouched with no temporary files."""
    old, new = tmp_path / "afm.mlpackage", tmp_path / "new.mlpackage"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    real_rename, calls = os.rename, []

    def failing_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:                       # moving the new package in fails
            raise OSError("disk full")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        E.replace_path(str(new), str(old))
    monkeypatch.setattr(os, "rename", real_rename)
    assert sorted(os.listdir(old)) == ["a"] and (old / "a").read_text() == "old"
    E.replace_path(str(new), str(old))
    assert sorted(os.listdir(old)) == ["b"] and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["afm.mlpackage"]

    # a failure in the middle of an export: the previous package and export.json stay as they were
    palettize.save_palettized(str(tmp_path / "p.pt"), palettized_model(NANO, 0))

    def broken(paths, path):
        os.makedirs(path)
        open(os.path.join(path, "half"), "w").close()
        raise RuntimeError("interrupted")
    monkeypatch.setattr(E, "save_package", broken)
    with pytest.raises(RuntimeError):
        E.main(["--ckpt", str(tmp_path / "p.pt"), "--out-dir", str(tmp_path), "--adapters", "--prefill-len", "8"])
    assert sorted(os.listdir(old)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["afm.mlpackage", "p.pt"]
