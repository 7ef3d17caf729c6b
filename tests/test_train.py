"""Tests of train.py: a short run learns, --resume reproduces an uninterrupted run, bad input fails cleanly,
distillation runs. Runs call train.main(argv) in-process on a small text file; one test goes through a
subprocess for the real exit code."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from data import load_splits
from model import CONFIGS, Transformer
from conftest import torchrun_output, twice_if_a_worker_aborts
from plumbing import load_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--lr", "3e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 40 KB of English text (Python's own documentation, shipped with CPython)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:40_000]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def run(corpus, out, *extra):
    return train.main(["--data", corpus, "--out-dir", str(out), *FAST, *extra])


def snapshot(d):
    """{file name: bytes} of everything in directory d."""
    return (
        {p: open(os.path.join(d, p), "rb").read() for p in sorted(os.listdir(d))} if os.path.isdir(d) else {}
    )


def test_short_run_lowers_validation_loss_and_writes_outputs(corpus, tmp_path):
    r = run(corpus, tmp_path, "--iters", "25", "--eval-every", "5")
    _, val = load_splits(corpus, 32)
    assert math.log(256) - r["val_loss"] > 1.0  # well below a uniform guess over bytes
    curve = [v["loss"] for v in r["val_curve"]]
    assert [v["step"] for v in r["val_curve"]] == [5, 10, 15, 20, 25]
    assert curve[-1] < curve[0]
    assert len(r["losses"]) == 25 and r["losses"][-1] < r["losses"][0]
    for key in (
        "config",
        "params",
        "non_embedding_params",
        "iters",
        "tokens_seen",
        "seconds",
        "tokens_per_second",
        "val_loss",
        "val_bpb",
    ):
        assert key in r
    assert r["config"]["name"] == "tiny" and r["tokens_seen"] == 25 * 4 * 32
    assert abs(r["val_bpb"] - r["val_loss"] / math.log(2)) < 1e-9
    train_text, _ = load_splits(corpus, 32)
    assert r["sample"].startswith(bytes(train_text[:16].tolist()).decode())  # a prompt from the corpus itself
    # the checkpoint rebuilds the trained model without flags
    model, ckpt = load_model(str(tmp_path / "ckpt.pt"))
    assert model.config == CONFIGS["tiny"] and ckpt["train_state"]["step"] == 25
    import json

    assert json.load(open(tmp_path / "train.json"))["val_bpb"] == r["val_bpb"]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path):
    straight = run(corpus, tmp_path / "a", "--iters", "12", "--eval-every", "4", "--seed", "3")
    stopped = run(
        corpus, tmp_path / "b", "--iters", "12", "--eval-every", "4", "--seed", "3", "--stop-at", "5"
    )
    assert stopped["stopped_at"] == 5 and len(stopped["losses"]) == 5
    assert not (tmp_path / "b" / "train.json").exists()
    resumed = train.main(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"])
    assert resumed["losses"] == straight["losses"]  # exactly, step by step
    assert resumed["val_curve"] == straight["val_curve"]
    assert resumed["val_loss"] == straight["val_loss"]
    a, _ = load_model(str(tmp_path / "a" / "ckpt.pt"))
    b, _ = load_model(str(tmp_path / "b" / "ckpt.pt"))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    # a finished run can be extended with a larger --iters
    more = train.main(["--out-dir", str(tmp_path / "b"), "--resume", "--iters", "14", "--device", "cpu"])
    assert more["losses"][:12] == straight["losses"] and len(more["losses"]) == 14


def bad_inputs(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("In the beginning.")  # shorter than one context window
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * 100)
    return {
        "missing corpus": ["--data", str(tmp_path / "nope.txt")],
        "empty corpus": ["--data", str(empty)],
        "short corpus": ["--data", str(short)],
        "not utf-8": ["--data", str(binary)],
        "unknown config": ["--data", corpus, "--config", "huge"],
        "zero iters": ["--data", corpus, "--iters", "0"],
        "negative iters": ["--data", corpus, "--iters", "-3"],
        "zero batch": ["--data", corpus, "--batch-size", "0"],
        "negative batch": ["--data", corpus, "--batch-size", "-1"],
        "seq too long": ["--data", corpus, "--seq-len", str(CONFIGS["tiny"].max_seq_len + 1)],
        "missing teacher": ["--data", corpus, "--teacher", str(tmp_path / "teacher.pt")],
        "resume nothing": ["--data", corpus, "--resume"],
    }


def test_bad_input_fails_with_one_line_and_touches_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text('{"keep": "me"}\n')
    (out / "other.txt").write_text("unrelated\n")
    before = snapshot(out)
    for what, argv in bad_inputs(corpus, tmp_path).items():
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--out-dir", str(out), "--iters" if "--iters" not in argv else "--seed", "5"])
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg, (what, msg)
        assert snapshot(out) == before, what
    # nothing at all is created for a bad run into a fresh directory
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()


def test_resume_refusals_leave_the_checkpoint_alone(corpus, tmp_path):
    # a foreign file where the checkpoint should be
    (tmp_path / "ckpt.pt").write_bytes(b"definitely not a checkpoint")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--out-dir", str(tmp_path), "--resume"])
    assert str(tmp_path / "ckpt.pt") in str(e.value.code) and snapshot(tmp_path) == before
    # a finished run, nothing left to do; and a resumed run cannot change its settings
    done = tmp_path / "done"
    run(corpus, done, "--iters", "3")
    before = snapshot(done)
    for argv in (
        ["--resume"],
        ["--resume", "--iters", "2"],
        ["--resume", "--iters", "9", "--lr", "1e-2"],
        ["--resume", "--iters", "9", "--data", "bible"],
    ):
        with pytest.raises(SystemExit) as e:
            train.main(["--out-dir", str(done), "--device", "cpu", *argv])
        assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code)
        assert snapshot(done) == before


def test_command_line_exit_code_and_one_line_error(corpus, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--config",
            "nonexistent",
            "--data",
            corpus,
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ctrl_c_checkpoints_and_resume_continues(corpus, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--data",
        corpus,
        "--out-dir",
        str(out),
        *FAST,
        "--iters",
        "100000",
    ]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    seen = ""
    while "loss=" not in seen:  # wait until a few steps have run
        ch = p.stderr.read(1)
        assert ch, "train.py ended before training started"
        seen += ch
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "interrupted" in err
    step = load_model(str(out / "ckpt.pt"))[1]["train_state"]["step"]
    assert step >= 1
    r = train.main(["--out-dir", str(out), "--resume", "--iters", str(step + 2), "--device", "cpu"])
    assert len(r["losses"]) == step + 2


def test_distillation_target_mixes_truth_and_teacher_top1():
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    student, teacher = Transformer(cfg), Transformer(cfg).eval()
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    got = train.loss_fn(student, x, y, teacher)
    logits = student(x).reshape(-1, 256)
    target = (
        0.1 * F.one_hot(y.reshape(-1), 256).float()
        + 0.9 * F.one_hot(teacher(x).argmax(-1).reshape(-1), 256).float()
    )
    torch.testing.assert_close(got, F.cross_entropy(logits, target))  # soft-target cross-entropy
    torch.testing.assert_close(train.loss_fn(student, x, y), F.cross_entropy(logits, y.reshape(-1)))


def test_teacher_run(corpus, tmp_path):
    torch.manual_seed(1)
    teacher = str(tmp_path / "teacher.pt")
    save_model(teacher, Transformer(CONFIGS["tiny"]))
    r = run(corpus, tmp_path / "out", "--iters", "4", "--teacher", teacher)
    assert r["settings"]["teacher"] == teacher and math.isfinite(r["val_loss"])


def test_learning_rate_schedule_and_decay_groups():
    s = dict(lr=1e-3, warmup=10, iters=110, min_lr=0.005, weight_decay=3.16e-4)
    lrs = [train.lr_at(i, s) for i in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then decays monotonically
    assert train.lr_at(110, s) == pytest.approx(5e-6)  # to 0.005x the peak
    assert train.lr_at(60, s) == pytest.approx(5e-6 + (1e-3 - 5e-6) / 2)  # cosine: half-way at mid-run
    model = Transformer(CONFIGS["tiny"])
    opt = train.make_optimizer(model, s)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), name  # matmuls + tied embedding only
    assert opt.param_groups[0]["weight_decay"] * s["lr"] == pytest.approx(3.16e-4)


# ----------------------------------------------------------------------------------------------------------
# torchrun: 2 CPU processes with gloo (DDP, then FSDP2) give the 1-process loss curve of the same global batch


def torchrun(corpus, out, *extra):
    """train.py under torchrun with 2 CPU processes; returns its combined output."""
    script = os.path.join(ROOT, "train.py")
    return torchrun_output(script, "--data", corpus, "--out-dir", str(out), *FAST, *extra)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_matches_one_process_and_resumes(corpus, tmp_path, sharding):
    twice_if_a_worker_aborts(lambda folder: torchrun_matches_one_process(corpus, folder, sharding), tmp_path)


def torchrun_matches_one_process(corpus, tmp_path, sharding):
    steps = ["--iters", "6", "--grad-accum", "2"]
    one = run(corpus, tmp_path / "one", *steps)
    log = torchrun(corpus, tmp_path / "two", *steps, *sharding, "--stop-at", "3")
    assert log.count("stopped at step 3") == 1  # rank 0 alone reports
    assert load_model(str(tmp_path / "two" / "ckpt.pt"))[1]["train_state"]["step"] == 3
    log = torchrun(corpus, tmp_path / "two", "--resume", *sharding, "--iters", "6")
    assert log.count("wrote ") == 1 and sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "train.json"]
    import json

    two = json.load(open(tmp_path / "two" / "train.json"))
    assert two["world_size"] == 2 and two["fsdp"] == bool(sharding)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    assert abs(two["val_bpb"] - one["val_bpb"]) < 1e-4
    model, _ = load_model(str(tmp_path / "two" / "ckpt.pt"))  # a plain checkpoint, whole tensors
    torch.testing.assert_close(
        model.state_dict(),
        load_model(str(tmp_path / "one" / "ckpt.pt"))[0].state_dict(),
        rtol=1e-4,
        atol=1e-5,
    )
