"""The Python side of the GPU benchmark (bench/gpu/run.sh): the baselines kiln is measured
against, on the same synthetic flux-dev weights and the same inputs.

    python3 bench/gpu/baselines.py --model DIR --out DIR [--height 1024 --width 1024]
        [--text-len 512] [--precisions bf16,fp8] [--attention cudnn|sdpa|flash|efficient]
        [--fuse-qkv] [--iters 10] [--modes eager,compile] [--attention-bench] [--profile]
    python3 bench/gpu/baselines.py --cold-start --model DIR --out DIR ...   (see below)

Writes to --out:
  inputs.safetensors       the transformer inputs (seeded) every measurement uses, kiln's too
  ref-eager-bf16.safetensors / ref-eager-fp8.safetensors   eager outputs on those inputs
  baselines.json           measured matmul ceilings (bf16, fp8), per-step milliseconds (CUDA events around one transformer call,
                           median of --iters after warm-up), TFLOP/s, relative errors, compile
                           seconds, peak memory, and (with --profile) GPU time by kernel class

Per step = one call of the whole transformer at the bucket's shapes, batch 1. Regional
torch.compile compiles every double- and single-stream block (nn.Module.compile, fullgraph,
default mode); the blocks share one compiled graph per class. fp8 is the same model as kiln's
(Fp8Linear: row-wise e4m3 weights scaled at load time, dynamic per-token activation scales,
torch._scaled_mm), so the comparison is of runtimes, not of quantization schemes.

--cold-start: one fresh process measures "process start -> first transformer output" for
regional torch.compile bf16, with whatever Inductor cache TORCHINDUCTOR_CACHE_DIR holds (run.sh
runs it with an empty and then a warm cache), and prints one JSON line.
"""
from __future__ import annotations

import time

PROCESS_START = time.monotonic()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from kiln import artifact_key as ak  # noqa: E402
from kiln import components as C  # noqa: E402
from kiln.models.flux import sdpa  # noqa: E402


def flops_per_step(config: dict, img_tokens: int, txt_tokens: int) -> dict[str, float]:
    """FLOPs of one transformer call, batch 1: matmuls of the blocks' linears (2*M*K*N) and of
    attention (QK^T and PV: 4*N^2*D per head); the per-sample modulation and embedding linears
    (M = 1) are negligible and left out."""
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    n = img_tokens + txt_tokens
    mlp = 4 * dim
    double_linear = 2 * n * (4 * dim * dim + 2 * dim * mlp)            # qkv, out, ff up+down
    single_linear = 2 * n * (3 * dim * dim + dim * mlp + (dim + mlp) * dim)  # qkv, mlp, proj_out
    attention = 4 * n * n * dim
    nd, ns = int(config["num_layers"]), int(config["num_single_layers"])
    lin = nd * double_linear + ns * single_linear
    att = (nd + ns) * attention
    return {"linear": float(lin), "attention": float(att), "total": float(lin + att)}


def time_ms(fn, iters: int, warmup: int = 2) -> dict:
    """Median (and min, max) milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in pairs]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm())


def kernel_class(name: str) -> str:
    n = name.lower()
    # Inductor's kernels are named after the ops they fuse; kiln's own fused quantization
    # kernels (kiln.models.fused_quant) do the same kind of work.
    if n.startswith("triton") or n.endswith("_quant_kernel"):
        return "fused elementwise/reduction (Triton)"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa")) and "gemm" not in n:
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul")):
        return "matmul"
    return "other"


def profile(fn, iters: int = 3) -> dict:
    """GPU time per kernel class over `iters` calls (torch.profiler), in ms per call."""
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    classes: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in p.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if not t or ev.key.startswith("ProfilerStep"):
            continue
        if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        cls = kernel_class(ev.key)
        classes[cls] = classes.get(cls, 0.0) + t / 1000.0 / iters
        kernels[ev.key] = kernels.get(ev.key, 0.0) + t / 1000.0 / iters
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"ms_per_call_by_class": {k: round(v, 3) for k, v in sorted(classes.items())},
            "top_kernels_ms": [[k[:120], round(v, 3)] for k, v in top]}


def build(model_dir: str, precision: str, bucket: ak.Bucket, options: dict):
    config = C.read_component_config(model_dir, "transformer")
    module, _ = C.build(config, "transformer", precision, bucket, device="cuda",
                        compile_options=options)
    C.load_weights(module, model_dir, "transformer")
    torch.cuda.synchronize()
    return config, module


def make_inputs(config: dict, bucket: ak.Bucket, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Seeded transformer inputs as the pipeline feeds them: bf16 latents and text states,
    sigma 1.0 (the first step), guidance 3.5."""
    g = torch.Generator().manual_seed(seed)
    s = (bucket.height // 16) * (bucket.width // 16)
    return {
        "hidden_states": torch.randn(1, s, int(config["in_channels"]), generator=g
                                     ).to(torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, bucket.text_len,
                                             int(config["joint_attention_dim"]), generator=g
                                             ).to(torch.bfloat16),
        "pooled_projections": torch.randn(1, int(config["pooled_projection_dim"]), generator=g
                                          ).to(torch.bfloat16),
        "timestep": torch.tensor([1.0], dtype=torch.float32),
        "guidance": torch.tensor([3.5], dtype=torch.float32),
    }


ORDER = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def compile_regional(module) -> None:
    for block in list(module.transformer_blocks) + list(module.single_transformer_blocks):
        block.compile(fullgraph=True)


def attention_bench(config: dict, bucket: ak.Bucket, iters: int) -> dict:
    """Each attention kernel at the transformer's shape ([1, H, txt+img, D] bf16, non-causal):
    median ms, TFLOP/s, error against the math kernel in float32."""
    heads, d = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    n = bucket.text_len + (bucket.height // 16) * (bucket.width // 16)
    g = torch.Generator(device="cuda").manual_seed(5)
    # The model's layout: [B, N, H, D] transposed to [B, H, N, D] (strided, last dim dense).
    q, k, v = (torch.randn(1, n, heads, d, device="cuda", generator=g, dtype=torch.bfloat16
                           ).transpose(1, 2) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2].float(), k[:, :2].float(),
                                                           v[:, :2].float())
    flop = 4.0 * n * n * d * heads
    out = {}
    for backend in ("sdpa", "cudnn", "flash", "efficient"):
        try:
            t = time_ms(lambda: sdpa(q, k, v, backend), iters=iters * 3, warmup=3)
            err = rel_err(sdpa(q, k, v, backend)[:, :2], ref)
            out[backend] = {"ms": round(t["median"], 4),
                            "tflops": round(flop / (t["median"] * 1e-3) / 1e12, 1),
                            "rel_err_vs_fp32": err}
        except RuntimeError as e:
            out[backend] = {"error": str(e).splitlines()[0][:200]}
    return {"shape": [1, heads, n, d], "flop": flop, "backends": out}


def ceilings(iters: int) -> dict:
    """Measured matmul rates on random data, 8192^3: bf16 (torch.mm), fp8 e4m3 with row-wise
    scales (the model's kind of torch._scaled_mm) and with one scale per tensor."""
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(3)
    a = torch.randn(n, n, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", generator=g, dtype=torch.bfloat16)
    flop = 2.0 * n ** 3
    out = {"bf16": flop / (time_ms(lambda: a @ b, iters)["median"] * 1e-3) / 1e12}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    row_a = torch.ones(n, 1, device="cuda")
    row_b = torch.ones(1, n, device="cuda")
    one = torch.ones((), device="cuda")
    out["fp8_rowwise"] = flop / (time_ms(lambda: torch._scaled_mm(
        a8, b8, scale_a=row_a, scale_b=row_b, out_dtype=torch.bfloat16), iters)["median"]
        * 1e-3) / 1e12
    out["fp8_tensorwise"] = flop / (time_ms(lambda: torch._scaled_mm(
        a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), iters)["median"]
        * 1e-3) / 1e12
    return {k: round(v, 1) for k, v in out.items()}


def cold_start(args, bucket: ak.Bucket, options: dict) -> int:
    t_import = time.monotonic() - PROCESS_START
    config, module = build(args.model, "bf16", bucket, options)
    t_weights = time.monotonic() - PROCESS_START
    inputs = [t.cuda() for t in make_inputs(config, bucket).values()]
    compile_regional(module)
    with torch.no_grad():
        out = module(*inputs)[0]
    torch.cuda.synchronize()
    t_first = time.monotonic() - PROCESS_START
    print(json.dumps({"cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""),
                      "import_s": round(t_import, 2), "weights_done_s": round(t_weights, 2),
                      "first_output_s": round(t_first, 2),
                      "compile_and_first_call_s": round(t_first - t_weights, 2),
                      "finite": bool(torch.isfinite(out).all())}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--fuse-qkv", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--attention-bench", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cold-start", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bucket = ak.Bucket(batch=1, height=args.height, width=args.width, text_len=args.text_len)
    options = {"attention": args.attention, "fuse_qkv": args.fuse_qkv}
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.cold_start:
        return cold_start(args, bucket, options)

    from safetensors.torch import save_file
    config = C.read_component_config(args.model, "transformer")
    flops = flops_per_step(config, (args.height // 16) * (args.width // 16), args.text_len)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "bucket": [args.height, args.width,
                                                           args.text_len],
                    "options": options, "flop_per_step": flops, "iters": args.iters,
                    "runs": {}}
    if args.attention_bench:
        report["matmul_tflops"] = ceilings(args.iters)
        print(json.dumps({"matmul_tflops": report["matmul_tflops"]}), flush=True)
        report["attention_kernels"] = attention_bench(config, bucket, args.iters)
        print(json.dumps(report["attention_kernels"]), flush=True)

    host_inputs = make_inputs(config, bucket)
    save_file(host_inputs, os.path.join(args.out, "inputs.safetensors"))
    inputs = [host_inputs[k].cuda() for k in ORDER]
    refs: dict[str, torch.Tensor] = {}
    modes = args.modes.split(",")
    for precision in args.precisions.split(","):
        t0 = time.monotonic()
        _, module = build(args.model, precision, bucket, options)
        load_s = time.monotonic() - t0
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            eager_out = module(*inputs)[0]
            refs[precision] = eager_out.float().cpu()
            save_file({"sample": eager_out.contiguous().cpu()},
                      os.path.join(args.out, f"ref-eager-{precision}.safetensors"))
            for mode in modes:
                name = f"{mode} {precision}"
                run: dict = {"weights_load_s": round(load_s, 2)}
                if mode == "compile":
                    compile_regional(module)
                    t1 = time.monotonic()
                    out = module(*inputs)[0]
                    torch.cuda.synchronize()
                    run["compile_and_first_call_s"] = round(time.monotonic() - t1, 2)
                else:
                    out = module(*inputs)[0]
                t = time_ms(lambda: module(*inputs), args.iters)
                run["step_ms"] = t
                run["tflops"] = round(flops["total"] / (t["median"] * 1e-3) / 1e12, 1)
                run["rel_err_vs_eager_bf16"] = (rel_err(out.float().cpu(), refs["bf16"])
                                                if "bf16" in refs else None)
                run["rel_err_vs_eager_same_precision"] = rel_err(out.float().cpu(),
                                                                 refs[precision])
                run["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
                if args.profile:
                    run["profile"] = profile(lambda: module(*inputs))
                report["runs"][name] = run
                print(json.dumps({name: run}), flush=True)
                if mode == "compile":
                    torch._dynamo.reset()
        del module, eager_out
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "baselines.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
