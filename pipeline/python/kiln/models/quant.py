"""Load-time derived constants and fp8 (e4m3) linears.

A package may ask for constants that are not checkpoint tensors as they are but are derived from
them when the weights are loaded: a fused QKV weight (the dim-0 concatenation of to_q, to_k, to_v)
or an fp8 weight and its row-wise scale computed from a bf16/fp32 checkpoint weight. The
checkpoint keeps its names; kiln-compile records each derivation in the package manifest
(`"derive": {"op": ..., "from": [checkpoint names]}`) and the C++ loader
(pipeline/weights.cc, ComponentWeights::Gather) computes it on the device. The functions here are
the Python twins of those ops, used by kiln.components.load_weights to run modules eagerly; both
sides must produce the same bytes (tests/pipeline/weights_test.cc checks that).

Modules declare what they derive, with names relative to themselves:
  - `fused_parameters()` -> {name: (checkpoint names...)}: the parameter is the dim-0 concatenation
    of those checkpoint tensors (op "concat0");
  - `quantized_parameters()` -> {name: (op, logical name)}: the parameter is `op` applied to the
    logical tensor `logical name`, which is a checkpoint tensor or a fused parameter (in which case
    the op reads the fused parameter's sources directly, in float32).
`derivations(model)` collects both into absolute names.

The ops (all sources are first concatenated on dim 0):
  concat0            cast to the constant's dtype, concatenate.
  fp8_rowwise        in float32: scale[r] = max(amax(|w[r, :]|), 1e-12) / 448,
                     q = (w / scale).clamp(-448, 448) -> float8_e4m3fn [out, in].
  fp8_rowwise_scale  that scale, float32 [1, out] (torch._scaled_mm's scale_b layout).
Every step is an exactly rounded IEEE operation (division by a tensor, not by a scalar: CUDA turns
`x / scalar` into `x * (1 / scalar)`), so CPU and GPU produce identical bytes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0      # largest finite float8_e4m3fn
SCALE_EPS = 1e-12    # floor of amax: an all-zero row gets a tiny scale instead of 0 / 0
MM_ALIGN = 16        # torch._scaled_mm needs K and N to be multiples of 16

OPS = ("concat0", "fp8_rowwise", "fp8_rowwise_scale")
_OP_DTYPE = {"fp8_rowwise": FP8_DTYPE, "fp8_rowwise_scale": torch.float32}


@dataclasses.dataclass(frozen=True)
class Derive:
    """How one package constant is computed from checkpoint tensors at weight-load time."""

    op: str                  # one of OPS
    sources: tuple[str, ...]  # checkpoint names, concatenated on dim 0 in this order

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"derive: op {self.op!r} is not one of {OPS}")
        if not self.sources:
            raise ValueError(f"derive: {self.op} needs at least one source")

    def to_json(self) -> dict:
        return {"op": self.op, "from": list(self.sources)}


def _amax_scale(w: torch.Tensor) -> torch.Tensor:
    """[rows, 1] float32 scale of a float32 [rows, cols] matrix: max(amax, eps) / 448."""
    amax = w.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    return amax / torch.full_like(amax, FP8_MAX)


def fp8_rowwise(sources: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [out, in], scale float32 [1, out]) with w ~= q * scale.t() for the dim-0
    concatenation w of `sources` (2-D, any float dtype), computed in float32 on their device."""
    w = torch.cat([s.to(torch.float32) for s in sources], dim=0)
    if w.ndim != 2:
        raise ValueError(f"fp8_rowwise: sources must be 2-D, got shape {list(w.shape)}")
    scale = _amax_scale(w)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(1, -1)


def derive(op: str, sources: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The constant `op` makes of `sources` (checkpoint tensors, in order) in `dtype`."""
    if op == "concat0":
        return torch.cat([s.to(dtype) for s in sources], dim=0)
    if op not in _OP_DTYPE:
        raise ValueError(f"derive: unknown op {op!r}")
    if dtype != _OP_DTYPE[op]:
        raise ValueError(f"derive: {op} makes {_OP_DTYPE[op]}, not {dtype}")
    q, scale = fp8_rowwise(sources)
    return q if op == "fp8_rowwise" else scale


def derivations(model: nn.Module) -> dict[str, Derive]:
    """Absolute constant name -> Derive for every derived parameter of `model` (see the module
    docstring); names absent from the result are checkpoint tensors as they are."""
    fused: dict[str, tuple[str, ...]] = {}
    quantized: dict[str, tuple[str, str]] = {}
    for prefix, module in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if hasattr(module, "fused_parameters"):
            for name, sources in module.fused_parameters().items():
                fused[p + name] = tuple(p + s for s in sources)
        if hasattr(module, "quantized_parameters"):
            for name, (op, logical) in module.quantized_parameters().items():
                quantized[p + name] = (op, p + logical)
    out = {name: Derive("concat0", sources) for name, sources in fused.items()}
    for name, (op, logical) in quantized.items():
        out[name] = Derive(op, fused.get(logical, (logical,)))
    return out


class QuantizedRows(NamedTuple):
    """An activation quantized by rows, as Fp8Linear takes it (kiln.models.fused_quant makes
    them): xq e4m3 [M, K], scale float32 [M, 1], lead the activation's shape without its last
    dim (prod(lead) = M)."""

    xq: torch.Tensor
    scale: torch.Tensor
    lead: torch.Size

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lead, self.xq.shape[-1]))


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in float8_e4m3fn and a float32 scale per output row (derived from the
    checkpoint weight at load time), x quantized per token (row) on the fly: scale_a =
    max(amax(|x_row|), eps) / 448 (float32 [M, 1]), then one torch._scaled_mm with bf16 output.

    Parameter names: `weight` (float8_e4m3fn [out, in]), `weight_scale` (float32 [1, out]),
    `bias` (activation dtype [out], a checkpoint tensor). Keeps its dtypes when the model is cast
    (KEEP_DTYPE, honoured by kiln.components.build)."""

    KEEP_DTYPE = ("weight", "weight_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features % MM_ALIGN or out_features % MM_ALIGN:
            raise ValueError(f"Fp8Linear({in_features}, {out_features}): torch._scaled_mm needs "
                             f"both sizes to be multiples of {MM_ALIGN}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1, out_features, dtype=torch.float32),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def quantized_parameters(self) -> dict[str, tuple[str, str]]:
        return {"weight": ("fp8_rowwise", "weight"),
                "weight_scale": ("fp8_rowwise_scale", "weight")}

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):
            return self.forward_quantized(x.xq, x.scale, x.lead)
        xq, scale_a = quantize_rows(x)
        return self.forward_quantized(xq, scale_a, x.shape[:-1])

    def forward_quantized(self, xq: torch.Tensor, scale_a: torch.Tensor, lead: torch.Size
                          ) -> torch.Tensor:
        """The linear of an input already quantized by quantize_rows (xq [M, in], scale_a
        [M, 1]); `lead` is the input's shape without its last dim."""
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.weight_scale,
                             bias=bias, out_dtype=torch.bfloat16)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, e4m3 row-wise"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fp8Linear's activation quantization of x [..., K]: (xq float8_e4m3fn [M, K], scale_a
    float32 [M, 1]) over the M = prod(lead) rows, scale_a = max(amax(|row|), eps) / 448."""
    xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
    scale_a = _amax_scale(xf)
    return (xf / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_a


def linears_on(x: torch.Tensor, linears: Sequence[nn.Module]) -> list[torch.Tensor]:
    """[linear(x) for linear in linears], with one quantization of x shared by all of them when
    they are all Fp8Linear (same result as quantizing for each: the quantization is a function
    of x alone). The producer of x (norm + modulation) then fuses with a single amax + cast
    instead of one per consumer. x may be quantized already (QuantizedRows: every linear must
    then be an Fp8Linear)."""
    if isinstance(x, QuantizedRows):
        return [m(x) for m in linears]
    if len(linears) > 1 and all(isinstance(m, Fp8Linear) for m in linears):
        xq, scale_a = quantize_rows(x)
        return [m.forward_quantized(xq, scale_a, x.shape[:-1]) for m in linears]
    return [m(x) for m in linears]


def make_linear(fp8: bool):
    """Factory of the linears a model quantizes: nn.Linear, or Fp8Linear when `fp8`."""
    return Fp8Linear if fp8 else nn.Linear
