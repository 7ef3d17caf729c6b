"""
model.py -- the AFM-style decoder-only transformer.

Follows section 2 ("Architecture") of Gunter et al. 2024, "Apple Intelligence Foundation Language Models"
(arXiv 2407.21075): a dense decoder with one embedding matrix shared by the input lookup and the output head,
pre-normalisation with RMSNorm, query/key normalisation, grouped-query attention (8 key/value heads in
AFM-on-device), a SwiGLU feed-forward layer, and RoPE positions with base frequency 500,000. Also here: the
config dataclass, KV-cached generation, and parameter and FLOP counts. (Checkpoints: plumbing.py.)

    python model.py          # every named config with its parameter counts (on the meta device: no memory)
"""
import argparse
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- Config --------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Everything that defines a model's shape; checkpoints carry it as a dict."""
    name: str = "tiny"
    vocab_size: int = 256        # byte-level tokens for the configs we train here; AFM uses a 49K BPE
    dim: int = 256               # model width d
    n_layers: int = 6
    n_heads: int = 8             # query heads
    n_kv_heads: int = 2          # key/value heads (grouped-query attention)
    head_dim: int = 32
    ffn_dim: int = 768           # SwiGLU hidden width
    max_seq_len: int = 256       # longest context (size of the RoPE table and of the KV cache)
    rope_base: float = 500_000.0  # AFM: RoPE base frequency 500k
    norm_eps: float = 1e-5
    qk_norm: bool = True         # AFM normalises queries and keys; Llama-family models (pretrained.py) do not

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"need n_heads a multiple of n_kv_heads and an even head_dim (RoPE): {self}")


CONFIGS: dict[str, ModelConfig] = {
    # Trains on 2 CPU cores in minutes (train.py's default). Measured on the Bible at equal CPU time: d=192
    # x 4 layers (1.6M params, 4.0M tokens) reached 1.59 bits/byte, d=256 x 4 (3.1M, 2.6M tokens) 1.65; at
    # equal tokens 4 layers matched 6, so the budget goes to tokens. Widths: multiples of 16 (palettization).
    "tiny": ModelConfig(name="tiny", dim=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32,
                        ffn_dim=512, max_seq_len=128),
    # ~140M parameters, for one GPU.
    "small": ModelConfig(name="small", dim=1024, n_layers=12, n_heads=8, n_kv_heads=4, head_dim=128,
                         ffn_dim=2816, max_seq_len=1024),
    # AFM-on-device: d=3072, 26 layers, 24 query heads, 8 KV heads, head dim 128, 49,152 vocabulary.
    # The paper gives 2.58B non-embedding parameters but not the FFN width; 8,192 gives 2.617B (+1.4%).
    "afm-on-device": ModelConfig(name="afm-on-device", vocab_size=49_152, dim=3072, n_layers=26, n_heads=24,
                                 n_kv_heads=8, head_dim=128, ffn_dim=8192, max_seq_len=4096),
}


# -- Layers --------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (AFM: pre-normalisation with RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):                                             # (..., dim)
        # the gain in x's dtype: an fp32 gain on bf16 x keeps torch off its fused kernel (H200: 2.8 vs 0.9 ms)
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_seq_len: int, base: float):
    """cos/sin tables of shape (max_seq_len, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x (B, heads, T, hd) with each pair (x[..., i], x[..., i + hd/2]) rotated by its position's angle;
    cos, sin (T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with QK-norm, RoPE and grouped-query attention, optionally on a KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # AFM: query/key normalisation -- an RMSNorm over each head's queries and keys, before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask = None
        if cache is not None:
            k_cache, v_cache = cache                   # each (B, n_kv_heads, max_seq_len, head_dim)
            k_cache[:B, :, pos:pos + T], v_cache[:B, :, pos:pos + T] = k, v
            k, v = k_cache[:B, :, :pos + T], v_cache[:B, :, :pos + T]
            t = torch.arange(pos + T, device=x.device)       # query i (at pos + i) sees keys 0..pos + i
            mask = None if T == 1 else t[None, :] <= t[pos:, None]
        # AFM: grouped-query attention -- each K/V head serves n_heads / n_kv_heads query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, n_heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """AFM: SwiGLU, down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):                                             # (..., dim)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One layer, AFM's pre-normalisation: attention, then SwiGLU, each on an RMSNorm of x, added to x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """The AFM-style decoder: tied embedding, n_layers blocks, a final RMSNorm, logits over the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        # AFM: one embedding matrix for the input lookup and (transposed) the output projection.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim // 2)
        self.register_buffer("rope_sin", sin, persistent=False)
        # N(0, 0.02^2); then, as GPT-2, the projections that write into the residual stream / sqrt(2 n_layers)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, tokens, cache=None, pos: int = 0):
        """tokens (B, T) int64 -> logits (B, T, vocab_size). With `cache` (from `new_cache`), the tokens at
        positions [pos, pos + T) add their keys/values to it: a decoding step costs O(T), not O(T^2)."""
        B, T = tokens.shape
        if pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(tokens)                                   # (B, T, dim)
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i], pos)
        return F.linear(self.norm(x), self.tok_emb.weight)         # (B, T, vocab_size), tied output head

    def new_cache(self, batch_size: int = 1):
        """One (k, v) pair per layer, each (B, n_kv_heads, max_seq_len, head_dim), zero-filled."""
        c, p = self.config, self.tok_emb.weight         # plain tensors, even when p is an FSDP DTensor
        shape = (batch_size, c.n_kv_heads, c.max_seq_len, c.head_dim)
        return [tuple(torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in "kv") for _ in self.layers]

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, stop=()):
        """`tokens` (B, T) extended by up to `max_new_tokens`: greedy at temperature 0, else sampled from the
        softmax at that temperature among the `top_k` most likely; ends early once every row has drawn a token
        in `stop`. use_cache=False recomputes the whole prefix at every step (to measure the cache)."""
        if tokens.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt + new tokens exceed max_seq_len={self.config.max_seq_len}")
        cache = self.new_cache(tokens.shape[0]) if use_cache else None
        logits = self(tokens, cache=cache, pos=0)[:, -1]
        out, done = tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)        # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            done |= torch.isin(nxt[:, 0], torch.tensor(list(stop), dtype=nxt.dtype, device=nxt.device))
            if i == max_new_tokens - 1 or done.all():
                break
            logits = (self(nxt, cache=cache, pos=out.shape[1] - 1) if use_cache else self(out))[:, -1]
        return out


def sample(logits, temperature: float = 0.0, top_k: int | None = None, generator=None):
    """logits (B, V) -> next tokens (B, 1): the argmax at temperature 0, else drawn as in generate."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:                     # top_k <= 0: off
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# -- Counting ------------------------------------------------------------------------------------------------

def count_params(config: ModelConfig) -> dict:
    """Parameter counts, built on the meta device (no memory). The tied embedding is counted once."""
    with torch.device("meta"):
        m = Transformer(config)
    total, emb = sum(p.numel() for p in m.parameters()), m.tok_emb.weight.numel()
    return {"params": total, "non_embedding_params": total - emb, "embedding_params": emb}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N + 12 L H Q T, where N counts every
    matmul weight (the tied output head too) and the second term is attention's scores and values."""
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * count_params(config)["params"] + attention


def main():
    """Print every named config with its parameter counts."""
    argparse.ArgumentParser(description="Print every named config with its parameter counts.").parse_args()
    print(f"{'config':<15}{'d':>6}{'layers':>7}{'heads':>6}{'kv':>4}{'ffn':>6}{'vocab':>7}{'total':>15}"
          f"{'non-embedding':>15}{'embedding':>13}")
    for name, c in CONFIGS.items():
        n = count_params(c)
        print(f"{name:<15}{c.dim:>6}{c.n_layers:>7}{c.n_heads:>6}{c.n_kv_heads:>4}{c.ffn_dim:>6}"
              f"{c.vocab_size:>7}{n['params']:>15,}{n['non_embedding_params']:>15,}"
              f"{n['embedding_params']:>13,}")


if __name__ == "__main__":
    main()
