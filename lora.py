"""
lora.py -- LoRA by hand: accuracy-recovery adapters on the frozen palettized base; feature adapters from them.

Follows section 5 of Gunter et al. 2024, "Apple Intelligence Foundation Language Models" (arXiv 2407.21075):
rank-16 LoRA adapters with 16-bit values on every attention and feed-forward projection (q, k, v, o, gate, up,
down), swapped on the frozen base at run time. Recovery trains on the base's own corpus with next-token cross
entropy (the paper's pre-training loss; `--loss kl` distils the float model's logits instead). A small
under-trained model also keeps learning its corpus under cross entropy, so the float model trains the same
adapter too (`--control`): `gap_closed_matched` is the gap closed against it. Under torchrun: DDP.

    python lora.py                               # out/palettized.pt, out/ckpt.pt -> out/adapter_recovery.pt
    python lora.py --task pydoc --init recovery  # a feature adapter on Python's docs -> out/adapter_pydoc.pt
    python lora.py --task pydoc --init zero      # the same from the standard init -> adapter_pydoc_zero.pt
    python lora.py --eval --adapter out/adapter_pydoc.pt --data pydoc      # validation bpb of base + adapter
Ctrl-C ends training early without losing it: the adapter so far is evaluated and saved (`iters_done`).
"""
import argparse
import copy
import hashlib
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, corpus_from_checkpoint, get_batch, load_splits, tokenizer_from_checkpoint
from plumbing import (CheckpointError, init_distributed, load_checkpoint, load_model, save_checkpoint,
                      save_json)
from palettize import (PROJECTIONS, PalettizedLinear, bits_per_weight, load_float_or_palettized,
                       load_palettized, val_bpb)


class AdapterError(Exception):
    """An adapter that does not fit the model it is loaded onto, or a bad adapter request (one line)."""


# -- LoRA ----------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021, "LoRA"):

        y = base(x) + (alpha / r) * B(A(x))          A: (r, in), B: (out, r)

    `base` (nn.Linear or PalettizedLinear) stays as is; A starts Kaiming-uniform (as nn.Linear), B at zero: a
    fresh adapter changes nothing. At a fixed alpha the rank keeps the update's size; alpha = 2 r (the
    default) is a scale of 2."""

    def __init__(self, base: nn.Module, rank: int = 16, alpha: float = 32.0):
        super().__init__()
        if not (isinstance(rank, int) and rank > 0 and alpha > 0):
            raise AdapterError(f"LoRA rank (an integer) and alpha must be positive, got {rank!r}, {alpha!r}")
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):                                            # (..., in) -> (..., out)
        h = F.linear(x, self.lora_A.to(x.dtype))                     # (..., r)
        return self.base(x) + self.scale * F.linear(h, self.lora_B.to(x.dtype))


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} for every adapter attached to `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def targeted_layers(model: nn.Module, targets) -> dict[str, nn.Module]:
    """{name: module} of the linear-like modules (LoRALinear once attached) whose last name is in targets."""
    return {name: m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features")}


def add_adapters(model: nn.Module, rank: int = 16, alpha: float = 32.0, targets=PROJECTIONS) -> list[str]:
    """Freeze all of `model` and wrap each target projection in a LoRALinear, in place; returns the wrapped
    names. The A matrices draw from torch's global RNG (seed it first)."""
    if adapters(model):
        raise AdapterError("the model already has adapters: remove_adapters() first, or load_adapter()")
    found = targeted_layers(model, targets)
    missing = [t for t in targets if t not in {n.rsplit(".", 1)[-1] for n in found}]
    if missing or not targets:
        raise AdapterError(f"no linear layer named {', '.join(missing) or '(none given)'} in the model")
    LoRALinear(nn.Linear(1, 1), rank, alpha)                # checks rank and alpha before anything changes
    model.requires_grad_(False)
    for name, m in found.items():
        model.set_submodule(name, LoRALinear(m, rank, alpha))
    return list(found)


def remove_adapters(model: nn.Module) -> None:
    """Unwrap every LoRALinear back to its frozen base layer, in place: the bare base again."""
    for name, m in adapters(model).items():
        model.set_submodule(name, m.base)


def adapter_config(model: nn.Module) -> dict | None:
    """{rank, alpha, targets} of the attached adapters (targets in PROJECTIONS order), or None if none."""
    if not (mods := adapters(model)):
        return None
    if len(kinds := {(m.rank, m.alpha) for m in mods.values()}) != 1:
        raise AdapterError("the attached adapters mix ranks or alphas; this file handles one of each")
    (rank, alpha), leaves = kinds.pop(), {n.rsplit(".", 1)[-1] for n in mods}
    return {"rank": rank, "alpha": alpha,
            "targets": [p for p in PROJECTIONS if p in leaves] + sorted(leaves - set(PROJECTIONS))}


def trainable_and_total_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a palettized weight counts as in x out parameters, as in its float model."""
    pal = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PalettizedLinear))
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()) + pal)


# -- The adapter file: the adapter tensors only, bound to their base by a fingerprint ------------------------

def fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base, tensor by tensor in name order (LUTs and indices, int8 embedding, norms).
    Adapter tensors are left out and names read as if none were attached: adapters never change it."""
    h, state = hashlib.sha256(), model.state_dict()
    for name in sorted(k for k in state if ".lora_" not in k):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name.replace('.base.', '.')}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(path: str, model: nn.Module, name: str, **extra) -> None:
    """Write the adapter tensors (fp16), their config and the base's fingerprint, atomically."""
    if (cfg := adapter_config(model)) is None:
        raise AdapterError("the model has no adapters to save")
    tensors = {k: t.to("cpu", torch.float16).clone() for k, t in model.state_dict().items() if ".lora_" in k}
    save_checkpoint(path, kind="adapter", config={**cfg, "name": name}, fingerprint=fingerprint(model),
                    adapter=tensors, **extra)


def load_adapter(path: str, model: nn.Module) -> dict:
    """Put the adapter file `path` onto `model` in place (attached as the file says, or swapped into those
    attached); returns its checkpoint. Another base, rank or targets: one-line AdapterError, model as was."""
    ckpt = load_checkpoint(path, "adapter")
    cfg, sd, fp = ckpt["config"], ckpt.get("adapter"), fingerprint(model)
    if not (isinstance(cfg, dict) and {"rank", "alpha", "targets"} <= set(cfg) and isinstance(sd, dict)):
        raise AdapterError(f"{path}: not an adapter file of this project (config or tensors missing)")
    if (theirs := str(ckpt.get("fingerprint"))) != fp:
        raise AdapterError(f"{path}: trained on a different base (fingerprint {theirs:.12}, this base "
                           f"{fp:.12})")
    r, targets, attached = cfg["rank"], cfg["targets"], adapter_config(model)
    if attached and (attached["rank"], set(attached["targets"])) != (r, set(targets)):
        raise AdapterError(f"{path}: rank {r}, targets {','.join(targets)} do not match the attached "
                           f"adapters' rank {attached['rank']}, targets {','.join(attached['targets'])}")
    want = {k: s for n, m in targeted_layers(model, targets).items()
            for k, s in ((f"{n}.lora_A", (r, m.in_features)), (f"{n}.lora_B", (m.out_features, r)))}
    # keys missing, extra, or of the wrong shape
    if bad := sorted(k for k in {*want, *sd} if want.get(k) != getattr(sd.get(k), "shape", None)):
        raise AdapterError(f"{path}: adapter tensors do not fit this model (first mismatch: {bad[0]})")
    if attached is None:
        add_adapters(model, r, cfg["alpha"], targets)
    model.load_state_dict(sd, strict=False)                    # exactly the adapter tensors, checked above
    for m in adapters(model).values():
        m.alpha, m.scale = float(cfg["alpha"]), cfg["alpha"] / r
    return ckpt


# -- Training ------------------------------------------------------------------------------------------------

def train_adapters(model, train_data, *, iters: int, lr: float, batch_size: int, seq_len: int, seed: int,
                   device="cpu", teacher=None, loss: str = "ce", callback=lambda step: None,
                   progress: bool = True, stop_at: int | None = None) -> list[float]:
    """AdamW on the adapters only (linear warm-up, cosine decay to 10% of lr); returns each step's loss.
    callback(step) runs before step 0 and after each; Ctrl-C (or stop_at) ends it early, the adapter kept.
    Under torchrun each rank trains on a slice of every batch, DDP averaging gradients: one process's run."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    fwd = model if not dist.is_initialized() else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if str(device).startswith("cuda") else None,
        broadcast_buffers=False)                               # the frozen base is the same everywhere
    params = [p for p in model.parameters() if p.requires_grad]        # the adapters (AdamW refuses none)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen, warmup, losses = torch.Generator().manual_seed(seed), max(1, iters // 20), []
    model.train()
    callback(0)
    bar = tqdm(range(iters), desc=f"lora ({loss})", disable=not progress or rank > 0, dynamic_ncols=True)
    try:
        for step in bar:
            opt.param_groups[0]["lr"] = lr * (step + 1) / warmup if step < warmup else \
                lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, iters - warmup))))
            x, y = get_batch(train_data, batch_size, seq_len, gen, device, rank, world)  # this rank's share
            logits = fwd(x).float().flatten(0, 1)                                   # (B*T, V)
            ce = F.cross_entropy(logits, y.flatten()) if loss != "kl" else 0.0      # nats per token
            if loss != "ce":                          # kl, mix: KL(teacher || student) over the vocabulary
                with torch.no_grad():
                    t = F.log_softmax(teacher(x).float().flatten(0, 1), dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), t, log_target=True, reduction="batchmean")
            step_loss = ce if loss == "ce" else kl if loss == "kl" else 0.5 * (ce + kl)     # mix: their mean
            opt.zero_grad(set_to_none=True)
            step_loss.backward()
            opt.step()
            if dist.is_initialized():                                # the mean over the ranks
                dist.all_reduce(step_loss := step_loss.detach())
                step_loss /= world
            losses.append(step_loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            callback(step + 1)
            if stop_at is not None and step + 1 >= stop_at:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        tqdm.write(f"interrupted after {len(losses)} of {iters} steps: keeping the adapter trained so far")
    model.eval()
    return losses


# -- The command line ----------------------------------------------------------------------------------------

def main(argv=None):
    """Run the script: recovery, a feature adapter, or --eval."""
    t0 = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    add("--task", default="recovery", help="'recovery', or a feature name (e.g. pydoc: trains on --data)")
    add("--init", choices=("recovery", "zero"), default="recovery", help="a feature's start: --adapter, or 0")
    add("--eval", action="store_true", help="only print the validation bpb of --base + --adapter")
    add("--out-dir", default="out", help="outputs go here; default inputs are read from here too")
    add("--base", help="palettized checkpoint (default: OUT_DIR/palettized.pt); --eval takes a float one too")
    add("--teacher", help="float checkpoint, for recovery (default: OUT_DIR/ckpt.pt)")
    add("--adapter", help="to start from or evaluate, or none (default: OUT_DIR/adapter_recovery.pt)")
    add("--data", help="'bible', 'pydoc' or a text file (default: the base's corpus; a feature: its name)")
    add("--loss", choices=("ce", "kl", "mix"), default="ce", help="recovery: CE, KL to the teacher, or both")
    add("--control", action=argparse.BooleanOptionalAction, default=True, help="also adapt the float model")
    add("--rank", type=int, help="LoRA rank (default: 16, or the --adapter file's)")
    add("--alpha", type=float, help="LoRA alpha, scale = alpha / rank (default: 2 x rank)")
    add("--targets", default=",".join(PROJECTIONS), help="comma-separated projections to adapt")
    add("--lr", type=float, help="peak learning rate (default: 2e-3 recovery, 1e-3 features)")
    add("--iters", type=int, help="training steps (default: 300 recovery, 100 features)")
    add("--batch-size", type=int, default=16, help="sequences per step, all processes together")
    add("--seq-len", type=int, help="context length (default: the model's max_seq_len)")
    add("--eval-windows", type=int, default=256, help="validation windows per evaluation")
    add("--seed", type=int, default=0, help="seed of the adapter init and the batches")
    add("--device", default="auto", help="cpu, cuda[:N] or auto (cuda if available)")
    add("--stop-at", type=int, help="stop after this step as if interrupted (the adapter is kept)")
    a = ap.parse_args(argv)
    try:
        for flag in ("rank", "iters", "batch_size", "seq_len", "eval_windows", "stop_at", "lr", "alpha"):
            if getattr(a, flag) is not None and not getattr(a, flag) > 0:
                raise AdapterError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
        a.targets = [t for t in a.targets.split(",") if t]
        if not a.targets or (os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir)):
            raise AdapterError("--targets is empty" if not a.targets else f"--out-dir {a.out_dir}: a file")
        rank, world, a.device = init_distributed(a.device)
        if a.batch_size % world:
            raise AdapterError(f"--batch-size {a.batch_size} must be a multiple of the {world} processes")
        a.leader, recovery = rank == 0, a.task == "recovery"
        for k, file in dict(base="palettized.pt", teacher="ckpt.pt", adapter="adapter_recovery.pt").items():
            setattr(a, k, getattr(a, k) or os.path.join(a.out_dir, file))      # the inputs in OUT_DIR
        a.lr, a.iters = a.lr or (2e-3 if recovery else 1e-3), a.iters or (300 if recovery else 100)
        base, ckpt = (load_float_or_palettized if a.eval else load_palettized)(a.base)
        a.base_data = corpus_from_checkpoint(ckpt)                   # the corpus the base learned
        a.data = a.data or (a.base_data if recovery or a.eval else a.task)
        a.tokenizer, a.seq_len = tokenizer_from_checkpoint(ckpt), a.seq_len or base.config.max_seq_len
        if a.seq_len > base.config.max_seq_len:
            raise AdapterError(f"--seq-len {a.seq_len} exceeds the model's {base.config.max_seq_len}")
        if not a.eval:
            return train_task(a, base, t0)
        if a.adapter != "none":
            load_adapter(a.adapter, base)
        bpb = val_bpb(base.to(a.device), load_splits(a.data, a.seq_len, a.tokenizer)[1], a)
        print(f"{a.data} val bpb: {bpb:.4f}  (base {a.base}, adapter {a.adapter})")
    except (AdapterError, CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def train_task(a, base, t0) -> dict:
    """Train, measure and save (on rank 0) the recovery or a feature adapter (--init); returns its report."""
    recovery, log = a.task == "recovery", print if a.leader else (lambda *_: None)
    teacher = load_model(a.teacher)[0] if recovery else None
    if recovery and teacher.config != base.config:
        raise AdapterError(f"{a.teacher}: config {teacher.config.name} is not the base's {base.config.name}; "
                           "palettize the base from this teacher")
    train, val = load_splits(a.data, a.seq_len, a.tokenizer)
    if recovery:                                      # (so a recovery adapter is made on the device)
        teacher.to(a.device).eval().requires_grad_(False)
        bpb_float, bpb_pal = val_bpb(teacher, val, a), val_bpb(base.to(a.device), val, a)
        log(f"val bpb on {a.data}: float {bpb_float:.4f}, palettized {bpb_pal:.4f}")
    else:
        orig_val = load_splits(a.base_data, a.seq_len, a.tokenizer)[1]      # of what the base learned
    torch.manual_seed(a.seed)
    if recovery or a.init == "zero":
        add_adapters(base, a.rank or 16, a.alpha or 2.0 * (a.rank or 16), a.targets)
    else:
        load_adapter(a.adapter, base)
    cfg, (trainable, total) = adapter_config(base), trainable_and_total_params(base.to(a.device))
    if (a.rank or cfg["rank"], a.alpha or cfg["alpha"], set(a.targets)) != \
            (cfg["rank"], cfg["alpha"], set(cfg["targets"])):            # a loaded adapter is not as asked
        raise AdapterError(f"{a.adapter}: rank {cfg['rank']}, alpha {cfg['alpha']:g}, targets "
                           f"{','.join(cfg['targets'])} do not match --rank, --alpha, --targets")
    log(f"{a.task} adapter on {a.data}" + ("" if recovery else f", init {a.init}") + f": rank {cfg['rank']}, "
        f"alpha {cfg['alpha']:g} on {','.join(cfg['targets'])}; {trainable:,} of {total:,} parameters train")
    steps, curve = set() if recovery else {a.iters * i // 4 for i in range(5)}, {}

    def at_step(step):                                         # a feature's validation curve
        if step in steps:
            curve[step] = val_bpb(base, val, a)
            log(f"step {step}: {a.data} val bpb {curve[step]:.4f}")
    kw = dict(iters=a.iters, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
              device=a.device, teacher=teacher, loss=a.loss if recovery else "ce")
    orig_start, t_train = None if recovery else val_bpb(base, orig_val, a), time.time()
    losses = train_adapters(base, train, callback=at_step, stop_at=a.stop_at, **kw)
    t_train, done = time.time() - t_train, len(losses)
    if done not in curve:                           # recovery, or a feature interrupted between evaluations
        curve[done] = val_bpb(base, val, a)
    common = {"rank": cfg["rank"], "alpha": cfg["alpha"], "trainable_params": trainable, "iters": a.iters,
              "iters_done": done, "interrupted": done < a.iters, "lr": a.lr, "batch_size": a.batch_size,
              "seq_len": a.seq_len, "seed": a.seed, "seconds": time.time() - t0, "train_seconds": t_train,
              "base": a.base, "device": str(a.device)}
    if recovery:
        bpb_rec = curve[done]
        bpb_ctrl = bpb_float if a.loss == "kl" else None     # under KL the float model is its own teacher
        if a.loss != "kl" and a.control and done == a.iters:
            log("control: the same adapter training on the float model ...")
            student = copy.deepcopy(teacher)                      # a frozen copy stays the teacher
            torch.manual_seed(a.seed)
            add_adapters(student, cfg["rank"], cfg["alpha"], a.targets)
            train_adapters(student, train, **kw)
            bpb_ctrl = val_bpb(student, val, a)
        gap = bpb_pal - bpb_float   # a fraction of a gap within evaluation noise says nothing: numbers only
        closed = (bpb_pal - bpb_rec) / gap if gap > 1e-3 * bpb_float else None
        matched = 1.0 - (bpb_rec - bpb_ctrl) / gap if closed is not None and bpb_ctrl is not None else None
        pal = {m: (m.out_features, m.in_features) for m in base.modules() if isinstance(m, PalettizedLinear)}
        bpw = bits_per_weight(pal, {m: m.bits for m in pal}, next(iter(pal)).group_size)
        report = {"val_bpb_float": bpb_float, "val_bpb_palettized": bpb_pal, "val_bpb_recovered": bpb_rec,
                  "gap": gap, "gap_closed": closed, "val_bpb_float_adapted": bpb_ctrl,
                  "gap_closed_matched": matched, "base_bits_per_weight": bpw, **common, "targets": a.targets,
                  "total_params": total, "loss": a.loss, "data": a.data, "losses": losses,
                  "teacher": a.teacher}
        log(f"val bpb: float {bpb_float:.4f}, palettized {bpb_pal:.4f}, recovered {bpb_rec:.4f}; gap "
            + (f"closed {closed:.1%}" if closed is not None else f"{gap:+.5f}: within noise")
            + ("" if matched is None else f"; the control {bpb_ctrl:.4f}: matched gap closed {matched:.1%}"))
    else:
        orig_end = val_bpb(base, orig_val, a)
        report = {"task": a.task, "data": a.data, "init": a.init,
                  "init_adapter": a.adapter if a.init == "recovery" else None,
                  "val_bpb_by_step": {str(s): curve[s] for s in sorted(curve)}, "orig_data": a.base_data,
                  "orig_val_bpb_start": orig_start, "orig_val_bpb_end": orig_end,
                  "forgetting": orig_end - orig_start, **common}
        log(f"{a.base_data} val bpb {orig_start:.4f} -> {orig_end:.4f} "
            f"(forgetting {orig_end - orig_start:+.4f})")
    report["seconds"], name = time.time() - t0, a.task + ("" if recovery or a.init == "recovery" else "_zero")
    json_name = "lora_recovery.json" if recovery else f"lora_{a.task}_{a.init}.json"
    path = os.path.join(a.out_dir, f"adapter_{name}.pt")
    if a.leader:
        extra = {"loss": a.loss} if recovery else {"init": a.init}
        save_adapter(path, base, name.removesuffix("_zero"), **extra, val_bpb=curve[done], steps=done)
        report["adapter_bytes"] = os.path.getsize(path)
        save_json(os.path.join(a.out_dir, json_name), report)
    log(f"wrote {path} and {json_name} in {report['seconds']:.0f} s ({t_train:.0f} s training)")
    return report


if __name__ == "__main__":
    main()
