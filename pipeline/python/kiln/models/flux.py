"""Flux.1 transformer (MMDiT): double-stream then single-stream blocks, for torch.export.

Built from a diffusers `FluxTransformer2DModel` config.json dict; parameter names equal the
diffusers checkpoint names (`transformer_blocks.0.attn.to_q.weight`, ...), so a checkpoint loads
with no renaming. The model holds parameters only (no buffers): RoPE tables are computed in the
graph from static sizes, so an exported package asks for checkpoint tensors and nothing else.

Numerics follow diffusers: timestep and guidance are cast to the activation dtype and multiplied by
1000 before the sinusoidal embedding (as the reference pipelines do), RoPE angles are computed in
float64 and applied in float32, attention is F.scaled_dot_product_attention.

Two build options change the parameters a package asks for, never the checkpoint
(kiln.models.quant declares how they are derived at weight-load time):
  fuse_qkv  the attention projections of each block become one Linear: `attn.to_qkv` (image or
            single stream) and `attn.add_qkv_proj` (text stream), each the dim-0 concatenation of
            the checkpoint's q, k, v weights and biases;
  fp8       the linears inside transformer_blocks and single_transformer_blocks (attention
            projections, to_out, to_add_out, ff, ff_context, proj_mlp, proj_out) are Fp8Linear;
            the AdaLN modulation linears (norm1.linear, norm1_context.linear, norm.linear), the
            embedders and the output layers stay in the activation dtype.
A third, `fused_quant` (fp8 only), changes no parameter: the fp8 linears' inputs are quantized
inside the kernels that make them (kiln.models.fused_quant: the modulation after each block's
LayerNorm, and the GELU, with a single block's concatenation), not by a pass of their own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.fp8_attention import fp8_sdpa
from kiln.models.fused_quant import gelu_quant, modulate_quant
from kiln.models.quant import QuantizedRows, linears_on, make_linear

ROPE_THETA = 10000.0
TIME_PROJ_DIM = 256  # sinusoidal channels of the timestep / guidance embedding
MLP_RATIO = 4


# ---------------------------------------------------------------------------------------------
# Position ids and rotary tables.


def text_ids(text_len: int, device=None) -> torch.Tensor:
    """[text_len, 3] float ids of the text tokens: all zero."""
    return torch.zeros(text_len, 3, dtype=torch.float32, device=device)


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows*cols, 3] float ids (0, row, col) of the packed 2x2 latent patches, row-major."""
    r = torch.arange(rows, dtype=torch.float32, device=device)
    c = torch.arange(cols, dtype=torch.float32, device=device)
    grid_r = r[:, None].expand(rows, cols).reshape(-1)
    grid_c = c[None, :].expand(rows, cols).reshape(-1)
    return torch.stack([torch.zeros_like(grid_r), grid_r, grid_c], dim=-1)


def rope_tables(ids: torch.Tensor, axes_dims: list[int], theta: float = ROPE_THETA
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [N, sum(axes_dims)] float32 for ids [N, n_axes].

    Each axis a gets axes_dims[a]/2 frequencies theta^(-2i/d); every angle is written twice
    (adjacent channel pairs rotate together), so the table width is the head dim.
    """
    pos = ids.to(torch.float64)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        inv_freq = 1.0 / (theta ** exponent)
        angles = pos[:, axis:axis + 1] * inv_freq[None, :]  # [N, dim/2]
        cos_parts.append(torch.stack([angles.cos(), angles.cos()], dim=-1).flatten(1))
        sin_parts.append(torch.stack([angles.sin(), angles.sin()], dim=-1).flatten(1))
    return torch.cat(cos_parts, dim=-1).float(), torch.cat(sin_parts, dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates channel pairs (x[2i], x[2i+1]) of x [B, H, N, D] by the angles in cos/sin [N, D]."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = x.float() * cos + rotated.float() * sin
    return out.to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int = TIME_PROJ_DIM, max_period: float = 10000.0
                      ) -> torch.Tensor:
    """[B] -> [B, dim] float32 embedding, cos half first (diffusers Timesteps with
    flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half
                      * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------
# Building blocks. Module and attribute names mirror the checkpoint layout.


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (TimestepEmbedding / PixArtAlphaTextProjection layout)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Conditioning vector temb [B, dim] = emb(timestep) (+ emb(guidance)) + proj(pooled text)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_PROJ_DIM, dim)
        self.guidance_embedder = MLPEmbedder(TIME_PROJ_DIM, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        dtype = pooled.dtype
        emb = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))
        return emb + self.text_embedder(pooled)


class AdaModulation(nn.Module):
    """SiLU(temb) -> linear -> n chunks of [B, dim] (AdaLayerNormZero* `.linear`)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.chunks, dim=-1)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift, per batch row."""
    return layer_norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
    """RMS norm with a learned scale over the last dim (QK norm over the head dim)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class GeluMLP(nn.Module):
    """FeedForward(activation "gelu-approximate"): net.0.proj -> GELU(tanh) -> net.2."""

    class _Proj(nn.Module):
        def __init__(self, dim: int, inner: int, fp8: bool):
            super().__init__()
            self.proj = make_linear(fp8)(dim, inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.proj(x), approximate="tanh")

    def __init__(self, dim: int, inner: int, fp8: bool = False):
        super().__init__()
        self.fused_quant = False  # FluxTransformer sets its build option (fp8 only)
        self.net = nn.ModuleList([self._Proj(dim, inner, fp8), nn.Identity(),
                                  make_linear(fp8)(inner, dim)])

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if self.fused_quant:  # GELU and the second linear's quantization in one kernel
            return self.net[2](gelu_quant(None, self.net[0].proj(x)))
        return self.net[2](self.net[0](x))


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, N, H, D]."""
    return x.unflatten(-1, (-1, head_dim))


def _qkv_names(q: str, k: str, v: str) -> dict[str, tuple[str, ...]]:
    return {"weight": (f"{q}.weight", f"{k}.weight", f"{v}.weight"),
            "bias": (f"{q}.bias", f"{k}.bias", f"{v}.bias")}


# Attention kernels a model can be built with (build option `attention`): "sdpa" lets
# F.scaled_dot_product_attention choose at trace time; "cudnn", "flash" and "efficient" name one
# fused CUDA kernel, called as its aten op so that torch.export and torch.compile keep exactly
# that kernel; on a CPU tensor each of these is "sdpa" (the CPU has one fused kernel). "fp8" is
# kiln's own e4m3 kernel (kiln.models.fp8_attention, the fp8 precision only): q, k, v quantized
# per head; on a CPU tensor its reference computes the same function.
ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "fp8")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
         qk_bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Non-causal attention of q, k, v [B, H, N, D] with the kernel `backend`. `qk_bounds`
    (fp8 only): bounds of |q| and |k| that fix their fp8 scales (fp8_sdpa)."""
    if backend == "fp8":
        return fp8_sdpa(q, k, v, *(qk_bounds or (None, None)))
    if backend == "sdpa" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    if backend == "efficient":
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
    raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")


def rms_rope_bound(norms: list[RMSNorm], head_dim: int) -> torch.Tensor:
    """A bound of |x| for x = RoPE(RMSNorm(.)) through any of `norms`: |RMSNorm(y)_i| <=
    sqrt(D) * |w_i| (y_i^2 <= sum y^2), and a rotation keeps each channel pair's norm, which is
    at most sqrt(D) * max|w|. A function of the weights alone: no pass over the activations."""
    w = torch.stack([n.weight.abs().amax() for n in norms]).amax()
    return w.float() * math.sqrt(head_dim)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], backend: str = "sdpa",
               qk_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
               sp=None) -> torch.Tensor:
    """q, k, v [B, N, H, D] (already QK-normed) -> [B, N, H*D].

    sp (a kiln.sequence_parallel.Ulysses, or None): the N tokens are this rank's shard of the
    sequence; RoPE is applied to them here (rope holds their rows), then an all-to-all trades
    the token shards for head shards, attention runs over every rank's tokens with H/P heads,
    and the inverse all-to-all brings this rank's tokens back with all H heads. Attention
    without a mask is equivariant in the token order, so the gathered order need not be the
    single-rank one."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope)
    if sp is not None:
        q, k, v = (sp.to_heads(t) for t in (q, k, v))
    out = sdpa(q, k, v, backend, qk_bounds)
    if sp is not None:
        out = sp.to_tokens(out)
    return out.transpose(1, 2).flatten(2)


class JointAttention(nn.Module):
    """Attention of a double-stream block: image (to_*) and text (add_*) streams attend jointly.
    fuse_qkv: one `to_qkv` and one `add_qkv_proj` projection instead of three each."""

    def __init__(self, dim: int, heads: int, head_dim: int, fuse_qkv: bool = False,
                 fp8: bool = False):
        super().__init__()
        inner = heads * head_dim
        linear = make_linear(fp8)
        self.head_dim = head_dim
        self.fuse_qkv = fuse_qkv
        self.attention = "sdpa"  # FluxTransformer sets its build option
        self.sp = None  # kiln.sequence_parallel.enable sets it; None: the whole sequence here
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if fuse_qkv:
            self.to_qkv = linear(dim, 3 * inner)
        else:
            self.to_q = linear(dim, inner)
            self.to_k = linear(dim, inner)
            self.to_v = linear(dim, inner)
        self.to_out = nn.ModuleList([linear(inner, dim)])
        self.norm_added_q = RMSNorm(head_dim)
        self.norm_added_k = RMSNorm(head_dim)
        if fuse_qkv:
            self.add_qkv_proj = linear(dim, 3 * inner)
        else:
            self.add_q_proj = linear(dim, inner)
            self.add_k_proj = linear(dim, inner)
            self.add_v_proj = linear(dim, inner)
        self.to_add_out = linear(inner, dim)

    def fused_parameters(self) -> dict[str, tuple[str, ...]]:
        if not self.fuse_qkv:
            return {}
        out = {f"to_qkv.{n}": s for n, s in _qkv_names("to_q", "to_k", "to_v").items()}
        out.update({f"add_qkv_proj.{n}": s for n, s in
                    _qkv_names("add_q_proj", "add_k_proj", "add_v_proj").items()})
        return out

    def _img_qkv(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fuse_qkv:
            return self.to_qkv(img).chunk(3, dim=-1)
        return tuple(linears_on(img, (self.to_q, self.to_k, self.to_v)))

    def _txt_qkv(self, txt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fuse_qkv:
            return self.add_qkv_proj(txt).chunk(3, dim=-1)
        return tuple(linears_on(txt, (self.add_q_proj, self.add_k_proj, self.add_v_proj)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        iq, ik, iv = self._img_qkv(img)
        tq, tk, tv = self._txt_qkv(txt)
        q = torch.cat([self.norm_added_q(_split_heads(tq, d)),
                       self.norm_q(_split_heads(iq, d))], dim=1)
        k = torch.cat([self.norm_added_k(_split_heads(tk, d)),
                       self.norm_k(_split_heads(ik, d))], dim=1)
        v = torch.cat([_split_heads(tv, d), _split_heads(iv, d)], dim=1)
        bounds = None
        if self.attention == "fp8":
            bounds = (rms_rope_bound([self.norm_q, self.norm_added_q], d),
                      rms_rope_bound([self.norm_k, self.norm_added_k], d))
        out = _attention(q, k, v, rope, self.attention, bounds, self.sp)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class SelfAttention(nn.Module):
    """Attention of a single-stream block: QKV only, the output projection is the block's.
    fuse_qkv: one `to_qkv` projection instead of three."""

    def __init__(self, dim: int, heads: int, head_dim: int, fuse_qkv: bool = False,
                 fp8: bool = False):
        super().__init__()
        inner = heads * head_dim
        linear = make_linear(fp8)
        self.head_dim = head_dim
        self.fuse_qkv = fuse_qkv
        self.attention = "sdpa"  # FluxTransformer sets its build option
        self.sp = None  # kiln.sequence_parallel.enable sets it; None: the whole sequence here
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if fuse_qkv:
            self.to_qkv = linear(dim, 3 * inner)
        else:
            self.to_q = linear(dim, inner)
            self.to_k = linear(dim, inner)
            self.to_v = linear(dim, inner)

    def fused_parameters(self) -> dict[str, tuple[str, ...]]:
        if not self.fuse_qkv:
            return {}
        return {f"to_qkv.{n}": s for n, s in _qkv_names("to_q", "to_k", "to_v").items()}

    def qkv_linears(self) -> tuple[nn.Module, ...]:
        """The projections of the input, in order: (to_qkv,) or (to_q, to_k, to_v)."""
        return (self.to_qkv,) if self.fuse_qkv else (self.to_q, self.to_k, self.to_v)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.attend(linears_on(x, self.qkv_linears()), rope)

    def attend(self, projected: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
        """Attention of the outputs of qkv_linears() (one fused or three tensors)."""
        d = self.head_dim
        q, k, v = projected[0].chunk(3, dim=-1) if self.fuse_qkv else projected
        q = self.norm_q(_split_heads(q, d))
        k = self.norm_k(_split_heads(k, d))
        v = _split_heads(v, d)
        bounds = None
        if self.attention == "fp8":
            bounds = (rms_rope_bound([self.norm_q], d), rms_rope_bound([self.norm_k], d))
        return _attention(q, k, v, rope, self.attention, bounds, self.sp)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text streams, joint attention, AdaLN-Zero gating."""

    def __init__(self, dim: int, heads: int, head_dim: int, fuse_qkv: bool = False,
                 fp8: bool = False):
        super().__init__()
        self.norm1 = AdaModulation(dim, 6)
        self.norm1_context = AdaModulation(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, fuse_qkv, fp8)
        self.ff = GeluMLP(dim, MLP_RATIO * dim, fp8)
        self.ff_context = GeluMLP(dim, MLP_RATIO * dim, fp8)
        self.fused_quant = False  # FluxTransformer sets its build option (fp8 only)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mod = modulate_quant if self.fused_quant else modulate
        i_shift, i_scale, i_gate, i_mshift, i_mscale, i_mgate = self.norm1(temb)
        t_shift, t_scale, t_gate, t_mshift, t_mscale, t_mgate = self.norm1_context(temb)
        img_attn, txt_attn = self.attn(mod(img, i_shift, i_scale), mod(txt, t_shift, t_scale),
                                       rope)
        img = img + i_gate[:, None] * img_attn
        img = img + i_mgate[:, None] * self.ff(mod(img, i_mshift, i_mscale))
        txt = txt + t_gate[:, None] * txt_attn
        txt = txt + t_mgate[:, None] * self.ff_context(mod(txt, t_mshift, t_mscale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; image]: attention and MLP in parallel, one fused output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, fuse_qkv: bool = False,
                 fp8: bool = False):
        super().__init__()
        linear = make_linear(fp8)
        self.norm = AdaModulation(dim, 3)
        self.proj_mlp = linear(dim, MLP_RATIO * dim)
        self.attn = SelfAttention(dim, heads, head_dim, fuse_qkv, fp8)
        self.proj_out = linear(dim + MLP_RATIO * dim, dim)
        self.fused_quant = False  # FluxTransformer sets its build option (fp8 only)

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift, scale, gate = self.norm(temb)
        # One input for the attention projections and the MLP: fp8 quantizes it once (with
        # fused_quant in the modulation's kernel, and the output projection's input in the
        # GELU's).
        if self.fused_quant:
            h = modulate_quant(x, shift, scale)
            *qkv, mlp = linears_on(h, self.attn.qkv_linears() + (self.proj_mlp,))
            out = self.proj_out(gelu_quant(self.attn.attend(qkv, rope), mlp))
            return x + gate[:, None] * out
        h = modulate(x, shift, scale)
        *qkv, mlp = linears_on(h, self.attn.qkv_linears() + (self.proj_mlp,))
        mlp = F.gelu(mlp, approximate="tanh")
        out = self.proj_out(torch.cat([self.attn.attend(qkv, rope), mlp], dim=-1))
        return x + gate[:, None] * out


class OutputNorm(nn.Module):
    """AdaLayerNormContinuous: the modulation linear emits (scale, shift) in that order."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return layer_norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


# ---------------------------------------------------------------------------------------------


class FluxTransformer(nn.Module):
    """FluxTransformer2DModel. forward takes the packed latents and the rotary tables of
    [text; image] tokens; `components` builds those tables from the bucket. fuse_qkv and fp8:
    see the module docstring (fp8 needs every block width to be a multiple of 16)."""

    def __init__(self, config: dict, fuse_qkv: bool = False, fp8: bool = False,
                 attention: str = "sdpa", fused_quant: bool = False):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"flux transformer: attention {attention!r} is not one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if fused_quant and not fp8:
            raise ValueError("flux transformer: fused_quant quantizes fp8 linears' inputs; "
                             "it needs fp8")
        if int(config.get("patch_size", 1)) != 1:
            raise ValueError(f"flux transformer: patch_size {config['patch_size']} is not 1")
        heads = int(config["num_attention_heads"])
        head_dim = int(config["attention_head_dim"])
        self.axes_dims = [int(a) for a in config.get("axes_dims_rope", (16, 56, 56))]
        if sum(self.axes_dims) != head_dim:
            raise ValueError(f"flux transformer: axes_dims_rope {self.axes_dims} does not sum to "
                             f"attention_head_dim {head_dim}")
        dim = heads * head_dim
        in_channels = int(config["in_channels"])
        out_channels = int(config.get("out_channels") or in_channels)
        self.time_text_embed = TimeTextEmbed(dim, int(config["pooled_projection_dim"]),
                                             bool(config.get("guidance_embeds", False)))
        self.context_embedder = nn.Linear(int(config["joint_attention_dim"]), dim)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, head_dim, fuse_qkv, fp8)
            for _ in range(int(config["num_layers"])))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, head_dim, fuse_qkv, fp8)
            for _ in range(int(config["num_single_layers"])))
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, out_channels)
        for module in self.modules():
            if isinstance(module, (JointAttention, SelfAttention)):
                module.attention = attention
            if isinstance(module, (DoubleStreamBlock, SingleStreamBlock, GeluMLP)):
                module.fused_quant = fused_quant

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """hidden_states [B, S, in], encoder_hidden_states [B, L, joint], pooled [B, pooled],
        timestep / guidance [B] (sigma, guidance scale), rope: cos, sin [L+S, head_dim]."""
        dtype = hidden_states.dtype
        temb = self.time_text_embed(timestep.to(dtype) * 1000, guidance.to(dtype) * 1000,
                                    pooled_projections)
        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)
        n_txt = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        return self.proj_out(self.norm_out(x[:, n_txt:], temb))

    def rope_for(self, rows: int, cols: int, text_len: int, device=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for text_len text tokens followed by a rows x cols patch grid."""
        ids = torch.cat([text_ids(text_len, device), image_ids(rows, cols, device)], dim=0)
        return rope_tables(ids, self.axes_dims)
