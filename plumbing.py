"""
plumbing.py -- checkpoints, reports and processes that every script shares (not a step of the paper).

A checkpoint is one dict with its `kind` ("model", "palettized", "adapter") and the model's config, so every
script rebuilds its input without flags. Saved atomically, loaded with `weights_only=True`, it runs no code.

    python -c "import plumbing; print(plumbing.load_model('out/ckpt.pt')[0].config)"
"""
import atexit
import json
import os
import pathlib
import re
import tempfile
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from model import ModelConfig, Transformer


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or not ours. The message is one line naming the file."""


def _write_atomically(path: str, write) -> None:
    """`write(tmp)` fills a temporary file that then replaces `path`: an interruption leaves no half file."""
    os.makedirs(folder := os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # a folder, so that the file is written under its final name (torch.save names its archive after it) and
    # with the umask's permissions (mkstemp's would be 0600); the folder is removed, whatever happens
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp_dir:
        write(tmp := os.path.join(tmp_dir, os.path.basename(path)))
        os.replace(tmp, path)


def save_checkpoint(path: str, **payload) -> None:
    """Write `payload` (tensors, dicts, numbers, strings) to `path` atomically."""
    _write_atomically(path, lambda tmp: torch.save(payload, tmp))


def save_json(path: str, obj) -> None:
    """Write a JSON report to `path` atomically."""
    _write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def load_checkpoint(path: str, kind: str | None = "model", map_location="cpu") -> dict:
    """The checkpoint at `path`, of `kind` (any kind if None), or else a one-line CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, a pickle of arbitrary objects, not a torch file at all ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of this project")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: holds a {ckpt['kind']!r} checkpoint, expected {kind!r}")
    return ckpt


def config_from_dict(d: dict) -> ModelConfig:
    """The ModelConfig a checkpoint stored as a dict (keys it does not know are ignored)."""
    return ModelConfig(**{k: v for k, v in d.items() if k in {f.name for f in fields(ModelConfig)}})


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


def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun it also joins the process group."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", name):
        raise ValueError(f"--device {device_name}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_name}: no CUDA GPU is available")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)       # on every way out, on every rank
    return dist.get_rank(), dist.get_world_size(), device
