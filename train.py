"""
train.py -- pre-train the AFM-style decoder (model.py) on byte-level text (data.py).

Follows the optimisation recipe of Gunter et al. 2024, "Apple Intelligence Foundation Language Models"
(arXiv 2407.21075), section 3 ("Pre-training"), scaled down: AdamW with decoupled weight decay, a linear
warm-up then cosine decay of the learning rate (the paper decays to 0.005x the peak), gradient clipping,
fp32 weights with bf16 compute on the GPU, and optional distillation from a teacher whose top-1 prediction
gets weight 0.9 in the target (as the paper does for AFM-on-device).

    python train.py                                  # `tiny` on the World English Bible, 2 CPU cores, minutes
    python train.py --iters 200 --out-dir out_quick  # a quick look
    python train.py --resume                         # continue an interrupted run from out/ckpt.pt
    python train.py --config small --device cuda --dtype bfloat16 --compile --batch-size 64   # one GPU

Writes out/ckpt.pt (model + config + everything --resume needs: optimizer, step, data-sampler RNG state,
loss history) and out/train.json (the numbers the README quotes). The checkpoint is rewritten atomically
every --ckpt-every seconds and when the run is stopped with Ctrl-C, so an interrupted run loses little.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import threading
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, decode, encode, evaluate, get_batch, load_splits
from model import (CONFIGS, CheckpointError, Transformer, config_from_dict, count_params, flops_per_token,
                   get_config, load_checkpoint, load_model, save_json, save_model)

H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s of one H200 (same tensor cores as the H100 SXM), for MFU

# Settings that define a run. A resumed run takes them from its checkpoint; only --iters may change.
DEFAULTS = dict(config="tiny", data="bible", iters=1000, seed=1337, batch_size=16, seq_len=None, lr=2e-3,
                warmup=100, min_lr=0.005, weight_decay=3.16e-4, grad_accum=1, teacher=None, eval_every=None)
CHANGEABLE = ("iters", "eval_every")   # the settings a resumed run may change


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    ap = argparse.ArgumentParser(description="Train the AFM-style decoder on byte-level text.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="out", help="where ckpt.pt and train.json go (default: out)")
    ap.add_argument("--config", help=f"model config: {', '.join(CONFIGS)} (default: {d['config']})")
    ap.add_argument("--data", help="'bible' (default), 'pydoc' or a path to a UTF-8 text file")
    ap.add_argument("--iters", type=int, help=f"optimizer steps (default: {d['iters']})")
    ap.add_argument("--seed", type=int, help=f"seed of the initial weights and of batch sampling (default: {d['seed']})")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available; default)")
    ap.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default: {d['batch_size']})")
    ap.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's max_seq_len)")
    ap.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']})")
    ap.add_argument("--warmup", type=int, help=f"linear warm-up steps (default: {d['warmup']})")
    ap.add_argument("--min-lr", type=float, help="final learning rate as a fraction of the peak (default: 0.005, "
                                                 "the paper's cosine floor)")
    ap.add_argument("--weight-decay", type=float, help="decoupled weight decay: fraction of each matmul weight "
                                                       "removed per step at the peak LR (default: 3.16e-4, the paper's)")
    ap.add_argument("--teacher", help="a model checkpoint to distil from: target = 0.1 true next byte + 0.9 "
                                      "teacher's top-1")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="compute dtype; bfloat16 = autocast, weights stay float32 (default: bfloat16 on cuda, "
                         "float32 on cpu)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (worth it on the GPU)")
    ap.add_argument("--eval-every", type=int, help="validate every N steps (default: 5 times a run)")
    ap.add_argument("--ckpt-every", type=float, default=60.0, help="rewrite the checkpoint every N seconds (default: 60)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt")
    ap.add_argument("--stop-at", type=int, help="stop after this step as if interrupted (checkpoint kept); "
                                                "for testing --resume")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Everything that can fail on bad input happens here, before anything is written.

def prepare(args: argparse.Namespace) -> dict:
    explicit = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise CheckpointError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path, "model")
        if "train_state" not in ckpt:
            raise CheckpointError(f"nothing to resume: {ckpt_path} holds no training state")
        settings = dict(ckpt["train_state"]["settings"])
        for k, v in explicit.items():
            if k not in CHANGEABLE and v != settings[k]:
                raise ValueError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {settings[k]}; "
                                 f"a resumed run keeps its settings (only --iters and --eval-every may change)")
        settings.update({k: explicit[k] for k in CHANGEABLE if k in explicit})
        if ckpt["train_state"]["step"] >= settings["iters"]:
            raise ValueError(f"nothing to resume: {ckpt_path} already finished {ckpt['train_state']['step']} "
                             f"steps of --iters {settings['iters']} (pass a larger --iters to go on)")
    else:
        settings = {**DEFAULTS, **explicit}

    cfg = get_config(settings["config"]) if ckpt is None else config_from_dict(ckpt["config"])
    if settings["seq_len"] is None:
        settings["seq_len"] = cfg.max_seq_len
    if settings["eval_every"] is None:
        settings["eval_every"] = max(1, settings["iters"] // 5)
    for k in ("iters", "batch_size", "grad_accum", "seq_len", "eval_every"):
        if settings[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {settings[k]}")
    if settings["seq_len"] > cfg.max_seq_len:
        raise ValueError(f"--seq-len {settings['seq_len']} exceeds the config's max_seq_len {cfg.max_seq_len}")
    if not settings["lr"] > 0 or settings["warmup"] < 0 or not 0 <= settings["min_lr"] <= 1 \
            or settings["weight_decay"] < 0:
        raise ValueError("need --lr > 0, --warmup >= 0, 0 <= --min-lr <= 1 and --weight-decay >= 0")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ValueError(f"--stop-at must be positive, got {args.stop_at}")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    train_data, val_data = load_splits(settings["data"], min_len=settings["seq_len"])

    teacher = None
    if settings["teacher"]:
        teacher, _ = load_model(settings["teacher"])
        tc = teacher.config
        if tc.vocab_size != cfg.vocab_size or tc.max_seq_len < settings["seq_len"]:
            raise ValueError(f"{settings['teacher']}: teacher (vocab {tc.vocab_size}, max_seq_len {tc.max_seq_len}) "
                             f"does not fit the student (vocab {cfg.vocab_size}, seq_len {settings['seq_len']})")

    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a directory")
    return dict(settings=settings, cfg=cfg, ckpt=ckpt, ckpt_path=ckpt_path, device=device, dtype=dtype,
                train_data=train_data, val_data=val_data, teacher=teacher)


# ----------------------------------------------------------------------------------------------------------
# Optimisation

def lr_at(step: int, s: dict) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr x peak (AFM: cosine to 0.005x peak)."""
    peak, warmup, iters = s["lr"], s["warmup"], s["iters"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, iters - warmup))
    return peak * (s["min_lr"] + (1 - s["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, s: dict, device: torch.device) -> torch.optim.AdamW:
    # Decay only the 2-D matmul weights: they carry the capacity that weight decay regularises. The 1-D RMSNorm
    # gains (attention/FFN/final norms, q/k norms) are scale parameters whose natural value is 1; decaying them
    # toward 0 would only fight the normalisation. The tied embedding IS decayed: it is the output head's matmul
    # weight too, and being tied, every row gets a gradient through the softmax at every step, so decay does
    # not erode rarely seen bytes the way it would in an untied input-only embedding.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # AFM's "decoupled" weight decay shrinks weights by wd x (lr / peak lr) per step, independent of the peak LR;
    # torch's AdamW shrinks by lr x weight_decay, so weight_decay = wd / peak lr gives exactly that.
    groups = [{"params": decay, "weight_decay": s["weight_decay"] / s["lr"]},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update (CUDA and CPU) instead of a Python loop over tensors
    return torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def loss_fn(model, x, y, teacher=None):
    """Next-byte cross-entropy; with a teacher, the AFM distillation target: 0.1 on the true next byte and
    0.9 on the teacher's top-1 prediction (cross-entropy is linear in the target, so it is a sum of two)."""
    logits = model(x).float()                                         # (B, T, vocab)
    logits = logits.view(-1, logits.shape[-1])
    loss = F.cross_entropy(logits, y.reshape(-1))
    if teacher is None:
        return loss
    with torch.no_grad():
        top1 = teacher(x).argmax(dim=-1)                              # (B, T)
    return 0.1 * loss + 0.9 * F.cross_entropy(logits, top1.reshape(-1))


# ----------------------------------------------------------------------------------------------------------

def train(run: dict, args: argparse.Namespace, t_start: float, cpu_start: float = 0.0) -> dict:
    s, cfg, device, ckpt = run["settings"], run["cfg"], run["device"], run["ckpt"]
    B, T, accum, iters = s["batch_size"], s["seq_len"], s["grad_accum"], s["iters"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = torch.bfloat16 if run["dtype"] == "bfloat16" else None

    torch.manual_seed(s["seed"])
    model = Transformer(cfg).to(device)
    optimizer = make_optimizer(model, s, device)
    gen = torch.Generator().manual_seed(s["seed"])                    # the data sampler's own RNG
    step, losses, val_curve, prior_seconds = 0, [], [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for g in optimizer.param_groups:                               # the state may come from another device
            g["fused"], g["foreach"] = device.type in ("cuda", "cpu"), None
        st = ckpt["train_state"]
        gen.set_state(st["data_rng"])
        step, losses, val_curve, prior_seconds = st["step"], list(st["losses"]), list(st["val_curve"]), st["seconds"]
        print(f"resuming {run['ckpt_path']} at step {step} of {iters}")
    teacher = run["teacher"].to(device).eval() if run["teacher"] is not None else None
    fwd = torch.compile(model) if args.compile else model

    n = count_params(cfg)
    flops_tok = flops_per_token(cfg, T)
    eval_every = s["eval_every"]
    log_every = 1 if device.type == "cpu" else 20                    # each log reads the loss: a GPU sync
    print(f"{cfg.name}: {n['params']:,} params ({n['non_embedding_params']:,} non-embedding), "
          f"{B}x{accum}x{T} tokens/step, {iters} steps, lr {s['lr']}, {device} {run['dtype']}, "
          f"data {s['data']} (train {len(run['train_data']):,} / val {len(run['val_data']):,} bytes)")

    def checkpoint():
        save_model(run["ckpt_path"], model, optimizer=optimizer.state_dict(),
                   train_state=dict(settings=s, step=step, data_rng=gen.get_state(), losses=losses,
                                    val_curve=val_curve, seconds=prior_seconds + time.perf_counter() - t_start))

    def validate():
        r = evaluate(model, run["val_data"], T, batch_size=32, device=device, autocast_dtype=autocast_dtype)
        val_curve.append({"step": step, "loss": r["loss"], "bpb": r["bpb"]})
        return r

    # Ctrl-C / SIGTERM: finish the current step, checkpoint, leave (a second Ctrl-C aborts at once)
    stop, handlers = [], {}

    def on_signal(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(1)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)

    # throughput: training steps only (no eval / checkpoint), after the first few (compilation, warm caches)
    first_timed = step + min(5, max(0, iters - step - 1))
    timed_tokens, timed_seconds, timed_from, last_ckpt = 0, 0.0, step, time.perf_counter()
    pending = []
    bar = tqdm(total=iters, initial=step, desc="train", dynamic_ncols=True, mininterval=0.5)
    model.train()
    try:
        t_mark = time.perf_counter()
        while step < iters:
            lr = lr_at(step, s)
            for g in optimizer.param_groups:
                g["lr"] = lr
            total = 0.0
            for _ in range(accum):
                x, y = get_batch(run["train_data"], B, T, gen, device)
                with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_fn(fwd, x, y, teacher) / accum
                loss.backward()
                total = total + loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(total)
            bar.update(1)

            boundary = step % log_every == 0 or step == iters or step % eval_every == 0 or stop \
                or step == args.stop_at or step == first_timed
            if not boundary:
                continue
            losses.extend(torch.stack(pending).float().tolist())        # syncs with the GPU
            pending.clear()
            now = time.perf_counter()
            if timed_from >= first_timed:
                timed_seconds += now - t_mark
                timed_tokens += (step - timed_from) * B * T * accum
            timed_from, t_mark = step, now
            tok_s = timed_tokens / timed_seconds if timed_seconds else 0.0
            post = {"loss": f"{losses[-1]:.3f}", "tok/s": f"{tok_s:,.0f}"}
            if device.type == "cuda":
                post["mfu"] = f"{flops_tok * tok_s / H200_BF16_PEAK:.1%}"
            bar.set_postfix(post, refresh=False)

            if step % eval_every == 0 and step < iters:
                r = validate()
                bar.write(f"step {step}: train loss {losses[-1]:.4f}, val loss {r['loss']:.4f}, val bpb {r['bpb']:.4f}")
            if stop or step == args.stop_at:
                checkpoint()
                bar.close()
                msg = f"stopped at step {step}; checkpoint {run['ckpt_path']} (continue with --resume)"
                if stop:                                                 # interrupted: a non-zero exit
                    raise SystemExit(f"interrupted: {msg}")
                print(msg)
                return {"stopped_at": step, "losses": losses}
            if time.perf_counter() - last_ckpt > args.ckpt_every and step < iters:
                checkpoint()
                last_ckpt = time.perf_counter()
            t_mark = time.perf_counter()
    finally:
        bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)

    r = validate()
    checkpoint()
    tok_s = timed_tokens / timed_seconds if timed_seconds else 0.0
    prompt = encode("In the beginning")[None].long().to(device)
    text = decode(model.generate(prompt, min(200, cfg.max_seq_len - prompt.shape[1]), temperature=0.8, top_k=40,
                                 generator=torch.Generator(device=device).manual_seed(s["seed"]))[0].cpu())
    seconds = prior_seconds + time.perf_counter() - t_start      # the whole run, data loading included
    report = {
        "config": asdict(cfg), **n, "iters": iters, "tokens_seen": iters * B * T * accum,
        "seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "tokens_per_second": round(tok_s, 1),
        "val_loss": r["loss"], "val_bpb": r["bpb"],
        **({"mfu": flops_tok * tok_s / H200_BF16_PEAK} if device.type == "cuda" else {}),
        "flops_per_token": flops_tok, "settings": s, "device": str(device), "dtype": run["dtype"],
        "compile": args.compile, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "val_curve": val_curve, "losses": losses, "sample": text,
    }
    save_json(os.path.join(args.out_dir, "train.json"), report)
    print(f"val loss {r['loss']:.4f} nats/byte, val bpb {r['bpb']:.4f}; {tok_s:,.0f} tokens/s"
          + (f", MFU {report['mfu']:.1%}" if device.type == "cuda" else "") + f"; {seconds:.0f} s")
    print(f"sample: {text!r}")
    print(f"wrote {run['ckpt_path']} and {os.path.join(args.out_dir, 'train.json')}")
    return report


def main(argv=None) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()   # wall clock; CPU time of this process
    args = parse_args(argv)
    try:
        run = prepare(args)
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return train(run, args, t_start, cpu_start)


if __name__ == "__main__":
    main()
