"""Can a sequence-parallel block live in an AOTInductor package? (issue 15, docs/multi_gpu.md)

P gloo ranks on the CPU (torch.multiprocessing spawn, a free loopback port). Each rank builds one
flux-tiny DoubleStreamBlock with kiln.sequence_parallel enabled, then:
  1. torch.export.export of the block on its shard (weights as constants): the graph must hold
     `_c10d_functional.all_to_all_single` + `wait_tensor` with the group's *name* baked in;
  2. torch._inductor.aoti_compile_and_package to a per-rank .pt2;
  3. torch._inductor.aoti_load_package and one call, while the process group is alive and
     registered under that name: compared with the eager sharded block, and the gathered result
     with the single-process block.
Each rank also writes rank<R>.safetensors (inputs in0..in4, `want`: its shard of the
single-process output) for the C++ run (kiln-sp-a2a-run, bench/sp/README.md).
Every stage's outcome (ok / the exception) is printed per rank (docs/multi_gpu.md records the
output). The ranks agree before the run (an all-reduce of their verdicts), so no rank enters the
package's collectives while the other still compiles, and a rank that failed ends its process
with status 1: the others are then stopped and the probe exits 1 instead of leaving a rank
waiting on a collective its peer never joins.

--compile-only stops after writing the packages and the inputs (no load or run in Python): what
tests/parallel/python/test_sp_package.py needs, because running a package with collectives from
Python can deadlock (docs/multi_gpu.md: the loader holds the GIL while `wait_tensor` waits, and
gloo's worker thread needs the GIL to drop a tensor that has a Python object); the C++ run has no
GIL.

Run: PYTHONPATH=pipeline/python .venv/bin/python bench/aoti_collectives.py [--world 2] [--out DIR]
     [--compile-only]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln import configs, make_tiny
from kiln import sequence_parallel as sp
from kiln.models.flux import FluxTransformer

ROWS, COLS, TEXT_LEN, BATCH = 4, 4, 8, 1


def _block_and_inputs():
    cfg = configs.flux_tiny()["transformer"]
    model = FluxTransformer(cfg).eval()
    model.load_state_dict(make_tiny.seeded_state(model, 0, "transformer"))
    gen = torch.Generator().manual_seed(1)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    img = torch.randn(BATCH, ROWS * COLS, dim, generator=gen)
    txt = torch.randn(BATCH, TEXT_LEN, dim, generator=gen)
    temb = torch.randn(BATCH, dim, generator=gen)
    return model, model.transformer_blocks[0], img, txt, temb


class _Block(torch.nn.Module):
    """The block with the rope tables as plain inputs (as the regional `double` region)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, img, txt, temb, cos, sin):
        return self.block(img, txt, temb, (cos, sin))


def _stage(rank: int, name: str, fn):
    t0 = time.monotonic()
    try:
        out = fn()
        print(f"[rank {rank}] {name}: ok ({time.monotonic() - t0:.1f} s)", flush=True)
        return out
    except Exception:  # a probe: report every failure and go on
        print(f"[rank {rank}] {name}: FAILED\n{traceback.format_exc(limit=4)}", flush=True)
        return None


def _agree(ok: bool) -> bool:
    """True only when every rank got here with ok: also keeps the ranks in step."""
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fail(rank: int, why: str) -> None:
    """Ends this rank at once (no group teardown that could wait on a peer): status 1 makes
    start_processes stop the other ranks and raise in the parent."""
    print(f"[rank {rank}] {why}", flush=True)
    os._exit(1)


def _worker(rank: int, world: int, port: int, out_dir: str, compile_only: bool) -> None:
    torch.set_num_threads(1)
    # Both ranks compile the same graph: one Inductor cache each, or they race in one directory.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(out_dir, f"inductor-rank{rank}")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        model, block, img, txt, temb = _block_and_inputs()
        with torch.no_grad():
            ref_img, _ = block(img, txt, temb, model.rope_for(ROWS, COLS, TEXT_LEN))
        ulysses = sp.Ulysses()
        sp.enable(model, ulysses)
        cos, sin = sp.shard_rope(model.rope_for(ROWS, COLS, TEXT_LEN), TEXT_LEN, rank, world)
        args = (sp.shard(img, rank, world), sp.shard(txt, rank, world), temb, cos, sin)
        module = _Block(block).eval()
        with torch.no_grad():
            eager = module(*args)
        # For the C++ half (kiln-sp-a2a-run, bench/sp/README.md): this rank's inputs and its
        # token shard of the single-process block's image output.
        from safetensors.torch import save_file
        tensors = {f"in{i}": a.contiguous() for i, a in enumerate(args)}
        tensors["want"] = sp.shard(ref_img, rank, world).contiguous()
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
        print(f"[rank {rank}] group name {dist.group.WORLD.group_name!r}", flush=True)
        ep = _stage(rank, "torch.export", lambda: torch.export.export(module, args))
        if not _agree(ep is not None):
            _fail(rank, "a rank failed torch.export: stopping")
        ops = sorted({str(n.target) for n in ep.graph.nodes if "c10d" in str(n.target)})
        groups = sorted({str(a) for n in ep.graph.nodes if "all_to_all" in str(n.target)
                         for a in n.args[3:4]})
        print(f"[rank {rank}] collective ops in the graph: {ops}; group args {groups}", flush=True)
        path = os.path.join(out_dir, f"block-rank{rank}.pt2")
        pkg = _stage(rank, "aoti_compile_and_package", lambda: torch._inductor.
                     aoti_compile_and_package(ep, package_path=path))
        if compile_only:
            if pkg is None:
                _fail(rank, "the compile failed: stopping")
            return
        runner = pkg and _stage(rank, "aoti_load_package",
                                lambda: torch._inductor.aoti_load_package(pkg))
        if not _agree(runner is not None):
            _fail(rank, "a rank failed to compile or load its package: stopping")
        got = _stage(rank, "run", lambda: runner(*args))
        if got is None:
            _fail(rank, "the run failed: stopping")
        diff = max(float((g - e).abs().max()) for g, e in zip(got, eager))
        print(f"[rank {rank}] package vs eager sharded block: max|diff| {diff:.2e}", flush=True)
        whole = sp.gather(got[0], ulysses)
        err = float((whole - ref_img).abs().max() / ref_img.abs().max())
        print(f"[rank {rank}] gathered package output vs single-process block: "
              f"max|err|/max|ref| {err:.2e}", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default=None, help="where the .pt2 files go (default: a temp dir)")
    p.add_argument("--compile-only", action="store_true",
                   help="write the packages and rank<R>.safetensors; no load or run in Python")
    a = p.parse_args()
    out_dir = a.out or tempfile.mkdtemp(prefix="aoti-collectives-")
    os.makedirs(out_dir, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_worker, args=(a.world, port, out_dir, a.compile_only),
                           nprocs=a.world, start_method="spawn")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:  # rest stopped
        print(f"stopped: {e}")
        return 1
    print(f"packages in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
