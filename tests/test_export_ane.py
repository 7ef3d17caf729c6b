"""Tests for export_ane.py: the Neural-Engine-layout model against model.Transformer; a small palettized model
with one adapter exported once (module fixture) and its package checked from every side; the command line
(defaults from --out-dir, --help, one-line errors, a failed verification keeps the package).
Run: python -m pytest -q tests/test_export_ane.py"""
import json
import os
import re

import numpy as np
import pytest
import torch

import bpe
import data
import export_ane as E
import lora
import palettize
import verify_ane as V
from model import ModelConfig, Transformer
from plumbing import save_model

# dims multiples of 16 (LUT groups of 16 rows); two layers so that the export takes seconds
MICRO = ModelConfig(name="micro", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    ffn_dim=128, max_seq_len=64)
NANO = ModelConfig(name="nano", vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                   ffn_dim=64, max_seq_len=32)
LLAMA = ModelConfig(name="llama-like", vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=16, ffn_dim=64, max_seq_len=32, qk_norm=False)          # no query/key norm


def random_model(cfg, seed, spread=0.05):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * spread)   # norms away from 1, weights larger: a less trivial model
    return m


def mixed_bits_model(cfg, seed):
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


_MICRO_EXPORT = {}


def micro_export(tmp_path_factory) -> dict:
    """MICRO palettized with one adapter, exported and verified once per session (tests/test_verify_ane.py
    checks the same package). Reported: --out-dir D must read D/palettized.pt and every D/adapter_*.pt, not
    ./out: so only --out-dir names the inputs here, from a folder without ./out."""
    if _MICRO_EXPORT:
        return _MICRO_EXPORT
    d = tmp_path_factory.mktemp("export")
    palettize.save_palettized(str(d / "palettized.pt"), mixed_bits_model(MICRO, 0))
    write_adapter(str(d / "adapter_demo.pt"), str(d / "palettized.pt"), "demo", 1)
    stale = d / "afm.mlpackage"
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("an older export")   # must be replaced, not merged into
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))
        returned = E.main(["--out-dir", str(d), "--prefill-len", "16", "--context", "48"])
    with open(d / "export.json") as f:
        report = json.load(f)
    model, _ = palettize.load_palettized(str(d / "palettized.pt"))
    _MICRO_EXPORT.update(dir=d, pkg=str(d / "afm.mlpackage"), report=report, returned=returned,
                         model=model.eval())
    return _MICRO_EXPORT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return micro_export(tmp_path_factory)


# ----------------------------------------------------------------------------------------------------------
# The Neural-Engine-layout model

@pytest.mark.parametrize("seed", range(5))
def test_ane_model_equals_training_model(seed):
    """Same float state dict -> same logits: prefill at every prompt length, then decode steps; with and
    without query/key norm."""
    cfg = [MICRO, NANO, ModelConfig(name="gqa4", dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16,
                                    ffn_dim=96, max_seq_len=40), LLAMA][seed % 4]
    ref = random_model(cfg, seed)
    ane = E.AneTransformer(cfg).eval()
    ane.load_state_dict(ref.state_dict())        # unchanged: same names, same shapes
    g = torch.Generator().manual_seed(seed)
    P = cfg.max_seq_len // 2
    L = int(torch.randint(1, P + 1, (1,), generator=g))
    toks = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len), generator=g)
    assert cfg.qk_norm == any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in ane.state_dict())
    with torch.no_grad():
        want = ref(toks)                                                       # (1, T, V)
        scale = want.abs().max()
        pad = lambda n: torch.cat([toks[:, :n], torch.zeros(1, P - n, dtype=torch.long)], 1)  # noqa: E731
        every = torch.cat([ane(pad(n), torch.tensor([n])) for n in range(1, P + 1)], 1)  # each prompt length
        assert (every - want[:, :P]).abs().max() <= 1e-5 * scale
        got = [ane(pad(L), torch.tensor([L]))]                          # the prefill the decode steps follow
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
    zeros = torch.zeros(1, 16, 1, 2).half()                           # all-zero input: no 0/0
    assert torch.equal(E.ane_rms_norm(zeros, torch.ones(1, 16, 1, 1).half(), 1e-5, 1), zeros)


# ----------------------------------------------------------------------------------------------------------
# The exported package

def test_out_dir_supplies_the_default_inputs(exported):
    r = exported["report"]
    assert r["ckpt"] == str(exported["dir"] / "palettized.pt") and list(r["adapters"]) == ["demo"]
    assert r["adapters"]["demo"]["path"] == str(exported["dir"] / "adapter_demo.pt")
    assert exported["returned"]["package_bytes"] == r["package_bytes"]


def test_functions_and_states(exported):
    r = exported["report"]
    assert r["functions"] == ["prefill", "decode", "prefill_demo", "decode_demo"]
    spec = E.ct.utils.load_spec(exported["pkg"])
    funcs = {f.name: f for f in spec.description.functions}
    assert set(funcs) == set(r["functions"]) and spec.description.defaultFunctionName == "prefill"
    for name, f in funcs.items():
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in f.state}
        assert states == {"k_cache": [2, 32, 1, 48], "v_cache": [2, 32, 1, 48]}   # (layers, kv*hd, 1, ctx)
        ins = {i.name: list(i.type.multiArrayType.shape) for i in f.input}
        want = {"tokens": [1, 16], "length": [1]} if name.startswith("prefill") else \
            {"token": [1, 1], "pos": [1]}
        assert ins == want
        assert [o.name for o in f.output] == ["logits"]
    assert not os.path.exists(os.path.join(exported["pkg"], "stale.txt"))      # the old package was replaced
    assert not [p for p in os.listdir(os.path.dirname(exported["pkg"])) if p.startswith(".")]  # no temp left


def test_luts_and_indices_exact(exported):
    """Each projection in each function is one constexpr_lut_to_dense with palettize.py's LUT and indices."""
    prog = V.read_package(exported["pkg"])
    pal = {n: m for n, m in exported["model"].named_modules() if isinstance(m, palettize.PalettizedLinear)}
    assert len(pal) == 14 and {m.bits for m in pal.values()} == {2, 4}
    for fname, func in prog.functions.items():
        luts = {op.name: op for op in func.operations if op.op_type == "constexpr_lut_to_dense"}
        assert len(luts) == len(pal), fname
        for name, m in pal.items():
            op = luts[V.mil_name(f"{name}.weight")]
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


def test_export_verified_itself(exported):
    r = exported["report"]
    assert r["verified"] and r["compared_logits"] >= 40 and "verify_error" not in r   # base and adapter
    assert r["argmax_agreement"] >= 0.99 and r["max_abs_logit_diff"] <= r["logit_tolerance"]
    assert 0 < r["argmax_judged"] <= r["compared_logits"]
    assert r["argmax_margin_threshold"] == r["logit_tolerance"]


def test_sizes(exported):
    """Constants are stored once across the four functions: the weight file is the ideal bytes (indices,
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

def test_bad_inputs(tmp_path, capsys):
    palettize.save_palettized(str(tmp_path / "a.pt"), mixed_bits_model(NANO, 0))
    palettize.save_palettized(str(tmp_path / "b.pt"), mixed_bits_model(NANO, 1))
    write_adapter(str(tmp_path / "adapter_other.pt"), str(tmp_path / "b.pt"), "other", 0)
    cases = [(["--ckpt", str(tmp_path / "a.pt"), "--adapters", str(tmp_path / "adapter_other.pt")],
              "different base"),
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
    palettize.save_palettized(str(tmp_path / "p.pt"), mixed_bits_model(NANO, 0))

    def broken(prog, path):                       # saving the first function is interrupted
        os.makedirs(path)
        open(os.path.join(path, "half"), "w").close()
        raise RuntimeError("interrupted")
    monkeypatch.setattr(E, "save_program", broken)
    with pytest.raises(RuntimeError):
        E.main(["--ckpt", str(tmp_path / "p.pt"), "--out-dir", str(tmp_path), "--adapters",
               "--prefill-len", "8"])
    assert sorted(os.listdir(old)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["afm.mlpackage", "p.pt"]


# ----------------------------------------------------------------------------------------------------------
# The command line; reported bugs

def reversed_bytes_tokenizer():
    """A BPE tokenizer without merges whose id of byte b is 255 - b: its tokens are not the bytes."""
    return data.BPETokenizer([bpe.gpt2_byte_chars()[b] for b in range(255, -1, -1)], [])


def test_export_without_qk_norm_verifies(tmp_path, monkeypatch):
    """A Llama-like model (qk_norm=False: no query/key norm, the queries only scaled) exports and verifies,
    with an adapter. Its checkpoint carries a tokenizer: the verification text is in its tokens."""
    palettize.save_palettized(str(tmp_path / "palettized.pt"), mixed_bits_model(LLAMA, 2),
                              tokenizer=reversed_bytes_tokenizer().to_dict())
    write_adapter(str(tmp_path / "adapter_chat.pt"), str(tmp_path / "palettized.pt"), "chat", 3)
    texts, verify_text = [], V.verify_text
    monkeypatch.setattr(V, "verify_text", lambda *args: texts.append(verify_text(*args)) or texts[-1])
    r = E.main(["--out-dir", str(tmp_path), "--prefill-len", "8", "--context", "16"])
    assert r["verified"] and r["lut_exact"] and r["lut_layers"] == 7 and r["compared_logits"] == 2 * 3 * 9
    assert r["functions"] == ["prefill", "decode", "prefill_chat", "decode_chat"]
    assert len(texts) == 1 and torch.equal(texts[0], 255 - verify_text(256, 16))


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        E.parse_args(["--help"])
    options = re.split(r"\n  (?=-)", capsys.readouterr().out.split("options:")[1])[2:]   # after -h, --help
    assert len(options) == 6 and all("(default: " in " ".join(o.split()) for o in options), options


def near_tie_checkpoint(path, seed=3):
    """A float NANO model whose most frequent top token t on the verification text has a twin j < t: j's
    embedding row is t's times (1 - 1e-4). In fp16 the two rows are equal, so the package's logits tie
    (numpy's argmax picks j) while PyTorch prefers t by a hair: a near-tie, not an error."""
    m = random_model(NANO, seed)
    with torch.no_grad():
        m.tok_emb.weight.copy_(m.tok_emb.weight.half().float())          # fp16-representable rows
        toks = V.verify_text(NANO.vocab_size, 16)
        top = m(toks[None])[0].argmax(-1)
        t = int(top.mode().values)
        j = min(set(range(t)) - set(toks.tolist()))                      # a token the text never feeds in
        m.tok_emb.weight[j] = m.tok_emb.weight[t] * (1 - 1e-4)
        assert torch.equal(m.tok_emb.weight[j].half(), m.tok_emb.weight[t].half())
    save_model(path, m)
    return (top == t).sum()


def test_float_checkpoint_with_a_near_tie_exports_fp16_with_notice(tmp_path, capsys):
    """A float checkpoint is exported in fp16, with a notice. Reported: "argmax agreement 98.1% over 54"
    failed an export whose logits were well within tolerance; the argmax is now judged only where PyTorch's
    top-2 margin exceeds the tolerance, so this checkpoint's planted near-tie passes."""
    assert near_tie_checkpoint(str(tmp_path / "ckpt.pt")) > 0
    r = E.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out-dir", str(tmp_path), "--adapters",
               "--prefill-len", "8"])
    out = capsys.readouterr().out
    assert "notice:" in out and f"over {r['argmax_judged']} of {r['compared_logits']} positions" in out
    assert r == json.load(open(tmp_path / "export.json"))
    assert r["compression"] == "fp16" and r["lut_layers"] == 0 and r["lut_exact"] is None
    assert r["functions"] == ["prefill", "decode"] and r["verified"]
    assert r["max_abs_logit_diff"] <= r["logit_tolerance"]
    assert r["argmax_judged"] < r["compared_logits"] and r["argmax_agreement"] >= 0.99
    prog = V.read_package(str(tmp_path / "afm.mlpackage"))
    assert not any(op.op_type.startswith("constexpr_") for f in prog.functions.values()
                   for op in f.operations)


def test_failed_verification_keeps_the_package(tmp_path, monkeypatch, capsys):
    """A failed check writes the package and export.json (verified false, the reason) and exits non-zero
    with a one-line error."""
    save_model(str(tmp_path / "ckpt.pt"), random_model(NANO, 4))
    monkeypatch.setattr(V, "TOLERANCE", 1e-9)                            # no fp16 run can pass this
    with pytest.raises(SystemExit) as e:
        E.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out-dir", str(tmp_path), "--adapters",
               "--prefill-len", "8"])
    msg = str(e.value)
    assert msg.startswith("error: verification") and "\n" not in msg and "kept" in msg
    assert os.path.isdir(tmp_path / "afm.mlpackage")
    r = json.load(open(tmp_path / "export.json"))
    assert r["verified"] is False and r["verify_error"] in msg and r["package_bytes"] > 0
