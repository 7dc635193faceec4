"""T5 encoder (v1.1 / gated-GELU, and the original ReLU variant) for torch.export.

Built from a transformers `T5Config` config.json dict; parameter names equal T5EncoderModel's
checkpoint names (`shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`, ...). The
input embedding is `shared.weight` only: T5EncoderModel ties `encoder.embed_tokens.weight` to it,
and the loader maps a checkpoint that holds only the latter onto it.

T5 specifics: RMS layer norm computed in float32, no attention scaling, a learned relative
position bias (block 0 only) added to every layer's attention logits, no attention mask (Flux
encodes the full padded sequence).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm; the mean square is taken in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(ms + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int,
                              device=None) -> torch.Tensor:
    """[q_len, k_len] int64 bucket of (key position - query position), bidirectional:
    half the buckets per sign, exact for small distances, log-spaced up to max_distance."""
    rel = (torch.arange(k_len, dtype=torch.int64, device=device)[None, :]
           - torch.arange(q_len, dtype=torch.int64, device=device)[:, None])
    half = num_buckets // 2
    bucket = (rel > 0).to(torch.int64) * half
    dist = rel.abs()
    max_exact = half // 2
    # log(0) is never taken: distances below max_exact use the exact branch.
    far = max_exact + (torch.log(dist.clamp(min=max_exact).float() / max_exact)
                       / math.log(max_distance / max_exact)
                       * (half - max_exact)).to(torch.int64)
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < max_exact, dist, far)


class T5Attention(nn.Module):
    def __init__(self, d_model: int, heads: int, d_kv: int, relative_bias: bool,
                 num_buckets: int, max_distance: int):
        super().__init__()
        inner = heads * d_kv
        self.heads, self.d_kv = heads, d_kv
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.relative_attention_bias = (nn.Embedding(num_buckets, heads) if relative_bias
                                        else None)

    def position_bias(self, seq_len: int, device) -> torch.Tensor:
        """[1, heads, L, L] additive attention bias."""
        buckets = relative_position_buckets(seq_len, seq_len, self.num_buckets,
                                            self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (self.heads, self.d_kv)).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).flatten(2))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, attn: T5Attention, d_model: int, eps: float):
        super().__init__()
        self.SelfAttention = attn
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedGelu(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5DenseRelu(nn.Module):
    """wo(relu(wi x)), the original T5."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, dense: nn.Module, d_model: int, eps: float):
        super().__init__()
        self.DenseReluDense = dense
        self.layer_norm = T5LayerNorm(d_model, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: dict, relative_bias: bool):
        super().__init__()
        d_model, eps = int(config["d_model"]), float(config.get("layer_norm_epsilon", 1e-6))
        attn = T5Attention(d_model, int(config["num_heads"]), int(config["d_kv"]), relative_bias,
                           int(config.get("relative_attention_num_buckets", 32)),
                           int(config.get("relative_attention_max_distance", 128)))
        proj = config.get("feed_forward_proj", "relu")
        if proj in ("gated-gelu", "gated-gelu_new"):
            dense: nn.Module = T5DenseGatedGelu(d_model, int(config["d_ff"]))
        elif proj == "relu":
            dense = T5DenseRelu(d_model, int(config["d_ff"]))
        else:
            raise ValueError(f"t5: feed_forward_proj {proj!r} is not supported "
                             "(gated-gelu or relu)")
        self.layer = nn.ModuleList([T5LayerSelfAttention(attn, d_model, eps),
                                    T5LayerFF(dense, d_model, eps)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.block = nn.ModuleList(T5Block(config, relative_bias=i == 0)
                                   for i in range(int(config["num_layers"])))
        self.final_layer_norm = T5LayerNorm(int(config["d_model"]),
                                            float(config.get("layer_norm_epsilon", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1], x.device)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """T5EncoderModel: input_ids [B, L] int64 -> last hidden state [B, L, d_model]."""

    # Checkpoint names T5EncoderModel may hold for the one embedding table we call `shared`.
    TIED_ALIASES = {"shared.weight": ("encoder.embed_tokens.weight",)}

    def __init__(self, config: dict):
        super().__init__()
        self.shared = nn.Embedding(int(config["vocab_size"]), int(config["d_model"]))
        self.encoder = T5Stack(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(input_ids))
