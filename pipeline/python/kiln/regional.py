"""The regional layout of the transformer: one package per region instead of one whole-graph
package, each region's weights passed as run-time *inputs* (not package constants), so one
loaded package serves every layer of its type.

Regions, run in this order for one denoising step (`run_regional` is the Python reference loop,
the C++ pipeline must do the same):

  head    (hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, *W)
          -> (img [B,S,D], txt [B,L,D], temb [B,D], rope_cos [L+S,hd], rope_sin [L+S,hd])
          x/context embedders, time/guidance/text embeddings, the RoPE tables (from the bucket's
          static sizes); one layer, prefix "".
  double  (img, txt, temb, rope_cos, rope_sin, *W) -> (img, txt)
          one DoubleStreamBlock; layers "transformer_blocks.{i}." for i < num_layers.
  (the loop concatenates x = cat([txt, img], dim=1))
  single  (x, temb, rope_cos, rope_sin, *W) -> (x,)
          one SingleStreamBlock; layers "single_transformer_blocks.{i}.".
  tail    (x, temb, *W) -> (sample [B,S,out],)
          norm_out + proj_out over the image tokens x[:, L:]; one layer, prefix "".

`*W` are the region's tensors in the order of `Region.weight_names` (names relative to the
layer: `norm1.linear.weight`, ...); layer i's checkpoint name is `prefix_i + name`. Derived
tensors (fuse_qkv, fp8 weights and scales) carry the same `derive` rules as whole-graph
constants, with layer-relative names (kiln.models.quant.derivations of the region's module).
Each region is exported with torch.func.functional_call over a template module that is not
registered as a submodule, so the exported program has no parameters at all.

Sequence parallel (compile option `sequence_parallel` P > 1, docs/multi_gpu.md): the set is
compiled for one rank of P. The bucket is the rank's (height / P, text_len / P): the head takes
the rank's shard of the latents and of the text and returns its img and txt shards, but the
RoPE tables of the *whole* image ([P*(L+S), hd], text rows first, from the rank's sizes times
P), so the package is the same on every rank; the caller gives each block its rank's rows
(kiln.sequence_parallel.shard_rope, the C++ RegionalTransformer likewise). The double and single
blocks carry the Ulysses all-to-alls around attention (`_c10d_functional.all_to_all_single`),
naming the process group of the compile option `process_group` (absent: "0", Python's default
group): at export the default group (a fake group of P ranks, made when none exists) is also
registered under that name. The tail takes the rank's [txt_r; img_r] and returns its image
rows.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
from torch import nn

from kiln import artifact_key as ak
from kiln.models.flux import FluxTransformer, image_ids, rope_tables, text_ids
from kiln.models.quant import derivations

REGIONS = ("head", "double", "single", "tail")
# The c10d group name a sequence-parallel set's all-to-alls resolve at run time when the compile
# option `process_group` gives none (Python's default group); recorded in its manifest as
# `process_group`, which the C++ loop checks against the group it was given
# (parallel::SequenceParallelDenoise).
PROCESS_GROUP = "0"
LAYOUTS = ("whole", "regional")


class _HeadModule(nn.Module):
    """The head's computation; shares its submodules with the transformer it was made from."""

    def __init__(self, model: FluxTransformer, rows: int, cols: int, text_len: int):
        super().__init__()
        self.time_text_embed = model.time_text_embed
        self.context_embedder = model.context_embedder
        self.x_embedder = model.x_embedder
        self.axes_dims = list(model.axes_dims)
        self.rows, self.cols, self.text_len = rows, cols, text_len

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                guidance):
        # As FluxTransformer.forward, term by term (same ops, same rounding).
        dtype = hidden_states.dtype
        temb = self.time_text_embed(timestep.to(dtype) * 1000, guidance.to(dtype) * 1000,
                                    pooled_projections)
        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)
        ids = torch.cat([text_ids(self.text_len, hidden_states.device),
                         image_ids(self.rows, self.cols, hidden_states.device)], dim=0)
        cos, sin = rope_tables(ids, self.axes_dims)
        return img, txt, temb, cos, sin


class _DoubleModule(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, img, txt, temb, cos, sin):
        return self.block(img, txt, temb, (cos, sin))


class _SingleModule(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, temb, cos, sin):
        return (self.block(x, temb, (cos, sin)),)


class _TailModule(nn.Module):
    def __init__(self, model: FluxTransformer, text_len: int):
        super().__init__()
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.text_len = text_len

    def forward(self, x, temb):
        return (self.proj_out(self.norm_out(x[:, self.text_len:], temb)),)


class RegionExport(nn.Module):
    """forward(*activations, *weights): functional_call of the (unregistered) template with the
    weights bound to `weight_names`. Exports to a graph whose weights are all user inputs."""

    def __init__(self, template: nn.Module, weight_names: list[str], n_activations: int):
        super().__init__()
        object.__setattr__(self, "_template", template)  # not a submodule: no parameters
        self.weight_names = list(weight_names)
        self.n_activations = n_activations

    def forward(self, *args):
        acts = args[:self.n_activations]
        weights = dict(zip(self.weight_names, args[self.n_activations:]))
        return tuple(torch.func.functional_call(self._template, weights, acts))


@dataclasses.dataclass
class Region:
    name: str
    template: nn.Module          # the computation; its state_dict names are weight_names
    activations: list[tuple[str, list[int], torch.dtype]]
    outputs: list[tuple[str, list[int], torch.dtype]]
    prefixes: list[str]          # one per layer: checkpoint name = prefix + weight name

    @property
    def weight_names(self) -> list[str]:
        return list(self.template.state_dict().keys())

    def export_module(self) -> RegionExport:
        return RegionExport(self.template, self.weight_names, len(self.activations))

    def weight_table(self) -> list[dict]:
        """Manifest entries of the weight inputs: name, shape, dtype (+ derive, layer-relative)."""
        derived = derivations(self.template)
        out = []
        for name, t in self.template.state_dict().items():
            entry = {"name": name, "shape": list(t.shape),
                     "dtype": str(t.dtype).replace("torch.", "")}
            if name in derived:
                entry["derive"] = derived[name].to_json()
            out.append(entry)
        return out

    def layer_weights(self, state: dict[str, torch.Tensor], layer: int) -> list[torch.Tensor]:
        """Layer `layer`'s weight inputs, in order, from the whole transformer's state_dict."""
        return [state[checkpoint_name(self, layer, n)] for n in self.weight_names]


def regions(model: FluxTransformer, bucket: ak.Bucket, act: torch.dtype,
            head_inputs: list[tuple[str, list[int], torch.dtype]],
            sequence_parallel: int = 1) -> list[Region]:
    """The four regions of `model` (a built transformer) for `bucket`; `head_inputs` are the
    whole-graph transformer's inputs (kiln.components._input_shapes). With sequence_parallel
    P > 1 the bucket is one rank's of P (module docstring): the head's RoPE tables cover P times
    its rows and text tokens. (The block templates' attention `sp` is set by compile_one.)"""
    from kiln.components import PIXELS_PER_TOKEN
    rows, cols = bucket.height // PIXELS_PER_TOKEN, bucket.width // PIXELS_PER_TOKEN
    b, s, l = bucket.batch, rows * cols, bucket.text_len
    p = sequence_parallel
    dim = model.x_embedder.out_features
    out_ch = model.proj_out.out_features
    hd = sum(model.axes_dims)
    f32 = torch.float32
    img = ("img", [b, s, dim], act)
    txt = ("txt", [b, l, dim], act)
    temb = ("temb", [b, dim], act)
    cos, sin = ("rope_cos", [l + s, hd], f32), ("rope_sin", [l + s, hd], f32)
    whole_cos = ("rope_cos", [p * (l + s), hd], f32)
    whole_sin = ("rope_sin", [p * (l + s), hd], f32)
    if p < 1 or (dim // hd) % p:
        raise ValueError(f"sequence parallel: {dim // hd} attention heads do not divide over "
                         f"{p} ranks")
    x = ("x", [b, l + s, dim], act)
    head_in = list(head_inputs)
    n_double = len(model.transformer_blocks)
    n_single = len(model.single_transformer_blocks)
    out = [Region("head", _HeadModule(model, p * rows, cols, p * l), head_in,
                  [img, txt, temb, whole_cos, whole_sin], [""])]
    if n_double:
        out.append(Region("double", _DoubleModule(model.transformer_blocks[0]),
                          [img, txt, temb, cos, sin], [img, txt],
                          [f"transformer_blocks.{i}.block." for i in range(n_double)]))
    if n_single:
        out.append(Region("single", _SingleModule(model.single_transformer_blocks[0]),
                          [x, temb, cos, sin], [x],
                          [f"single_transformer_blocks.{i}.block." for i in range(n_single)]))
    out.append(Region("tail", _TailModule(model, l), [x, temb],
                      [("sample", [b, s, out_ch], act)], [""]))
    # The block templates' names carry the wrapper's "block." prefix; layer prefixes above
    # therefore end in "block." only to be stripped here: checkpoint name = layer prefix + name
    # without "block.".
    for r in out:
        r.prefixes = [p.replace(".block.", ".") for p in r.prefixes]
    return out


def strip_block(name: str) -> str:
    return name[len("block."):] if name.startswith("block.") else name


def checkpoint_name(region: Region, layer: int, weight_name: str) -> str:
    return region.prefixes[layer] + strip_block(weight_name)


def example_inputs(region: Region, device) -> tuple:
    """Random activations of the region's shapes plus uninitialised weights of one layer's
    shapes on `device` (export needs tensors, not values; the template itself may be on meta)."""
    gen = torch.Generator().manual_seed(0)
    acts = []
    for name, shape, dtype in region.activations:
        if name == "timestep":
            t = torch.full(shape, 0.5, dtype=dtype)
        elif name == "guidance":
            t = torch.full(shape, 3.5, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen).to(dtype)
        acts.append(t.to(device))
    weights = [torch.empty(t.shape, dtype=t.dtype, device=device)
               for t in region.template.state_dict().values()]
    return tuple(acts) + tuple(weights)


def run_regional(calls: dict, model_regions: list[Region], state: dict[str, torch.Tensor],
                 inputs: tuple) -> torch.Tensor:
    """One transformer evaluation as the loop over layers. `calls[name]` runs region `name`
    (a loaded package or the eager RegionExport), `state` is the transformer's state_dict
    (checkpoint names), `inputs` the whole-graph package's five inputs. Returns the sample."""
    by_name = {r.name: r for r in model_regions}

    def weights(r: Region, i: int) -> list[torch.Tensor]:
        return r.layer_weights(state, i)

    head = by_name["head"]
    img, txt, temb, cos, sin = calls["head"](*inputs, *weights(head, 0))
    if "double" in by_name:
        r = by_name["double"]
        for i in range(len(r.prefixes)):
            img, txt = calls["double"](img, txt, temb, cos, sin, *weights(r, i))
    x = torch.cat([txt, img], dim=1)
    if "single" in by_name:
        r = by_name["single"]
        for i in range(len(r.prefixes)):
            (x,) = calls["single"](x, temb, cos, sin, *weights(r, i))
    (sample,) = calls["tail"](x, temb, *weights(by_name["tail"], 0))
    return sample


def _region_entry(r: Region, path: str, export_s: float, compile_s: float) -> dict:
    from kiln import compile as kc
    with open(path, "rb") as f:
        sha = ak.sha256_hex(f.read())
    return {
        "package": {"file": os.path.basename(path), "sha256": sha, "bytes": os.path.getsize(path)},
        "inputs": kc._specs(r.activations),
        "outputs": kc._specs(r.outputs),
        "weights": [dict(w, name=strip_block(w["name"]),
                         **({"derive": {"op": w["derive"]["op"],
                                        "from": [strip_block(x) for x in w["derive"]["from"]]}}
                            if "derive" in w else {}))
                    for w in r.weight_table()],
        "layers": r.prefixes,
        "export_seconds": round(export_s, 3),
        "compile_seconds": round(compile_s, 3),
    }


def _build_regions(spec: dict) -> list[Region]:
    """The regions of the transformer described by `spec` (model, precision, bucket, options),
    built on the meta device: the templates are never run with their own parameters."""
    from kiln import components as C
    config = C.read_component_config(spec["model"], "transformer")
    bucket = ak.Bucket(**spec["bucket"])
    precision = spec["precision"]
    model, _ = C.build(config, "transformer", precision, bucket, materialize="meta",
                       compile_options=spec["options"])
    return regions(model, bucket, C.activation_dtype(precision),
                   C._input_shapes(config, "transformer", precision, bucket),
                   sequence_parallel(spec["options"]))


def sequence_parallel(options: dict) -> int:
    """The compile option `sequence_parallel` (absent: 1)."""
    return int(options.get("sequence_parallel", 1)) if isinstance(options, dict) else 1


def process_group(options: dict) -> str:
    """The compile option `process_group` (absent: PROCESS_GROUP)."""
    return str(options.get("process_group", PROCESS_GROUP)) if isinstance(options, dict) \
        else PROCESS_GROUP


def _enable_ulysses(template: nn.Module, world: int, name: str = PROCESS_GROUP) -> None:
    """Sets Ulysses all-to-alls over `world` ranks on the template's attention modules, for
    export. The graph names the group `name` and depends on the world size only (the split
    sizes), not on the rank: with no default group in this process (kiln-compile and its region
    workers have none) a fake one of `world` ranks is made for the export, and registered under
    `name` too when that is not its own ("0")."""
    import torch.distributed as dist
    from kiln import sequence_parallel as sp
    if not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    if dist.get_world_size() != world or dist.group.WORLD.group_name != PROCESS_GROUP:
        raise RuntimeError(f"sequence_parallel {world}: this process's default group has "
                           f"{dist.get_world_size()} ranks and the name "
                           f"{dist.group.WORLD.group_name!r}, not {PROCESS_GROUP!r}")
    if name != PROCESS_GROUP:
        from torch._C._distributed_c10d import _register_process_group, _resolve_process_group
        try:
            known = _resolve_process_group(name)
        except (RuntimeError, ValueError):
            known = None
        if known is None:
            _register_process_group(name, dist.group.WORLD)
        elif known.size() != world:
            raise RuntimeError(f"sequence_parallel {world}: the group registered as {name!r} "
                               f"in this process has {known.size()} ranks")
    sp.enable(template, sp.Ulysses(group_name=name))


def compile_one(spec: dict, name: str, out_dir: str) -> dict:
    """Exports and AOTInductor-compiles region `name` into out_dir/<name>.pt2; its manifest
    entry."""
    device = torch.device(spec["device"])
    (r,) = [r for r in _build_regions(spec) if r.name == name]
    world = sequence_parallel(spec["options"])
    if world > 1 and name in ("double", "single"):
        _enable_ulysses(r.template, world, process_group(spec["options"]))
    t0 = time.monotonic()
    module = r.export_module().eval()
    with torch.no_grad():
        ep = torch.export.export(module, example_inputs(r, device), strict=False)
    if ep.state_dict or ep.constants:
        raise RuntimeError(f"region {name}: the exported program holds constants "
                           f"{sorted(list(ep.state_dict) + list(ep.constants))[:5]}; every "
                           "weight must be an input")
    t1 = time.monotonic()
    path = os.path.join(out_dir, f"{name}.pt2")
    configs = dict(spec["inductor_configs"])
    configs["aot_inductor.metadata"] = dict(configs.get("aot_inductor.metadata", {}),
                                            **{"kiln.region": name})
    from kiln import compile as kc
    kc.aoti_package(ep, path, configs, configs["aot_inductor.metadata"].get("kiln.digest"))
    return _region_entry(r, path, t1 - t0, time.monotonic() - t1)


def compile_regions(spec: dict, out_dir: str, jobs: int | None = None,
                    workers: list | None = None) -> dict:
    """Compiles every region of the transformer `spec` describes ({"model", "precision",
    "bucket": {...}, "options": compile options, "device": "cpu"|"cuda", "inductor_configs"})
    into out_dir; returns the manifest's `regions` object in REGIONS order. With jobs > 1 (default
    kiln.region_workers.regional_jobs()) the regions are shared out among that many processes
    (start_workers; `workers`, when given, are ones started earlier, used and ended here), which
    compile at once: with four, a miss costs the slowest region, not the sum."""
    import json
    from kiln.region_workers import regional_jobs, start_workers, stop_workers
    names = [r.name for r in _build_regions(spec)]
    if jobs is None:
        jobs = regional_jobs() if workers is None else len(workers)
    if jobs <= 1 and not workers:
        return {n: compile_one(spec, n, out_dir) for n in names}
    if workers is None:
        workers = start_workers(spec["device"], min(jobs, len(names)))
    try:
        # Region i goes to worker i mod len(workers); a worker compiles its regions in order and
        # prints one entry line for each.
        mine = {id(w): names[i::len(workers)] for i, w in enumerate(workers)}
        for proc in workers:
            try:
                for n in mine[id(proc)]:
                    proc.stdin.write(json.dumps({"spec": spec, "region": n, "out_dir": out_dir})
                                     + "\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the worker died starting up: its stderr says why, below
        table, errors = {}, []
        for proc in workers:
            lines = proc.stdout.read().strip().splitlines()
            rc = proc.wait()
            proc.kiln_stderr.seek(0)
            err = proc.kiln_stderr.read().strip()
            for i, n in enumerate(mine[id(proc)]):
                try:
                    table[n] = json.loads(lines[i])
                except (ValueError, IndexError):
                    errors.append(f"region {n} (worker exit {rc}): {err[-2000:]}")
                    break
        if errors:
            raise RuntimeError("regional compile failed: " + "; ".join(errors))
        return {n: table[n] for n in names}
    finally:
        stop_workers(workers)


def load_regions(pkg_dir: str, manifest: dict) -> dict:
    """{region: callable} of the compiled packages of a regional set (Python's AOTI loader)."""
    return {name: torch._inductor.aoti_load_package(os.path.join(pkg_dir, entry["package"]["file"]))
            for name, entry in manifest["regions"].items()}


def _worker(device: str) -> int:
    """start_workers' process: warm up, then compile each region stdin asks for (one JSON
    request a line) and print its manifest entry as one JSON line; ends at EOF."""
    import json
    import sys
    if device not in ("cpu", "cuda"):
        print(f"kiln.regional --worker: device {device!r} is neither cpu nor cuda",
              file=sys.stderr)
        return 2
    import torch._inductor.compile_fx  # noqa: F401 - imported now, while the caller works
    import torch.export  # noqa: F401
    from kiln import components  # noqa: F401
    if device == "cuda":
        torch.cuda.init()
    try:  # Inductor's Triton compile workers start in the background; the compile finds them
        from torch._inductor import async_compile
        getattr(async_compile, "maybe_warm_pool", lambda: None)()
    except Exception:  # noqa: BLE001 - an optimization only; the compile starts them itself
        pass
    # Whatever the compiles print goes to stderr (a file): stdout carries only the entries, so
    # the caller, reading one worker's stdout after another, never finds a pipe full.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if line.strip():
            request = json.loads(line)
            entry = compile_one(request["spec"], request["region"], request["out_dir"])
            out.write(json.dumps(entry) + "\n")
            out.flush()
    return 0


def _main(argv: list[str]) -> int:
    """python -m kiln.regional --worker DEVICE: start_workers' process (above);
    python -m kiln.regional SPEC.json REGION OUT_DIR: one region's compile by hand; prints its
    manifest entry as one JSON line."""
    import json
    import sys
    if len(argv) == 2 and argv[0] == "--worker":
        return _worker(argv[1])
    if len(argv) != 3:
        print("usage: python -m kiln.regional SPEC.json REGION OUT_DIR | --worker DEVICE",
              file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps(compile_one(spec, argv[1], argv[2])))
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv[1:]))
