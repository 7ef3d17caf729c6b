"""recipe.py's results table: built only from the JSON reports the steps write; the README only on request."""

import json
import random

import pytest

import recipe


def write_reports(d, seed):
    """Minimal reports of the shape the scripts write, with seeded random numbers."""
    rng = random.Random(seed)
    f, p = 1.5 + rng.random(), 1.6 + rng.random()
    rec = p - 0.01 * rng.random()
    pal = {
        "float_bytes": 3_248_000,
        "val_bpb_float": f,
        "val_bpb_palettized": p,
        "val_bpb_rise": p / f - 1,
        "bits_per_weight": 3.686,
        "model_bytes": 780_000,
        "sensitivity": True,
        "uniform_bits": None,
        "target_bpw": 3.7,
    }
    reports = {
        "train.json": {
            "config": {"name": "tiny"},
            "params": 1_620_000,
            "iters": 1000,
            "seconds": 200 + rng.random(),
            "tokens_per_second": 9000.0,
            "val_bpb": f,
        },
        "palettize.json": pal,
        "lora_recovery.json": {
            "rank": 16,
            "base_bits_per_weight": 3.686,
            "iters_done": 300,
            "train_seconds": 70.0,
            "seconds": 145.0,
            "loss": "ce",
            "val_bpb_recovered": rec,
            "gap": p - f,
            "gap_closed": (p - rec) / (p - f),
            "val_bpb_float_adapted": f - 0.01,
            "gap_closed_matched": 0.8,
            "adapter_bytes": 452_527,
        },
        "export.json": {
            "functions": ["prefill", "decode"],
            "max_abs_logit_diff": 0.02,
            "argmax_agreement": 1.0,
            "verified": True,
            "package_bytes": 2_900_000,
            "ideal_bytes": 2_080_000,
            "floor_over_ideal": 1.097,
        },
    }
    for b in (4, 2):
        (d / f"uniform_{b}bit").mkdir()
        reports[f"uniform_{b}bit/palettize.json"] = {
            **pal,
            "uniform_bits": b,
            "bits_per_weight": b + 0.07,
            "val_bpb_palettized": p + 0.1 / b,
            "target_bpw": None,
        }
    for init in ("recovery", "zero"):
        curve = {str(s): 6 - s / 50 + rng.random() for s in (0, 25, 50, 75, 100)}
        reports[f"lora_pydoc_{init}.json"] = {
            "val_bpb_by_step": curve,
            "orig_data": "bible",
            "orig_val_bpb_end": 2.2,
        }
    for name, r in reports.items():
        (d / name).write_text(json.dumps(r))
    return reports


@pytest.mark.parametrize("seed", range(5))
def test_table_comes_from_the_reports(tmp_path, seed):
    r = write_reports(tmp_path, seed)
    table = recipe.results_table(str(tmp_path))
    assert f"{r['train.json']['val_bpb']:.4f}" in table
    assert f"{r['lora_recovery.json']['val_bpb_recovered']:.4f}" in table
    assert f"closes {r['lora_recovery.json']['gap_closed']:.0%} of the gap" in table
    for init in ("recovery", "zero"):
        assert f"| {init} | " + f"{r[f'lora_pydoc_{init}.json']['val_bpb_by_step']['0']:.4f}" in table
    for b in (4, 2):
        cmd = f"--ckpt {tmp_path}/ckpt.pt --bits {b} --out-dir {tmp_path}/uniform_{b}bit`"
        assert cmd in table
        assert f"{r[f'uniform_{b}bit/palettize.json']['val_bpb_palettized']:.4f}" in table
    assert "floor 1.10x" in table and "| bible bpb after |" in table


def test_a_gap_within_noise_is_not_a_fraction(tmp_path):
    r = write_reports(tmp_path, 0)
    rec = dict(r["lora_recovery.json"], gap=0.00004, gap_closed=None, gap_closed_matched=None)
    (tmp_path / "lora_recovery.json").write_text(json.dumps(rec))
    assert "gap +0.0000 is within noise" in recipe.results_table(str(tmp_path))


def test_missing_reports_give_a_partial_table(tmp_path):
    table = recipe.results_table(str(tmp_path))
    assert table.splitlines()[0].startswith("| step |") and "recovery" not in table


def test_table_goes_to_out_and_the_readme_only_on_request(tmp_path):
    write_reports(tmp_path, 0)
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{recipe.MARK_BEGIN}\nold table\n{recipe.MARK_END}\ntail\n")
    body = recipe.write_table(str(tmp_path))
    assert (tmp_path / "results.md").read_text() == body + "\n" and "old table" in readme.read_text()
    recipe.write_table(str(tmp_path), str(readme))
    once = readme.read_text()
    assert once.startswith("head\n") and once.endswith(f"{recipe.MARK_END}\ntail\n")
    assert "old table" not in once and body in once
    recipe.write_table(str(tmp_path), str(readme))
    assert readme.read_text() == once  # idempotent (same day)
