"""
lora.py -- LoRA written out by hand: accuracy-recovery adapters for the palettized model, and feature adapters
that start from them.

Follows section 5 of Gunter et al. 2024 (arXiv 2407.21075), "Apple Intelligence Foundation Language Models":
  * Adapters (5.1): small LoRA modules on every linear projection of self-attention (q, k, v, o) and of the
    feed-forward layer (gate, up, down) in every block; the base model stays frozen. Rank 16, 16-bit values.
    Adapters are swapped at run time on one loaded base.
  * Accuracy recovery (5.2): after palettization (palettize.py) the quantized model is frozen and LoRA adapters
    are trained to repair its errors; every feature adapter then starts from that recovery adapter instead of
    from zero, while the quantized base stays frozen.

Here the recovery adapter is trained on the pre-training corpus, with next-token cross entropy, with
distillation from the float model's logits (KL), or with an equal mix of the two (`--loss`). The pre-training
recipe in the paper is next-token prediction; distillation uses the float checkpoint we already have as the
teacher. `--loss ce` is the default: it gave the lowest validation bpb in our measurements (README). Our `tiny`
model is under-trained, so cross entropy does more than repair palettization: the adapter keeps learning the
corpus and ends below the float model. To separate the two, the recovery run also trains the same adapter, with
the same loss, steps and seed, on the float model (`--control`, on by default for ce and mix) and reports the gap
that remains between the two adapted models (`gap_closed_matched`). With `--loss kl` the float model is its own
teacher, its loss and gradients are zero, so that control is the float model itself.

Run:
    python lora.py                                    # recovery: out/palettized.pt + teacher out/ckpt.pt
                                                      #   -> out/adapter_recovery.pt, out/lora_recovery.json
    python lora.py --task pydoc --init recovery       # feature adapter on Python docs, from the recovery adapter
                                                      #   -> out/adapter_pydoc.pt, out/lora_pydoc_recovery.json
    python lora.py --task pydoc --init zero           # the same from the standard init
                                                      #   -> out/adapter_pydoc_zero.pt, out/lora_pydoc_zero.json
    python lora.py --eval --adapter none              # validation bpb of the bare palettized base
    python lora.py --eval --adapter out/adapter_pydoc.pt --data pydoc

Ctrl-C during training ends it early without losing it: the adapter trained so far is evaluated and saved, and
the report says how many steps it had (`iters_done`, `interrupted`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, evaluate, get_batch, load_splits
from model import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_json
from palettize import PROJECTIONS, PalettizedLinear, load_palettized


class AdapterError(Exception):
    """An adapter that does not fit the model it is loaded onto, or a bad adapter request. One-line message."""


# ----------------------------------------------------------------------------------------------------------
# LoRA

class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021, "LoRA"):

        y = base(x) + (alpha / r) * B(A(dropout(x)))        A: (r, in), B: (out, r)

    `base` is anything with `in_features`, `out_features` and a forward (nn.Linear or PalettizedLinear); it is
    not modified. A starts Kaiming-uniform (as nn.Linear's own init) and B at zero, so a fresh adapter changes
    nothing and the first gradient step moves B only.

    Scaling: alpha / r, the convention of the LoRA paper and of Hugging Face PEFT, so changing the rank at fixed
    alpha keeps the update's size roughly fixed. (mlx-examples' LoRA instead multiplies by a fixed `scale`
    independent of the rank.) Default alpha = 2 r, i.e. a scale of 2.
    """

    def __init__(self, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0):
        super().__init__()
        if not (isinstance(rank, int) and rank > 0):
            raise AdapterError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise AdapterError(f"LoRA alpha must be positive, got {alpha!r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        ref = next(iter(list(base.parameters()) + list(base.buffers())), None)
        device = ref.device if ref is not None else None
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):                                            # x: (..., in)
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))      # (..., r)
        return self.base(x) + self.scale * F.linear(h, self.lora_B.to(x.dtype))  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha / r) B A, shape (out, in): base weight + this = the merged weight."""
        return self.scale * self.lora_B @ self.lora_A

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} for every adapter attached to `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targeted(model: nn.Module, targets) -> dict[str, nn.Module]:
    """The linear-like modules whose last name component is in `targets` (LoRA wrappers not included)."""
    found = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features") and not isinstance(m, LoRALinear):
            found[name] = m
    return found


def _canonical_targets(names) -> list[str]:
    """Target names in PROJECTIONS order (others after, sorted), without duplicates."""
    names = set(names)
    return [p for p in PROJECTIONS if p in names] + sorted(names - set(PROJECTIONS))


def add_adapters(model: nn.Module, rank: int = 16, alpha: float = 32.0, targets=PROJECTIONS,
                 dropout: float = 0.0) -> list[str]:
    """Freeze every tensor of `model` and wrap each target projection in a LoRALinear, in place.
    Returns the wrapped module names. The A matrices draw from torch's global RNG (seed it first)."""
    if adapters(model):
        raise AdapterError("the model already has adapters; remove_adapters() first, or load_adapter() to swap")
    targets = _canonical_targets(targets)
    found = _targeted(model, targets)
    missing = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing or not targets:
        raise AdapterError(f"no linear layer named {', '.join(missing) or '(none given)'} in the model")
    LoRALinear(nn.Linear(1, 1), rank, alpha)  # validates rank and alpha before anything is modified
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in found.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoRALinear(m, rank, alpha, dropout))
    return list(found)


def remove_adapters(model: nn.Module) -> None:
    """Unwrap every LoRALinear back to its frozen base layer, in place: the bare base again."""
    for name in adapters(model):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, getattr(parent, leaf).base)


def adapter_config(model: nn.Module) -> dict | None:
    """{rank, alpha, targets} of the attached adapters, or None when there are none."""
    mods = adapters(model)
    if not mods:
        return None
    ranks = {m.rank for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise AdapterError("the attached adapters mix ranks or alphas; this file handles one of each")
    return {"rank": ranks.pop(), "alpha": alphas.pop(),
            "targets": _canonical_targets(n.rsplit(".", 1)[-1] for n in mods)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). The total counts each palettized weight as one parameter (in x out), as the float
    model it came from would, and the embedding once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, PalettizedLinear))
    return trainable, total


# ----------------------------------------------------------------------------------------------------------
# Fingerprints and adapter files

def fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base, tensor by tensor in name order: for a palettized model the LUTs and indices,
    the int8 embedding with its scales, and the norms. Adapter tensors are left out and names are taken as if
    no adapter were attached, so attaching, training or swapping adapters never changes the fingerprint."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if ".lora_" in name or name.startswith("lora_"):
            continue
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name.replace('.base.', '.')}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(path: str, model: nn.Module, name: str, **extra) -> None:
    """Write only the adapter tensors (fp16), their config and the base's fingerprint, atomically."""
    cfg = adapter_config(model)
    if cfg is None:
        raise AdapterError("the model has no adapters to save")
    tensors = {}
    for mname, m in adapters(model).items():
        tensors[f"{mname}.lora_A"] = m.lora_A.detach().to("cpu", torch.float16).clone()  # (r, in)
        tensors[f"{mname}.lora_B"] = m.lora_B.detach().to("cpu", torch.float16).clone()  # (out, r)
    save_checkpoint(path, kind="adapter", config={**cfg, "name": name}, fingerprint=fingerprint(model),
                    adapter=tensors, **extra)


def load_adapter(path: str, model: nn.Module, map_location="cpu") -> dict:
    """Put the adapter in `path` onto `model`, in place, and return its checkpoint dict.

    With no adapters attached, attaches them with the file's rank, alpha and targets. With adapters attached,
    swaps their values (same rank and targets required). Refuses, with a one-line AdapterError and `model`
    untouched, an adapter trained on another base (fingerprint), or of another rank or other targets."""
    ckpt = load_checkpoint(path, "adapter", map_location)
    cfg = ckpt["config"]
    if not (isinstance(cfg, dict) and {"rank", "alpha", "targets"} <= set(cfg) and isinstance(ckpt.get("adapter"), dict)):
        raise AdapterError(f"{path}: not an adapter file of this project (config or tensors missing)")
    fp = fingerprint(model)
    if ckpt.get("fingerprint") != fp:
        raise AdapterError(f"{path}: trained on a different base (fingerprint {str(ckpt.get('fingerprint'))[:12]}, "
                           f"this base {fp[:12]})")
    attached = adapter_config(model)
    if attached is not None:
        if attached["rank"] != cfg["rank"]:
            raise AdapterError(f"{path}: rank {cfg['rank']} does not match the attached adapters' rank {attached['rank']}")
        if set(attached["targets"]) != set(cfg["targets"]):
            raise AdapterError(f"{path}: targets {','.join(cfg['targets'])} do not match the attached adapters' "
                               f"{','.join(attached['targets'])}")
        layers = {n: m.base for n, m in adapters(model).items()}
    else:
        layers = _targeted(model, cfg["targets"])
    r = cfg["rank"]
    want = {}
    for n, m in layers.items():
        want[f"{n}.lora_A"] = (r, m.in_features)
        want[f"{n}.lora_B"] = (m.out_features, r)
    got = {k: tuple(v.shape) for k, v in ckpt["adapter"].items()}
    if got != want:
        bad = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise AdapterError(f"{path}: adapter tensors do not fit this model (first mismatch: {bad[0]})")
    if attached is None:
        add_adapters(model, r, cfg["alpha"], cfg["targets"])
    with torch.no_grad():
        for n, m in adapters(model).items():
            m.lora_A.copy_(ckpt["adapter"][f"{n}.lora_A"])
            m.lora_B.copy_(ckpt["adapter"][f"{n}.lora_B"])
            m.alpha, m.scale = float(cfg["alpha"]), cfg["alpha"] / r
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# Training

def adapter_loss(logits, targets, teacher_logits=None, kind: str = "ce"):
    """Next-token cross entropy ("ce"), KL(teacher || student) over the vocabulary ("kl"), or their mean
    ("mix"); nats per token. logits, teacher_logits: (B, T, V); targets: (B, T)."""
    logits = logits.float().flatten(0, 1)                                    # (B*T, V)
    ce = F.cross_entropy(logits, targets.flatten()) if kind in ("ce", "mix") else 0.0
    if kind == "ce":
        return ce
    t = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), t, log_target=True, reduction="batchmean")
    return kl if kind == "kl" else 0.5 * (ce + kl)


def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, iters - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_adapters(model, train_data, *, iters: int, lr: float, batch_size: int, seq_len: int, seed: int,
                   device="cpu", teacher=None, loss: str = "ce", callback=None, progress: bool = True,
                   stop_at: int | None = None) -> list[float]:
    """AdamW on the adapter tensors only; returns the training loss of every step taken. `callback(step)` runs
    before step 0 and after every step (for evaluations at chosen step counts). Ctrl-C (or reaching `stop_at`,
    the same thing for tests) ends training early and keeps what was learned: the caller evaluates and saves
    the adapter after len(losses) steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterError("nothing to train: attach adapters first")
    if loss != "ce" and teacher is None:
        raise AdapterError(f"--loss {loss} needs a teacher model")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, iters // 20)
    model.train()
    losses = []
    if callback:
        callback(0)
    bar = tqdm(range(iters), desc=f"lora ({loss})", disable=not progress, dynamic_ncols=True)
    try:
        for it in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(it, iters, lr, warmup)
            x, y = get_batch(train_data, batch_size, seq_len, gen, device)  # (B, T), (B, T)
            t_logits = None
            if loss != "ce":
                with torch.no_grad():
                    t_logits = teacher(x)                                    # (B, T, V)
            l = adapter_loss(model(x), y, t_logits, loss)
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            losses.append(l.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if callback:
                callback(it + 1)
            if stop_at is not None and it + 1 >= stop_at:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        tqdm.write(f"interrupted after {len(losses)} of {iters} steps: keeping the adapter trained so far")
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------
# Script

def bits_per_weight(model: nn.Module) -> float:
    """Average bits per projection weight of a palettized model, LUTs included (fp16 entries)."""
    bits = n = 0
    for m in model.modules():
        if isinstance(m, PalettizedLinear):
            n += m.in_features * m.out_features
            bits += m.bits * m.in_features * m.out_features + 16 * m.lut.numel()
    return bits / n if n else 16.0


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterError(f"--device {name}: CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise AdapterError(f"--device {name}: use auto, cpu or cuda[:N]")
    return name


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Train LoRA adapters on the frozen palettized model: accuracy recovery (default), a feature "
                    "adapter (--task NAME --init recovery|zero), or evaluate an adapter (--eval).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--task", default="recovery",
                    help="'recovery' (repair palettization against the float teacher) or a feature name (trains "
                         "on --data, default the same name: 'pydoc')")
    ap.add_argument("--init", choices=("recovery", "zero"), default="recovery",
                    help="feature adapters: start from the recovery adapter (--adapter) or from the standard init")
    ap.add_argument("--eval", action="store_true", help="only print validation bpb of --base + --adapter on --data")
    ap.add_argument("--out-dir", default="out", help="outputs go here; default inputs are read from here too")
    ap.add_argument("--base", default=None, help="palettized checkpoint [OUT_DIR/palettized.pt]")
    ap.add_argument("--teacher", default=None, help="float checkpoint, recovery only [OUT_DIR/ckpt.pt]")
    ap.add_argument("--adapter", default=None,
                    help="adapter to start from (--init recovery) or to evaluate (--eval); 'none' = bare base "
                         "[OUT_DIR/adapter_recovery.pt]")
    ap.add_argument("--data", default=None, help="corpus: 'bible', 'pydoc' or a text file [bible for recovery, "
                                                  "else the task name]")
    ap.add_argument("--loss", choices=("ce", "kl", "mix"), default="ce",
                    help="recovery loss: next-token CE, KL from the teacher's logits, or their mean")
    ap.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                    help="recovery with ce or mix: also train the same adapter on the float model and report the "
                         "gap that remains between the two (doubles the training time)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank [16, or the --adapter file's]")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank [2 x rank]")
    ap.add_argument("--targets", default=",".join(PROJECTIONS), help="comma-separated projections to adapt")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate [2e-3 recovery, 1e-3 features]")
    ap.add_argument("--iters", type=int, default=None, help="training steps [300 recovery, 100 features]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=None, help="context length [the model's max_seq_len]")
    ap.add_argument("--eval-windows", type=int, default=256, help="validation windows per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda if available)")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this step as if interrupted (Ctrl-C): the adapter so far is evaluated and saved")
    return ap.parse_args(argv)


def check_args(a):
    for flag in ("rank", "iters", "batch_size", "seq_len", "eval_windows", "stop_at"):
        v = getattr(a, flag)
        if v is not None and v <= 0:
            raise AdapterError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    for flag in ("lr", "alpha"):
        v = getattr(a, flag)
        if v is not None and not v > 0:
            raise AdapterError(f"--{flag} must be positive, got {v}")
    a.targets = [t for t in a.targets.split(",") if t]
    if not a.targets:
        raise AdapterError("--targets is empty")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        raise AdapterError(f"--out-dir {a.out_dir}: exists and is not a directory")
    a.device = pick_device(a.device)
    recovery = a.task == "recovery"
    a.base = a.base or os.path.join(a.out_dir, "palettized.pt")
    a.teacher = a.teacher or os.path.join(a.out_dir, "ckpt.pt")
    a.adapter = a.adapter or os.path.join(a.out_dir, "adapter_recovery.pt")
    a.data = a.data or ("bible" if recovery or a.eval else a.task)
    a.lr = a.lr or (2e-3 if recovery else 1e-3)
    a.iters = a.iters or (300 if recovery else 100)
    return a


def evaluate_bpb(model, val, a) -> float:
    return evaluate(model, val, a.seq_len, batch_size=16, max_windows=a.eval_windows, device=a.device)["bpb"]


def run_eval(a, base):
    if a.adapter != "none":
        load_adapter(a.adapter, base)
    _, val = load_splits(a.data, a.seq_len)
    bpb = evaluate_bpb(base.to(a.device), val, a)
    print(f"{a.data} val bpb: {bpb:.4f}  (base {a.base}, adapter {a.adapter})")


def run_recovery(a, base, t0):
    teacher, _ = load_model(a.teacher)
    if teacher.config != base.config:
        raise AdapterError(f"{a.teacher}: its config ({teacher.config.name}) differs from the base's "
                           f"({base.config.name}); the base must be palettized from this teacher")
    train, val = load_splits(a.data, a.seq_len)
    teacher.to(a.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    base.to(a.device)
    rank = a.rank or 16
    alpha = a.alpha or 2.0 * rank
    print(f"evaluating the float teacher and the palettized base on {a.data} ({a.eval_windows} windows) ...")
    bpb_float = evaluate_bpb(teacher, val, a)
    bpb_pal = evaluate_bpb(base, val, a)
    print(f"val bpb: float {bpb_float:.4f}, palettized {bpb_pal:.4f} (gap {bpb_pal - bpb_float:+.4f})")
    torch.manual_seed(a.seed)
    add_adapters(base, rank, alpha, a.targets)
    trainable, total = count_parameters(base)
    print(f"adapters: rank {rank}, alpha {alpha:g} on {','.join(a.targets)}; trainable {trainable:,} of "
          f"{total:,} parameters ({100 * trainable / total:.2f}%)")
    t_train = time.time()
    losses = train_adapters(base, train, iters=a.iters, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len,
                            seed=a.seed, device=a.device, teacher=teacher, loss=a.loss, stop_at=a.stop_at)
    t_train = time.time() - t_train
    done = len(losses)
    bpb_rec = evaluate_bpb(base, val, a)
    gap = bpb_pal - bpb_float
    closed = (bpb_pal - bpb_rec) / gap if gap > 0 else None
    bpb_ctrl = closed_matched = None
    if a.loss == "kl":
        bpb_ctrl = bpb_float          # KL(float || float) = 0: the float model would not move
    elif done < a.iters:
        print("control skipped: the run was interrupted")
    elif a.control:
        # The control: the same adapter, loss, steps and seed on the float model (a frozen copy stays teacher).
        print("control: training the same adapter on the float model ...")
        student = copy.deepcopy(teacher)
        torch.manual_seed(a.seed)
        add_adapters(student, rank, alpha, a.targets)
        train_adapters(student, train, iters=a.iters, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len,
                       seed=a.seed, device=a.device, teacher=teacher, loss=a.loss)
        bpb_ctrl = evaluate_bpb(student, val, a)
        del student
    if bpb_ctrl is not None and gap > 0:
        closed_matched = 1.0 - (bpb_rec - bpb_ctrl) / gap
    seconds = time.time() - t0
    adapter_path = os.path.join(a.out_dir, "adapter_recovery.pt")
    save_adapter(adapter_path, base, "recovery", loss=a.loss, val_bpb=bpb_rec, steps=done)
    report = {
        "val_bpb_float": bpb_float, "val_bpb_palettized": bpb_pal, "val_bpb_recovered": bpb_rec,
        "gap_closed": closed, "val_bpb_float_adapted": bpb_ctrl, "gap_closed_matched": closed_matched,
        "base_bits_per_weight": bits_per_weight(base), "rank": rank, "alpha": alpha,
        "targets": a.targets, "trainable_params": trainable, "total_params": total,
        "adapter_bytes": os.path.getsize(adapter_path), "iters": a.iters, "iters_done": done,
        "interrupted": done < a.iters, "seconds": seconds,
        "train_seconds": t_train, "loss": a.loss, "lr": a.lr, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "seed": a.seed, "data": a.data, "final_train_loss": losses[-1] if losses else None,
        "base": a.base, "teacher": a.teacher, "device": a.device,
    }
    save_json(os.path.join(a.out_dir, "lora_recovery.json"), report)
    closed_txt = f"{100 * closed:.1f}%" if closed is not None else "n/a (no gap)"
    print(f"val bpb: float {bpb_float:.4f}, palettized {bpb_pal:.4f}, recovered {bpb_rec:.4f}; "
          f"gap closed {closed_txt} in {seconds:.0f} s ({t_train:.0f} s training)")
    if closed_matched is not None:
        print(f"control: the float model with the same adapter training reaches {bpb_ctrl:.4f}; the palettized "
              f"model trails it by {bpb_rec - bpb_ctrl:+.4f} (was {gap:+.4f}): matched gap closed "
              f"{100 * closed_matched:.1f}%")
    print(f"wrote {adapter_path} ({report['adapter_bytes']:,} bytes), {os.path.join(a.out_dir, 'lora_recovery.json')}")


def run_feature(a, base, t0):
    train, val = load_splits(a.data, a.seq_len)
    _, orig_val = load_splits("bible", a.seq_len)
    torch.manual_seed(a.seed)
    if a.init == "recovery":
        load_adapter(a.adapter, base)
        cfg = adapter_config(base)
        if a.rank is not None and a.rank != cfg["rank"]:
            raise AdapterError(f"{a.adapter}: rank {cfg['rank']} does not match --rank {a.rank}")
        if set(a.targets) != set(cfg["targets"]):
            raise AdapterError(f"{a.adapter}: targets {','.join(cfg['targets'])} do not match --targets")
        if a.alpha is not None and a.alpha != cfg["alpha"]:
            raise AdapterError(f"{a.adapter}: alpha {cfg['alpha']:g} does not match --alpha {a.alpha:g}")
    else:
        rank = a.rank or 16
        add_adapters(base, rank, a.alpha or 2.0 * rank, a.targets)
    cfg = adapter_config(base)
    base.to(a.device)
    trainable, total = count_parameters(base)
    print(f"feature adapter '{a.task}' on {a.data}, init {a.init}: rank {cfg['rank']}, alpha {cfg['alpha']:g}; "
          f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    steps = sorted({0, a.iters // 4, a.iters // 2, 3 * a.iters // 4, a.iters})
    curve = {}

    def at_step(step):
        if step in steps:
            curve[step] = evaluate_bpb(base, val, a)
            tqdm.write(f"step {step}: {a.data} val bpb {curve[step]:.4f}")

    bpb_orig_start = evaluate_bpb(base, orig_val, a)
    t_train = time.time()
    done = len(train_adapters(base, train, iters=a.iters, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len,
                              seed=a.seed, device=a.device, loss="ce", callback=at_step, stop_at=a.stop_at))
    t_train = time.time() - t_train
    if done not in curve:                                            # interrupted between two evaluations
        curve[done] = evaluate_bpb(base, val, a)
    steps = sorted(curve)                                            # the step counts actually evaluated
    bpb_orig_end = evaluate_bpb(base, orig_val, a)
    suffix = "" if a.init == "recovery" else "_zero"
    adapter_path = os.path.join(a.out_dir, f"adapter_{a.task}{suffix}.pt")
    save_adapter(adapter_path, base, a.task, init=a.init, val_bpb=curve[done], steps=done)
    report = {
        "task": a.task, "data": a.data, "init": a.init, "init_adapter": a.adapter if a.init == "recovery" else None,
        "val_bpb_by_step": {str(s): curve[s] for s in steps},
        "bible_val_bpb_start": bpb_orig_start, "bible_val_bpb_end": bpb_orig_end,
        "bible_forgetting": bpb_orig_end - bpb_orig_start,
        "rank": cfg["rank"], "alpha": cfg["alpha"], "trainable_params": trainable,
        "adapter_bytes": os.path.getsize(adapter_path), "iters": a.iters, "iters_done": done,
        "interrupted": done < a.iters, "lr": a.lr, "batch_size": a.batch_size,
        "seq_len": a.seq_len, "seed": a.seed, "seconds": time.time() - t0, "train_seconds": t_train,
        "base": a.base, "device": a.device,
    }
    json_path = os.path.join(a.out_dir, f"lora_{a.task}_{a.init}.json")
    save_json(json_path, report)
    print(f"{a.data} val bpb by step: " + ", ".join(f"{s}: {curve[s]:.4f}" for s in steps))
    print(f"bible val bpb {bpb_orig_start:.4f} -> {bpb_orig_end:.4f} (forgetting {bpb_orig_end - bpb_orig_start:+.4f})")
    print(f"wrote {adapter_path} ({report['adapter_bytes']:,} bytes), {json_path}")


def main(argv=None):
    t0 = time.time()
    try:
        a = check_args(parse_args(argv))
        base, _ = load_palettized(a.base)
        a.seq_len = a.seq_len or base.config.max_seq_len
        if a.seq_len > base.config.max_seq_len:
            raise AdapterError(f"--seq-len {a.seq_len} exceeds the model's max_seq_len {base.config.max_seq_len}")
        if a.eval:
            run_eval(a, base)
        elif a.task == "recovery":
            run_recovery(a, base, t0)
        else:
            run_feature(a, base, t0)
    except (AdapterError, CheckpointError, DataError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
