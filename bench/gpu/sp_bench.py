"""Sequence-parallel denoising (issue 15): one image on 1, 2 and 4 GPUs, side by side in one run.

    torchrun --standalone --nproc_per_node=4 bench/gpu/sp_bench.py --model DIR --out DIR \
        [--precision bf16|fp8] [--size 1024x1024] [--text-len 512] [--steps 28] \
        [--gpus 1,2,4] [--modes eager,compile] [--attention cudnn]

One process per GPU (torchrun, NCCL). Rank 0 reads the transformer's weights from the repository
once (kiln.components.load_weights) and broadcasts every tensor to the other ranks over NCCL
(the weight broadcast of docs/multi_gpu.md; its seconds and GB/s are reported). Then, for each
mode (eager; torch.compile of the same module) and each P in --gpus, ranks 0..P-1 denoise the same
seeded latents with kiln.sequence_parallel (Ulysses: text and image tokens sharded 1/P, an
all-to-all of heads around attention) while the others wait at a barrier: one warm-up denoise,
then a timed one with CUDA events around every step (--steps steps, the Flux.1-dev schedule).
Reported per (mode, P): median and mean ms per step, the whole loop's ms, scaling efficiency
t(1) / (P * t(P)) per step, and the same-seed error of the final latents against P = 1 of the same
mode (max|diff| / max|P=1|). The text encoders and the VAE are not run: their time is the same as
on one GPU (they run on rank 0, docs/multi_gpu.md).

CPU dry run (gloo, flux-tiny's seeded weights, no --model needed): bench/README.md.

    torchrun --standalone --nproc_per_node=2 bench/gpu/sp_bench.py --model flux-tiny \
        --device cpu --precision fp32 --size 128x96 --text-len 24 --steps 4 --gpus 1,2 --out DIR

Writes DIR/sp_bench.json; prints one JSON line per measurement and a table last (rank 0).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "pipeline", "python"))

from kiln import artifact_key as ak  # noqa: E402
from kiln import components as C  # noqa: E402
from kiln import configs, make_tiny  # noqa: E402
from kiln import sequence_parallel as sp  # noqa: E402
from kiln.models.flux import FluxTransformer  # noqa: E402

SEED = 1234
GUIDANCE = 3.5


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sp_bench.py")
    p.add_argument("--model", required=True,
                   help="a diffusers-layout repository, or flux-tiny (seeded weights, no files)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp8"), default="bf16")
    p.add_argument("--attention", default="sdpa", help="kiln.models.flux.ATTENTION_BACKENDS")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--gpus", default="1,2,4", help="the P values, each <= the number of ranks")
    p.add_argument("--modes", default="eager,compile")
    return p.parse_args(argv)


def _log(record: dict) -> None:
    if dist.get_rank() == 0:
        print(json.dumps(record), flush=True)


def _build(a: argparse.Namespace, device: torch.device, bucket: ak.Bucket):
    """The transformer on every rank, weights read by rank 0 only and broadcast."""
    if a.model == "flux-tiny":
        config = configs.flux_tiny()["transformer"]
    else:
        config = C.read_component_config(a.model, "transformer")
    options = {"attention": a.attention}
    model, _ = C.build(config, "transformer", a.precision, bucket, device=device,
                       compile_options=options)
    t0 = time.monotonic()
    if dist.get_rank() == 0:
        if a.model == "flux-tiny":
            plain = FluxTransformer(config)
            state = make_tiny.seeded_state(plain, 0, "transformer")
            act = C.activation_dtype(a.precision)
            model.load_state_dict({k: v.to(act) for k, v in state.items()})
        else:
            C.load_weights(model, a.model, "transformer")
    read_s = time.monotonic() - t0
    _sync(device)
    t0 = time.monotonic()
    tensors = list(model.state_dict().values())
    for t in tensors:
        # fp8 weights travel as bytes: a collective need not know the float8 dtypes.
        dist.broadcast(t.view(torch.uint8) if t.element_size() == 1 else t, src=0)
    _sync(device)
    bcast_s = time.monotonic() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    _log({"what": "weights", "read_s_rank0": round(read_s, 3), "broadcast_s": round(bcast_s, 3),
          "bytes": nbytes, "broadcast_GBps": round(nbytes / max(bcast_s, 1e-9) / 1e9, 2),
          "ranks": dist.get_world_size()})
    return config, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _inputs(config: dict, bucket: ak.Bucket, act: torch.dtype, device: torch.device) -> dict:
    rows, cols = bucket.height // C.PIXELS_PER_TOKEN, bucket.width // C.PIXELS_PER_TOKEN
    gen = torch.Generator().manual_seed(SEED)  # CPU: the same values on every rank
    make = functools.partial(torch.randn, generator=gen)
    return {
        "latents": make(1, rows * cols, config["in_channels"]).to(device, act),
        "txt": make(1, bucket.text_len, config["joint_attention_dim"]).to(device, act),
        "pooled": make(1, config["pooled_projection_dim"]).to(device, act),
        "guidance": torch.full((1,), GUIDANCE, device=device, dtype=act),
    }


def _timed_denoise(step, x, txt, pooled, guidance, sigmas, rope, device) -> tuple[torch.Tensor,
                                                                                   list[float]]:
    """The Euler loop of sp.denoise with a timer around every step (CUDA events, or wall)."""
    ms = []
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            t = torch.full((x.shape[0],), sigmas[i], dtype=x.dtype, device=device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                v = step(x, txt, pooled, t, guidance, rope)
                end.record()
            else:
                t0 = time.perf_counter()
                v = step(x, txt, pooled, t, guidance, rope)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            if device.type == "cuda":
                end.synchronize()
                ms.append(start.elapsed_time(end))
            else:
                ms.append((time.perf_counter() - t0) * 1e3)
    return x, ms


def _run_one(a, config, model, bucket, device, group, p: int, mode: str) -> dict | None:
    """Ranks < p: one warm-up and one timed denoise; rank 0 returns the gathered latents."""
    rank = dist.get_rank()
    if rank >= p:
        return None
    ulysses = sp.Ulysses(group)
    rows, cols = bucket.height // C.PIXELS_PER_TOKEN, bucket.width // C.PIXELS_PER_TOKEN
    ulysses.check(int(config["num_attention_heads"]), bucket.text_len, rows * cols)
    sp.enable(model, ulysses)
    inp = _inputs(config, bucket, C.activation_dtype(a.precision), device)
    latents = sp.shard(inp["latents"], rank, p)
    txt = sp.shard(inp["txt"], rank, p)
    rope = sp.shard_rope(model.rope_for(rows, cols, bucket.text_len, device), bucket.text_len,
                         rank, p)
    step = functools.partial(FluxTransformer.forward, model)  # rope as an input, no bucket check
    if mode == "compile":
        torch._dynamo.reset()
        step = torch.compile(step)
    sigmas = sp.flux_sigmas(a.steps, rows * cols)
    t0 = time.monotonic()
    _timed_denoise(step, latents, txt, inp["pooled"], inp["guidance"], sigmas[:3], rope, device)
    warm_s = time.monotonic() - t0
    t0 = time.monotonic()
    out, ms = _timed_denoise(step, latents, txt, inp["pooled"], inp["guidance"], sigmas, rope,
                             device)
    _sync_group(device, group)
    loop_ms = (time.monotonic() - t0) * 1e3
    whole = sp.gather(out, ulysses)
    sp.enable(model, None)
    return {"latents": whole.float().cpu(), "step_ms": ms, "loop_ms": loop_ms,
            "warmup_s": warm_s}


def _sync_group(device: torch.device, group) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=group)


def main(argv: list[str]) -> int:
    a = _args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if a.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    world = dist.get_world_size()
    ps = [int(x) for x in a.gpus.split(",")]
    if max(ps) > world or min(ps) < 1:
        raise SystemExit(f"--gpus {a.gpus}: each P must be in 1..{world} (the torchrun ranks)")
    width, height = (int(x) for x in a.size.split("x"))
    bucket = ak.Bucket(batch=1, height=height, width=width, text_len=a.text_len)
    config, model = _build(a, device, bucket)
    groups = {p: dist.new_group(list(range(p))) for p in ps}  # every rank creates every group
    results: dict[str, dict[int, dict]] = {}
    for mode in a.modes.split(","):
        for p in ps:
            r = _run_one(a, config, model, bucket, device, groups[p], p, mode)
            dist.barrier()
            if dist.get_rank() == 0:
                results.setdefault(mode, {})[p] = r
    if dist.get_rank() == 0:
        _report(a, results, device)
    dist.destroy_process_group()
    return 0


def _report(a, results: dict, device: torch.device) -> None:
    rows = []
    for mode, by_p in results.items():
        base = by_p.get(1) or by_p[min(by_p)]
        base_p = min(by_p)
        base_ms = statistics.median(base["step_ms"])
        for p, r in sorted(by_p.items()):
            med = statistics.median(r["step_ms"])
            ref = base["latents"]
            err = float((r["latents"] - ref).abs().max() / ref.abs().max())
            row = {"what": "denoise", "mode": mode, "P": p, "device": str(device),
                   "precision": a.precision, "size": a.size, "steps": a.steps,
                   "step_ms_median": round(med, 3),
                   "step_ms_mean": round(statistics.fmean(r["step_ms"]), 3),
                   "loop_ms": round(r["loop_ms"], 1), "warmup_s": round(r["warmup_s"], 2),
                   "scaling_efficiency": round(base_ms * base_p / (p * med), 3),
                   "rel_err_vs_P%d" % base_p: err}
            rows.append(row)
            _log(row)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sp_bench.json"), "w") as f:
        json.dump({"args": vars(a), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'mode':8} {'P':>2} {'step ms':>9} {'loop ms':>9} {'eff':>6} {'rel err':>9}")
    for r in rows:
        err = next(v for k, v in r.items() if k.startswith("rel_err"))
        print(f"{r['mode']:8} {r['P']:>2} {r['step_ms_median']:>9.2f} {r['loop_ms']:>9.1f} "
              f"{r['scaling_efficiency']:>6.3f} {err:>9.2e}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
