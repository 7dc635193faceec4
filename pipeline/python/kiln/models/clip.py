"""CLIP text encoder for torch.export.

Built from a transformers `CLIPTextConfig` config.json dict; parameter names equal CLIPTextModel's
checkpoint names (`text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.0.self_attn.q_proj.weight`, `text_model.final_layer_norm.weight`).
The checkpoint's `text_model.embeddings.position_ids` buffer is not a parameter here: positions are
0..L-1, computed in the graph.

Pre-LN transformer with a causal mask and no padding mask (Flux feeds the full padded 77 tokens).
The pooled output is the final-layer-normed state at the EOS token of each sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Configs written before transformers PR #24773 carry eos_token_id 2 although the real EOS id is
# the highest in the vocabulary; for them the EOS position is argmax(input_ids), as transformers
# does.
LEGACY_EOS_TOKEN_ID = 2


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"clip: hidden_act {name!r} is not supported")


class ClipEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(positions, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)[None]


class ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class ClipMLP(nn.Module):
    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, inner: int, act: str, eps: float):
        super().__init__()
        self.self_attn = ClipAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ClipMLP(dim, inner, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.layers = nn.ModuleList(
            ClipEncoderLayer(int(config["hidden_size"]), int(config["num_attention_heads"]),
                             int(config["intermediate_size"]),
                             config.get("hidden_act", "quick_gelu"),
                             float(config.get("layer_norm_eps", 1e-5)))
            for _ in range(int(config["num_hidden_layers"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipTextTransformer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        dim = int(config["hidden_size"])
        eos = config.get("eos_token_id", LEGACY_EOS_TOKEN_ID)
        self.eos_token_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        self.embeddings = ClipEmbeddings(int(config["vocab_size"]),
                                         int(config["max_position_embeddings"]), dim)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(dim, eps=float(config.get("layer_norm_eps", 1e-5)))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))
        ids = input_ids.to(torch.int32)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos_pos = ids.argmax(dim=-1)
        else:  # first EOS: padding may reuse the EOS id
            eos_pos = (ids == self.eos_token_id).to(torch.int32).argmax(dim=-1)
        pooled = torch.gather(hidden, 1, eos_pos[:, None, None].expand(-1, 1, hidden.shape[-1]))
        return hidden, pooled[:, 0]


class ClipTextModel(nn.Module):
    """CLIPTextModel: input_ids [B, L] -> (last hidden [B, L, hidden], pooled [B, hidden])."""

    def __init__(self, config: dict):
        super().__init__()
        self.text_model = ClipTextTransformer(config)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model(input_ids)
