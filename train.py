"""
train.py -- pre-train the AFM-style decoder (model.py) on text (data.py): one CPU, one GPU, or many GPUs.

Follows section 3 ("Pre-training") of Gunter et al. 2024, "Apple Intelligence Foundation Language Models"
(arXiv 2407.21075), scaled down: AdamW with decoupled weight decay, linear warm-up then cosine decay to
0.005x the peak learning rate, gradient clipping, fp32 weights with bf16 compute on the GPU, and optional
distillation from a teacher whose top-1 prediction gets weight 0.9 in the target (as for AFM-on-device).

    python train.py                                  # `tiny` on the World English Bible, 2 CPU cores, minutes
    python train.py --resume                         # continue an interrupted run from out/ckpt.pt
    python train.py --config small --device cuda --compile --batch-size 64                  # one GPU
    torchrun --nproc_per_node 8 train.py --config afm-on-device --compile --batch-size 64   # 8 GPUs, DDP

Writes out/ckpt.pt (model, config, and what --resume needs: optimizer, step, sampler RNG, losses) and
out/train.json. The checkpoint is rewritten atomically every --ckpt-every seconds and on Ctrl-C.
"""
import argparse
import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dsd
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from data import DataError, decode, evaluate, get_batch, load_splits
from model import CONFIGS, Transformer, count_params, flops_per_token
from plumbing import (CheckpointError, config_from_dict, init_distributed, load_checkpoint, load_model,
                      save_json, save_model)

H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s of one H200 (the H100 SXM's tensor cores), for MFU

# The settings that define a run: a resumed run takes them from its checkpoint and may change only CHANGEABLE.
DEFAULTS = dict(config="tiny", data="bible", iters=1000, seed=1337, batch_size=16, seq_len=None, lr=2e-3,
                warmup=100, min_lr=0.005, weight_decay=3.16e-4, grad_accum=1, teacher=None, eval_every=None)
CHANGEABLE = ("iters", "eval_every")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Pre-train the AFM-style decoder on text (see the docstring).")
    add = ap.add_argument
    add("--out-dir", default="out", help="where ckpt.pt and train.json go (default: out)")
    add("--config", help=f"model config: {', '.join(CONFIGS)} (default: tiny)")
    add("--data", help="'bible', 'pydoc' or a path to a UTF-8 text file (default: bible)")
    add("--iters", type=int, help="optimizer steps (default: 1000)")
    add("--seed", type=int, help="seed of the initial weights and of the batches (default: 1337)")
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto: cuda if there is one (default: auto)")
    add("--batch-size", type=int, help="sequences per micro-batch, all processes together (default: 16)")
    add("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    add("--seq-len", type=int, help="tokens per sequence (default: the config's max_seq_len)")
    add("--lr", type=float, help="peak learning rate (default: 0.002)")
    add("--warmup", type=int, help="linear warm-up steps (default: 100)")
    add("--min-lr", type=float, help="final learning rate as a fraction of the peak (default: 0.005)")
    add("--weight-decay", type=float, help="per-step decay of matmul weights at peak lr (default: 3.16e-4)")
    add("--teacher", help="model checkpoint to distil from: target 0.1 truth + 0.9 its top-1 (default: none)")
    add("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: bfloat16 autocast on cuda)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--fsdp", action="store_true", help="under torchrun, shard with FSDP2 (default: off, DDP)")
    add("--eval-every", type=int, help="validate every N steps (default: 5 times a run)")
    add("--ckpt-every", type=float, default=60.0, help="rewrite the checkpoint every N seconds (default: 60)")
    add("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt (default: off)")
    add("--stop-at", type=int, help="stop after this step as if interrupted (default: none)")
    return ap.parse_args(argv)


def run_settings(args: argparse.Namespace) -> tuple[dict, object, dict | None]:
    """(settings, model config, checkpoint to resume or None); every flag is checked before any write."""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    ckpt, path = None, os.path.join(args.out_dir, "ckpt.pt")
    s = {**DEFAULTS, **given}                       # resuming: the checkpoint's settings instead
    if args.resume:
        ckpt = load_checkpoint(path, "model")
        if "train_state" not in ckpt:
            raise CheckpointError(f"nothing to resume: {path} holds no training state")
        s = {**ckpt["train_state"]["settings"], **{k: v for k, v in given.items() if k in CHANGEABLE}}
        for k, v in given.items():
            if k not in CHANGEABLE and v != s[k]:
                raise ValueError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {s[k]}; a "
                                 f"resumed run keeps its settings (only --iters and --eval-every may change)")
        if ckpt["train_state"]["step"] >= s["iters"]:
            raise ValueError(f"nothing to resume: {path} already finished {ckpt['train_state']['step']} "
                             f"steps of --iters {s['iters']} (pass a larger --iters to go on)")
    elif s["config"] not in CONFIGS:
        raise ValueError(f"unknown config {s['config']!r}; choose one of {', '.join(CONFIGS)}")
    cfg = CONFIGS[s["config"]] if ckpt is None else config_from_dict(ckpt["config"])
    s["seq_len"] = s["seq_len"] or cfg.max_seq_len
    s["eval_every"] = s["eval_every"] or max(1, s["iters"] // 5)
    for k in ("iters", "batch_size", "grad_accum", "seq_len", "eval_every"):
        if s[k] <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {s[k]}")
    if s["seq_len"] > cfg.max_seq_len:
        raise ValueError(f"--seq-len {s['seq_len']} exceeds the config's max_seq_len {cfg.max_seq_len}")
    if not s["lr"] > 0 or s["warmup"] < 0 or not 0 <= s["min_lr"] <= 1 or s["weight_decay"] < 0:
        raise ValueError("need --lr > 0, --warmup >= 0, 0 <= --min-lr <= 1 and --weight-decay >= 0")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ValueError(f"--stop-at must be positive, got {args.stop_at}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a directory")
    return s, cfg, ckpt


def lr_at(step: int, s: dict) -> float:
    """The learning rate of `step`: linear warm-up to the peak, then cosine decay to min_lr x peak."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    progress = min(1.0, (step - s["warmup"]) / max(1, s["iters"] - s["warmup"]))
    return s["lr"] * (s["min_lr"] + (1 - s["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, s: dict) -> torch.optim.AdamW:
    """AdamW; decays the matmul weights and tied embedding (2-D), not the RMSNorm gains (natural value 1)."""
    # AFM's decoupled weight decay removes wd x (lr / peak lr) of each weight per step; torch's AdamW removes
    # lr x weight_decay, so weight_decay = wd / peak lr is exactly that.
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2],
               "weight_decay": s["weight_decay"] / s["lr"]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.95), eps=1e-8, fused=True)


def loss_fn(model, x, y, teacher=None):
    """Next-token cross entropy; with a teacher, AFM's distillation target 0.1 truth + 0.9 teacher's top-1
    (cross entropy is linear in the target, so it is a sum of two)."""
    logits = model(x).float().flatten(0, 1)                           # (B * T, vocab)
    loss = F.cross_entropy(logits, y.flatten())
    if teacher is None:
        return loss
    with torch.no_grad():
        top1 = teacher(x).argmax(dim=-1)                              # (B, T)
    return 0.1 * loss + 0.9 * F.cross_entropy(logits, top1.flatten())


def main(argv=None) -> dict:
    """Train; returns the report written to train.json (on rank 0; the other ranks return {})."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    args = parse_args(argv)
    try:
        rank, world, device = init_distributed(args.device)
        s, cfg, ckpt = run_settings(args)
        B, T, accum, iters = s["batch_size"], s["seq_len"], s["grad_accum"], s["iters"]
        if B % world:
            raise ValueError(f"--batch-size {B} must be a multiple of the {world} processes")
        train_data, val_data = load_splits(s["data"], min_len=T)
        teacher = load_model(s["teacher"], device)[0].eval() if s["teacher"] else None
        if s["teacher"] and (teacher.config.vocab_size != cfg.vocab_size or teacher.config.max_seq_len < T):
            raise ValueError(f"{s['teacher']}: the teacher's vocabulary or context does not fit the student")
    except (DataError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    leader = rank == 0                                      # rank 0 alone prints, evaluates, writes
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    bf16 = torch.bfloat16 if dtype == "bfloat16" else None
    # torchrun: one process per GPU, or CPU processes with gloo; DDP or FSDP2 (even one process, so that its
    # cost can be measured). Every rank draws the step's whole batch from the same seeded sampler and trains
    # on its own slice of it, so the global batch and the loss curve are those of one process.
    sharded, ddp = dist.is_initialized() and args.fsdp, dist.is_initialized() and not args.fsdp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # the model, its optimizer, and the state of an interrupted run
    torch.manual_seed(s["seed"])
    model = Transformer(cfg).to(device)
    if sharded:                         # FSDP2, in place: each block, then the rest (embedding, final norm)
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32 if bf16 else None)
        for module in (*model.layers, model):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    optimizer = make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s["seed"])                    # the batch sampler's own RNG
    st = ckpt["train_state"] if ckpt is not None else dict(step=0, losses=[], val_curve=[], seconds=0.0)
    step, losses, val_curve, prior_seconds = st["step"], st["losses"], st["val_curve"], st["seconds"]
    full = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)   # whole tensors, gathered on the CPU
    if ckpt is not None:
        dsd.set_model_state_dict(model, ckpt["model"], options=full)
        dsd.set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=full)
        gen.set_state(st["data_rng"])
    fwd = torch.compile(model) if args.compile else model
    if ddp:
        # gradients live in the all-reduce buckets; torch.compile splits its graph at each bucket (to overlap
        # the all-reduce with backward), and 100 MB buckets instead of 25 keep that cost near 1% on an H200
        fwd = torch.nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            bucket_cap_mb=100)
    n, flops_tok = count_params(cfg), flops_per_token(cfg, T)
    log_every = 1 if device.type == "cpu" else 20                    # each log reads the loss: a GPU sync
    if leader:
        print(f"{cfg.name}: {n['params']:,} params, {B}x{accum}x{T} tokens/step on {world} process(es)"
              f"{' (FSDP)' if sharded else ''}, steps {step}..{iters}, lr {s['lr']}, {device} {dtype}, data "
              f"{s['data']} (train {len(train_data):,} / val {len(val_data):,} tokens)")

    def checkpoint():                   # every rank gathers (FSDP needs them all); rank 0 writes
        model_sd, optim_sd = dsd.get_state_dict(model, optimizer, options=full)
        if leader:
            save_model(os.path.join(args.out_dir, "ckpt.pt"), model, state_dict=model_sd, optimizer=optim_sd,
                       train_state=dict(settings=s, step=step, data_rng=gen.get_state(), val_curve=val_curve,
                                        losses=losses, seconds=prior_seconds + time.perf_counter() - t_start))

    def validate():                     # rank 0 alone, or every rank when the parameters are sharded
        if leader or sharded:
            r = evaluate(model, val_data, T, batch_size=32, device=device, autocast_dtype=bf16)
            val_curve.append({"step": step, "loss": r["loss"], "bpb": r["bpb"]})
            return r

    stop = []                           # Ctrl-C / SIGTERM: finish the step, checkpoint, leave; twice: at once

    def on_signal(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(1)
    main_thread = threading.current_thread() is threading.main_thread()     # signals reach it alone
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM) if main_thread}

    # throughput counts training steps only (no eval, no checkpoint), after the first few (compilation)
    first_timed = step + min(5, max(0, iters - step - 1))
    timed_seconds, pending = 0.0, []
    last_ckpt = t_mark = time.perf_counter()
    bar = tqdm(total=iters, initial=step, desc="train", dynamic_ncols=True, mininterval=0.5,
               disable=not leader)
    try:
        while step < iters:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, s)
            total = 0.0
            for micro in range(accum):
                x, y = get_batch(train_data, B, T, gen, device, rank, world)    # this rank's share
                last = micro == accum - 1                              # gradients are averaged only then
                if sharded:
                    model.set_requires_gradient_sync(last)
                with fwd.no_sync() if ddp and not last else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=bf16, enabled=bf16 is not None):
                        loss = loss_fn(fwd, x, y, teacher) / accum
                    loss.backward()
                total = total + loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append(total)
            bar.update(1)
            if not (step % log_every == 0 or step % s["eval_every"] == 0
                    or step in (iters, args.stop_at, first_timed) or (stop and world == 1)):
                continue
            t = torch.stack(pending).float()                           # one sync per log
            if dist.is_initialized():
                dist.all_reduce(t)
            losses.extend((t / world).tolist())                      # the mean over ranks
            pending.clear()
            if step > first_timed:                     # t_mark: the last log, first_timed or later
                timed_seconds += time.perf_counter() - t_mark
            tok_s = (step - first_timed) * B * T * accum / timed_seconds if timed_seconds else 0.0
            mfu = flops_tok * tok_s / (world * H200_BF16_PEAK) if device.type == "cuda" else None
            bar.set_postfix({"loss": f"{losses[-1]:.3f}", "tok/s": f"{tok_s:,.0f}",
                             **({"mfu": f"{mfu:.1%}"} if mfu is not None else {})}, refresh=False)
            if step % s["eval_every"] == 0 and step < iters and (r := validate()):
                bar.write(f"step {step}: train loss {losses[-1]:.4f}, val loss {r['loss']:.4f}, "
                          f"val bpb {r['bpb']:.4f}")
            interrupted, due = bool(stop), leader and time.perf_counter() - last_ckpt > args.ckpt_every
            if world > 1:                       # True on every rank if on any: all stop or checkpoint at once
                flags = torch.tensor([interrupted, due], dtype=torch.int32, device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                interrupted, due = flags.bool().tolist()
            if interrupted or step == args.stop_at:
                checkpoint()
                msg = f"stopped at step {step}; checkpoint {args.out_dir}/ckpt.pt (continue with --resume)"
                if interrupted:                                          # interrupted: a non-zero exit
                    raise SystemExit(f"interrupted: {msg}" if leader else 1)
                if leader:
                    bar.write(msg)
                return {"stopped_at": step, "losses": losses} if leader else {}
            if due and step < iters:
                checkpoint()
                last_ckpt = time.perf_counter()
            t_mark = time.perf_counter()
    finally:
        bar.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)

    r = validate()
    checkpoint()
    if not (leader or sharded):
        return {}
    # a sample, from a prompt out of the training text (on every rank when the parameters are sharded)
    prompt = train_data[:min(16, cfg.max_seq_len // 4)][None].long().to(device)
    rng = torch.Generator(device=device).manual_seed(s["seed"])
    text = decode(model.generate(prompt, min(200, cfg.max_seq_len - prompt.shape[1]), temperature=0.8,
                                 top_k=40, generator=rng)[0].cpu())
    report = {"config": asdict(cfg), **n, "iters": iters, "tokens_seen": iters * B * T * accum,
              "seconds": round(prior_seconds + time.perf_counter() - t_start, 2),     # data loading included
              "cpu_seconds": round(time.process_time() - cpu_start, 2), "tokens_per_second": round(tok_s, 1),
              "val_loss": r["loss"], "val_bpb": r["bpb"], **({"mfu": mfu} if mfu is not None else {}),
              "flops_per_token": flops_tok, "settings": s, "device": str(device), "dtype": dtype,
              "compile": args.compile, "world_size": world, "fsdp": sharded, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "val_curve": val_curve, "losses": losses, "sample": text}
    if leader:
        save_json(os.path.join(args.out_dir, "train.json"), report)
        print(f"val loss {r['loss']:.4f} nats/token, val bpb {r['bpb']:.4f}; {tok_s:,.0f} tokens/s"
              + (f", MFU {mfu:.1%}" if mfu is not None else "") + f"; {report['seconds']:.0f} s\n"
              f"sample: {text!r}\nwrote {args.out_dir}/ckpt.pt and train.json")
    return report if leader else {}


if __name__ == "__main__":
    main()
