"""
bench.py -- side-by-side measurements, ratios first. One function per section; `main` runs the ones asked for
and merges their results into out/bench.json (sections not run keep their previous entries).

Sections:
  palettize  ours (palettize.palettize_weight) against coremltools' k-means palettizer,
             `coremltools.optimize.coreml.palettize_weights(OpPalettizerConfig(mode="kmeans", nbits=4,
             granularity="per_grouped_channel", group_size=16))`, on the same fp16 3072x3072 and 8192x3072
             weights drawn from N(0, 0.02^2). coremltools palettizes an mlprogram holding one linear layer with
             that weight (converted from torch; conversion not timed; its k-means is scikit-learn's KMeans, a
             benchmark-only dependency: pip install scikit-learn). Both errors are measured against the same
             fp16 weight, after decoding coremltools' constexpr_lut_to_dense op. Ratios: time (coremltools / ours)
             and MSE (ours / coremltools).
  train      training throughput: `tiny` on this machine's CPU (tokens/s); with --device cuda, `small` with
             bf16 autocast and torch.compile, its tokens/s and MFU against the H200's 989 TFLOP/s dense bf16.
  generate   greedy generation to the end of the context with the KV cache against recomputing the prefix at
             every step (out/ckpt.pt if present, else a random `tiny`): tokens/s both ways, same tokens.
  export     the Core ML package's bytes against the ideal bytes, read from out/export.json.
  afm        the whole afm-on-device model's projection weights (26 layers x 7, about 2.6B weights, random
             N(0, 0.02^2)) palettized to 4 bits, timed end to end from weights on the device to LUTs and
             indices. Meant for one GPU: `python bench.py --only afm --device cuda`.

Run: `python bench.py` (all sections that can run here), `python bench.py --only palettize`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from model import CONFIGS, save_json


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# Palettization: ours vs coremltools

def coremltools_palettize(w16: torch.Tensor, nbits: int = 4, group_size: int = 16):
    """coremltools' k-means palettization of one fp16 weight inside an mlprogram.
    Returns (seconds spent in palettize_weights, dense fp16 result as a float tensor)."""
    import numpy as np
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    out_f, in_f = w16.shape
    lin = torch.nn.Linear(in_f, out_f, bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(w16.float())
    traced = torch.jit.trace(lin, torch.zeros(1, in_f))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, in_f))], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16)
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        mode="kmeans", nbits=nbits, granularity="per_grouped_channel", group_size=group_size))
    t = time.perf_counter()
    compressed = cto.palettize_weights(mlmodel, config)
    seconds = time.perf_counter() - t
    ops = [op for f in compressed._mil_program.functions.values() for op in f.operations
           if op.op_type == "constexpr_lut_to_dense"]
    if len(ops) != 1:
        raise RuntimeError(f"expected one constexpr_lut_to_dense op, found {len(ops)}")
    dense = np.asarray(ops[0].materialized_val_inference(), dtype=np.float32).reshape(out_f, in_f)
    return seconds, torch.from_numpy(dense)


def bench_palettize(args) -> dict:
    import palettize

    rows = []
    for shape in args.shapes:
        g = torch.Generator().manual_seed(0)
        w16 = (torch.randn(shape, generator=g) * 0.02).half()
        ref = w16.float()
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)          # ours only: coremltools/scikit-learn keep their own setting
        palettize.palettize_weight(w16[:64], 4, 16)                      # warm-up (allocator, kernels)
        t = time.perf_counter()
        lut, idx = palettize.palettize_weight(w16, 4, 16)
        ours_s = time.perf_counter() - t
        torch.set_num_threads(threads)
        ours_mse = (palettize.dequantize(lut, idx, 16) - ref).pow(2).mean().item()
        row = {"shape": list(shape), "ours_s": ours_s, "ours_mse": ours_mse}
        try:
            ct_s, ct_dense = coremltools_palettize(w16)
            row.update(coremltools_s=ct_s, coremltools_mse=(ct_dense - ref).pow(2).mean().item())
            row.update(time_ratio=row["coremltools_s"] / ours_s, mse_ratio=ours_mse / row["coremltools_mse"])
        except ImportError as e:
            row["coremltools_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(f"palettize {shape[0]}x{shape[1]} 4-bit g16: ours {ours_s:.3f} s, MSE {ours_mse:.4e}"
              + (f" | coremltools {row['coremltools_s']:.2f} s, MSE {row['coremltools_mse']:.4e} | "
                 f"{row['time_ratio']:.1f}x faster, MSE ratio {row['mse_ratio']:.4f}"
                 if "time_ratio" in row else f" | coremltools unavailable ({row['coremltools_error']})"))
    return {"threads": args.threads, "rows": rows}


# ----------------------------------------------------------------------------------------------------------
# The whole afm-on-device model, 4-bit, on one device

def afm_projection_shapes(cfg) -> list[tuple[str, tuple[int, int]]]:
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    per_layer = [("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, q)),
                 ("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))]
    return [(f"layers.{i}.{n}", s) for i in range(cfg.n_layers) for n, s in per_layer]


def bench_afm(args) -> dict:
    import palettize

    device = torch.device(args.device)
    cfg = CONFIGS["afm-on-device"]
    shapes = afm_projection_shapes(cfg)[:7 * args.afm_layers] if args.afm_layers else afm_projection_shapes(cfg)
    n = sum(a * b for _, (a, b) in shapes)
    g = torch.Generator(device=device).manual_seed(0)
    ws = [torch.empty(s, device=device, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for _, s in shapes]
    # warm-up on two layers (CUDA context, kernels), then the whole model
    palettize.palettize_weights(ws[:2], 4, 16)
    _sync(device)
    t = time.perf_counter()
    res = palettize.palettize_weights(ws, 4, 16, names=[nm for nm, _ in shapes])
    _sync(device)
    seconds = time.perf_counter() - t
    # error on a sample of layers (not timed)
    mse = [(palettize.dequantize(lut, idx, 16) - w.float()).pow(2).mean().item()
           for (lut, idx), w in list(zip(res, ws))[:7]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"afm-on-device: {len(shapes)} projections, {n / 1e9:.3f}B weights palettized to 4 bits on {name} "
          f"in {seconds:.3f} s ({n / seconds / 1e9:.3g}B weights/s); MSE of layer 0's projections "
          f"{sum(mse) / len(mse):.3e}")
    return {"device": name, "weights": n, "layers": len(shapes), "afm_layers": len(shapes) // 7, "seconds": seconds,
            "weights_per_second": n / seconds, "mse_layer0": sum(mse) / len(mse)}


# ----------------------------------------------------------------------------------------------------------
# Training throughput: `tiny` on this machine's CPU; on a GPU, `small` with bf16 + torch.compile and its MFU

def bench_train(args) -> dict:
    import tempfile
    import train

    cuda = str(args.device).startswith("cuda")
    argv = (["--config", "small", "--device", args.device, "--dtype", "bfloat16", "--compile", "--batch-size", "64",
             "--iters", "150"] if cuda else
            ["--config", "tiny", "--device", "cpu", "--iters", "30"])
    with tempfile.TemporaryDirectory() as d:
        r = train.main(argv + ["--out-dir", d, "--eval-every", "100000"])
    out = {"config": r["config"]["name"], "device": r["device"], "tokens_per_second": r["tokens_per_second"],
           "train_command": "python train.py " + " ".join(argv)}
    if cuda:
        out.update(mfu=r["mfu"], gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    print(f"train {out['config']} on {out['device']}: {out['tokens_per_second']:,.0f} tokens/s"
          + (f", MFU {out['mfu']:.1%} of 989 TFLOP/s" if cuda else ""))
    return out


# ----------------------------------------------------------------------------------------------------------
# Generation: the KV cache against recomputing the whole prefix at every step

def bench_generate(args) -> dict:
    from model import Transformer, load_model

    path = os.path.join(args.out_dir, "ckpt.pt")
    if os.path.isfile(path):
        model, _ = load_model(path)
    else:
        torch.manual_seed(0)
        model = Transformer(CONFIGS["tiny"])
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    n = model.config.max_seq_len - prompt.shape[1]
    res = {}
    for use_cache in (True, False):
        model.generate(prompt, 8, use_cache=use_cache)                          # warm-up
        t = time.perf_counter()
        out = model.generate(prompt, n, use_cache=use_cache)
        res[use_cache] = (time.perf_counter() - t, out)
    same = bool(torch.equal(res[True][1], res[False][1]))
    r = {"config": model.config.name, "new_tokens": n, "cached_tokens_per_second": n / res[True][0],
         "recompute_tokens_per_second": n / res[False][0], "speedup": res[False][0] / res[True][0],
         "same_tokens": same}
    print(f"generate {n} tokens ({model.config.name}, greedy): KV cache {r['cached_tokens_per_second']:,.0f} tok/s, "
          f"recompute {r['recompute_tokens_per_second']:,.0f} tok/s -> {r['speedup']:.1f}x; same tokens: {same}")
    return r


# ----------------------------------------------------------------------------------------------------------

SECTIONS = {"palettize": bench_palettize, "train": bench_train, "generate": bench_generate, "afm": bench_afm}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Benchmarks, side by side; results merge into OUT_DIR/bench.json.")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all that fit the device)")
    ap.add_argument("--device", default="cpu", help="device for the device sections (afm): cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for our side of CPU sections (default 2)")
    ap.add_argument("--out-dir", default="out", help="where bench.json goes (default: out)")
    ap.add_argument("--shapes", default="3072x3072,8192x3072", help="weight shapes of the palettize section")
    ap.add_argument("--afm-layers", type=int, default=None,
                    help="afm section: palettize only the first N of the 26 layers (a quick check off the GPU)")
    args = ap.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        raise SystemExit(f"error: --shapes {args.shapes!r}: expected OUTxIN[,OUTxIN...]") from None
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in names if s not in SECTIONS]
        if bad:
            raise SystemExit(f"error: unknown section {bad[0]!r} (choose from {', '.join(SECTIONS)})")
    else:
        names = [s for s in SECTIONS if s != "afm" or args.device.startswith("cuda")]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    path = os.path.join(args.out_dir, "bench.json")
    report = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise SystemExit(f"error: {path} exists but is not JSON; move it away first") from None
    for name in names:
        result = SECTIONS[name](args)
        result.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=f"{platform.node()} {platform.machine()} "
                      f"{os.cpu_count()} cpus", command="python bench.py " + " ".join(argv or []))
        report[name] = result
        save_json(path, report)
    return report


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
