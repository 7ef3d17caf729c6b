"""
recipe.py -- the whole recipe in one command, and its results table.

Runs each of STEPS as its own process, exactly the command shown (so any step can be re-run by hand), then
prints the table built only from their JSON reports and writes it to out/results.md (--readme: README too).

    python recipe.py                      # everything, about 9 minutes on 2 CPU cores
    python recipe.py --from lora          # start again at a step (after an interruption, say)
    python recipe.py --table-only         # only rebuild the table from out/*.json
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

STEPS = {  # name (for --from): its commands, in order; the paper's section in brackets
    "train": ["train.py"],                                              # pre-train `tiny` on the Bible (3)
    "palettize": ["palettize.py --bpw 3.7"],                            # 3.7 bits per weight, the mix (5)
    "uniform": [f"palettize.py --ckpt out/ckpt.pt --bits {b} --out-dir out/uniform_{b}bit" for b in (4, 2)],
    "lora": ["lora.py"],                                                # the recovery adapter (5)
    "feature": [f"lora.py --task pydoc --init {i}" for i in ("recovery", "zero")],  # from recovery or zero
    "export": ["export_ane.py"],                                        # one Core ML package for the ANE (5)
}
MARK_BEGIN, MARK_END = "<!-- results:begin -->", "<!-- results:end -->"


def results_table(out_dir: str = "out") -> str:
    """A Markdown table of what each step of the recipe cost and gained, from out_dir's JSON reports alone."""
    load = lambda n: json.load(open(p)) if os.path.isfile(p := os.path.join(out_dir, n)) else None  # noqa
    tr, pal, rec, exp = map(load, ("train.json", "palettize.json", "lora_recovery.json", "export.json"))
    uniform = [u for b in (4, 2) if (u := load(f"uniform_{b}bit/palettize.json"))]
    feats = {i: load(f"lora_pydoc_{i}.json") for i in ("recovery", "zero")}
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
                    f"{closed} | +{mb(rec['adapter_bytes'])} | `python lora.py` |")
    if exp:
        check = (f"max logit diff {exp['max_abs_logit_diff']:.3f}, argmax agreement "
                 f"{exp['argmax_agreement']:.1%}" if exp.get("verified") else "not verified")
        rows.append(f"| export | Core ML package ({', '.join(exp['functions'])}) | {check} | "
                    f"{mb(exp['package_bytes'])} (ideal {mb(exp['ideal_bytes'])}, floor "
                    f"{exp['floor_over_ideal']:.2f}x) | `python export_ane.py` |")
    if all(feats.values()):          # the feature adapter's validation curve, from recovery and from zero
        steps = sorted({*feats["recovery"]["val_bpb_by_step"]} & {*feats["zero"]["val_bpb_by_step"]}, key=int)
        rows += ["", "Feature adapter on Python's documentation (`pydoc` validation bpb by step; same steps "
                 "and seed):", "", "| init | " + " | ".join(f"step {s}" for s in steps)
                 + f" | {feats['zero']['orig_data']} bpb after |", "|---|" + "---|" * (len(steps) + 1)]
        rows += [f"| {init} | " + " | ".join(f"{f['val_bpb_by_step'][s]:.4f}" for s in steps)
                 + f" | {f['orig_val_bpb_end']:.4f} |" for init, f in feats.items()]
    return "\n".join(rows)


def write_table(out_dir: str = "out", readme: str | None = None) -> str:
    """Print the table and write it to out_dir/results.md, and into `readme` between its markers if given."""
    body = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPUs, with "
            f"`python recipe.py`.\n\n{results_table(out_dir)}")
    print(body)
    pathlib.Path(out_dir, "results.md").write_text(body + "\n")
    if readme:
        head, begin, rest = open(readme).read().partition(MARK_BEGIN)
        _, end, tail = rest.partition(MARK_END)
        if not (begin and end):
            raise SystemExit(f"error: {readme} has no {MARK_BEGIN} ... {MARK_END} markers")
        pathlib.Path(readme + ".tmp").write_text(f"{head}{begin}\n{body}\n{end}{tail}")
        os.replace(readme + ".tmp", readme)                     # a rename: an interrupted write loses nothing
        print(f"updated the results table in {readme}")
    return body


def main(argv=None) -> None:
    """Run the recipe's steps from --from on, then write the table."""
    ap = argparse.ArgumentParser(description="Run the whole recipe, step by step, then print its results.")
    add = ap.add_argument
    add("--from", dest="start", choices=STEPS, default="train", help="the step to start at (default: train)")
    add("--table-only", action="store_true", help="run nothing; the table from out/*.json (default: off)")
    add("--readme", action="store_true", help="also write the table into README.md (default: no)")
    a, here = ap.parse_args(argv), os.path.dirname(os.path.abspath(__file__))
    names = [] if a.table_only else list(STEPS)[list(STEPS).index(a.start):]
    todo = [(name, command) for name in names for command in STEPS[name]]
    for i, (name, command) in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] python {command}", flush=True)
        script, *flags = command.split()
        if subprocess.run([sys.executable, os.path.join(here, script), *flags]).returncode:
            raise SystemExit(f"error: python {command} failed; later: python recipe.py --from {name}")
    os.makedirs("out", exist_ok=True)
    write_table("out", os.path.join(here, "README.md") if a.readme else None)


if __name__ == "__main__":
    main()
