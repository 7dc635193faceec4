"""Ulysses sequence parallelism (kiln.sequence_parallel) against the single-process model.

P real processes (torch.multiprocessing spawn) join a gloo process group over loopback TCP on a
free port; each builds flux-tiny's transformer from the seeded weights (kiln.make_tiny), takes
its shard of the same inputs, runs one transformer step and a whole Euler denoise, and writes
its output shard; the test gathers the shards in rank order and compares them with the same
computation in this process without sequence parallelism.

Tolerance. Everything is float32 on the CPU and the sharded model computes the same function:
the only differences are reordered reductions (a linear over n/P rows may block its dot products
differently from one over n rows; the softmax sums over keys in the gathered order rank by rank
instead of [txt; img]). Each reordering moves a result by a few float32 ulps (eps = 1.2e-7) of
the magnitudes summed; through flux-tiny's 4 blocks and a 6-step denoise the measured error is
3.3e-7 (P = 2) and 3.4e-7 (P = 4) of the output's largest value for one step, 1.5e-7 and 1.7e-7
after the denoise (about 3 float32 ulps). TOL = 3e-6 of max|ref| (25 ulps) leaves a margin of
about 10x for another BLAS's blocking, and is far below any error a wrong partition makes:
skipping the all-to-all (test_skipped_all_to_all_is_detected) gives 0.5 of max|ref|.

P = 2 on flux-tiny (2 heads); P = 4 needs 4 heads, so it runs on flux-tiny's config with
num_attention_heads = 4 (the same seeded weights rule). P = 4 on flux-tiny itself is refused.

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q \
       tests/pipeline/python/test_sequence_parallel.py
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln import configs, make_tiny
from kiln import sequence_parallel as sp
from kiln.models.flux import FluxTransformer

TOL = 3e-6            # of max|reference|; see the module docstring
ROWS, COLS, TEXT_LEN, BATCH = 8, 6, 24, 2
STEPS = 6
GUIDANCE = 3.5
JOIN_TIMEOUT_S = 180  # the whole spawn, start-up included (2 cores shared)
PG_TIMEOUT_S = 60     # any one collective


def _config(heads: int) -> dict:
    cfg = configs.flux_tiny()["transformer"]
    cfg["num_attention_heads"] = heads
    return cfg


def _model(cfg: dict) -> FluxTransformer:
    model = FluxTransformer(cfg).eval()
    model.load_state_dict(make_tiny.seeded_state(model, 0, "transformer"))
    return model


def _inputs(cfg: dict) -> dict:
    gen = torch.Generator().manual_seed(7)
    return {
        "latents": torch.randn(BATCH, ROWS * COLS, cfg["in_channels"], generator=gen),
        "txt": torch.randn(BATCH, TEXT_LEN, cfg["joint_attention_dim"], generator=gen),
        "pooled": torch.randn(BATCH, cfg["pooled_projection_dim"], generator=gen),
        "guidance": torch.full((BATCH,), GUIDANCE),
    }


def _run(model: FluxTransformer, inp: dict, rope, sigmas) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t = torch.full((BATCH,), sigmas[0])
        step = model(inp["latents"], inp["txt"], inp["pooled"], t, inp["guidance"], rope)
    final = sp.denoise(model, inp["latents"], inp["txt"], inp["pooled"], inp["guidance"], sigmas,
                       rope)
    return {"step": step, "denoise": final}


class _NoAllToAll(sp.Ulysses):
    """A broken partition for the negative test: keeps the tensor where it is."""

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def _worker(rank: int, world: int, port: int, heads: int, out_dir: str, broken: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        cfg = _config(heads)
        model = _model(cfg)
        ulysses = (_NoAllToAll if broken else sp.Ulysses)()
        ulysses.check(heads, TEXT_LEN, ROWS * COLS)
        sp.enable(model, ulysses)
        inp = _inputs(cfg)
        local = {"latents": sp.shard(inp["latents"], rank, world),
                 "txt": sp.shard(inp["txt"], rank, world),
                 "pooled": inp["pooled"], "guidance": inp["guidance"]}
        rope = sp.shard_rope(model.rope_for(ROWS, COLS, TEXT_LEN), TEXT_LEN, rank, world)
        out = _run(model, local, rope, sp.flux_sigmas(STEPS, ROWS * COLS))
        gathered = {k: sp.gather(v, ulysses) for k, v in out.items()}
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "out.pt"))
        refused = None
        if world == 4:  # flux-tiny's own 2 heads cannot split over 4 ranks
            try:
                ulysses.check(2, TEXT_LEN, ROWS * COLS)
            except ValueError as e:
                refused = str(e)
        torch.save({"refused": refused}, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank past its last collective before any tears gloo down: a rank destroying the
        # group while another still had gloo traffic aborted once ("terminate called without
        # an active exception", SIGABRT, 4 ranks, session 15's fresh clone).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, heads: int, out_dir: str, broken: bool = False) -> dict:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), heads, out_dir, broken),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=1):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"sequence-parallel run of {world} ranks did not finish in "
                        f"{JOIN_TIMEOUT_S} s")
    return torch.load(os.path.join(out_dir, "out.pt"))


def _reference(heads: int) -> dict[str, torch.Tensor]:
    cfg = _config(heads)
    model = _model(cfg)
    return _run(model, _inputs(cfg), model.rope_for(ROWS, COLS, TEXT_LEN),
                sp.flux_sigmas(STEPS, ROWS * COLS))


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("world,heads", [(2, 2), (4, 4)])
def test_matches_single_process(tmp_path, world, heads):
    ref = _reference(heads)
    got = _spawn(world, heads, str(tmp_path))
    for name in ("step", "denoise"):
        assert got[name].shape == ref[name].shape
        err = _rel_err(got[name], ref[name])
        print(f"P={world} {name}: max|err| / max|ref| = {err:.2e}")
        assert err < TOL, f"P={world} {name}: relative error {err:.2e} >= {TOL}"
    if world == 4:
        refused = [torch.load(tmp_path / f"rank{r}.pt")["refused"] for r in range(world)]
        assert all(r == "sequence parallel: 2 attention heads do not divide over 4 ranks"
                   for r in refused), refused


def test_skipped_all_to_all_is_detected(tmp_path):
    ref = _reference(2)
    got = _spawn(2, 2, str(tmp_path), broken=True)
    err = _rel_err(got["step"], ref["step"])
    print(f"P=2 without the all-to-all: max|err| / max|ref| = {err:.2e}")
    assert err > 100 * TOL


def test_one_rank_is_the_unmodified_model(tmp_path):
    """P = 1 through the same code (a process group of one, sharding, enable): bit-identical."""
    ref = _reference(2)
    got = _spawn(1, 2, str(tmp_path))
    for name in ("step", "denoise"):
        assert torch.equal(got[name], ref[name]), name


def test_uneven_shard_is_refused():
    with pytest.raises(ValueError, match="25 tokens do not divide over 2 ranks"):
        sp.shard(torch.zeros(1, 25, 4), 0, 2)
