"""fp8 measurements of issue 13 on the GPU host, side by side in one process (bench/gpu/run.sh
stage `fp8`):

    python3 bench/gpu/fp8_bench.py --out DIR [--model DIR] [--parts attention,gemm,step,block]
        [--height 1024 --width 1024 --text-len 512] [--iters 10]

Parts:
  sweep      (on request) launch configurations of kiln's fp8 attention kernel at flux-dev's
             1024^2 shape [1, 24, 4608, 128]; the fastest is used by the later parts.
  attention  kiln's fp8 attention kernel (kiln.models.fp8_attention) at each bucket's
             sequence length (512^2, 768^2, 1024^2, and 1024x1008 whose 4544 tokens take the
             masked tail path): ms and TFLOP/s of cuDNN bf16 SDPA, of the fp8 kernel alone (inputs
             already quantized) and of fp8_sdpa under torch.compile (quantization included);
             error of each against float32 attention, and of the kernel against its reference
             (attention_reference on the GPU: the same function).
  gemm       torch._scaled_mm row-wise against tensor-wise scaling at the transformer's linear
             shapes (image stream M = 4096 + 512 tokens, text M = 512), GEMM alone and with the
             activation quantization each needs (compiled), against bf16 torch.mm; and the
             block-wise forms of torch.nn.functional.scaled_mm (activations 1x128 with weights
             128x128 or 1x128).
  step       one transformer call at the bucket, eager and regional torch.compile, for bf16
             (cuDNN), fp8 (cuDNN) and fp8 with fp8 attention: ms, TFLOP/s, error against eager
             bf16, GPU time per kernel class; writes inputs.safetensors and ref-eager-*.safetensors
             for kiln-bench. Needs --model (bench/gpu/run.sh's synthetic flux-dev).
  block      AOTInductor compile of one double- and one single-stream block with fp8 attention
             (export + compile seconds, and whether the package holds the Triton kernel).
Writes DIR/fp8.json; prints one JSON line per measurement and a table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import zipfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as B  # noqa: E402

from kiln import artifact_key as ak  # noqa: E402
from kiln import components as C  # noqa: E402
from kiln.models import fp8_attention as fa  # noqa: E402
from kiln.models import quant  # noqa: E402

# The step part's variants (--step-variants): precision:attention[:fq], "fq" building the model
# with fused quantization (kiln.models.fused_quant); the first is the reference of the errors.
VARIANTS = "bf16:cudnn,fp8:cudnn,fp8:fp8"


def variant_tag(variant: str) -> str:
    """bf16:cudnn -> bf16, fp8:fp8 -> fp8-attn, fp8:fp8:fq -> fp8-attn-fq."""
    precision, attention, *rest = variant.split(":")
    return precision + ("-attn" if attention == "fp8" else "") + ("-fq" if "fq" in rest else "")


def emit(report: dict, key: str, value) -> None:
    report[key] = value
    print(json.dumps({key: value}), flush=True)


def qkv(n: int, heads: int = 24, d: int = 128, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # The model's layout: [B, N, H, D] transposed to [B, H, N, D].
    return tuple(torch.randn(1, n, heads, d, device="cuda", generator=g, dtype=torch.bfloat16
                             ).transpose(1, 2) for _ in range(3))


def bench_ms(fn, iters: int) -> float:
    return B.time_ms(fn, iters=iters, warmup=3)["median"]


def sweep_part(report: dict, iters: int) -> None:
    """Launch configurations of the kernel at [1, 24, 4608, 128]; leaves the fastest in
    fa.CONFIG for the other parts."""
    d, heads = 128, 24
    q, k, v = qkv(4608)
    q8, qs = fa.quantize_heads(q)
    k8, ks = fa.quantize_heads(k)
    vt8, vs = fa.quantize_heads(v, transpose=True)
    flop = 4.0 * 4608 * 4608 * d * heads
    sweep = []
    best = None
    for bm in (64, 128):
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if bm == 64 and warps == 8:
                        continue
                    fa.CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                    try:
                        ms = bench_ms(lambda: fa.fp8_attention(q8, k8, vt8, qs, ks, vs), iters)
                    except Exception as e:  # a configuration that does not fit (shared memory)
                        sweep.append({"config": dict(fa.CONFIG), "error": str(e)[:160]})
                        continue
                    row = {"config": dict(fa.CONFIG), "ms": round(ms, 4),
                           "tflops": round(flop / ms / 1e9, 1)}
                    sweep.append(row)
                    if best is None or ms < best["ms"]:
                        best = row
    emit(report, "attention_sweep", sweep)
    fa.CONFIG.update(best["config"])
    emit(report, "attention_config", best)


def attention_part(report: dict, iters: int) -> None:
    d, heads = 128, 24
    report.setdefault("attention_config", {"config": dict(fa.CONFIG)})
    compiled = torch.compile(fa.fp8_sdpa, fullgraph=True, dynamic=False)
    rows = []
    for label, n in (("512x512", 1536), ("768x768", 2816), ("1024x1024", 4608),
                     ("1024x1008", 4544)):
        q, k, v = qkv(n, seed=n)
        flop = 4.0 * n * n * d * heads
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        q8, qs = fa.quantize_heads(q)
        k8, ks = fa.quantize_heads(k)
        vt8, vs = fa.quantize_heads(v, transpose=True)
        out_kernel = fa.fp8_attention(q8, k8, vt8, qs, ks, vs)
        out_ref = fa.attention_reference(q8, k8, vt8, qs, ks, vs,
                                         block_n=fa.CONFIG["BLOCK_N"])
        out_cudnn = B.sdpa(q, k, v, "cudnn")
        row = {"bucket": label, "shape": [1, heads, n, d],
               "cudnn_bf16_ms": round(bench_ms(lambda: B.sdpa(q, k, v, "cudnn"), iters), 4),
               "fp8_kernel_ms": round(bench_ms(
                   lambda: fa.fp8_attention(q8, k8, vt8, qs, ks, vs), iters), 4),
               "fp8_with_quantization_ms": round(bench_ms(lambda: compiled(q, k, v), iters), 4),
               "err_cudnn_vs_fp32": B.rel_err(out_cudnn, ref),
               "err_fp8_vs_fp32": B.rel_err(out_kernel, ref),
               "err_fp8_kernel_vs_reference": B.rel_err(out_kernel, out_ref),
               "fp8_finite": bool(torch.isfinite(out_kernel).all())}
        for name in ("cudnn_bf16", "fp8_kernel", "fp8_with_quantization"):
            row[f"{name}_tflops"] = round(flop / row[f"{name}_ms"] / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    emit(report, "attention", rows)


BLOCK = 128  # block-wise scaling's block along K (and N for 128x128 weight blocks)


def q_block(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, K / 128]) with one scale per token and
    128 channels (scaled_mm's BlockWise1x128 for A: the scales outer-dim-major, M contiguous).
    Local to 128 channels: the kernel producing x (GELU, attention's output, one head = 128
    channels) could compute it in its epilogue, without a pass over the whole row."""
    m, k = x.shape
    xf = x.float().view(m, k // BLOCK, BLOCK)
    s = xf.abs().amax(-1).clamp(min=quant.SCALE_EPS) / quant.FP8_MAX
    q = (xf / s[..., None]).clamp(-quant.FP8_MAX, quant.FP8_MAX).to(quant.FP8_DTYPE)
    return q.view(m, k), s.t().contiguous().t()


def blockwise_forms(x: torch.Tensor, w: torch.Tensor, q_block_c):
    """The block-wise forms of torch.nn.functional.scaled_mm (DeepSeek's recipe: activations
    1x128, weights 128x128; and 1x128 for both) as (name, fn) pairs, or a string saying why
    this torch has none (torch 2.11 on the H100 host: BlockWise1x128 / BlockWise128x128,
    bench/results/2026-12-07-h100-attn-lab/gemm-call4)."""
    st, sw = getattr(F, "ScalingType", None), getattr(F, "SwizzleType", None)
    if st is None or not hasattr(F, "scaled_mm"):
        return "torch.nn.functional has no scaled_mm / ScalingType"

    def pick(enum, *names):
        for name in names:
            if hasattr(enum, name):
                return getattr(enum, name)
        raise AttributeError(f"{enum} has none of {names}")
    try:
        b1x128 = pick(st, "BlockWise1x128", "Blockwise_1x128")
        b128 = pick(st, "BlockWise128x128", "Blockwise_128x128")
        none = pick(sw, "NO_SWIZZLE", "NoSwizzle") if sw is not None else None
    except AttributeError as e:
        return str(e)
    n, k = w.shape
    kb = k // BLOCK
    wf = w.float().view(n // BLOCK, BLOCK, kb, BLOCK)
    ws = wf.abs().amax(dim=(1, 3)).clamp(min=quant.SCALE_EPS) / quant.FP8_MAX
    w8 = (wf / ws[:, None, :, None]).clamp(-quant.FP8_MAX, quant.FP8_MAX).to(
        quant.FP8_DTYPE).view(n, k)
    padded = torch.zeros(n // BLOCK, (kb + 3) // 4 * 4, device=w.device)
    padded[:, :kb] = ws
    w_scale_128 = padded.t()  # [round_up(K/128, 4), N/128], as scaled_mm's checks want
    w8r, w_scale_1x128 = q_block(w)  # weights 1x128: one scale per output row and 128 inputs
    xq, xs = q_block(x)
    swz = {} if none is None else {"swizzle_a": [none], "swizzle_b": [none]}

    def mm(a, sa, wq, sb, recipe_b):
        return F.scaled_mm(a, wq.t(), scale_a=[sa], scale_recipe_a=[b1x128], scale_b=[sb],
                           scale_recipe_b=[recipe_b], output_dtype=torch.bfloat16, **swz)

    def block128_all():
        a, s = q_block_c(x)
        return mm(a, s, w8, w_scale_128, b128)
    return [("block1x128_w128x128_mm", lambda: mm(xq, xs, w8, w_scale_128, b128)),
            ("block1x128_w1x128_mm", lambda: mm(xq, xs, w8r, w_scale_1x128, b1x128)),
            ("block1x128_w128x128_with_quant", block128_all)]


def gemm_part(report: dict, iters: int) -> None:
    dim, mlp = 3072, 12288
    shapes = [(4608, dim, dim), (4608, dim, mlp), (4608, mlp, dim), (4608, dim + mlp, dim),
              (512, dim, dim), (512, dim, mlp), (512, mlp, dim)]

    def q_row(x):
        return quant.quantize_rows(x)

    def q_tensor(x):
        xf = x.float()
        s = xf.abs().amax().clamp(min=quant.SCALE_EPS) / quant.FP8_MAX
        return (xf / s).clamp(-quant.FP8_MAX, quant.FP8_MAX).to(quant.FP8_DTYPE), s

    q_row_c = torch.compile(q_row, fullgraph=True)
    q_block_c = torch.compile(q_block, fullgraph=True)
    q_tensor_c = torch.compile(q_tensor, fullgraph=True)
    rows = []
    for m, kk, n in shapes:
        g = torch.Generator(device="cuda").manual_seed(m + kk + n)
        x = torch.randn(m, kk, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, kk, device="cuda", generator=g, dtype=torch.bfloat16) / kk ** 0.5
        w8, w_scale = quant.fp8_rowwise([w])
        wt_scale = w.float().abs().amax() / quant.FP8_MAX
        w8t = (w.float() / wt_scale).to(quant.FP8_DTYPE)
        xq, xs = q_row(x)
        xqt, xst = q_tensor(x)
        flop = 2.0 * m * kk * n
        ref = x.float() @ w.float().t()

        def row_mm():
            return torch._scaled_mm(xq, w8.t(), scale_a=xs, scale_b=w_scale,
                                    out_dtype=torch.bfloat16)

        def tensor_mm():
            return torch._scaled_mm(xqt, w8t.t(), scale_a=xst, scale_b=wt_scale,
                                    out_dtype=torch.bfloat16)

        def row_all():
            a, s = q_row_c(x)
            return torch._scaled_mm(a, w8.t(), scale_a=s, scale_b=w_scale,
                                    out_dtype=torch.bfloat16)

        def tensor_all():
            a, s = q_tensor_c(x)
            return torch._scaled_mm(a, w8t.t(), scale_a=s, scale_b=wt_scale,
                                    out_dtype=torch.bfloat16)

        r = {"m": m, "k": kk, "n": n}
        forms = [("bf16_mm", lambda: x @ w.t()), ("rowwise_mm", row_mm),
                 ("tensorwise_mm", tensor_mm), ("rowwise_with_quant", row_all),
                 ("tensorwise_with_quant", tensor_all)]
        block = blockwise_forms(x, w, q_block_c)
        if isinstance(block, str):
            r["blockwise_error"] = block
        else:
            forms += block
        for name, fn in forms:
            try:
                ms = bench_ms(fn, iters * 3)
            except Exception as e:  # a block-wise form this torch or cuBLAS does not take
                r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            r[f"{name}_ms"] = round(ms, 4)
            r[f"{name}_tflops"] = round(flop / ms / 1e9, 1)
        r["err_rowwise"] = B.rel_err(row_mm(), ref)
        r["err_tensorwise"] = B.rel_err(tensor_mm(), ref)
        for name, fn in forms[5:]:
            if name.endswith("_mm") and f"{name}_ms" in r:
                r[f"err_{name[:-3]}"] = B.rel_err(fn(), ref)
        rows.append(r)
        print(json.dumps(r), flush=True)
    emit(report, "gemm", rows)


def step_part(report: dict, args, bucket: ak.Bucket) -> None:
    from safetensors.torch import save_file
    config = C.read_component_config(args.model, "transformer")
    flops = B.flops_per_step(config, (bucket.height // 16) * (bucket.width // 16),
                             bucket.text_len)
    report["flop_per_step"] = flops
    host_inputs = B.make_inputs(config, bucket)
    save_file(host_inputs, os.path.join(args.out, "inputs.safetensors"))
    inputs = [host_inputs[k].cuda() for k in B.ORDER]
    ref = None
    runs = {}
    for variant in args.step_variants.split(","):
        precision, attention, *rest = variant.split(":")
        options = {"attention": attention, "fuse_qkv": False, "fused_quant": "fq" in rest}
        _, module = B.build(args.model, precision, bucket, options)
        tag = variant_tag(variant)
        with torch.no_grad():
            eager_out = module(*inputs)[0]
            save_file({"sample": eager_out.contiguous().cpu()},
                      os.path.join(args.out, f"ref-eager-{tag}.safetensors"))
            if ref is None:
                ref = eager_out.float()
            for mode in args.step_modes.split(","):
                run: dict = {}
                torch.cuda.reset_peak_memory_stats()
                if mode == "compile":
                    B.compile_regional(module)
                    t1 = time.monotonic()
                    out = module(*inputs)[0]
                    torch.cuda.synchronize()
                    run["compile_and_first_call_s"] = round(time.monotonic() - t1, 2)
                else:
                    out = eager_out
                t = B.time_ms(lambda: module(*inputs), args.iters)
                run["step_ms"] = round(t["median"], 2)
                run["step_spread_ms"] = [round(t["min"], 2), round(t["max"], 2)]
                run["tflops"] = round(flops["total"] / (t["median"] * 1e-3) / 1e12, 1)
                run["rel_err_vs_eager_bf16"] = B.rel_err(out.float(), ref)
                run["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                run["profile"] = B.profile(lambda: module(*inputs))
                runs[f"{mode} {tag}"] = run
                print(json.dumps({f"{mode} {tag}": run}), flush=True)
                if mode == "compile":
                    torch._dynamo.reset()
        del module, eager_out, out
        gc.collect()
        torch.cuda.empty_cache()
    emit(report, "step", runs)


def block_part(report: dict, args) -> None:
    """AOTInductor compile of one block of each type (fp8, fp8 attention) at flux-dev's sizes,
    random weights, weightless package as kiln-compile makes them."""
    from kiln.models.flux import DoubleStreamBlock, SingleStreamBlock
    heads, hd = 24, 128
    dim = heads * hd
    n_img, n_txt = (args.height // 16) * (args.width // 16), args.text_len
    rope = (torch.randn(n_img + n_txt, hd, device="cuda"),
            torch.randn(n_img + n_txt, hd, device="cuda"))
    temb = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    rows = {}
    for name, block, example in (
            ("double", DoubleStreamBlock(dim, heads, hd, fp8=True),
             (torch.randn(1, n_img, dim, device="cuda", dtype=torch.bfloat16),
              torch.randn(1, n_txt, dim, device="cuda", dtype=torch.bfloat16), temb, rope)),
            ("single", SingleStreamBlock(dim, heads, hd, fp8=True),
             (torch.randn(1, n_img + n_txt, dim, device="cuda", dtype=torch.bfloat16), temb,
              rope))):
        C._cast(block, torch.bfloat16)
        block = block.cuda().eval()
        for m in block.modules():
            if hasattr(m, "attention"):
                m.attention = "fp8"
            if isinstance(m, quant.Fp8Linear):
                w = torch.randn(m.out_features, m.in_features, device="cuda") / m.in_features ** .5
                q8, s = quant.fp8_rowwise([w])
                m.weight.data = q8
                m.weight_scale.data = s
        t0 = time.monotonic()
        with torch.no_grad():
            ep = torch.export.export(block, example, strict=False)
        t1 = time.monotonic()
        path = os.path.join(args.out, f"block-{name}.pt2")
        torch._inductor.aoti_compile_and_package(
            ep, package_path=path, inductor_configs={"aot_inductor.package_constants_in_so": False,
                                                     "always_keep_tensor_constants": True})
        t2 = time.monotonic()
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            text = b"".join(z.read(n) for n in names if n.endswith((".cpp", ".json", ".wrapper.cpp")))
        rows[name] = {"export_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
                      "package_bytes": os.path.getsize(path),
                      "holds_fp8_kernel": b"fp8_attention_fwd_kernel" in text,
                      "cubins": sum(n.endswith(".cubin") for n in names)}
        print(json.dumps({f"block {name}": rows[name]}), flush=True)
        os.remove(path)
    emit(report, "block_compile", rows)


def table(report: dict) -> str:
    lines = []
    if "attention_config" in report:
        lines.append(f"fp8 attention config: {report['attention_config']}")
    for r in report.get("attention", []):
        lines.append(f"attention {r['bucket']:>9} N={r['shape'][2]}: cuDNN bf16 "
                     f"{r['cudnn_bf16_ms']:.3f} ms {r['cudnn_bf16_tflops']:.0f} TF/s | fp8 kernel "
                     f"{r['fp8_kernel_ms']:.3f} ms {r['fp8_kernel_tflops']:.0f} TF/s | with quant "
                     f"{r['fp8_with_quantization_ms']:.3f} ms | err vs fp32 cudnn "
                     f"{r['err_cudnn_vs_fp32']:.4f} fp8 {r['err_fp8_vs_fp32']:.4f} "
                     f"kernel-vs-ref {r['err_fp8_kernel_vs_reference']:.5f}")
    for r in report.get("gemm", []):
        lines.append(f"gemm {r['m']}x{r['k']}x{r['n']}: bf16 {r['bf16_mm_tflops']:.0f} | row "
                     f"{r['rowwise_mm_tflops']:.0f} ({r['rowwise_with_quant_ms']:.3f} ms w/ quant)"
                     f" | tensor {r['tensorwise_mm_tflops']:.0f} "
                     f"({r['tensorwise_with_quant_ms']:.3f} ms w/ quant) TF/s")
    for name, r in report.get("step", {}).items():
        lines.append(f"step {name:>17}: {r['step_ms']:7.2f} ms {r['tflops']:6.1f} TF/s err "
                     f"{r['rel_err_vs_eager_bf16']:.4f} {r['profile']['ms_per_call_by_class']}")
    for name, r in report.get("block_compile", {}).items():
        lines.append(f"AOTI block {name}: {r}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--parts", default="attention,gemm,block,step")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--step-modes", default="eager,compile",
                   help="the step part's modes: eager (always first: it makes the references), "
                        "compile (regional torch.compile)")
    p.add_argument("--step-variants", default=VARIANTS,
                   help="the step part's variants, precision:attention[:fq], comma-separated")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bucket = ak.Bucket(batch=1, height=args.height, width=args.width, text_len=args.text_len)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "cuda": torch.version.cuda}
    parts = args.parts.split(",")
    failed = []
    for part, fn in (("sweep", lambda: sweep_part(report, args.iters)),
                     ("attention", lambda: attention_part(report, args.iters)),
                     ("gemm", lambda: gemm_part(report, args.iters)),
                     ("block", lambda: block_part(report, args)),
                     ("step", lambda: step_part(report, args, bucket))):
        if part not in parts:
            continue
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # keep the other parts' figures
            import traceback
            traceback.print_exc()
            report[f"{part}_error"] = repr(e)[:500]
            failed.append(part)
        report[f"{part}_seconds"] = round(time.monotonic() - t0, 1)
        with open(os.path.join(args.out, "fp8.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(table(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
