"""
plumbing.py -- checkpoints, reports and processes: what every script of the recipe shares, kept out of the
reader's way.

Not a step of the paper (Gunter et al. 2024, arXiv 2407.21075); it serves them all. A checkpoint is one dict
saved atomically (a temporary file, then a rename: an interrupted save never leaves half a file) with its
`kind` ("model", "palettized", "adapter") and the model's config inside, so every script rebuilds its input
without flags; it loads with `torch.load(weights_only=True)`, so a checkpoint cannot run code. Under torchrun,
train.py and lora.py start here as one process per GPU (or CPU process).

    python -c "import plumbing; print(plumbing.load_model('out/ckpt.pt')[0].config)"
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import tempfile
from dataclasses import asdict, fields

import torch
import torch.distributed

from model import ModelConfig, Transformer


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or not ours. The message is one line naming the file."""


def _write_atomically(path: str, write) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`: an interrupted write
    never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, **payload) -> None:
    """Write `payload` (tensors, dicts, numbers, strings) to `path` atomically."""
    _write_atomically(path, lambda tmp: torch.save(payload, tmp))


def save_json(path: str, obj) -> None:
    """Write a JSON report to `path` atomically."""
    _write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def load_checkpoint(path: str, kind: str | None = "model", map_location="cpu") -> dict:
    """Load a checkpoint written by save_checkpoint with `kind=...` in it (any kind if None). Raises a
    one-line CheckpointError for a missing, truncated or foreign file, or one of another kind."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file at all ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: holds a {ckpt['kind']!r} checkpoint, expected {kind!r}")
    return ckpt


def config_from_dict(d: dict) -> ModelConfig:
    """The ModelConfig a checkpoint stored as a dict (keys it does not know are ignored)."""
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})


def save_model(path: str, model: Transformer, state_dict: dict | None = None, **extra) -> None:
    """Save a float model: its weights (or `state_dict`, gathered from shards), its config, and `extra`."""
    save_checkpoint(path, kind="model", config=asdict(model.config), model=state_dict or model.state_dict(),
                    **extra)


def load_model(path: str, map_location="cpu") -> tuple[Transformer, dict]:
    """Rebuild a float model from its checkpoint with no flags: returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path, "model", map_location)
    model = Transformer(config_from_dict(ckpt["config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not match its config ({str(e).splitlines()[0]})") from None
    return model.to(map_location), ckpt


# ----------------------------------------------------------------------------------------------------------
# Devices and processes (train.py and lora.py run under torchrun too)

def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. `device_name`: cpu, cuda, cuda:N or auto (cuda if there is
    one). Under torchrun it also joins the process group (nccl on GPUs, gloo on CPUs) and takes the GPU of its
    local rank; a plain run is rank 0 of 1."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device_name}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_name}: no CUDA GPU is available")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(torch.distributed.destroy_process_group)   # on every way out, on every rank
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
