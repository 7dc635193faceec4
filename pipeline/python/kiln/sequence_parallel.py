"""Ulysses sequence parallelism for kiln's Flux transformer: one image denoised by P ranks.

Partitioning. Each of P ranks holds 1/P of the tokens of the joint sequence: a contiguous
1/P of the image tokens (row-major patches) *and* a contiguous 1/P of the text tokens, so every
rank holds L/P + S/P tokens and every per-token op (embedders, AdaLN modulation, the text and
image MLPs, the linears, the output layers) runs on its shard with the same weights and no
communication. The text is sharded rather than replicated because Flux's text stream is not
small next to an image shard: at 1024² (S = 4096, L = 512) on 4 ranks a replicated text would be
512 of each rank's 1536 tokens, a third of the per-rank linear work done 4 times over. The
price is that L must be divisible by P (512 is, for P in 1, 2, 4, 8).

Attention needs every token. Around it (kiln.models.flux._attention, when its module's `sp` is
set) the rank applies RoPE to its own q and k rows (`shard_rope` gives it those rows), then one
all-to-all per q, k, v trades token shards for head shards: [B, H, N/P, D] -> [B, H/P, N, D]
(N = L + S); attention runs over all N tokens with H/P heads; one all-to-all brings the output
back to [B, H, N/P, D]. The gathered sequence is ordered rank by rank ([txt_0; img_0; txt_1;
...]) rather than [txt; img]: unmasked attention is equivariant in the token order and RoPE has
already been applied per token, so the order is immaterial and no reordering copy is needed.
Four all-to-alls per block, each moving (P-1)/P of a [B, N/P, H*D] tensor per rank.

Heads must be divisible by P (Flux.1-dev has 24: P = 2, 3, 4, 6, 8 are fine); otherwise
`Ulysses.check` refuses with a ValueError naming both numbers. Ulysses cannot split a head; the
way past that limit is Ring attention (keys and values passed round the ranks, any head count)
or a hybrid Ulysses x Ring grid, neither written here.

P = 1 is the unmodified model: `enable(model, None)` (or never calling `enable`) leaves every
attention module's `sp` at None, and `_attention` then runs exactly the single-GPU code.

The all-to-all is torch.distributed._functional_collectives.all_to_all_single, so that
torch.export and torch.compile trace it as a `_c10d_functional` op; the process group is any
torch.distributed group (gloo on the CPU in the tests, NCCL on GPUs). `gather`, once per image
outside the model, is a plain all_gather.

Who calls this: tests/pipeline/python/test_sequence_parallel.py and bench/gpu/sp_bench.py, one
process per rank, each process single-threaded with respect to this module; and kiln.regional,
which exports the blocks of a `sequence_parallel` package set with `enable` (one process, a
fake group of P ranks: the graph does not depend on the rank).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fcol
from torch import nn

from kiln.models.flux import FluxTransformer, JointAttention, SelfAttention


class Ulysses:
    """The all-to-alls around attention for one rank of a process group of P ranks.

    `group_name` (optional) is the c10d name the all-to-alls name in a traced graph instead of
    the group's own (kiln.regional exports a package set whose blocks resolve the compile option
    `process_group` at run time); the group must be registered under it in this process."""

    def __init__(self, group: dist.ProcessGroup | None = None, group_name: str | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.group_name = group_name

    def check(self, heads: int, text_len: int, image_len: int) -> None:
        """ValueError unless heads, text and image tokens all divide evenly over the ranks."""
        for what, n in (("attention heads", heads), ("text tokens", text_len),
                        ("image tokens", image_len)):
            if n % self.world:
                raise ValueError(f"sequence parallel: {n} {what} do not divide over "
                                 f"{self.world} ranks")

    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk i of dim 0 goes to rank i; the result's chunk j came from rank j."""
        group = self.group_name if self.group_name is not None else self.group
        return fcol.all_to_all_single(x.contiguous(), None, None, group)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] (this rank's n tokens, all heads) -> [B, H/P, P*n, D] (every rank's
        tokens, rank by rank, this rank's head group)."""
        if self.world == 1:
            return x
        b, h, n, d = x.shape
        p = self.world
        send = x.reshape(b, p, h // p, n, d).transpose(0, 1)  # [P(head group), B, H/P, n, D]
        recv = self._all_to_all(send)                         # [P(token shard), B, H/P, n, D]
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of to_heads: [B, H/P, P*n, D] -> [B, H, n, D]."""
        if self.world == 1:
            return x
        b, hp, pn, d = x.shape
        p = self.world
        send = x.reshape(b, hp, p, pn // p, d).permute(2, 0, 1, 3, 4)  # [P(token shard), ...]
        recv = self._all_to_all(send)                                   # [P(head group), ...]
        return recv.transpose(0, 1).reshape(b, p * hp, pn // p, d)


def enable(model: nn.Module, sp: Ulysses | None) -> None:
    """Sets (sp) or clears (None) sequence parallelism on every attention module of `model`."""
    for module in model.modules():
        if isinstance(module, (JointAttention, SelfAttention)):
            module.sp = sp


def shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world of x along dim (which must divide evenly)."""
    n = x.shape[dim]
    if n % world:
        raise ValueError(f"sequence parallel: {n} tokens do not divide over {world} ranks")
    return x.narrow(dim, rank * (n // world), n // world)


def shard_rope(rope: tuple[torch.Tensor, torch.Tensor], text_len: int, rank: int, world: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the [L+S, D] rotary tables for this rank's tokens: its text shard, then its
    image shard (the order of its local sequence [txt_r; img_r])."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([shard(t[:text_len], rank, world, 0),
                          shard(t[text_len:], rank, world, 0)], dim=0)
    return rows(rope[0]), rows(rope[1])


def gather(x: torch.Tensor, sp: Ulysses | None, dim: int = 1) -> torch.Tensor:
    """Every rank's shard of x concatenated along dim in rank order (x itself when sp is None)."""
    if sp is None or sp.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(sp.world)]
    dist.all_gather(parts, x.contiguous(), group=sp.group)
    return torch.cat(parts, dim=dim)


def flux_sigmas(steps: int, image_seq_len: int, base_shift: float = 0.5,
                max_shift: float = 1.15, base_len: int = 256, max_len: int = 4096
                ) -> list[float]:
    """Flux.1-dev's shifted flow-matching sigmas (steps + 1, last 0), in double. The formula
    pipeline/scheduler.h implements; not its float32 rounding (a reference loop for tests and
    benchmarks, where both sides use the same list)."""
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)
    out = []
    for i in range(steps):
        s = 1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1)
        out.append(math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)))
    return out + [0.0]


@torch.no_grad()
def denoise(model: FluxTransformer, latents: torch.Tensor, txt: torch.Tensor,
            pooled: torch.Tensor, guidance: torch.Tensor, sigmas: list[float],
            rope: tuple[torch.Tensor, torch.Tensor], step=None) -> torch.Tensor:
    """The Euler loop x <- x + (sigma[i+1] - sigma[i]) * v(x, sigma[i]) on this rank's shard.

    latents [B, S/P, C] and txt [B, L/P, joint] are the rank's shards and rope its rows
    (shard_rope); pooled and guidance are whole. The update is per token, so the latents stay
    sharded for all steps and are gathered once, before the VAE. `step` (optional) replaces
    model.forward, e.g. a torch.compile'd model with the same signature."""
    step = step or model
    b = latents.shape[0]
    x = latents
    for i in range(len(sigmas) - 1):
        t = torch.full((b,), sigmas[i], dtype=latents.dtype, device=latents.device)
        v = step(x, txt, pooled, t, guidance, rope)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
