"""sample.py: text from a float checkpoint, a palettized one and one with an adapter; one-line errors."""

import pytest
import torch

import sample
from lora import add_adapters, save_adapter
from model import ModelConfig, Transformer
from plumbing import save_model
from palettize import palettize_model, save_palettized

MICRO = ModelConfig(
    name="micro", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=48
)


def test_float_palettized_and_adapter(tmp_path, capsys):
    torch.manual_seed(0)
    m = Transformer(MICRO)
    save_model(str(tmp_path / "ckpt.pt"), m)
    text = sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Hello", "--max-new-tokens", "12"])
    assert text.startswith("Hello") and len(text.encode("utf-8", "replace")) >= 5
    assert (
        sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Hello", "--max-new-tokens", "12"])
        == text
    )
    greedy = sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--prompt", "Hi", "--temperature", "0"])
    want = m.generate(torch.tensor([list(b"Hi")]), 46)[0].tolist()  # to the end of the context
    assert greedy.encode("utf-8", "replace") == bytes(want).decode("utf-8", "replace").encode(
        "utf-8", "replace"
    )
    palettize_model(m, 4)
    save_palettized(str(tmp_path / "pal.pt"), m)
    add_adapters(m, rank=2)
    save_adapter(str(tmp_path / "ad.pt"), m, "x")
    for extra in ([], ["--adapter", str(tmp_path / "ad.pt")]):
        out = sample.main(
            ["--ckpt", str(tmp_path / "pal.pt"), "--prompt", "ab", "--max-new-tokens", "5", *extra]
        )
        assert out.startswith("ab")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ckpt", "missing.pt"], "no such file"),
        (["--chat", "hi"], "--chat needs"),
        (["--prompt", "x" * 60], "no room"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_bad_input_is_one_line(tmp_path, argv, message):
    save_model(str(tmp_path / "ckpt.pt"), Transformer(MICRO))
    argv = [a if a != "missing.pt" else str(tmp_path / a) for a in argv]
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), *argv])
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
