"""plumbing.py: checkpoints round-trip, and a missing, truncated or foreign one is a one-line error."""
import pytest
import torch

from plumbing import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from test_model import SMALL, make


def _assert_one_line_naming(err, path):
    msg = str(err.value)
    assert path in msg and "\n" not in msg


def test_checkpoint_round_trip(tmp_path):
    m = make(SMALL, seed=5)
    path = str(tmp_path / "ckpt.pt")
    save_model(path, m, step=7, note="hello")
    m2, ckpt = load_model(path)
    assert m2.config == SMALL and ckpt["step"] == 7 and ckpt["note"] == "hello"
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(m(x), m2.eval()(x), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # atomic save left no temp file


def test_missing_truncated_and_foreign_checkpoints(tmp_path):
    good = str(tmp_path / "good.pt")
    save_model(good, make(SMALL))
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as e:
        load_model(missing)
    _assert_one_line_naming(e, missing)

    data = open(good, "rb").read()
    for cut in (0, 10, len(data) // 2, len(data) - 100):
        trunc = str(tmp_path / f"trunc{cut}.pt")
        open(trunc, "wb").write(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_model(trunc)
        _assert_one_line_naming(e, trunc)

    text = str(tmp_path / "text.pt")
    open(text, "w").write("not a checkpoint\n")
    plain = str(tmp_path / "plain.pt")
    torch.save({"weights": torch.zeros(3)}, plain)  # a torch file, but not one of ours
    tensor = str(tmp_path / "tensor.pt")
    torch.save(torch.zeros(3), tensor)
    other_kind = str(tmp_path / "adapter.pt")
    save_checkpoint(other_kind, kind="adapter", config={})
    for p in (text, plain, tensor, other_kind):
        with pytest.raises(CheckpointError) as e:
            load_model(p)
        _assert_one_line_naming(e, p)

    wrong = str(tmp_path / "wrong.pt")  # config and weights disagree
    ck = load_checkpoint(good)
    ck["config"] = {**ck["config"], "dim": 32}
    save_checkpoint(wrong, **ck)
    with pytest.raises(CheckpointError) as e:
        load_model(wrong)
    _assert_one_line_naming(e, wrong)
