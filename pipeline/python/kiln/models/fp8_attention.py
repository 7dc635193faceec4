"""fp8 (e4m3) flash attention for Hopper, written in Triton and registered as the custom op
`kiln::fp8_attention`, so that torch.export keeps it as one node and AOTInductor compiles its
Triton kernel into the package (no Python at serving time).

Used by the fp8 precision's transformer when it is built with the model option
`attention: "fp8"` (kiln.models.flux `sdpa(..., backend="fp8")`); the option is part of the
compile options, so such a package has its own artifact key.

The function, for q, k, v [B, H, N, D] in the activation dtype (non-causal, no mask):
  1. each head's q, k and v is quantized tensor-wise (per batch row and head):
     scale = max(amax(|x|), 1e-12) / 448, x8 = e4m3(x / scale) (quantize_heads); for the
     transformer's q and k the scale comes from a bound known from the QK-norm weights instead
     (kiln.models.flux.rms_rope_bound), so their quantization needs no pass of its own; v is written
     transposed, [B, H, D, N], because Hopper's fp8 tensor-core instruction (wgmma) wants both
     operands of P @ V contiguous along the reduced dimension;
  2. the kernel walks K and V in blocks of BLOCK_N keys for each block of BLOCK_M queries:
     s = (q8 @ k8^T) * q_scale * k_scale / sqrt(D) in float32 (fp8 products, float32
     accumulation), online softmax in float32 (running max m and sum l, base-2 exponentials),
     p = e4m3(exp(s - m) * 256), out = sum over blocks of p @ v8, each block's product from a
     zero tensor-core accumulator added to the running sum in float32 ("two-level"
     accumulation); out * v_scale / (256 * l) in bf16. P is scaled by 256 (a power of two:
     exact; folded into the exponent, one FMA) before its fp8 rounding so that small
     probabilities stay normal e4m3 numbers instead of flushing to the subnormal range.
     Why two levels: Hopper's fp8 tensor-core instruction adds its products into the
     accumulator it is given with fewer bits than float32, so letting it carry the sum over
     all 4608 keys of a flux-dev row (the form `tl.dot(p, v, acc)`) lost precision: the fp8
     transformer's error against eager bf16 was 0.1017 with that form and 0.0736 with two
     levels (fp8 linears alone: 0.0731), for ~5 % of the kernel's time
     (bench/results/2026-12-07-h100-attn-lab/; DeepSeek-V3 reports the same accumulator
     limit for fp8 GEMMs and promotes to float32 every 128 products).

On a CPU, or where Triton is not installed, the op runs `attention_reference`, which computes the
same function (same quantization, same block walk, same fp8 rounding of P) with torch ops in
float32; tests/pipeline/python/test_fp8_attention.py checks it against PyTorch's attention, and
bench/gpu/fp8_bench.py checks the Triton kernel against it and against float32 attention.
"""
from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_EPS = 1e-12
P_LOG2 = 8
P_SCALE = float(2 ** P_LOG2)   # P is multiplied by this (exactly) before its e4m3 rounding
LOG2E = 1.4426950408889634

try:  # Triton ships with CUDA builds of torch; the CPU build used by `make test` has none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None

# Launch configuration of the kernel: BLOCK_M queries per program, BLOCK_N keys per inner step.
# Chosen by bench/gpu/fp8_bench.py's sweep of this kernel (two-level accumulation) on the H100,
# 2026-12-07: 64/128, 4 warps, 3 stages 0.351 ms (743 TFLOP/s) at [1, 24, 4608, 128]; next
# 128/128/8/4 0.399 and 64/64/4/4 0.401 (bench/results/2026-12-07-h100-attn-lab/). Keep BLOCK_M
# and BLOCK_N multiples of 16 (fp8 tensor-core tiles).
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}


def quantize_heads(x: torch.Tensor, transpose: bool = False, bound: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, scale) for x [B, H, N, D]: scale float32 [B, H] = max(amax(|x[b, h]|), eps) / 448 and
    x8 = e4m3(x / scale), [B, H, N, D] contiguous, or [B, H, D, N] contiguous with `transpose`.
    With `bound` (a 0-d tensor >= every |x|, known without reading x), every head's scale is
    bound / 448 instead: the cast is then elementwise and fuses into the kernel producing x
    (e4m3 is a floating-point format: a looser scale costs no relative precision until values
    fall under its smallest normal, 2^-6 of the scale). Division by a tensor (not by a scalar)
    keeps CPU and GPU rounding identical."""
    xf = x.float()
    if bound is None:
        amax = xf.abs().amax(dim=(-2, -1))
    else:
        amax = bound.float().expand(x.shape[:2])
    amax = amax.clamp(min=SCALE_EPS)
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (xf / scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if transpose:
        q = q.transpose(-2, -1)
    return q.contiguous(), scale


def attention_reference(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor,
                        q_scale: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                        block_n: int = CONFIG["BLOCK_N"], quantize_p: bool = True
                        ) -> torch.Tensor:
    """What the kernel computes, with torch ops in float32 (any device): q8, k8 [B, H, N, D] and
    vt8 [B, H, D, N] float8_e4m3fn, scales float32 [B, H] -> bf16 [B, H, N, D]. Keys are walked in
    blocks of `block_n` with the online softmax; `quantize_p=False` keeps P in float32 (then
    the result is exact softmax attention of the dequantized inputs, up to float32 rounding)."""
    b, h, n, d = q8.shape
    sm = (q_scale * k_scale * (LOG2E / math.sqrt(d))).float()[:, :, None, None]
    q = q8.float()
    k = k8.float()
    v = vt8.float().transpose(-2, -1)
    m = torch.full((b, h, n, 1), float("-inf"), device=q8.device)
    l_sum = torch.zeros((b, h, n, 1), device=q8.device)
    acc = torch.zeros((b, h, n, d), device=q8.device)
    for start in range(0, n, block_n):
        s = (q @ k[:, :, start:start + block_n].transpose(-2, -1)) * sm
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp2(s - m_new)
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(dim=-1, keepdim=True)
        if quantize_p:
            p = (p * P_SCALE).to(FP8_DTYPE).float()
        else:
            p = p * P_SCALE
        acc = acc * alpha + p @ v[:, :, start:start + block_n]
        m = m_new
    out = acc * (v_scale.float()[:, :, None, None] / (l_sum * P_SCALE))
    return out.to(torch.bfloat16)


if triton is not None:

    @triton.jit
    def fp8_attention_fwd_kernel(
            Q, K, Vt, QS, KS, VS, Out,
            stride_qb, stride_qh, stride_qn,
            stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vd,
            stride_ob, stride_oh, stride_on,
            H, N,
            SM_SCALE_LOG2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            EVEN_N: tl.constexpr, P_LOG2: tl.constexpr):
        """One program: BLOCK_M queries of one (batch row, head). Last dims are contiguous
        (q, k: D; vt: N; out: D). The softmax scale is a constexpr: a float argument would be
        typed fp64 by Inductor's launcher and turn the whole softmax into fp64."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        qk_scale = tl.load(QS + pid_bh) * tl.load(KS + pid_bh) * SM_SCALE_LOG2
        v_scale = tl.load(VS + pid_bh)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = Vt + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd + offs_n[:, None]
        if EVEN_N:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            if EVEN_N:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                cols = start_n + offs_n
                k = tl.load(k_ptrs, mask=cols[None, :] < N, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < N, other=0.0)
            qk = tl.dot(q, k)
            if not EVEN_N:
                qk = tl.where((start_n + offs_n)[None, :] < N, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            alpha = tl.math.exp2(m_i - m_new)
            m_i = m_new
            # P * 2^P_LOG2 = 2^(s - m + P_LOG2): the scale, the max and P's factor in one FMA.
            p = tl.math.exp2(qk * qk_scale - (m_i - P_LOG2)[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # Two-level accumulation: each block's P @ V starts from a zero tensor-core
            # accumulator and is added to acc in float32 (module docstring).
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N
        out = acc * (v_scale / l_i)[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        if EVEN_N:
            tl.store(o_ptrs, out.to(tl.bfloat16))
        else:
            tl.store(o_ptrs, out.to(tl.bfloat16), mask=offs_m[:, None] < N)


def _quiet_without_triton(register):
    """torch.library.triton_op warns once per registration when Triton is absent (the CPU build
    `make test` uses); there the op runs its reference on purpose, so the warning is noise."""
    if triton is not None:
        return register
    import logging

    def quiet(fn):
        log = logging.getLogger("torch._library.triton")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            return register(fn)
        finally:
            log.setLevel(level)
    return quiet


@_quiet_without_triton(torch.library.triton_op("kiln::fp8_attention", mutates_args=()))
def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                  k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """Attention of e4m3 q8, k8 [B, H, N, D] and vt8 [B, H, D, N] (all contiguous) with float32
    scales [B, H] (quantize_heads) -> bf16 [B, H, N, D] (on CUDA token-major in memory: a
    transpose of a contiguous [B, N, H, D]). The Triton kernel on CUDA; elsewhere
    attention_reference (the same function)."""
    if not q8.is_cuda or triton is None:
        return attention_reference(q8, k8, vt8, q_scale, k_scale, v_scale)
    b, h, n, d = q8.shape
    # Written token-major ([B, N, H, D] in memory, viewed as [B, H, N, D]), as cuDNN's SDPA
    # leaves it: the model's transpose to [B, N, H * D] for the output projection is then a view,
    # not a copy (or a strided read inside the next kernel, which ran at ~1 TB/s).
    out = torch.empty((b, n, h, d), dtype=torch.bfloat16, device=q8.device).transpose(1, 2)
    block_m, block_n = CONFIG["BLOCK_M"], CONFIG["BLOCK_N"]
    even = n % block_m == 0 and n % block_n == 0
    grid = (triton.cdiv(n, block_m), b * h)
    torch.library.wrap_triton(fp8_attention_fwd_kernel)[grid](
        q8, k8, vt8, q_scale, k_scale, v_scale, out,
        q8.stride(0), q8.stride(1), q8.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, n,
        SM_SCALE_LOG2=LOG2E / math.sqrt(d), HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=even,
        P_LOG2=P_LOG2,
        num_warps=CONFIG["num_warps"], num_stages=CONFIG["num_stages"])
    return out


def check_shapes(q: torch.Tensor) -> None:
    """ValueError unless q [B, H, N, D] has a head dim the kernel takes (a multiple of 16, at
    most 256: one fp8 tensor-core tile row per 16 channels, the whole head in registers)."""
    d = q.shape[-1]
    if q.ndim != 4 or d % 16 or d > 256:
        raise ValueError(f"fp8 attention: head dim {d} of shape {list(q.shape)} must be a "
                         f"multiple of 16 and at most 256")


def fp8_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             q_bound: torch.Tensor | None = None, k_bound: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Non-causal attention of q, k, v [B, H, N, D] through fp8: quantize each head (q and k
    with the scales their bounds give, when given: see quantize_heads), run
    kiln::fp8_attention; returns the activation dtype of q."""
    check_shapes(q)
    q8, qs = quantize_heads(q, bound=q_bound)
    k8, ks = quantize_heads(k, bound=k_bound)
    vt8, vs = quantize_heads(v, transpose=True)
    return fp8_attention(q8, k8, vt8, qs, ks, vs).to(q.dtype)
