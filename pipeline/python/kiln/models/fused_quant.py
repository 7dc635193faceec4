"""fp8 activation quantization fused into the kernels that produce the activations: two Triton
kernels registered as the custom ops `kiln::modulate_quant` and `kiln::gelu_quant`, so that
torch.export keeps each as one node and AOTInductor compiles the kernel into the package.

Used by the fp8 transformer built with the model option `fused_quant: true` (a compile option,
so such a package has its own artifact key). Without it, each Fp8Linear input is quantized by
`quantize_rows` after its producer: Inductor fuses the two, but the row amax of a 3,072- or
15,360-wide row is a looped reduction there (the row does not stay in registers), so the
producer's math runs twice and the row is read twice. On the H100 those kernels took 28.3 ms of
a 108 ms flux-dev step against bf16's 18.5 ms of elementwise work
(bench/results/2026-12-07-h100-attn-lab/). Here one program owns one row and reads it from
memory once. Measured on the H100 (bench/results/2026-12-07-fused-quant/, kiln's regional fp8
transformer with fp8 attention, same run): 107.50 -> 105.34 ms per step, the elementwise time
28.2 -> 26.0 ms, the error against eager bf16 0.0738 -> 0.0736.

The functions (every step in float32, rounded once to e4m3 at the end; rows r of M):
  modulate_quant(x [B, N, D], shift [B, D], scale [B, D]):
      y = layer_norm(x[b, n]) (no affine, eps 1e-6) * (1 + scale[b]) + shift[b]
      -> quantize_rows(y): the adaptive LayerNorm's modulation (kiln.models.flux.modulate) and
      Fp8Linear's activation quantization in one pass;
  gelu_quant(a [M, Ka] or None, m [M, Km]):
      y = cat(a, gelu_tanh(m)) -> quantize_rows(y): a double block's MLP activation (a None),
      or a single block's concatenation of attention output and MLP activation before its
      output projection.
  quantize_rows(y) = (e4m3(clamp(y / s, +-448)), s) with s[r] = max(amax(|y[r]|), 1e-12) / 448,
      as kiln.models.quant.quantize_rows (y / s divided, not multiplied by 1 / s).

The unfused path rounds the producer's output to bf16 before quantizing (eager) or not (Inductor
keeps fused intermediates in float32); the fused ops never do. On a CPU, or where Triton is not
installed, each op runs its reference, which computes the same function with torch ops
(tests/pipeline/python/test_fused_quant.py); bench/gpu/fused_quant_bench.py checks the Triton
kernels against the references and times them against Inductor's fusion of the unfused path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from kiln.models import quant
from kiln.models.quant import QuantizedRows
from kiln.models.fp8_attention import _quiet_without_triton

LN_EPS = 1e-6
GELU_C = math.sqrt(2.0 / math.pi)  # gelu(x, "tanh") = x/2 (1 + tanh(c (x + 0.044715 x^3)))

try:  # Triton ships with CUDA builds of torch; the CPU build used by `make test` has none.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None


# ---------------------------------------------------------------------------------------------
# References: the functions the kernels compute, in torch ops.


def modulate_quant_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.to(torch.float32)
    y = F.layer_norm(xf, (xf.shape[-1],), eps=LN_EPS)
    y = y * (1 + scale.to(torch.float32)[:, None, :]) + shift.to(torch.float32)[:, None, :]
    return quant.quantize_rows(y)


def gelu_quant_reference(a: Optional[torch.Tensor], m: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    y = F.gelu(m.to(torch.float32), approximate="tanh")
    if a is not None:
        y = torch.cat([a.to(torch.float32), y], dim=-1)
    return quant.quantize_rows(y)


# ---------------------------------------------------------------------------------------------
# Kernels: one program per row.

if triton is not None:
    @triton.jit
    def _quantize_store(y, mask, q_ptrs, s_ptr, amax):
        s = tl.maximum(amax, 1e-12) / 448.0
        q = tl.clamp(libdevice.div_rn(y, s), -448.0, 448.0)
        tl.store(q_ptrs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr, s)

    @triton.jit
    def modulate_quant_kernel(X, SHIFT, SCALE, Q, S, n_tok, D, stride_xm, stride_sb,
                              BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = row // n_tok
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        rstd = 1.0 / tl.sqrt_rn(var + 1e-6)
        sc = tl.load(SCALE + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, (xc * rstd) * (1.0 + sc) + sh, 0.0)
        amax = tl.max(tl.abs(y), axis=0)
        _quantize_store(y, mask, Q + row * D + offs, S + row, amax)

    @triton.jit
    def _gelu_tanh(m):
        return 0.5 * m * (1.0 + libdevice.tanh(0.7978845608028654 * (m + 0.044715 * m * m * m)))

    @triton.jit
    def gelu_quant_kernel(A, M, Q, S, KA, KM, stride_am, stride_mm, HAS_A: tl.constexpr,
                          CHUNK: tl.constexpr):
        # Two passes over the row in chunks: the amax, then the quantized values. The second
        # pass reads the row again from L2 (the first just brought it there: one program's row
        # is 24-30 KB, all programs resident at once a few MB), so DRAM sees each byte once;
        # the GELU is computed twice. Holding a 15,360-wide row in registers instead (one pass)
        # ran at ~600 GB/s on the H200: too few programs per SM to hide the loads.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, CHUNK)
        m_row = M + row * stride_mm
        a_row = A + row * stride_am
        acc = tl.zeros([CHUNK], dtype=tl.float32)  # running max of |y| per lane
        for start in range(0, KM, CHUNK):
            mask = start + offs < KM
            m = tl.load(m_row + start + offs, mask=mask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
            acc = tl.maximum(acc, tl.abs(_gelu_tanh(m)))
        if HAS_A:
            for start in range(0, KA, CHUNK):
                mask = start + offs < KA
                a = tl.load(a_row + start + offs, mask=mask, other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
                acc = tl.maximum(acc, tl.abs(a))
        s = tl.maximum(tl.max(acc, axis=0), 1e-12) / 448.0
        q_row = Q + row * (KA + KM)
        if HAS_A:
            for start in range(0, KA, CHUNK):
                mask = start + offs < KA
                a = tl.load(a_row + start + offs, mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                q = tl.clamp(libdevice.div_rn(a, s), -448.0, 448.0)
                tl.store(q_row + start + offs, q.to(tl.float8e4nv), mask=mask)
        for start in range(0, KM, CHUNK):
            mask = start + offs < KM
            m = tl.load(m_row + start + offs, mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            q = tl.clamp(libdevice.div_rn(_gelu_tanh(m), s), -448.0, 448.0)
            tl.store(q_row + KA + start + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(S + row, s)


# Launch configurations (bench/gpu/fused_quant_bench.py --sweep picks them on the GPU host):
# modulate_quant holds a row in registers (BLOCK_D = the row's width rounded up to a power of 2);
# gelu_quant walks its row in CHUNK-wide pieces. Swept on the H100, 2026-12-07, GPU ms per
# flux-dev step (bench/results/2026-12-07-fused-quant/): modulate 4 warps 2.86 (2: 3.10, 8: 3.05,
# 16: 3.43); gelu CHUNK 2048 / 8 warps 10.63 (1024/4 10.76, 1024/8 10.83, 4096/16 10.99,
# 4096/4 16.60).
MODULATE_CONFIG = {"num_warps": 4}
GELU_CONFIG = {"CHUNK": 2048, "num_warps": 8}


def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


@_quiet_without_triton(torch.library.triton_op("kiln::modulate_quant", mutates_args=()))
def modulate_quant_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq e4m3 [B*N, D], s float32 [B*N, 1]) for x [B, N, D], shift and scale [B, D]: see the
    module docstring. The Triton kernel on CUDA; elsewhere modulate_quant_reference."""
    if not _use_kernel(x):
        return modulate_quant_reference(x, shift, scale)
    b, n, d = x.shape
    x2 = x.reshape(b * n, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    shift, scale = shift.contiguous(), scale.contiguous()
    q = torch.empty((b * n, d), dtype=quant.FP8_DTYPE, device=x.device)
    s = torch.empty((b * n, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(d)
    torch.library.wrap_triton(modulate_quant_kernel)[(b * n,)](
        x2, shift, scale, q, s, n, d, x2.stride(0), shift.stride(0), BLOCK_D=block,
        num_warps=MODULATE_CONFIG["num_warps"])
    return q, s


@_quiet_without_triton(torch.library.triton_op("kiln::gelu_quant", mutates_args=()))
def gelu_quant_op(a: Optional[torch.Tensor], m: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq e4m3 [M, Ka + Km], s float32 [M, 1]) for a [M, Ka] (or None) and m [M, Km]: see the
    module docstring. The Triton kernel on CUDA; elsewhere gelu_quant_reference."""
    if not _use_kernel(m):
        return gelu_quant_reference(a, m)
    rows, km = m.shape
    ka = 0 if a is None else a.shape[-1]
    if m.stride(-1) != 1:
        m = m.contiguous()
    if a is not None and a.stride(-1) != 1:
        a = a.contiguous()
    q = torch.empty((rows, ka + km), dtype=quant.FP8_DTYPE, device=m.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=m.device)
    torch.library.wrap_triton(gelu_quant_kernel)[(rows,)](
        m if a is None else a, m, q, s, ka, km, 0 if a is None else a.stride(0), m.stride(0),
        HAS_A=a is not None, CHUNK=GELU_CONFIG["CHUNK"], num_warps=GELU_CONFIG["num_warps"])
    return q, s


# ---------------------------------------------------------------------------------------------
# What the model calls.


def modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> QuantizedRows:
    """kiln.models.flux.modulate(x, shift, scale) quantized for Fp8Linear, in one kernel."""
    q, s = modulate_quant_op(x, shift, scale)
    return QuantizedRows(q, s, x.shape[:-1])


def gelu_quant(a: Optional[torch.Tensor], m: torch.Tensor) -> QuantizedRows:
    """cat(a, gelu_tanh(m), dim=-1) (a may be None) quantized for Fp8Linear, in one kernel;
    a and m [..., K] with the same leading dims."""
    lead = m.shape[:-1]
    a2 = None if a is None else a.reshape(-1, a.shape[-1])
    q, s = gelu_quant_op(a2, m.reshape(-1, m.shape[-1]))
    return QuantizedRows(q, s, lead)
