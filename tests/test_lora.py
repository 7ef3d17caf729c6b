"""Tests for lora.py on micro models (no out/ needed): LoRA math, freezing, adapter files, swapping,
fingerprints, a short recovery run, the feature-adapter script and bad input."""

import json
import os

import pytest
import torch
import torch.nn as nn

import lora
from lora import (
    AdapterError,
    LoRALinear,
    add_adapters,
    adapter_config,
    adapters,
    trainable_and_total_params,
    fingerprint,
    load_adapter,
    remove_adapters,
    save_adapter,
    train_adapters,
)
from conftest import torchrun_output, twice_if_a_worker_aborts
from model import ModelConfig, Transformer
from plumbing import CheckpointError, load_model, save_model
from palettize import PROJECTIONS, load_palettized, palettize_model, save_palettized

MICRO = ModelConfig(
    name="micro", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=32
)


def palettized_model(seed=0, bits=4):
    torch.manual_seed(seed)
    m = Transformer(MICRO)
    palettize_model(m, bits)
    return m.eval()


def randomize_adapters(model, seed):
    """Give every adapter non-zero A and B so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def tokens(seed, B=2, T=16):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def base_state(model):
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ---------------------------------------------------------------------------------------------------------
# LoRALinear


@pytest.mark.parametrize("seed", range(8))
def test_lora_linear_math(seed):
    torch.manual_seed(seed)
    din, dout, r = torch.randint(1, 40, (2,)).tolist() + [int(torch.randint(1, 9, ()).item())]
    alpha = float(torch.rand(()) * 30 + 0.5)
    base = nn.Linear(din, dout, bias=bool(seed % 2))
    m = LoRALinear(base, rank=r, alpha=alpha)
    x = torch.randn(3, 5, din)
    assert torch.equal(m(x), base(x))  # B = 0: a fresh adapter changes nothing
    assert m.lora_A.shape == (r, din) and m.lora_B.shape == (dout, r)
    with torch.no_grad():
        m.lora_B.normal_()
    want = base(x) + (alpha / r) * x @ m.lora_A.T @ m.lora_B.T
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    merged = base.weight + (alpha / r) * m.lora_B @ m.lora_A  # merging gives the same layer
    torch.testing.assert_close(m(x), nn.functional.linear(x, merged, base.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_fresh_adapters_leave_model_outputs_identical(seed):
    for m in (palettized_model(seed), Transformer(MICRO).eval()):
        x = tokens(seed)
        with torch.no_grad():
            before = m(x)
        names = add_adapters(m, rank=4, alpha=8)
        assert len(names) == MICRO.n_layers * len(PROJECTIONS)
        with torch.no_grad():
            assert torch.equal(m(x), before)


def test_only_adapters_train_and_base_is_bit_identical():
    m = palettized_model(1)
    teacher = Transformer(MICRO).eval()
    before = base_state(m)
    fp = fingerprint(m)
    add_adapters(m, rank=4, alpha=8)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert len(trainable) == 2 * MICRO.n_layers * len(PROJECTIONS)
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    for loss in ("ce", "kl", "mix"):
        train_adapters(
            m,
            data,
            iters=3,
            lr=1e-2,
            batch_size=2,
            seq_len=16,
            seed=0,
            teacher=teacher,
            loss=loss,
            progress=False,
        )
    after = base_state(m)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(m_.lora_B.abs().sum() > 0 for m_ in adapters(m).values())
    assert fingerprint(m) == fp  # adapters never change the base's fingerprint
    remove_adapters(m)
    assert fingerprint(m) == fp and not adapters(m)


def test_parameter_counts():
    m = palettized_model(0)
    _, total0 = trainable_and_total_params(m)
    add_adapters(m, rank=4, alpha=8)
    t1, total1 = trainable_and_total_params(m)
    per_layer = sum(4 * (mod.in_features + mod.out_features) for mod in adapters(m).values())
    assert t1 == per_layer  # only the adapters train
    assert total1 == total0 + t1
    float_total = sum(p.numel() for p in Transformer(MICRO).parameters())
    assert total0 == float_total  # palettized weights count as the weights they replace


# ---------------------------------------------------------------------------------------------------------
# Fingerprints and adapter files


def test_fingerprint_sees_every_base_tensor():
    m = palettized_model(2)
    fp = fingerprint(m)
    assert fp == fingerprint(palettized_model(2))  # deterministic
    assert fp != fingerprint(palettized_model(3))
    g = torch.Generator().manual_seed(0)
    for name, t in list(m.state_dict().items()):
        i = int(torch.randint(t.numel(), (1,), generator=g))
        flat = t.view(-1)
        old = flat[i].clone()
        with torch.no_grad():
            flat[i] = old + 1 if not t.dtype.is_floating_point else old + 0.5
        assert fingerprint(m) != fp, name
        with torch.no_grad():
            flat[i] = old
    assert fingerprint(m) == fp


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_adapter_file_size(tmp_path, rank):
    m = palettized_model(0)
    add_adapters(m, rank=rank, alpha=2 * rank)
    path = tmp_path / "a.pt"
    save_adapter(str(path), m, "test")
    payload = sum(2 * rank * (x.in_features + x.out_features) for x in adapters(m).values())
    n_tensors = 2 * len(adapters(m))
    size = os.path.getsize(path)
    assert payload < size <= payload + 8192 + 400 * n_tensors  # fp16 tensors + a small header
    ck = torch.load(path, weights_only=True)
    assert (
        ck["kind"] == "adapter"
        and ck["config"]["rank"] == rank
        and ck["config"]["targets"] == list(PROJECTIONS)
    )
    assert all(t.dtype == torch.float16 for t in ck["adapter"].values())
    assert set(ck) == {"kind", "config", "fingerprint", "adapter"}


def test_save_load_same_outputs_on_reloaded_base(tmp_path):
    m = palettized_model(4)
    save_palettized(str(tmp_path / "pal.pt"), m)
    base1, _ = load_palettized(str(tmp_path / "pal.pt"))
    add_adapters(base1, rank=4, alpha=8)
    randomize_adapters(base1, 0)
    with torch.no_grad():  # adapters are stored as fp16: round them first
        for a in adapters(base1).values():
            a.lora_A.copy_(a.lora_A.half().float())
            a.lora_B.copy_(a.lora_B.half().float())
    save_adapter(str(tmp_path / "a.pt"), base1, "x")
    base2, _ = load_palettized(str(tmp_path / "pal.pt"))
    ck = load_adapter(str(tmp_path / "a.pt"), base2)
    assert ck["config"]["name"] == "x" and adapter_config(base2) == adapter_config(base1)
    for s in range(5):
        x = tokens(s)
        with torch.no_grad():
            assert torch.equal(base1(x), base2(x))


def test_swap_adapters_on_one_base(tmp_path):
    m = palettized_model(5)
    x = tokens(0)
    with torch.no_grad():
        bare = m(x)
    add_adapters(m, rank=4, alpha=8)
    outs = {}
    for i in (1, 2):
        randomize_adapters(m, i)
        save_adapter(str(tmp_path / f"a{i}.pt"), m, f"a{i}")
    for i in (1, 2):
        load_adapter(str(tmp_path / f"a{i}.pt"), m)
        with torch.no_grad():
            outs[i] = m(x)
    assert not torch.allclose(outs[1], outs[2])
    assert not torch.allclose(outs[1], bare)
    for i in (2, 1, 2):  # swapping back and forth is exact
        load_adapter(str(tmp_path / f"a{i}.pt"), m)
        with torch.no_grad():
            assert torch.equal(m(x), outs[i])
    remove_adapters(m)  # the bare base again
    with torch.no_grad():
        assert torch.equal(m(x), bare)
    load_adapter(str(tmp_path / "a1.pt"), m)  # attaches adapters when there are none
    with torch.no_grad():
        assert torch.equal(m(x), outs[1])


def test_fingerprint_mismatch_is_refused(tmp_path):
    a = palettized_model(6)
    add_adapters(a, rank=4, alpha=8)
    save_adapter(str(tmp_path / "a.pt"), a, "a")
    other = palettized_model(7)
    before = base_state(other)
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(str(tmp_path / "a.pt"), other)
    assert not adapters(other) and base_state(other).keys() == before.keys()
    also = palettized_model(6)  # same weights, one LUT entry nudged
    with torch.no_grad():
        also.layers[1].ffn.down_proj.lut[0, 0] += 1e-3
    with pytest.raises(AdapterError, match="different base"):
        load_adapter(str(tmp_path / "a.pt"), also)


def test_rank_and_target_mismatch_are_refused(tmp_path):
    m = palettized_model(8)
    add_adapters(m, rank=4, alpha=8)
    save_adapter(str(tmp_path / "r4.pt"), m, "r4")
    remove_adapters(m)
    add_adapters(m, rank=8, alpha=16)
    with pytest.raises(AdapterError, match="rank 4"):
        load_adapter(str(tmp_path / "r4.pt"), m)
    remove_adapters(m)
    add_adapters(m, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_adapters(m, 0)
    A_before = {n: x.lora_A.clone() for n, x in adapters(m).items()}
    with pytest.raises(AdapterError, match="targets"):
        load_adapter(str(tmp_path / "r4.pt"), m)
    assert all(torch.equal(A_before[n], x.lora_A) for n, x in adapters(m).items())  # untouched
    with pytest.raises(AdapterError):
        add_adapters(m, rank=4)  # already has adapters
    remove_adapters(m)
    for bad in (0, -3):
        with pytest.raises(AdapterError, match="rank"):
            add_adapters(m, rank=bad)
        with pytest.raises(AdapterError, match="rank"):
            LoRALinear(nn.Linear(4, 4), rank=bad)
    with pytest.raises(AdapterError, match="no linear layer"):
        add_adapters(m, rank=4, targets=("nope",))
    assert not adapters(m)
    with pytest.raises(CheckpointError, match="no such file"):
        load_adapter(str(tmp_path / "missing.pt"), m)
    save_model(str(tmp_path / "model.pt"), Transformer(MICRO))
    with pytest.raises(CheckpointError, match="expected 'adapter'"):
        load_adapter(str(tmp_path / "model.pt"), m)


# ---------------------------------------------------------------------------------------------------------
# The script, end to end on a micro model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A micro float model trained briefly on a small corpus, and its 2-bit palettization."""
    d = tmp_path_factory.mktemp("lora")
    words = ["alpha", "beta", "gamma", "delta", "lambda", "return", "def", "class", "import", "print"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (12000,), generator=g).tolist())
    (d / "corpus.txt").write_text(text)
    from data import load_splits, get_batch

    train, _ = load_splits(str(d / "corpus.txt"), 32)
    torch.manual_seed(0)
    m = Transformer(MICRO)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(80):
        x, y = get_batch(train, 16, 32, g)
        loss = nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(str(d / "ckpt.pt"), m)
    palettize_model(m, 2)
    save_palettized(str(d / "palettized.pt"), m)
    return d


def script_flags(workdir, eval_windows="32"):
    """The flags every script run here shares: the micro corpus, short sequences, small batches, the CPU."""
    return ["--data", str(workdir / "corpus.txt"), "--seq-len", "32", "--batch-size", "8",
            "--eval-windows", eval_windows, "--device", "cpu"]


def run(workdir, *extra):
    lora.main(["--out-dir", str(workdir), *script_flags(workdir), *extra])


def test_recovery_run_lowers_validation_loss(workdir):
    run(workdir, "--iters", "40", "--lr", "1e-2", "--rank", "4")
    rep = json.loads((workdir / "lora_recovery.json").read_text())
    assert rep["val_bpb_recovered"] < rep["val_bpb_palettized"]
    assert rep["val_bpb_palettized"] > rep["val_bpb_float"]
    assert 0 < rep["gap_closed"] <= 1.5
    for k in (
        "base_bits_per_weight",
        "rank",
        "alpha",
        "trainable_params",
        "adapter_bytes",
        "iters",
        "seconds",
    ):
        assert k in rep
    assert rep["rank"] == 4 and rep["adapter_bytes"] == os.path.getsize(workdir / "adapter_recovery.pt")
    base, _ = load_palettized(str(workdir / "palettized.pt"))
    load_adapter(str(workdir / "adapter_recovery.pt"), base)  # fits the base it was trained on
    # The default loss is ce, so the float control ran: the matched gap is measured against it.
    assert rep["loss"] == "ce" and rep["val_bpb_float_adapted"] is not None
    gap = rep["val_bpb_palettized"] - rep["val_bpb_float"]
    assert rep["gap_closed_matched"] == pytest.approx(
        1 - (rep["val_bpb_recovered"] - rep["val_bpb_float_adapted"]) / gap
    )


@pytest.mark.parametrize("flags", [("--loss", "kl"), ("--no-control",)])
def test_recovery_control(workdir, flags):
    """With kl the float model is its own teacher and cannot move, so the matched gap equals the plain one;
    --no-control skips the control and says so with nulls."""
    run(workdir, "--iters", "4", "--lr", "1e-2", "--rank", "4", *flags)
    rep = json.loads((workdir / "lora_recovery.json").read_text())
    if flags[0] == "--loss":
        assert rep["val_bpb_float_adapted"] == rep["val_bpb_float"]
        assert rep["gap_closed_matched"] == pytest.approx(rep["gap_closed"])
    else:
        assert rep["val_bpb_float_adapted"] is None and rep["gap_closed_matched"] is None


def test_feature_adapter_script(workdir):
    for init in ("recovery", "zero"):
        run(
            workdir,
            "--task",
            "feat",
            "--init",
            init,
            "--iters",
            "8",
            "--lr",
            "1e-2",
            *(["--rank", "4"] if init == "zero" else []),
        )
        rep = json.loads((workdir / f"lora_feat_{init}.json").read_text())
        assert list(rep["val_bpb_by_step"]) == ["0", "2", "4", "6", "8"]
        assert "orig_val_bpb_end" in rep and rep["orig_data"] == "bible" and rep["rank"] == 4
    assert (workdir / "adapter_feat.pt").exists() and (workdir / "adapter_feat_zero.pt").exists()
    r = json.loads((workdir / "lora_feat_recovery.json").read_text())
    z = json.loads((workdir / "lora_feat_zero.json").read_text())
    assert r["val_bpb_by_step"]["0"] < z["val_bpb_by_step"]["0"]  # starts from the recovered model


def test_bad_input_is_one_line_and_overwrites_nothing(workdir, tmp_path, capsys):
    snapshot = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    bad_calls = [
        ["--base", str(tmp_path / "missing.pt")],
        ["--teacher", str(tmp_path / "missing.pt"), "--iters", "1"],
        ["--rank", "0"],
        ["--iters", "-1"],
        ["--lr", "0"],
        ["--seq-len", "4096"],
        ["--targets", "q_proj,nope", "--iters", "1"],
        ["--task", "feat", "--init", "recovery", "--rank", "8"],  # recovery adapter has rank 4
        ["--task", "feat", "--init", "recovery", "--targets", "q_proj"],  # ... and all seven targets
        ["--task", "feat", "--init", "recovery", "--adapter", str(tmp_path / "missing.pt")],
        ["--task", "feat", "--init", "recovery", "--adapter", str(workdir / "ckpt.pt")],
        ["--data", str(tmp_path / "missing.txt")],
        ["--device", "tpu"],
    ]
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    bad_calls.append(["--base", str(tmp_path / "other.pt")])
    for argv in bad_calls:
        with pytest.raises(SystemExit) as e:
            run(workdir, *argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg, (argv, msg)
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == snapshot


def test_eval_mode(workdir, capsys):
    run(workdir, "--eval", "--adapter", "none")
    bare = capsys.readouterr().out
    run(workdir, "--eval", "--adapter", str(workdir / "adapter_recovery.pt"))
    with_adapter = capsys.readouterr().out
    assert "val bpb" in bare and "val bpb" in with_adapter and bare != with_adapter


@pytest.mark.parametrize("task", ["recovery", "feat"])
def test_interrupted_run_keeps_its_adapter(workdir, task):
    """--stop-at N behaves like Ctrl-C after step N: the adapter trained so far is evaluated, saved and
    usable."""
    extra = ["--task", task, "--init", "zero", "--rank", "4"] if task == "feat" else ["--rank", "4"]
    run(workdir, "--iters", "30", "--lr", "1e-2", "--stop-at", "3", *extra)
    rep = json.loads(
        (workdir / ("lora_recovery.json" if task == "recovery" else "lora_feat_zero.json")).read_text()
    )
    assert rep["iters_done"] == 3 and rep["interrupted"] and rep["iters"] == 30
    if task == "recovery":
        assert rep["val_bpb_float_adapted"] is None  # the control is skipped after an interrupt
    else:
        assert list(rep["val_bpb_by_step"]) == ["0", "3"]
    base, _ = load_palettized(str(workdir / "palettized.pt"))
    ck = load_adapter(
        str(workdir / ("adapter_recovery.pt" if task == "recovery" else "adapter_feat_zero.pt")), base
    )
    assert ck["steps"] == 3


def test_train_adapters_stops_on_keyboard_interrupt():
    """A Ctrl-C in the middle of training returns the steps taken instead of losing them."""
    model = palettized_model(0)
    add_adapters(model, 4, 8.0)
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    losses = train_adapters(
        model, data, iters=20, lr=1e-2, batch_size=2, seq_len=16, seed=0, callback=interrupt, progress=False
    )
    assert len(losses) == 5
    assert any(m.lora_B.abs().sum() > 0 for m in adapters(model).values())


def test_recovery_defaults_to_the_base_corpus_and_a_tiny_gap_is_not_a_fraction(workdir, tmp_path, capsys):
    """The base's own corpus (from its palettize report), not the Bible; and an 8-bit base, whose gap to the
    float model is within noise, reports the absolute numbers instead of a huge percentage."""
    m, _ = load_model(str(workdir / "ckpt.pt"))
    palettize_model(m, 8)
    save_palettized(str(tmp_path / "palettized.pt"), m, report={"data": str(workdir / "corpus.txt")})
    lora.main(
        [
            "--out-dir",
            str(tmp_path),
            "--teacher",
            str(workdir / "ckpt.pt"),
            "--seq-len",
            "32",
            "--iters",
            "2",
            "--batch-size",
            "8",
            "--eval-windows",
            "16",
            "--device",
            "cpu",
            "--rank",
            "4",
            "--no-control",
        ]
    )
    rep = json.loads((tmp_path / "lora_recovery.json").read_text())
    assert rep["data"] == str(workdir / "corpus.txt")
    assert abs(rep["gap"]) < 1e-3 * rep["val_bpb_float"] and rep["gap_closed"] is None
    assert "within noise" in capsys.readouterr().out


def test_recovery_under_torchrun_matches_one_process(workdir, tmp_path):
    """2 CPU processes (gloo, DDP) train the adapter on halves of each batch: the loss curve of one process.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--base", str(workdir / "palettized.pt"), "--teacher", str(workdir / "ckpt.pt"),
             *script_flags(workdir, eval_windows="16"), "--iters", "5", "--lr", "1e-2", "--rank", "4",
             "--no-control"]
    lora.main(["--out-dir", str(tmp_path / "one"), *flags])
    script = os.path.join(root, "lora.py")

    def two_processes(folder):
        log = torchrun_output(script, "--out-dir", str(folder / "two"), *flags)
        assert log.count("wrote ") == 1  # rank 0 alone writes
        return json.loads((folder / "two" / "lora_recovery.json").read_text())

    two = twice_if_a_worker_aborts(two_processes, tmp_path)
    one = json.loads((tmp_path / "one" / "lora_recovery.json").read_text())
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    assert abs(two["val_bpb_recovered"] - one["val_bpb_recovered"]) < 1e-4
