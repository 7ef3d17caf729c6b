"""Tests for verify_ane.py on the package that tests/test_export_ane.py exports (a small palettized model with
one adapter; made once per session): the bit-for-bit check, the numpy run, the argmax judgement, the bytes.
Run: python -m pytest -q tests/test_verify_ane.py"""
import ast
import os

import numpy as np
import pytest
import torch

import export_ane as E
import lora
import palettize
import verify_ane as V
from test_export_ane import micro_export, reversed_bytes_tokenizer


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The export's package (prefill 16, context 48), the model, and what the export checks it against."""
    ex = micro_export(tmp_path_factory)
    model = ex["model"]
    return {**ex, "weights": E.projection_weights(model), "emb": E.embedding_weights(model),
            "adapters": [E.read_adapter(str(ex["dir"] / "adapter_demo.pt"), model)]}


def test_imports_one_way():
    """export_ane imports verify_ane, never the reverse."""
    tree = ast.parse(open(os.path.join(os.path.dirname(V.__file__), "verify_ane.py")).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "export_ane" not in names


def test_no_verify_still_counts_bytes(package):
    r = V.package_report(package["pkg"], package["model"], package["weights"], package["emb"],
                         package["adapters"], 16, 48, verify=False)
    assert r["verified"] is False and r["lut_exact"] is None and r["predict"] == "skipped (--no-verify)"
    assert r["package_bytes"] == package["report"]["package_bytes"]
    assert r["adapters"] == package["report"]["adapters"]


def test_check_weights_bit_for_bit(package):
    prog = V.read_package(package["pkg"])
    ok = V.check_weights(prog, package["weights"], package["emb"])
    assert ok == {"lut_exact": True, "lut_layers": 14, "problems": []}
    changed = {n: dict(w) for n, w in package["weights"].items()}
    name = next(iter(changed))
    changed[name]["indices"] = changed[name]["indices"].clone()
    changed[name]["indices"][0, 0] ^= 1                               # one index off
    bad = V.check_weights(prog, changed, package["emb"])
    assert bad["lut_exact"] is False and len(bad["problems"]) == 4    # in each of the four functions
    assert all(name in p for p in bad["problems"])
    emb = dict(package["emb"], scale=package["emb"]["scale"] * 2)
    assert any("tok_emb" in p for p in V.check_weights(prog, package["weights"], emb)["problems"])


def test_numpy_program_agrees_with_pytorch(package):
    """A random prompt through the numpy runner, base and adapter functions, vs the PyTorch model."""
    prog, model = V.read_package(package["pkg"]), package["model"]
    g = torch.Generator().manual_seed(5)
    pairs = [("prefill", "decode", None), ("prefill_demo", "decode_demo", package["adapters"][0])]
    for pre, dec, ad in pairs:
        run_pre, run_dec = V.NumpyProgram(prog.functions[pre]), V.NumpyProgram(prog.functions[dec])
        for L in (3, 16):
            toks = torch.randint(0, 256, (L + 4,), generator=g)
            states = {k: np.zeros((2, 32, 1, 48), np.float16) for k in ("k_cache", "v_cache")}
            padded = np.zeros((1, 16), np.int32)
            padded[0, :L] = toks[:L].numpy()
            got = [run_pre({"tokens": padded, "length": np.array([L], np.int32)}, states)["logits"]]
            for p in range(L, L + 4):
                step = {"token": np.array([[int(toks[p])]], np.int32), "pos": np.array([p], np.int32)}
                got.append(run_dec(step, states)["logits"])
            got = np.concatenate([x.reshape(1, -1) for x in got])
            if ad is not None:
                lora.load_adapter(ad["path"], model)
            with torch.no_grad():
                want = model(toks[None])[0, L - 1:].numpy()
            lora.remove_adapters(model)
            assert np.abs(got - want).max() <= 0.02 * max(1.0, np.abs(want).max())
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    assert not lora.adapters(model)                                    # each adapter detached again


def test_verify_text_in_the_checkpoints_tokenizer():
    """The text that both models run on is in the checkpoint's tokens when it carries a tokenizer."""
    assert torch.equal(V.verify_text(256, 40, reversed_bytes_tokenizer()), 255 - V.verify_text(256, 40))


def test_logit_verdict_judges_the_argmax_only_where_the_margin_is_clear():
    """Rows: (max |diff|, same argmax, PyTorch's top-2 margin, max |logit|); tolerance 0.02 x 10 = 0.2."""
    clear = [(0.01, True, 1.0, 10.0)] * 52
    near_ties = [(0.01, False, 0.05, 10.0)] * 2                      # flipped, but within the tolerance
    r = V.logit_verdict(clear + near_ties)
    assert "verify_error" not in r and r["argmax_agreement"] == 1.0
    assert r["argmax_judged"] == 52 and r["compared_logits"] == 54
    assert r["argmax_margin_threshold"] == pytest.approx(0.2)
    r = V.logit_verdict(clear + [(0.01, False, 0.5, 10.0)] * 2)       # a clear winner flipped: an error
    assert r["argmax_agreement"] < 0.99 and "over 54 of 54" in r["verify_error"]
    assert "\n" not in r["verify_error"]
    r = V.logit_verdict(clear[:3] + [(0.3, True, 1.0, 10.0)])          # beyond the tolerance
    assert "max |logit diff| 0.3000" in r["verify_error"]
    assert "verify_error" not in V.logit_verdict(near_ties)           # nothing to judge: nothing disagreed


def test_package_report_verifies(package):
    stages = {}
    r = V.package_report(package["pkg"], package["model"], package["weights"], package["emb"],
                         package["adapters"], 16, 48, stage_s=stages)
    assert r["verified"] and r["lut_exact"] and r["lut_layers"] == 14
    assert set(stages) == {"verify_weights", "verify_numpy"}
    assert {k: r[k] for k in ("max_abs_logit_diff", "argmax_judged")} == \
        {k: package["report"][k] for k in ("max_abs_logit_diff", "argmax_judged")}
    assert r["compared_logits"] == 2 * 3 * 9 and r["max_abs_logit_diff"] <= r["logit_tolerance"]
    assert r["predict"].startswith("skipped")                         # no macOS here


def test_bytes_report(package):
    r = V.bytes_report(package["pkg"], package["model"], package["weights"], package["emb"],
                       package["adapters"])
    assert r == {k: package["report"][k] for k in r}                  # what the export wrote and returned
    ad = r["adapters"]["demo"]
    stored = palettize.stored_bytes(palettize.stored_tensors(package["model"]))   # palettize.py's own count
    base = V.ideal_bytes(package["model"], package["weights"], package["emb"])
    assert r["ideal_bytes"] == stored + ad["fp16_bytes"] == base + ad["fp16_bytes"]
    assert r["package_bytes"] == r["weight_bytes"] + r["program_bytes"] + r["other_bytes"]
    spec = V.ct.utils.load_spec(package["pkg"])
    # all functions: every blob (the weight file has a 64-byte header of its own), every weight declaration
    prog, blobs, decl = V.function_bytes(spec, package["pkg"], package["report"]["functions"])
    assert blobs + 64 == r["weight_bytes"] and decl == r["weight_declaration_bytes"]
    assert prog < r["program_bytes"]
    assert ad["fp16_bytes"] < ad["added_weight_bytes"] <= 1.1 * ad["fp16_bytes"]
