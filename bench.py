"""
bench.py -- measurements side by side, ratios first; not needed by the recipe. Each section is a function
(palettize: ours against coremltools, whose k-means needs `pip install scikit-learn`; generate; afm, for one
GPU); the results merge into OUT_DIR/bench.json (sections not run keep their earlier entries). Training
throughput and MFU are train.py's own report.

    python bench.py                                   # the sections that run on this machine
    python bench.py --only afm --device cuda          # one GPU
"""
import argparse
import json
import os
import platform
import time

import torch

import palettize
from model import CONFIGS, Transformer
from plumbing import load_model, save_json


def coremltools_palettize(w16: torch.Tensor) -> tuple[float, float]:
    """(seconds in coremltools' palettize_weights, MSE of the weight it decodes to) for one fp16 weight."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    lin = torch.nn.Linear(w16.shape[1], w16.shape[0], bias=False).eval()
    lin.weight = torch.nn.Parameter(w16.float())
    mlmodel = ct.convert(torch.jit.trace(lin, torch.zeros(1, w16.shape[1])), convert_to="mlprogram",
                         inputs=[ct.TensorType(name="x", shape=(1, w16.shape[1]))],
                         minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16))
    t = time.perf_counter()                                            # the conversion is not timed
    compressed = cto.palettize_weights(mlmodel, config)
    seconds = time.perf_counter() - t
    op, = [op for f in compressed._mil_program.functions.values() for op in f.operations
           if op.op_type == "constexpr_lut_to_dense"]
    dense = torch.tensor(op.materialized_val_inference()).float().reshape(w16.shape)
    return seconds, (dense - w16.float()).pow(2).mean().item()


def bench_palettize(args) -> dict:
    """Ours against coremltools' k-means (4 bits, groups of 16) on each --shapes weight: time, MSE, ratios."""
    rows, threads = [], torch.get_num_threads()
    for shape in args.shapes:
        w16 = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).half()
        torch.set_num_threads(args.threads)          # ours only: coremltools keeps its own setting
        palettize.palettize_weight(w16[:64], 4, 16)                      # warm-up (allocator, kernels)
        t = time.perf_counter()
        lut, idx = palettize.palettize_weight(w16, 4, 16)
        row = {"shape": list(shape), "ours_s": time.perf_counter() - t,
               "ours_mse": (palettize.dequantize(lut, idx, 16) - w16.float()).pow(2).mean().item()}
        torch.set_num_threads(threads)
        try:
            ct_s, ct_mse = coremltools_palettize(w16)
            row.update(coremltools_s=ct_s, coremltools_mse=ct_mse, time_ratio=ct_s / row["ours_s"],
                       mse_ratio=row["ours_mse"] / ct_mse)
            theirs = (f"coremltools {ct_s:.2f} s, MSE {ct_mse:.4e} | {row['time_ratio']:.1f}x faster, "
                      f"MSE ratio {row['mse_ratio']:.4f}")
        except ImportError as e:
            theirs = row["coremltools_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"palettize {shape[0]}x{shape[1]}: ours {row['ours_s']:.3f} s, MSE {row['ours_mse']:.4e} | "
              + theirs)
    return {"threads": args.threads, "rows": rows}


def bench_afm(args) -> dict:
    """afm-on-device's 2.6B projection weights (random; or --afm-layers layers) to 4 bits, timed."""
    c, device = CONFIGS["afm-on-device"], torch.device(args.device)
    d, q, kv, f = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim
    shapes = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)] * (args.afm_layers or c.n_layers)
    g = torch.Generator(device=device).manual_seed(0)
    ws = [torch.empty(s, device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for s in shapes]
    palettize.palettize_weights(ws[:2], 4, 16)                          # warm-up: CUDA context, kernels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    res = palettize.palettize_weights(ws, 4, 16)
    sync()
    seconds, n = time.perf_counter() - t, sum(a * b for a, b in shapes)
    mse0 = sum((palettize.dequantize(lut, idx, 16) - w.float()).pow(2).mean().item()
               for (lut, idx), w in zip(res[:7], ws)) / 7                # the error of layer 0, not timed
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"afm-on-device: {n / 1e9:.3f}B weights in {len(shapes)} projections to 4 bits on {name} in "
          f"{seconds:.3f} s; MSE of layer 0 {mse0:.3e}")
    return {"device": name, "weights": n, "layers": len(shapes), "afm_layers": len(shapes) // 7,
            "seconds": seconds, "weights_per_second": n / seconds, "mse_layer0": mse0}


def bench_generate(args) -> dict:
    """Greedy generation to the end of the context, the KV cache against recomputing the prefix each step."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    torch.manual_seed(0)
    model = (load_model(path)[0] if os.path.isfile(path) else Transformer(CONFIGS["tiny"])).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    n, runs = model.config.max_seq_len - prompt.shape[1], {}
    for cache in (True, False):
        model.generate(prompt, 8, use_cache=cache)                       # warm-up
        t = time.perf_counter()
        runs[cache] = (model.generate(prompt, n, use_cache=cache), time.perf_counter() - t)
    r = {"config": model.config.name, "new_tokens": n, "cached_tokens_per_second": n / runs[True][1],
         "recompute_tokens_per_second": n / runs[False][1], "speedup": runs[False][1] / runs[True][1],
         "same_tokens": bool(torch.equal(runs[True][0], runs[False][0]))}
    print(f"generate {n} tokens: KV cache {r['cached_tokens_per_second']:,.0f} tok/s, recompute "
          f"{r['recompute_tokens_per_second']:,.0f} tok/s: {r['speedup']:.1f}x, same: {r['same_tokens']}")
    return r


SECTIONS = {"palettize": bench_palettize, "generate": bench_generate, "afm": bench_afm}


def main(argv=None) -> dict:
    """Run the sections asked for; returns bench.json's contents."""
    ap = argparse.ArgumentParser(description="Benchmarks side by side, merged into OUT_DIR/bench.json.")
    ap.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS)} (default: all that fit)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for afm (default: cpu)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for our palettize (default: 2)")
    ap.add_argument("--out-dir", default="out", help="where bench.json goes (default: out)")
    ap.add_argument("--shapes", default="3072x3072,8192x3072",
                    help="OUTxIN weights of the palettize section (default: 3072x3072,8192x3072)")
    ap.add_argument("--afm-layers", type=int, help="afm: only the first N of the 26 layers (default: all)")
    args = ap.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        raise SystemExit(f"error: --shapes {args.shapes!r}: expected OUTxIN[,OUTxIN...]") from None
    names = [s for s in (args.only or "").split(",") if s] or \
        [s for s in SECTIONS if s != "afm" or args.device.startswith("cuda")]
    if set(names) - set(SECTIONS):
        raise SystemExit(f"error: unknown section in {args.only!r} (choose from {', '.join(SECTIONS)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    path = os.path.join(args.out_dir, "bench.json")
    try:
        report = json.load(open(path)) if os.path.exists(path) else {}
    except (OSError, json.JSONDecodeError):
        raise SystemExit(f"error: {path} exists but is not JSON; move it away first") from None
    for name in names:
        report[name] = SECTIONS[name](args) | {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine":
                                               f"{platform.machine()} {os.cpu_count()} cpus"}
        save_json(path, report)
    return report


if __name__ == "__main__":
    main()
