"""bench.py's results table: built only from the JSON reports, written into the README between its markers."""
import json
import random

import pytest

import bench


def write_reports(d, seed):
    """Minimal reports of the shape the scripts write, with seeded random numbers."""
    rng = random.Random(seed)
    f, p = 1.5 + rng.random(), 1.6 + rng.random()
    rec = p - 0.01 * rng.random()
    reports = {
        "train.json": {"config": {"name": "tiny"}, "params": 1_620_000, "iters": 1000, "seconds": 200 + rng.random(),
                       "tokens_per_second": 9000.0, "val_bpb": f},
        "palettize.json": {"float_bytes": 3_248_000, "val_bpb_float": f, "val_bpb_palettized": p,
                           "bits_per_weight": 3.686, "model_bytes": 780_000, "sensitivity": True},
        "lora_recovery.json": {"rank": 16, "base_bits_per_weight": 3.686, "iters": 300, "seconds": 145.0,
                               "loss": "ce", "val_bpb_recovered": rec, "gap_closed": (p - rec) / (p - f),
                               "val_bpb_float_adapted": f - 0.01, "gap_closed_matched": 0.8, "adapter_bytes": 452_527},
        "export.json": {"functions": ["prefill", "decode"], "max_abs_logit_diff": 0.02, "argmax_agreement": 1.0,
                        "package_bytes": 2_900_000, "ideal_bytes": 2_080_000, "floor_over_ideal": 1.097},
        "bench.json": {"sweep": {"rows": [{"bits": b, "bits_per_weight": b + 0.07, "model_bytes": 400_000 * b,
                                           "val_bpb": p + 0.1 / b, "command": f"python palettize.py --bits {b}"}
                                          for b in (4, 2)]}},
    }
    for init in ("recovery", "zero"):
        curve = {str(s): 6 - s / 50 + rng.random() for s in (0, 25, 50, 75, 100)}
        reports[f"lora_pydoc_{init}.json"] = {"val_bpb_by_step": curve, "bible_val_bpb_end": 2.2}
    for name, r in reports.items():
        (d / name).write_text(json.dumps(r))
    return reports


@pytest.mark.parametrize("seed", range(5))
def test_table_comes_from_the_reports(tmp_path, seed):
    r = write_reports(tmp_path, seed)
    table = bench.results_table(str(tmp_path))
    assert f"{r['train.json']['val_bpb']:.4f}" in table
    assert f"{r['lora_recovery.json']['val_bpb_recovered']:.4f}" in table
    assert f"closes {r['lora_recovery.json']['gap_closed']:.0%} of the gap" in table
    for init in ("recovery", "zero"):
        assert f"| {init} | " + f"{r[f'lora_pydoc_{init}.json']['val_bpb_by_step']['0']:.4f}" in table
    for row in r["bench.json"]["sweep"]["rows"]:
        assert row["command"] in table
    assert "floor 1.10x" in table


def test_missing_reports_give_a_partial_table(tmp_path):
    table = bench.results_table(str(tmp_path))
    assert table.splitlines()[0].startswith("| step |") and "recovery" not in table


def test_write_table_replaces_only_between_markers(tmp_path):
    write_reports(tmp_path, 0)
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{bench.MARK_BEGIN}\nold table\n{bench.MARK_END}\ntail\n")
    body = bench.write_table(str(tmp_path), str(readme))
    once = readme.read_text()
    assert once.startswith("head\n") and once.endswith(f"{bench.MARK_END}\ntail\n")
    assert "old table" not in once and body in once and bench.RECIPE in once
    bench.write_table(str(tmp_path), str(readme))
    assert readme.read_text() == once        # idempotent (same day)
