"""Experiment (issue 15, item 2): can torch.export + AOTInductor package a block that contains a
functional all-to-all, and can the package run it?

WORLD (default 2) local processes join a gloo group; each exports the same small module (linear ->
_c10d_functional.all_to_all_single -> linear), compiles it with
torch._inductor.aoti_compile_and_package (rank 0 compiles, rank 1 waits on a barrier), loads
the package with torch._inductor.aoti_load_package, runs it on its own input and compares it
with eager. Prints what each stage did; exits non-zero if any stage failed.

Run: PYTHONPATH=pipeline/python .venv/bin/python bench/sp/aoti_all_to_all.py [OUT_DIR [WORLD]]
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fcol
import torch.multiprocessing as mp

class Block(torch.nn.Module):
    def __init__(self, group_name: str):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.group_name = group_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = fcol.all_to_all_single(y.contiguous(), None, None, self.group_name)
        return self.b(y)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    group_name = dist.group.WORLD.group_name
    model = Block(group_name).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        want = model(x)
    from safetensors.torch import save_file  # for the C++ half, aoti_all_to_all_run.cc
    save_file({"in0": x.contiguous(), "want": want.contiguous()},
              os.path.join(out_dir, f"rank{rank}.safetensors"))
    path = os.path.join(out_dir, "block.pt2")
    stage = "export"
    try:
        ep = torch.export.export(model, (x,))
        if rank == 0:
            ops = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function"})
            print(f"[rank0] group {group_name!r}; exported ops: {ops}", flush=True)
            stage = "aoti_compile_and_package"
            torch._inductor.aoti_compile_and_package(ep, package_path=path)
            print(f"[rank0] packaged {path}", flush=True)
        stage = "barrier (rank 0 packages)"
        dist.barrier()
        stage = "aoti_load_package"
        runner = torch._inductor.aoti_load_package(path)
        stage = "run"
        with torch.no_grad():
            got = runner(x)
        err = float((got - want).abs().max())
        print(f"[rank{rank}] package ran; max|package - eager| = {err:.3e}", flush=True)
        assert err < 1e-5
    except Exception:
        print(f"[rank{rank}] FAILED at {stage}:\n{traceback.format_exc()[-3000:]}", flush=True)
        raise
    finally:
        dist.destroy_process_group()


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="aoti_a2a_")
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    os.makedirs(out_dir, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_worker, args=(world, port, out_dir), nprocs=world, start_method="spawn")
    except Exception as e:  # ProcessRaisedException: the rank's own traceback was printed
        print(f"failed: {type(e).__name__}", flush=True)
        return 1
    print(f"ok: exported, packaged, loaded and ran on {world} rank(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
