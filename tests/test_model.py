"""Tests of model.py: the AFM-style architecture, cached decoding, parameter counts."""

import math

import pytest
import torch

from model import CONFIGS, ModelConfig, Transformer, apply_rope, count_params, rope_tables

SMALL = ModelConfig(
    name="test", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_seq_len=48
)


def make(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_embedding_and_output_head_are_one_parameter():
    m = make()
    V, d = SMALL.vocab_size, SMALL.dim
    shaped = [n for n, p in m.named_parameters() if p.shape == (V, d)]
    assert shaped == ["tok_emb.weight"]
    assert sum(p.numel() for p in m.parameters()) == count_params(SMALL)["params"]
    # the output head uses it: one input byte still sends gradient to every row (through the softmax)
    m(torch.tensor([[7]])).logsumexp(-1).sum().backward()
    assert (m.tok_emb.weight.grad.abs().sum(dim=1) > 0).all()
    # and it IS the head: logits are the final hidden state times the embedding matrix
    x = torch.randint(0, V, (2, 10))
    h = m.tok_emb(x)
    cos, sin = m.rope_cos[:10], m.rope_sin[:10]
    for layer in m.layers:
        h = layer(h, cos, sin)
    torch.testing.assert_close(m(x), m.norm(h) @ m.tok_emb.weight.T)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_named_configs_build_and_have_valid_shapes(name):
    c = CONFIGS[name]
    assert c.n_kv_heads < c.n_heads and c.n_heads % c.n_kv_heads == 0
    for dim in (c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.ffn_dim):
        assert dim % 16 == 0  # palettization groups of 16 channels


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (2, 48)])
def test_output_shapes(B, T):
    m = make()
    x = torch.randint(0, 256, (B, T))
    assert m(x).shape == (B, T, 256)
    assert m(x).dtype == torch.float32


def test_tiny_config_forward_shape():
    c = CONFIGS["tiny"]
    m = Transformer(c)
    assert m(torch.randint(0, c.vocab_size, (2, 9))).shape == (2, 9, c.vocab_size)


def test_causality():
    m = make()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        T = int(torch.randint(2, 48, (1,), generator=g))
        x = torch.randint(0, 256, (2, T), generator=g)
        t = int(torch.randint(0, T, (1,), generator=g))
        y = x.clone()
        y[:, t] = (y[:, t] + 1 + torch.randint(0, 255, (2,), generator=g)) % 256
        a, b = m(x), m(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
        assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # the changed position itself does change


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model and an MHA model whose K/V projections repeat each KV head for its query group agree."""
    gqa = make(SMALL, seed=1)
    mha_cfg = ModelConfig(**{**SMALL.__dict__, "n_kv_heads": SMALL.n_heads})
    mha = Transformer(mha_cfg).eval()
    group, hd = SMALL.n_heads // SMALL.n_kv_heads, SMALL.head_dim
    sd = gqa.state_dict()
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k].view(SMALL.n_kv_heads, hd, SMALL.dim)  # (kv_heads, head_dim, dim)
            sd[k] = w.repeat_interleave(group, dim=0).reshape(SMALL.n_heads * hd, SMALL.dim)
    mha.load_state_dict(sd)
    for seed in range(5):
        x = torch.randint(0, 256, (2, 31), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_attention_matches_hand_written_reference():
    """One attention layer against explicit softmax(q k^T / sqrt(d)) v with K/V heads repeated by hand."""
    m = make(SMALL, seed=2)
    attn, c = m.layers[0].attn, SMALL
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        B, T = 2, int(torch.randint(1, 48, (1,), generator=g))
        x = torch.randn(B, T, c.dim, generator=g)
        cos, sin = m.rope_cos[:T], m.rope_sin[:T]
        q = attn.q_norm(attn.q_proj(x).view(B, T, c.n_heads, c.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim)).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(
            rep, dim=1
        )  # query head h uses kv head h // rep
        scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(y), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    hd, T = 32, 64
    cos, sin = rope_tables(hd, T, 500_000.0)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
        # the same q and k vectors placed at every position, rotated by their position
        qr = apply_rope(q.expand(1, 1, T, hd), cos, sin)[0, 0]  # (T, hd)
        kr = apply_rope(k.expand(1, 1, T, hd), cos, sin)[0, 0]
        scores = qr @ kr.T  # scores[i, j] = f(i - j)
        i, j, s = (int(v) for v in torch.randint(0, T // 2, (3,), generator=g))
        torch.testing.assert_close(scores[i, j], scores[i + s, j + s], rtol=1e-4, atol=1e-4)
        # and rotation keeps norms: position 0 is the identity
        torch.testing.assert_close(qr[0], q)
        torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(T))


def test_rope_base_is_500k():
    assert all(c.rope_base == 500_000.0 for c in CONFIGS.values())


def test_cached_decoding_equals_full_forward():
    m = make(SMALL, seed=3)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        B = int(torch.randint(1, 4, (1,), generator=g))
        T = int(torch.randint(2, SMALL.max_seq_len + 1, (1,), generator=g))
        x = torch.randint(0, 256, (B, T), generator=g)
        full = m(x)
        cache = m.new_cache(B)
        # random chunking: a prefill of random length, then random-length chunks (often single tokens)
        pos, outs = 0, []
        while pos < T:
            n = (
                int(torch.randint(1, T - pos + 1, (1,), generator=g))
                if pos == 0
                else min(T - pos, int(torch.randint(1, 4, (1,), generator=g)))
            )
            outs.append(m(x[:, pos : pos + n], cache=cache, pos=pos))
            pos += n
        torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)


def test_generate_with_and_without_cache_agree():
    m = make(SMALL, seed=4)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    a = m.generate(prompt, 20)
    b = m.generate(prompt, 20, use_cache=False)
    assert a.shape == (2, 25) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    s = m.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    s2 = m.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s2)
    with pytest.raises(ValueError):
        m.generate(prompt, SMALL.max_seq_len)


def test_afm_on_device_parameter_counts():
    c = CONFIGS["afm-on-device"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (
        3072,
        26,
        24,
        8,
        128,
        49_152,
    )
    n = count_params(c)  # on the meta device: no memory
    assert n["embedding_params"] == 49_152 * 3072 == 150_994_944
    assert abs(n["non_embedding_params"] - 2.58e9) / 2.58e9 < 0.02
    assert n["params"] == n["non_embedding_params"] + n["embedding_params"]
