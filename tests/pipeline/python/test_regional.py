"""The regional layout of the transformer (kiln/regional.py) on flux-tiny, CPU, fp32: eager
regional loop == eager whole model (byte-identical: the same ops on the same tensors); compiled
regional packages and the compiled whole-graph package against eager; a second compile of the
regional set compiles nothing; the artifact key distinguishes the layouts. Compile times of both
layouts are printed (run with -s to see them), not asserted.

Nothing is compiled here: the packages are the fixtures scripts/test.sh makes (the whole-graph
set in KILN_TESTDATA/packages, the regional set compiled on a miss by kiln-run --compile_options
'{"layout":"regional"}' into KILN_TESTDATA/packages-regional), so the file takes seconds. (It
compiled the regional set itself until session 6: 13.6 min under load.) The C++ pipeline's run of
the same set is tests/pipeline/python/test_regional_run.py.

Run: KILN_TESTDATA=... PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q -s \
         tests/pipeline/python/test_regional.py
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from kiln import artifact_key as ak
from kiln import compile as kc
from kiln import components as C
from kiln import regional as R

TESTDATA = os.environ.get("KILN_TESTDATA", "")
REPO = os.path.join(TESTDATA, "flux-tiny")
REGIONAL_PACKAGES = os.path.join(TESTDATA, "packages-regional")
# The bucket of the shared fixtures' transformer package (KILN_TESTDATA/packages, compiled by
# the testdata step with the default options), reused read-only as the whole-graph package so
# only the regional set is compiled here.
BUCKET = {"batch": 1, "height": 256, "width": 256, "text_len": 512}
# Compiled fp32 against eager fp32: Inductor fuses and reorders float32 arithmetic (and its CPU
# kernels vectorise reductions differently from ATen's), so outputs differ by rounding only. The
# flux-tiny output has magnitude ~1; 1e-4 absolute is ~1000 ulps of float32 at 1, far below any
# real error (a wrong weight or a skipped layer moves the output by >1e-1: checked below).
ATOL = 1e-4

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "transformer",
                                                                "config.json")),
                                reason="needs KILN_TESTDATA with flux-tiny")


@pytest.fixture(scope="module")
def model():
    cfg = C.read_component_config(REPO, "transformer")
    bucket = ak.Bucket(**BUCKET)
    m, ex = C.build(cfg, "transformer", "fp32", bucket)
    C.load_weights(m, REPO, "transformer")
    return cfg, bucket, m, ex


def _fixture(layout):
    """The fixture package (set) of `layout` at BUCKET: (manifest, its package root)."""
    options = ak.default_compile_options()
    root = os.path.join(TESTDATA, "packages")
    if layout == "regional":
        options["layout"] = layout
        root = REGIONAL_PACKAGES
    key, _ = kc.make_key(REPO, "transformer", "fp32", BUCKET, "cpu", options)
    path = os.path.join(root, key.digest(), kc.MANIFEST_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"needs the {layout} fixture {path} (scripts/test.sh makes it)")
    with open(path) as f:
        return json.load(f), root, options


def test_eager_regional_loop_is_the_whole_model(model):
    cfg, bucket, m, ex = model
    rs = R.regions(m, bucket, torch.float32, C._input_shapes(cfg, "transformer", "fp32", bucket))
    assert [r.name for r in rs] == list(R.REGIONS)
    assert len(rs[1].prefixes) == cfg["num_layers"]
    assert len(rs[2].prefixes) == cfg["num_single_layers"]
    with torch.no_grad():
        whole = m(*ex)[0]
        calls = {r.name: r.export_module() for r in rs}
        regional = R.run_regional(calls, rs, m.state_dict(), ex)
        assert torch.equal(whole, regional)
        # The loop really uses each layer's weights: layer 1's weights for layer 0 change it.
        state = dict(m.state_dict())
        for n in rs[1].weight_names:
            state[R.checkpoint_name(rs[1], 0, n)] = state[R.checkpoint_name(rs[1], 1, n)]
        wrong = R.run_regional(calls, rs, state, ex)
        assert (wrong - whole).abs().max().item() > 1e-1


def test_key_distinguishes_layouts():
    keys = {}
    for layout in (None, "whole", "regional"):
        options = ak.default_compile_options()
        if layout:
            options["layout"] = layout
        key, _ = kc.make_key(REPO, "transformer", "fp32", BUCKET, "cpu", options)
        keys[layout] = key.digest()
    assert keys["regional"] != keys[None] and keys["regional"] != keys["whole"]
    # Absent layout stays the default's digest (existing keys are unchanged).
    key, _ = kc.make_key(REPO, "transformer", "fp32", BUCKET, "cpu", ak.default_compile_options())
    assert key.digest() == keys[None]
    with pytest.raises(kc.UsageError, match="layout"):
        kc.make_key(REPO, "transformer", "fp32", BUCKET, "cpu", {"layout": "regionl"})
    # The layout is the transformer's alone: the other components keep the whole layout's keys
    # (a regional transformer shares their packages), as ComponentCompileOptions does in C++.
    regional = dict(ak.default_compile_options(), layout="regional")
    for component in ("text_encoder", "text_encoder_2", "vae_decoder"):
        a, _ = kc.make_key(REPO, component, "fp32", BUCKET, "cpu", regional)
        b, _ = kc.make_key(REPO, component, "fp32", BUCKET, "cpu", ak.default_compile_options())
        assert a.digest() == b.digest(), component


def test_sequence_parallel_option_and_region_shapes():
    """Compile option sequence_parallel (docs/multi_gpu.md): keyed for the transformer only,
    regional only, a positive integer; the regions of one rank's bucket of 2 take the rank's
    token shards, and the head returns the whole image's RoPE tables (the C++ loop gives each
    block its rank's rows)."""
    sp = dict(ak.default_compile_options(), layout="regional", sequence_parallel=2)
    rank_bucket = dict(BUCKET, height=128, text_len=256)
    a, _ = kc.make_key(REPO, "transformer", "fp32", rank_bucket, "cpu", sp)
    b, _ = kc.make_key(REPO, "transformer", "fp32", rank_bucket, "cpu",
                       dict(sp, sequence_parallel=1))
    assert a.digest() != b.digest()
    for component in ("text_encoder", "text_encoder_2", "vae_decoder"):
        c, _ = kc.make_key(REPO, component, "fp32", BUCKET, "cpu", sp)
        d, _ = kc.make_key(REPO, component, "fp32", BUCKET, "cpu", ak.default_compile_options())
        assert c.digest() == d.digest(), component
    for bad, match in ((dict(sp, layout="whole"), 'needs layout "regional"'),
                       (dict(sp, sequence_parallel=0), "integer >= 1, got 0"),
                       (dict(sp, sequence_parallel=True), "integer >= 1, got true"),
                       (dict(sp, sequence_parallel="2"), 'integer >= 1, got "2"')):
        with pytest.raises(kc.UsageError, match=match):
            kc.make_key(REPO, "transformer", "fp32", rank_bucket, "cpu", bad)
    spec = {"model": REPO, "precision": "fp32", "bucket": dict(rank_bucket, batch=1),
            "options": sp}
    by_name = {r.name: r for r in R._build_regions(spec)}
    s, l = 8 * 16, 256  # the rank's image and text tokens
    shapes = {name: ([a[1] for a in r.activations], [o[1] for o in r.outputs])
              for name, r in by_name.items()}
    assert shapes["head"][0][:2] == [[1, s, 64], [1, l, 32]]
    assert shapes["head"][1][3] == [2 * (l + s), 16]
    assert shapes["double"][0][3] == [l + s, 16]
    assert shapes["single"][0][0] == [1, l + s, 32]
    assert shapes["tail"][1] == [[1, s, 64]]
    # flux-tiny has 2 attention heads: 4 ranks cannot split them.
    with pytest.raises(ValueError, match="2 attention heads do not divide over 4 ranks"):
        R._build_regions(dict(spec, options=dict(sp, sequence_parallel=4)))


def test_process_group_option_keys_and_names_the_all_to_alls():
    """Compile option process_group (docs/multi_gpu.md): absent and "0" are one key (existing
    keys stay), another name another key, the transformer's alone; bad names refused; and the
    exported double block's all-to-alls name the group given, which C++ resolves at run time."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import _unregister_process_group
    sp = dict(ak.default_compile_options(), layout="regional", sequence_parallel=2)
    rank_bucket = dict(BUCKET, height=128, text_len=256)
    name = "flux-tiny/fp32"

    def digest(component, options, bucket=rank_bucket):
        return kc.make_key(REPO, component, "fp32", bucket, "cpu", options)[0].digest()

    assert digest("transformer", dict(sp, process_group="0")) == digest("transformer", sp)
    assert digest("transformer", dict(sp, process_group=name)) != digest("transformer", sp)
    for component in ("text_encoder", "text_encoder_2", "vae_decoder"):
        assert (digest(component, dict(sp, process_group=name), BUCKET)
                == digest(component, sp, BUCKET)), component
    for bad, match in ((dict(sp, process_group=""), 'process_group must be 1..256 characters'),
                       (dict(sp, process_group=2), "got 2"),
                       (dict(sp, process_group="a b"), 'got "a b"'),
                       (dict(sp, sequence_parallel=1, process_group=name),
                        "there is none without sequence_parallel > 1")):
        with pytest.raises(kc.UsageError, match=match):
            kc.make_key(REPO, "transformer", "fp32", rank_bucket, "cpu", bad)

    spec = {"model": REPO, "precision": "fp32", "bucket": dict(rank_bucket, batch=1),
            "options": dict(sp, process_group=name)}
    assert R.process_group(spec["options"]) == name and R.process_group(sp) == "0"
    (double,) = [r for r in R._build_regions(spec) if r.name == "double"]
    try:
        R._enable_ulysses(double.template, 2, R.process_group(spec["options"]))
        with torch.no_grad():
            ep = torch.export.export(double.export_module().eval(),
                                     R.example_inputs(double, torch.device("cpu")), strict=False)
    finally:
        if dist.is_initialized():
            _unregister_process_group(name)
            dist.destroy_process_group()
    groups = [n.args[-1] for n in ep.graph.nodes
              if n.op == "call_function" and "all_to_all_single" in str(n.target)]
    assert len(groups) == 4 and set(groups) == {name}, groups


def test_compiled_layouts_against_eager(model):
    cfg, bucket, m, ex = model
    whole_manifest, whole_root, _ = _fixture("whole")
    regional_manifest, regional_root, regional_options = _fixture("regional")
    per_region = ", ".join(f"{n} {e['compile_seconds']:.1f} s"
                           for n, e in regional_manifest["regions"].items())
    print(f"\nflux-tiny transformer compile (CPU, fp32, bucket {BUCKET}, the fixtures' manifests): "
          f"whole {whole_manifest['compile_seconds']:.1f} s, regional "
          f"{regional_manifest['total_seconds']:.1f} s ({per_region})")
    assert regional_manifest["layout"] == "regional"
    assert whole_manifest["digest"] != regional_manifest["digest"]
    for entry in regional_manifest["regions"].values():
        assert os.path.isfile(os.path.join(regional_root, regional_manifest["digest"],
                                           entry["package"]["file"]))
    assert regional_manifest["regions"]["double"]["layers"] == [
        f"transformer_blocks.{i}." for i in range(cfg["num_layers"])]

    # A second compile compiles nothing: the manifest on disk is returned (nothing written).
    t0 = time.monotonic()
    again = kc.compile_package(REPO, "transformer", "fp32", BUCKET, "cpu", regional_options,
                               regional_root)
    assert again == regional_manifest and time.monotonic() - t0 < 5

    with torch.no_grad():
        eager = m(*ex)[0]
        whole_pkg = torch._inductor.aoti_load_package(
            os.path.join(whole_root, whole_manifest["digest"], kc.PACKAGE_FILE))
        state = m.state_dict()
        whole_pkg.load_constants({n: state[n] for n in whole_manifest["constants"]},
                                 check_full_update=True, user_managed=True)
        whole = whole_pkg(*ex)[0]
        rs = R.regions(m, bucket, torch.float32,
                       C._input_shapes(cfg, "transformer", "fp32", bucket))
        calls = R.load_regions(os.path.join(regional_root, regional_manifest["digest"]),
                               regional_manifest)
        regional = R.run_regional(calls, rs, state, ex)
    err_whole = (whole - eager).abs().max().item()
    err_regional = (regional - eager).abs().max().item()
    err_between = (regional - whole).abs().max().item()
    print(f"max |diff| vs eager: whole {err_whole:.3g}, regional {err_regional:.3g}; "
          f"regional vs whole {err_between:.3g} (byte-identical: {torch.equal(whole, regional)})")
    assert err_whole <= ATOL and err_regional <= ATOL and err_between <= ATOL


_ISA_PROBE = r"""
import json, sys
import torch
from torch._inductor import config
from torch._inductor import cpu_vec_isa
from kiln import artifact_key as ak
from kiln import compile as kc
# A CPU with every x86 ISA Inductor knows (as the GPU hosts' Sapphire Rapids: AVX-512 BF16, VNNI,
# AMX), whatever this machine has: the ISAs' extra feature checks probe only where the CPU
# claims the feature, and this test must see them wherever it runs.
cpu_vec_isa.x86_isa_checker = lambda: ["avx2", "avx512", "avx512_vnni", "amx_tile"]
for name in ("_is_avx512_bf16_supported", "_is_vnni_supported", "_init_amx",
             "_is_amx_fp16_supported"):
    setattr(torch.cpu, name, lambda: True)
key, _ = kc.make_key(sys.argv[1], "transformer", "bf16", json.loads(sys.argv[2]), sys.argv[3],
                     ak.default_compile_options())
configs = kc._inductor_configs(key, key.digest(), {})
configs.pop("aot_inductor.metadata")
with config.patch(configs):
    print(json.dumps({"isa": str(cpu_vec_isa.pick_vec_isa()),
                      "vec_isa_ok": configs.get("cpp.vec_isa_ok")}))
"""


def _isa_probe_children(target: str, tmp_path, **env_extra) -> tuple[dict, list]:
    """Picks Inductor's CPU vector ISA in a fresh process under kiln-compile's Inductor options
    for `target` on a pretended CPU with every x86 ISA, its child processes recorded
    (bench/gpu/trace_children): (result, children)."""
    import subprocess
    import sys
    trace = tmp_path / (target.replace(":", "_") + "".join(env_extra))
    trace.mkdir()
    source = os.environ.get("KILN_SOURCE", os.path.join(os.path.dirname(__file__), "../../.."))
    env = dict(os.environ, KILN_TRACE_CHILDREN=str(trace),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join([os.path.join(source, "bench/gpu/trace_children"),
                                           os.path.join(source, "pipeline/python")]))
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _ISA_PROBE, REPO, json.dumps(BUCKET), target],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    children = []
    for path in trace.glob("children-*.jsonl"):
        children += [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(out.stdout.strip().splitlines()[-1]), children


def test_cuda_packages_skip_inductors_cpu_isa_probe(tmp_path):
    """A CUDA package's compile runs none of Inductor's CPU-ISA probes — a compile and a
    `python -c "import torch; ..."` load per ISA and extra feature (AVX-512 BF16, VNNI, AMX):
    on the GPU hosts 3.5-5 s each, 40 per regional compile on the H200 before any fix, still 24
    with `vec_isa_ok=True` on the H100 — and compiles the C++ wrapper without CPU vector flags
    (it has no CPU kernels); a CPU package (vectorized C++ kernels) keeps the probe; an
    operator's TORCHINDUCTOR_VEC_ISA_OK wins. The CPU is pretended to have every ISA, so the
    extra features' probes happen here whatever this machine has."""
    def probes(children):
        return [c for c in children if c["event"] == "end" and "-c" in c["argv"][1:2]]
    cpu, cpu_children = _isa_probe_children("cpu", tmp_path)
    cuda, cuda_children = _isa_probe_children("cuda:sm_90", tmp_path)
    assert cpu["vec_isa_ok"] is None and cuda["vec_isa_ok"] is False
    # The CPU target probed the base ISAs and the extra features, the CUDA one nothing.
    assert len(probes(cpu_children)) >= 4, cpu_children
    assert not probes(cuda_children), cuda_children
    assert not [c for c in cuda_children if c["event"] == "end"], cuda_children
    assert cuda["isa"] == "INVALID_VEC_ISA" and cpu["isa"] != cuda["isa"]
    # `vec_isa_ok=True` (this fix's first form) skips the base probe only: the features' probes
    # still run; kiln leaves an operator's setting alone.
    true, true_children = _isa_probe_children("cuda:sm_90", tmp_path,
                                              TORCHINDUCTOR_VEC_ISA_OK="1")
    assert true["vec_isa_ok"] is None and probes(true_children), true_children
