"""Variants of kiln's fp8 attention kernel, measured side by side (issue 13 item 2: >= 900
TFLOP/s at [1, 24, 4608, 128], the fp8 transformer's error against eager bf16 <= 0.10):

    python3 bench/gpu/attn_lab.py --out DIR [--model DIR] [--parts speed,model] [--iters 30]

Parts:
  speed  every variant below at flux-dev's 1024^2 shape [1, 24, 4608, 128] (and 4544, the masked
         tail) on the same random inputs: ms, TFLOP/s, error against float32 attention, beside
         cuDNN bf16 and kiln's kernel as shipped (kiln.models.fp8_attention).
  model  the flux-dev transformer (bench/gpu/run.sh's synthetic weights, --model) at 1024^2,
         eager, one call: fp8 linears with each attention variant swapped in for kiln's
         (kiln.models.flux.fp8_sdpa), error of each against eager bf16 (cuDNN attention), as
         fp8_bench.py's step part measures it; plus fp8 linears with cuDNN bf16 attention.

Variants (constexpr switches of one kernel, `lab_kernel`; `lab_kernel_tma` loads through
Hopper's tensor memory accelerator, host-side descriptors):
  fold       the exponent as one FMA, qk * scale - (m - log2 P_MUL), P's scale folded into it
             (kiln's kernel: a multiply by the scale, a subtract, a multiply by P_MUL)
  lazy=T     the running max (and the rescale of acc and l) moves only when some row's max rose
             by more than T (log2 units) in this block; P then reaches at most P_MUL * 2^T, so
             P_MUL = 2^(8.8 - T) keeps it under e4m3's 448
  two_level  acc += dot(p, v) in float32 (a fresh tensor-core accumulator per block: Hopper's fp8
             MMA accumulates with fewer bits than float32)
  l_p8       the softmax sum of the e4m3-rounded P (the weights P @ V applies), not of P
  pv_bf16    P and V in bf16 (only Q K^T in fp8): half the FLOPs at the bf16 rate, V unquantized
  smooth_k   K minus its mean over the tokens (per head and channel) before quantization: the
             softmax of each row is unchanged, the logits' quantization error shrinks when K has
             a common offset
  ws         tl.range(..., warp_specialize=True) (Triton 3.6 has a Hopper pass for it)
  poly=1|2   `lab_kernel_poly`: each key block as two halves, the second half's exponentials
             (poly=1; both with 2) computed on the FMA pipe instead of the special function unit
             (Hopper's MUFU.EX2: 16 per clock per SM, as long per fp8 score as the tensor cores)
Writes DIR/attn-lab.json; prints one JSON line per measurement and a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines as B  # noqa: E402

from kiln.models import fp8_attention as fa  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
E4M3_MAX_LOG2 = math.log2(448.0)


@triton.jit
def lab_kernel(Q, K, V, QS, KS, VS, Out,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svx, sob, soh, son,
               H, N,
               SM_SCALE_LOG2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, P_LOG2: tl.constexpr,
               P_MUL: tl.constexpr, FOLD: tl.constexpr, LAZY: tl.constexpr, TWO_LEVEL: tl.constexpr,
               L_P8: tl.constexpr, PV_BF16: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = tl.load(QS + pid_bh) * tl.load(KS + pid_bh) * SM_SCALE_LOG2
    v_scale = tl.load(VS + pid_bh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None]
    if PV_BF16:  # V [B, H, N, D], D contiguous; svx: the stride along N
        v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svx + offs_d[None, :]
        v_step = BLOCK_N * svx
    else:        # Vt [B, H, D, N], N contiguous; svx: the stride along D
        v_ptrs = V + b * svb + h * svh + offs_d[None, :] * svx + offs_n[:, None]
        v_step = BLOCK_N
    if EVEN_N:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        if EVEN_N:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            cols = start_n + offs_n
            k = tl.load(k_ptrs, mask=cols[None, :] < N, other=0.0)
            if PV_BF16:
                v = tl.load(v_ptrs, mask=cols[:, None] < N, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=cols[:, None] < N, other=0.0)
        qk = tl.dot(q, k)
        if not EVEN_N:
            qk = tl.where((start_n + offs_n)[None, :] < N, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if LAZY > 0:
            if tl.max(m_new - m_i, 0) > LAZY:
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
        else:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        if FOLD:
            p = tl.math.exp2(qk * qk_scale - (m_i - P_LOG2)[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - m_i[:, None]) * P_MUL
        if PV_BF16:
            pq = p.to(tl.bfloat16)
        else:
            pq = p.to(tl.float8e4nv)
        if L_P8:
            l_i = l_i + tl.sum(pq.to(tl.float32), 1)
        else:
            l_i = l_i + tl.sum(p, 1)
        if TWO_LEVEL:
            acc += tl.dot(pq, v)
        else:
            acc = tl.dot(pq, v, acc)
        k_ptrs += BLOCK_N * skn
        v_ptrs += v_step
    out = acc * (v_scale / l_i)[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :]
    if EVEN_N:
        tl.store(o_ptrs, out.to(tl.bfloat16))
    else:
        tl.store(o_ptrs, out.to(tl.bfloat16), mask=offs_m[:, None] < N)


@triton.jit
def lab_kernel_tma(desc_q, desc_k, desc_v, desc_o, QS, KS, VS, N,
                   SM_SCALE_LOG2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, P_LOG2: tl.constexpr,
                   LAZY: tl.constexpr, WS: tl.constexpr):
    """q, k [BH, N, D] and vt [BH, D, N] through 3-D descriptors (rows past N read as zeros,
    stores past N dropped), out [BH, N, D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qk_scale = tl.load(QS + pid_bh) * tl.load(KS + pid_bh) * SM_SCALE_LOG2
    v_scale = tl.load(VS + pid_bh)
    start_m = pid_m * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    q = desc_q.load([pid_bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([pid_bh, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, k.T)
        if not EVEN_N:
            qk = tl.where((start_n + offs_n)[None, :] < N, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if LAZY > 0:
            if tl.max(m_new - m_i, 0) > LAZY:
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
        else:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.math.exp2(qk * qk_scale - (m_i - P_LOG2)[:, None])
        l_i = l_i + tl.sum(p, 1)
        v = desc_v.load([pid_bh, 0, start_n]).reshape(HEAD_DIM, BLOCK_N)
        acc = tl.dot(p.to(tl.float8e4nv), v.T, acc)
    out = acc * (v_scale / l_i)[:, None]
    desc_o.store([pid_bh, start_m, 0], out.to(tl.bfloat16).reshape(1, BLOCK_M, HEAD_DIM))


@triton.jit
def exp2_fma(x):
    """2^x on the FMA and integer pipes (no MUFU.EX2) for x <= 9: x clamped at -125 (the result
    stays a normal float32), n = round(x) by the 1.5 * 2^23 trick, 2^(x - n) by a cubic on
    [-0.5, 0.5] (relative error 2e-4, far under e4m3's 6 %), n added to the exponent bits."""
    x = tl.maximum(x, -125.0)
    j = x + 12582912.0
    f = x - (j - 12582912.0)
    p = 0.99998866 + f * (0.69324820 + f * (0.24180661 + f * 0.05484800))
    n = j.to(tl.int32, bitcast=True) - 0x4B400000
    return (p.to(tl.int32, bitcast=True) + (n << 23)).to(tl.float32, bitcast=True)


@triton.jit
def lab_kernel_poly(Q, K, Vt, QS, KS, VS, Out,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svd, sob, soh, son,
                    H, N,
                    SM_SCALE_LOG2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, P_LOG2: tl.constexpr,
                    POLY: tl.constexpr):
    """lab_kernel's fold variant with each key block taken as two halves (two Q K^T and two
    P V products of BLOCK_N / 2 keys): the first half's exponentials on MUFU, the second's on
    the FMA pipe (exp2_fma) when POLY == 1, both halves' when POLY == 2. Balances the special
    function unit, which at fp8 rates needs as long per score as the tensor cores do."""
    HALF: tl.constexpr = BLOCK_N // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = tl.load(QS + pid_bh) * tl.load(KS + pid_bh) * SM_SCALE_LOG2
    v_scale = tl.load(VS + pid_bh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    ka_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None]
    va_ptrs = Vt + b * svb + h * svh + offs_d[None, :] * svd + offs_n[:, None]
    if EVEN_N:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        if EVEN_N:
            k_a = tl.load(ka_ptrs)
            k_b = tl.load(ka_ptrs + HALF * skn)
            v_a = tl.load(va_ptrs)
            v_b = tl.load(va_ptrs + HALF)
        else:
            cols = start_n + offs_n
            k_a = tl.load(ka_ptrs, mask=cols[None, :] < N, other=0.0)
            k_b = tl.load(ka_ptrs + HALF * skn, mask=cols[None, :] + HALF < N, other=0.0)
            v_a = tl.load(va_ptrs, mask=cols[:, None] < N, other=0.0)
            v_b = tl.load(va_ptrs + HALF, mask=cols[:, None] + HALF < N, other=0.0)
        qk_a = tl.dot(q, k_a)
        qk_b = tl.dot(q, k_b)
        if not EVEN_N:
            qk_a = tl.where((start_n + offs_n)[None, :] < N, qk_a, float("-inf"))
            qk_b = tl.where((start_n + HALF + offs_n)[None, :] < N, qk_b, float("-inf"))
        m_new = tl.maximum(m_i, tl.maximum(tl.max(qk_a, 1), tl.max(qk_b, 1)) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
        shift = (m_i - P_LOG2)[:, None]
        if POLY == 2:
            p_a = exp2_fma(qk_a * qk_scale - shift)
        else:
            p_a = tl.math.exp2(qk_a * qk_scale - shift)
        if POLY >= 1:
            p_b = exp2_fma(qk_b * qk_scale - shift)
        else:
            p_b = tl.math.exp2(qk_b * qk_scale - shift)
        l_i = l_i + tl.sum(p_a, 1) + tl.sum(p_b, 1)
        acc = tl.dot(p_a.to(tl.float8e4nv), v_a, acc)
        acc = tl.dot(p_b.to(tl.float8e4nv), v_b, acc)
        ka_ptrs += BLOCK_N * skn
        va_ptrs += BLOCK_N
    out = acc * (v_scale / l_i)[:, None]
    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :]
    if EVEN_N:
        tl.store(o_ptrs, out.to(tl.bfloat16))
    else:
        tl.store(o_ptrs, out.to(tl.bfloat16), mask=offs_m[:, None] < N)


DEFAULT = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, fold=False, lazy=0.0,
               two_level=False, l_p8=False, pv_bf16=False, smooth_k=False, ws=False, tma=False,
               p_log2=8.0, poly=-1)


def p_log2_for(lazy: float) -> float:
    """The largest whole power of two for P that keeps P * 2^lazy under 448."""
    return float(math.floor(E4M3_MAX_LOG2 - lazy))


def run_variant(q8, k8, v_in, qs, ks, vs, cfg: dict) -> torch.Tensor:
    """q8, k8 [B, H, N, D] e4m3; v_in vt8 [B, H, D, N] e4m3, or v [B, H, N, D] bf16 with
    pv_bf16; scales [B, H] float32 -> bf16 [B, H, N, D]."""
    b, h, n, d = q8.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out = torch.empty((b, h, n, d), dtype=torch.bfloat16, device=q8.device)
    grid = (triton.cdiv(n, bm), b * h)
    even = n % bm == 0 and n % bn == 0
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["tma"]:
        bh = b * h
        desc_q = TensorDescriptor(q8, [bh, n, d], [n * d, d, 1], [1, bm, d])
        desc_k = TensorDescriptor(k8, [bh, n, d], [n * d, d, 1], [1, bn, d])
        desc_v = TensorDescriptor(v_in, [bh, d, n], [n * d, n, 1], [1, d, bn])
        desc_o = TensorDescriptor(out, [bh, n, d], [n * d, d, 1], [1, bm, d])
        lab_kernel_tma[grid](desc_q, desc_k, desc_v, desc_o, qs, ks, vs, n,
                             SM_SCALE_LOG2=LOG2E / math.sqrt(d), HEAD_DIM=d, BLOCK_M=bm,
                             BLOCK_N=bn, EVEN_N=even, P_LOG2=cfg["p_log2"], LAZY=cfg["lazy"],
                             WS=cfg["ws"], **launch)
        return out
    if cfg["poly"] >= 0:
        lab_kernel_poly[grid](q8, k8, v_in, qs, ks, vs, out,
                              q8.stride(0), q8.stride(1), q8.stride(2),
                              k8.stride(0), k8.stride(1), k8.stride(2),
                              v_in.stride(0), v_in.stride(1), v_in.stride(2),
                              out.stride(0), out.stride(1), out.stride(2), h, n,
                              SM_SCALE_LOG2=LOG2E / math.sqrt(d), HEAD_DIM=d, BLOCK_M=bm,
                              BLOCK_N=bn, EVEN_N=even, P_LOG2=cfg["p_log2"], POLY=cfg["poly"],
                              **launch)
        return out
    v_stride = v_in.stride(2)
    lab_kernel[grid](q8, k8, v_in, qs, ks, vs, out,
                     q8.stride(0), q8.stride(1), q8.stride(2),
                     k8.stride(0), k8.stride(1), k8.stride(2),
                     v_in.stride(0), v_in.stride(1), v_stride,
                     out.stride(0), out.stride(1), out.stride(2), h, n,
                     SM_SCALE_LOG2=LOG2E / math.sqrt(d), HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
                     EVEN_N=even, P_LOG2=cfg["p_log2"], P_MUL=2.0 ** cfg["p_log2"], FOLD=cfg["fold"], LAZY=cfg["lazy"],
                     TWO_LEVEL=cfg["two_level"], L_P8=cfg["l_p8"], PV_BF16=cfg["pv_bf16"],
                     WS=cfg["ws"], **launch)
    return out


def quantized_inputs(q, k, v, cfg: dict, q_bound=None, k_bound=None):
    """What the variant's kernel takes, from q, k, v [B, H, N, D] in the activation dtype."""
    if cfg["smooth_k"]:
        k = k - k.float().mean(dim=2, keepdim=True).to(k.dtype)
        k_bound = None if k_bound is None else 2 * k_bound
    q8, qs = fa.quantize_heads(q, bound=q_bound)
    k8, ks = fa.quantize_heads(k, bound=k_bound)
    if cfg["pv_bf16"]:
        v_in, vs = v.to(torch.bfloat16), torch.ones_like(qs)
    else:
        v_in, vs = fa.quantize_heads(v, transpose=True)
    return q8, k8, v_in, qs, ks, vs


def lab_sdpa(cfg: dict):
    def sdpa(q, k, v, q_bound=None, k_bound=None):
        fa.check_shapes(q)
        return run_variant(*quantized_inputs(q, k, v, cfg, q_bound, k_bound), cfg).to(q.dtype)
    return sdpa


def variants() -> list[tuple[str, dict]]:
    out = []

    def add(name, **kw):
        cfg = dict(DEFAULT)
        cfg.update(kw)
        if cfg["lazy"] > 0 and "p_log2" not in kw:
            cfg["p_log2"] = p_log2_for(cfg["lazy"])
        out.append((name, cfg))
    add("base 64/128 w4 s3")
    add("fold", fold=True)
    for bm, bn, w, s in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 2),
                         (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 4), (128, 256, 8, 2)):
        add(f"fold {bm}/{bn} w{w} s{s}", fold=True, BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
            num_stages=s)
    for lazy in (0.8, 1.8, 3.8):
        add(f"fold lazy={lazy}", fold=True, lazy=lazy)
        add(f"fold lazy={lazy} 128/128 w8 s2", fold=True, lazy=lazy, BLOCK_M=128, num_warps=8,
            num_stages=2)
    add("fold two_level", fold=True, two_level=True)
    add("fold l_p8", fold=True, l_p8=True)
    add("fold smooth_k", fold=True, smooth_k=True)
    add("fold pv_bf16", fold=True, pv_bf16=True)
    add("fold pv_bf16 128/64 w8 s3", fold=True, pv_bf16=True, BLOCK_M=128, BLOCK_N=64,
        num_warps=8)
    add("fold ws", fold=True, ws=True)
    add("fold ws 128/128 w8 s2", fold=True, ws=True, BLOCK_M=128, num_warps=8, num_stages=2)
    for poly in (0, 1, 2):
        add(f"halves poly={poly}", fold=True, poly=poly)
        add(f"halves poly={poly} 128/128 w8 s2", fold=True, poly=poly, BLOCK_M=128,
            num_warps=8, num_stages=2)
    add("halves poly=1 64/256 w4 s2", fold=True, poly=1, BLOCK_N=256, num_stages=2)
    for bm, bn, w, s in ((64, 128, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3)):
        add(f"tma {bm}/{bn} w{w} s{s}", tma=True, fold=True, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=w, num_stages=s)
    add("tma lazy=1.8 128/128 w8 s2", tma=True, fold=True, lazy=1.8, BLOCK_M=128, num_warps=8,
        num_stages=2)
    add("tma ws 128/128 w8 s2", tma=True, fold=True, ws=True, BLOCK_M=128, num_warps=8,
        num_stages=2)
    add("tma ws 128/128 w4 s2", tma=True, fold=True, ws=True, BLOCK_M=128, num_warps=4,
        num_stages=2)
    return out


def emit(report: dict, key: str, value) -> None:
    report[key] = value
    print(json.dumps({key: value}), flush=True)


def speed_part(report: dict, iters: int, device: str, n_list=(4608, 4544), heads=24, d=128):
    rows = []
    for n in n_list:
        g = torch.Generator(device=device).manual_seed(n)
        q, k, v = (torch.randn(1, n, heads, d, device=device, generator=g, dtype=torch.bfloat16
                               ).transpose(1, 2) for _ in range(3))
        # A common offset on K (as a layer's bias would leave), invisible to the softmax.
        k = k + 0.5 * torch.randn(1, heads, 1, d, device=device, generator=g,
                                  dtype=torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flop = 4.0 * n * n * d * heads
        if device == "cuda":
            ms = B.time_ms(lambda: F.scaled_dot_product_attention(q, k, v), iters,
                           warmup=3)["median"]
            rows.append({"variant": "sdpa bf16 (cuDNN/flash default)", "n": n, "ms": round(ms, 4),
                         "tflops": round(flop / ms / 1e9, 1),
                         "err_vs_fp32": B.rel_err(F.scaled_dot_product_attention(q, k, v), ref)})
            print(json.dumps(rows[-1]), flush=True)
            q8, qs = fa.quantize_heads(q)
            k8, ks = fa.quantize_heads(k)
            vt8, vs = fa.quantize_heads(v, transpose=True)
            ms = B.time_ms(lambda: fa.fp8_attention(q8, k8, vt8, qs, ks, vs), iters,
                           warmup=3)["median"]
            rows.append({"variant": "kiln kernel as shipped", "n": n, "ms": round(ms, 4),
                         "tflops": round(flop / ms / 1e9, 1),
                         "err_vs_fp32": B.rel_err(fa.fp8_attention(q8, k8, vt8, qs, ks, vs), ref)})
            print(json.dumps(rows[-1]), flush=True)
        for name, cfg in variants():
            if device != "cuda" and (cfg["tma"] or cfg["ws"]):
                continue
            row = {"variant": name, "n": n, "config": cfg}
            try:
                args = quantized_inputs(q, k, v, cfg)
                out = run_variant(*args, cfg)
                row["err_vs_fp32"] = B.rel_err(out, ref)
                row["finite"] = bool(torch.isfinite(out.float()).all())
                if device == "cuda":
                    ms = B.time_ms(lambda: run_variant(*args, cfg), iters,
                                   warmup=3)["median"]
                    row["ms"] = round(ms, 4)
                    row["tflops"] = round(flop / ms / 1e9, 1)
            except Exception as e:  # a variant Triton cannot compile here
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    emit(report, "speed", rows)


def model_part(report: dict, args) -> None:
    import gc

    from kiln import artifact_key as ak
    from kiln import components as C
    from kiln.models import flux
    bucket = ak.Bucket(batch=1, height=1024, width=1024, text_len=512)
    config = C.read_component_config(args.model, "transformer")
    host_inputs = B.make_inputs(config, bucket)
    inputs = [host_inputs[k].cuda() for k in B.ORDER]
    _, module = B.build(args.model, "bf16", bucket, {"attention": "cudnn", "fuse_qkv": False})
    with torch.no_grad():
        ref = module(*inputs)[0].float()
    del module
    gc.collect()
    torch.cuda.empty_cache()
    rows = []
    _, module = B.build(args.model, "fp8", bucket, {"attention": "cudnn", "fuse_qkv": False})
    with torch.no_grad():
        rows.append({"attention": "cuDNN bf16 (fp8 linears only)",
                     "err_vs_eager_bf16": B.rel_err(module(*inputs)[0].float(), ref)})
    print(json.dumps(rows[-1]), flush=True)
    del module
    gc.collect()
    torch.cuda.empty_cache()
    _, module = B.build(args.model, "fp8", bucket, {"attention": "fp8", "fuse_qkv": False})
    shipped = flux.fp8_sdpa
    picks = [("kiln kernel as shipped", None)] + [
        (name, cfg) for name, cfg in variants()
        if name in ("fold", "fold lazy=1.8", "fold lazy=3.8", "fold two_level", "fold l_p8",
                    "fold smooth_k", "fold pv_bf16", "halves poly=1")]
    picks.append(("fold l_p8 smooth_k", dict(DEFAULT, fold=True, l_p8=True, smooth_k=True)))
    picks.append(("fold p_log2=6", dict(DEFAULT, fold=True, p_log2=6.0)))
    try:
        for name, cfg in picks:
            flux.fp8_sdpa = shipped if cfg is None else lab_sdpa(cfg)
            row = {"attention": name}
            try:
                with torch.no_grad():
                    out = module(*inputs)[0].float()
                    torch.cuda.synchronize()
                    t0 = time.monotonic()
                    module(*inputs)
                    torch.cuda.synchronize()
                row["err_vs_eager_bf16"] = B.rel_err(out, ref)
                row["eager_step_s"] = round(time.monotonic() - t0, 3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        flux.fp8_sdpa = shipped
    emit(report, "model", rows)


def table(report: dict) -> str:
    lines = ["variant                                    N     ms  TFLOP/s  err vs fp32"]
    for r in report.get("speed", []):
        if "error" in r:
            lines.append(f"{r['variant']:<40} {r['n']:>5}  failed: {r['error'][:60]}")
            continue
        ms = f"{r['ms']:.4f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        lines.append(f"{r['variant']:<40} {r['n']:>5} {ms:>7} {tf:>8}  {r['err_vs_fp32']:.4f}")
    if report.get("model"):
        lines.append("")
        lines.append("flux-dev transformer 1024^2, eager, fp8 linears + attention: err vs eager bf16")
        for r in report["model"]:
            lines.append(f"  {r['attention']:<40} "
                         + (f"{r['err_vs_eager_bf16']:.4f}" if "err_vs_eager_bf16" in r
                            else "failed: " + r.get("error", "")[:80]))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--parts", default="speed,model")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", default="4608,4544", help="sequence lengths of the speed part")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "triton": triton.__version__, "torch": torch.__version__}
    parts = args.parts.split(",")
    try:
        if "speed" in parts:
            speed_part(report, args.iters, args.device,
                       tuple(int(x) for x in args.n.split(",")), args.heads, args.head_dim)
        if "model" in parts and args.model:
            model_part(report, args)
    finally:
        with open(os.path.join(args.out, "attn-lab.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = table(report)
        with open(os.path.join(args.out, "attn-lab-table.txt"), "w") as f:
            f.write(text + "\n")
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
