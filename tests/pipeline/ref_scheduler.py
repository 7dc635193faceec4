"""Reference Flux schedules from diffusers itself, for tests/pipeline/scheduler_test.cc.

    ref_scheduler.py REQUEST_JSON OUT_JSON

REQUEST_JSON: [{"config": <scheduler_config.json contents>, "pairs": [[steps, seq_len], ...]}, ...].
For each config and pair, does what FluxPipeline.__call__ does before its denoising loop:
sigmas = np.linspace(1.0, 1 / n, n); mu = calculate_shift(seq_len, <config values>);
retrieve_timesteps(scheduler, n, "cpu", sigmas=sigmas, mu=mu), with the scheduler built by
FlowMatchEulerDiscreteScheduler.from_config(config). Writes OUT_JSON, one list per config:
[[{"steps", "seq_len", "mu", "sigmas", "timesteps", "model_timesteps"}, ...], ...], every number as
float.hex() of the exact value (float32 values widened to double), model_timesteps being the
`timestep / 1000` FluxPipeline passes to the transformer with float32 latents.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps


def hexes(t: torch.Tensor) -> list[str]:
    return [float(v).hex() for v in t.to(torch.float64).tolist()]


def schedules(config: dict, pairs: list[list[int]]) -> list[dict]:
    results = []
    for steps, seq_len in pairs:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, n = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        assert n == steps and timesteps.dtype == torch.float32
        assert scheduler.sigmas.dtype == torch.float32
        # As FluxPipeline's loop: t.expand(B).to(latents.dtype) / 1000, latents float32 here.
        model_timesteps = timesteps.to(torch.float32) / 1000
        results.append({
            "steps": steps,
            "seq_len": seq_len,
            "mu": float(mu).hex(),
            "sigmas": hexes(scheduler.sigmas),
            "timesteps": hexes(timesteps),
            "model_timesteps": hexes(model_timesteps),
        })
    return results


def main(request_path: str, out_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    out = [schedules(r["config"], r["pairs"]) for r in request]
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
