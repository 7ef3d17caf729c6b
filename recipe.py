"""
recipe.py -- the whole recipe in one command, and its results table.

Runs each step as its own process, exactly the command shown (so any step can be re-run by hand):

    python train.py                                          pre-train `tiny` on the Bible (section 3)
    python palettize.py --bpw 3.7                            3.7 bits per weight, the paper's mix (5)
    python palettize.py --ckpt out/ckpt.pt --bits 4 ...      uniform 4-bit and 2-bit, for comparison
    python lora.py                                           the recovery adapter (5)
    python lora.py --task pydoc --init recovery|zero         a feature adapter, from recovery or from zero
    python export_ane.py                                     one Core ML package for the Neural Engine (5)

then prints the results table, built only from the JSON reports the steps wrote, and writes it to
out/results.md. It writes nothing outside out/ unless asked: `--readme` puts the table into README.md.

    python recipe.py                      # everything, about 9 minutes on 2 CPU cores
    python recipe.py --from lora          # start again at a step (after an interruption, say)
    python recipe.py --table-only         # only rebuild the table from out/*.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

STEPS = [
    ("train", ["train.py"]),
    ("palettize", ["palettize.py", "--bpw", "3.7"]),
    ("uniform", ["palettize.py", "--ckpt", "out/ckpt.pt", "--bits", "4", "--out-dir", "out/uniform_4bit"]),
    ("uniform", ["palettize.py", "--ckpt", "out/ckpt.pt", "--bits", "2", "--out-dir", "out/uniform_2bit"]),
    ("lora", ["lora.py"]),
    ("feature", ["lora.py", "--task", "pydoc", "--init", "recovery"]),
    ("feature", ["lora.py", "--task", "pydoc", "--init", "zero"]),
    ("export", ["export_ane.py"]),
]
MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"


def report(out_dir: str, name: str) -> dict | None:
    """The JSON report `name` under out_dir, or None if that step has not run."""
    path = os.path.join(out_dir, name)
    return json.load(open(path)) if os.path.isfile(path) else None


def results_table(out_dir: str = "out") -> str:
    """A Markdown table of what each step of the recipe cost and gained, from out_dir's JSON reports alone."""
    tr, pal, rec, exp = (report(out_dir, n) for n in
                         ("train.json", "palettize.json", "lora_recovery.json", "export.json"))
    uniform = [r for b in (4, 2) if (r := report(os.path.join(out_dir, f"uniform_{b}bit"), "palettize.json"))]
    feats = {i: report(out_dir, f"lora_pydoc_{i}.json") for i in ("recovery", "zero")}
    mb = lambda n: f"{n / 1e6:.2f} MB"                                          # noqa: E731
    rows = ["| step | model | val bpb | bytes | command |", "|---|---|---|---|---|"]
    if tr:
        rows.append(f"| train | `{tr['config']['name']}` float, {tr['params'] / 1e6:.2f}M params, "
                    f"{tr['iters']} steps, {tr['seconds']:.0f} s, {tr['tokens_per_second']:,.0f} tok/s | "
                    f"{tr['val_bpb']:.4f} | {mb(pal['float_bytes']) + ' (fp16)' if pal else ''} | "
                    f"`python train.py` |")
    for p in uniform + ([pal] if pal else []):
        b = p["uniform_bits"]
        kind = (f"uniform {b}-bit" if b else "mixed 2/4-bit") + (", Fisher-weighted" * bool(p["sensitivity"]))
        flags = (f"--ckpt {out_dir}/ckpt.pt --bits {b} --out-dir {out_dir}/uniform_{b}bit" if b
                 else f"--bpw {p['target_bpw']}")
        rows.append(f"| palettize | {kind}, {p['bits_per_weight']:.2f} bits/weight | "
                    f"{p['val_bpb_palettized']:.4f} ({p['val_bpb_rise']:+.2%}) | {mb(p['model_bytes'])} | "
                    f"`python palettize.py {flags}` |")
    if rec:
        closed = (f"closes {rec['gap_closed']:.0%} of the gap" if rec["gap_closed"] is not None
                  else f"gap {rec['gap']:+.4f} is within noise")
        if rec.get("gap_closed_matched") is not None and rec["loss"] != "kl":
            closed += (f"; the float model given the same adapter training reaches "
                       f"{rec['val_bpb_float_adapted']:.4f}: {rec['gap_closed_matched']:.0%} closed against "
                       f"it")
        rows.append(f"| recovery adapter | rank {rec['rank']} LoRA on the "
                    f"{rec['base_bits_per_weight']:.2f}-bit base, {rec['iters_done']} steps in "
                    f"{rec['train_seconds']:.0f} s, loss {rec['loss']} | {rec['val_bpb_recovered']:.4f}, "
                    f"{closed} | "
                    f"+{mb(rec['adapter_bytes'])} | `python lora.py` |")
    if exp:
        check = (f"max logit diff {exp['max_abs_logit_diff']:.3f}, argmax agreement "
                 f"{exp['argmax_agreement']:.1%}" if exp.get("verified") else "not verified")
        rows.append(f"| export | Core ML package ({', '.join(exp['functions'])}) | {check} | "
                    f"{mb(exp['package_bytes'])} (ideal {mb(exp['ideal_bytes'])}, floor "
                    f"{exp['floor_over_ideal']:.2f}x) | `python export_ane.py` |")
    table = "\n".join(rows)
    if all(feats.values()):
        steps = sorted(set(feats["recovery"]["val_bpb_by_step"]) & set(feats["zero"]["val_bpb_by_step"]),
                       key=int)
        table += ("\n\nFeature adapter on Python's documentation (`pydoc` validation bpb by step; same steps "
                  "and seed):\n\n| init | " + " | ".join(f"step {s}" for s in steps)
                  + f" | {feats['zero']['orig_data']} bpb after |\n|---|" + "---|" * (len(steps) + 1))
        for init, f in feats.items():
            table += (f"\n| {init} | " + " | ".join(f"{f['val_bpb_by_step'][s]:.4f}" for s in steps)
                      + f" | {f['orig_val_bpb_end']:.4f} |")
    return table


def write_table(out_dir: str = "out", readme: str | None = None) -> str:
    """Print the table and write it to out_dir/results.md, and into `readme` between its markers if given."""
    body = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs, with "
            f"`python recipe.py`.\n\n{results_table(out_dir)}")
    print(body)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(body + "\n")
    if readme:
        text = open(readme).read()
        if MARK_BEGIN not in text or MARK_END not in text:
            raise SystemExit(f"error: {readme} has no {MARK_BEGIN} ... {MARK_END} markers")
        head, rest = text.split(MARK_BEGIN, 1)
        with open(readme + ".tmp", "w") as f:
            f.write(f"{head}{MARK_BEGIN}\n{body}\n{MARK_END}{rest.split(MARK_END, 1)[1]}")
        os.replace(readme + ".tmp", readme)
        print(f"updated the results table in {readme}")
    return body


def main(argv=None) -> None:
    """Run the recipe's steps from --from on, then write the table."""
    names = list(dict.fromkeys(n for n, _ in STEPS))
    ap = argparse.ArgumentParser(description="Run the whole recipe, step by step, then print its results.")
    ap.add_argument("--from", dest="start", choices=names, default=names[0],
                    help=f"the step to start at (default: {names[0]})")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing; the table from out/*.json (default: off)")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md (default: no)")
    a = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    todo = [] if a.table_only else [step for name, step in STEPS if names.index(name) >= names.index(a.start)]
    for i, step in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] python {' '.join(step)}", flush=True)
        if subprocess.run([sys.executable, os.path.join(here, step[0]), *step[1:]]).returncode:
            name = next(n for n, s in STEPS if s == step)
            raise SystemExit(f"error: python {' '.join(step)} failed; later: python recipe.py --from {name}")
    os.makedirs("out", exist_ok=True)
    write_table("out", os.path.join(here, "README.md") if a.readme else None)


if __name__ == "__main__":
    main()
