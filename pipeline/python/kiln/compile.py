"""kiln-compile: export one model component with torch.export and compile it with AOTInductor
into a weightless `.pt2` (weights are handed to the package at run time by the C++ pipeline).

    kiln-compile --model DIR --component transformer --precision bf16 \
        --height 1024 --width 1024 --text-len 512 --target cuda:sm_90 --out-root PACKAGES

Writes PACKAGES/<digest>/model.pt2 and PACKAGES/<digest>/manifest.json, where <digest> is the
artifact key's SHA-256 (kiln/artifact_key.py). The directory appears atomically (built under a
temporary name, fsynced, renamed). Prints one JSON object (the manifest) on stdout.
`--print-key` prints the key and its digest without compiling.

Compile options (--compile-options, a JSON object; every key optional; defaults in
kiln.artifact_key.default_compile_options, mirrored by cache::DefaultCompileOptions):
  max_autotune  Inductor autotuning (longer compiles, faster kernels on GPUs)
  fuse_qkv      transformer: one fused QKV projection per attention stream
  layout        transformer: "whole" (one package, the default; absent means whole) or
                "regional" (one package per region: head, double block, single block, tail, the
                weights run-time inputs so one package serves every layer: kiln/regional.py). The
                other components compile the same either way.
  sequence_parallel  transformer, layout "regional" only: an integer P >= 1 (absent means 1):
                the set is one rank's of P for Ulysses sequence parallelism (kiln/regional.py,
                docs/multi_gpu.md); the bucket is the rank's (--height and --text-len divided
                by P); the blocks' all-to-alls name the process group `process_group`
  process_group transformer, sequence_parallel > 1 only: the c10d group name the blocks'
                all-to-alls resolve at run time (1..256 characters of [A-Za-z0-9._:/-]; absent
                means "0", Python's default group, and "0" keys as absent); a multi-GPU node
                names its groups "<model>/<precision>" (docs/multi_gpu.md)
  attention     transformer: "sdpa" (PyTorch chooses), "cudnn", "flash" or "efficient" (that
                fused CUDA kernel; CPU targets always use sdpa), or "fp8" (kiln's Triton e4m3
                kernel, kiln/models/fp8_attention.py, compiled into the package; precision fp8
                only)
  fused_quant   transformer, precision fp8 only: the fp8 linears' inputs quantized inside the
                kernels that make them (kiln/models/fused_quant.py: LayerNorm + modulation, GELU)
Their canonical JSON is part of the artifact key, so the C++ pipeline must pass the same object.

Manifest `constants`: FQN -> {"shape", "dtype", "source": "checkpoint" | "package"}; a checkpoint
constant that is not a checkpoint tensor as it is (fused QKV, fp8 weight or scale) also has
`"derive": {"op": "concat0" | "fp8_rowwise" | "fp8_rowwise_scale", "from": [checkpoint names]}`
(kiln/models/quant.py), computed by the loader when the weights are read.
Manifest `canary`: a small fixed input and the package's output on it with synthetic constants
(kiln/canary.py: recipe, file canary.safetensors, tolerance per precision); a node recomputes it
after loading the package and quarantines a package whose output disagrees.
`--kiln-revision R` (cache::SubprocessCompiler passes its build's): refuse, before any work,
unless R is this kiln-compile's own code revision (kiln.artifact_key.code_revision, the key's
`toolchain.kiln`).
Exit status: 0 ok, 2 bad arguments or model repository, 1 export/compile failure, 3 the package
directory is full (ENOSPC, EDQUOT), 4 it may not be written (EACCES, EPERM, EROFS), 5 the caller's
`--kiln-revision` is not this kiln-compile's; for 3, 4 and 5 the last line of stderr says so in
one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any

from kiln import artifact_key as ak
from kiln import canary
from kiln import region_workers

PACKAGE_FILE = "model.pt2"
MANIFEST_FILE = "manifest.json"
EXTRA_CONSTANTS_FILE = "constants.safetensors"
MANIFEST_FORMAT = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
# compile option process_group: a model name's characters (it is written into generated code).
PROCESS_GROUP_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,256}")
REVISION_MISMATCH = 5  # exit status: --kiln-revision is not this kiln-compile's code revision


class UsageError(Exception):
    """Bad arguments or model repository: exit status 2."""


def toolchain(target: str) -> dict:
    """Versions that shape the generated code: torch, CUDA and Triton, and kiln's own code
    revision (artifact_key.code_revision of the package this runs from). CUDA and Triton only
    matter for CUDA targets and are left empty for CPU ones (pipeline/key_policy.cc builds keys
    the same way)."""
    import torch
    kiln = ak.code_revision()
    if target == "cpu":
        return {"torch": torch.__version__, "cuda": "", "triton": "", "kiln": kiln}
    try:
        import triton as _triton  # noqa: PLC0415
        triton = _triton.__version__
    except ImportError:
        triton = ""
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "", "triton": triton,
            "kiln": kiln}


def revision_mismatch(expected: str | None) -> str | None:
    """The sentence refusing a compile whose caller was built from other kiln code than this
    kiln-compile runs (`--kiln-revision`, passed by cache::SubprocessCompiler), or None. Its
    package would land under a key the caller never asks for, or, were the caller's revision
    taken, graphs of this code under the other code's key."""
    if expected is None:
        return None
    ours = ak.code_revision()
    if expected == ours:
        return None
    return (f"code revision mismatch: the caller was built from kiln code revision {expected}, "
            f"this kiln-compile runs kiln code revision {ours} ({ak.PACKAGE_DIR}); the binary "
            "and the Python package come from different checkouts: rebuild the binary from this "
            "checkout or point it at its own kiln-compile")


def component_bucket(component: str, config: dict, batch: int, height: int, width: int,
                     text_len: int) -> ak.Bucket:
    """The bucket fields a component's package depends on; must match the C++ pipeline's
    KeyPolicy::BucketFor() (pipeline/key_policy.cc)."""
    if component == "text_encoder":
        return ak.Bucket(batch=batch, text_len=int(config["max_position_embeddings"]))
    if component == "text_encoder_2":
        return ak.Bucket(batch=batch, text_len=text_len)
    if component == "transformer":
        return ak.Bucket(batch=batch, height=height, width=width, text_len=text_len)
    if component == "vae_decoder":
        return ak.Bucket(batch=batch, height=height, width=width)
    raise UsageError(f"unknown component {component!r}; expected one of {ak.COMPONENTS}")


def check_compile_options(options: Any) -> None:
    """UsageError unless `options` is a JSON object of known options (the model options of
    kiln.components plus how Inductor compiles) with allowed values; anything else is refused (a
    misspelt option would silently compile the default model under a different key)."""
    from kiln import components
    from kiln.regional import LAYOUTS
    known = {"max_autotune": bool, "layout": LAYOUTS, "sequence_parallel": int,
             "process_group": str, **components.MODEL_OPTION_VALUES}
    if not isinstance(options, dict):
        raise UsageError("--compile-options must be a JSON object")
    for name, value in options.items():
        if name not in known:
            raise UsageError(f"--compile-options: unknown option {name!r} (known: "
                             f"{', '.join(sorted(known))})")
        error = components.option_value_error(name, value, known[name])
        if error:
            raise UsageError(f"--compile-options: {error}")
    world = options.get("sequence_parallel", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise UsageError(f"--compile-options: sequence_parallel must be an integer >= 1, got "
                         f"{json.dumps(world)}")
    if world > 1 and options.get("layout") != "regional":
        raise UsageError("--compile-options: sequence_parallel needs layout \"regional\"")
    if "process_group" in options:
        name = options["process_group"]
        if not isinstance(name, str) or not PROCESS_GROUP_NAME.fullmatch(name):
            raise UsageError(f"--compile-options: process_group must be 1..256 characters of "
                             f"[A-Za-z0-9._:/-], got {json.dumps(name)}")
        if world == 1 and name != _default_process_group():
            raise UsageError(f"--compile-options: process_group {json.dumps(name)} names the "
                             "all-to-alls' group of a sequence-parallel set; there is none "
                             "without sequence_parallel > 1")


def component_compile_options(options: dict, component: str) -> dict:
    """The options `component` is compiled with and keyed by: `options` less the transformer-only
    `layout` (and `sequence_parallel`, `process_group`) for the other components, so a regional
    transformer shares the whole layout's text encoders and VAE, and less a `process_group` of
    "0" (the default: absent and "0" are one key). Twin of ComponentCompileOptions
    (pipeline/key_policy.h)."""
    if not isinstance(options, dict):
        return options
    if component == "transformer":
        return {k: v for k, v in options.items()
                if not (k == "process_group" and v == _default_process_group())}
    return {k: v for k, v in options.items()
            if k not in ("layout", "sequence_parallel", "process_group")}


def _default_process_group() -> str:
    """The name a sequence-parallel set's all-to-alls resolve when the options give none."""
    from kiln.regional import PROCESS_GROUP
    return PROCESS_GROUP


def make_key(model: str, component: str, precision: str, bucket_args: dict, target: str,
             compile_options: dict) -> tuple[ak.ArtifactKey, dict]:
    from kiln import components
    check_compile_options(compile_options)
    compile_options = component_compile_options(compile_options, component)
    error = components.precision_option_error(precision, compile_options)
    if error:
        raise UsageError(f"--compile-options: {error}")
    if component not in ak.COMPONENTS:
        raise UsageError(f"--component {component!r} is not one of {', '.join(ak.COMPONENTS)}")
    try:
        config = components.read_component_config(model, component)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: cannot read the {component} config: {e}") from e
    bucket = component_bucket(component, config, **bucket_args)
    key = ak.ArtifactKey(
        architecture=ak.architecture_digest(config), component=component, precision=precision,
        bucket=bucket, compile=ak.compile_options_digest(compile_options), target=target,
        toolchain=toolchain(target))
    try:
        key.validate()
    except ValueError as e:
        raise UsageError(str(e)) from e
    return key, config


def _inductor_configs(key: ak.ArtifactKey, digest: str, options: dict) -> dict:
    metadata = {
        "kiln.digest": digest,
        "kiln.key": ak.canonical_json(key.to_json()),
        "kiln.component": key.component,
        "kiln.precision": key.precision,
        "kiln.target": key.target,
        "kiln.torch_version": key.toolchain["torch"],
    }
    configs: dict[str, Any] = {
        "aot_inductor.package_constants_in_so": False,
        # Without this Inductor inlines small constants (1-D, <= 8 elements, e.g. a final conv's
        # bias) into the generated code: the export-time values would be baked into a package
        # that is meant to take every weight at run time.
        "always_keep_tensor_constants": True,
        "aot_inductor.metadata": metadata,
    }
    if key.precision in ("bf16", "fp8"):
        # Round to bf16 wherever eager PyTorch would. Without it Inductor keeps fused bf16
        # intermediates in float32, which is usually harmless but not before a sinusoid: the
        # guidance embedding's input bf16(3.5) * 1000 is 3504 in eager bf16 and 3500 fused, and
        # the whole transformer output moved by 56% (measured on flux-dev, bench/README.md).
        configs["emulate_precision_casts"] = True
    if key.target.startswith("cuda") and "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        # Inductor tests the CPU vector ISAs /proc/cpuinfo lists by compiling a probe for each and
        # loading it in a fresh process (`python -c "import torch ..."` in torch 2.11: 3.5-5 s
        # each), once per ISA and process, under file locks that the regional layout's region
        # processes share. A CUDA package has no CPU kernels: the ISA only sets the C++ wrapper's
        # compile flags (and an `AOTI_CPU_ISA` metadata string nothing reads). `vec_isa_ok=False`
        # skips every probe and compiles the wrapper without vector flags. (`True` skips only the
        # base probe: on the H100 host, whose CPUs have AVX-512 BF16, VNNI and AMX, each region
        # process still ran six probes for those and waited ~10 s on their locks, 2026-12-07.)
        # An operator's TORCHINDUCTOR_VEC_ISA_OK wins. CPU packages, whose kernels are vectorized
        # C++, keep the probe.
        configs["cpp.vec_isa_ok"] = False
    if options.get("max_autotune"):
        configs["max_autotune"] = True
    return configs


PACKAGE_ATTEMPTS = 3


def package_problem(package_path: str, digest: str | None) -> str | None:
    """What is wrong with a freshly written package, or None: every `*_metadata.json` in it must
    be JSON naming this compile's `kiln.digest`, and every shared library must be a whole ELF file
    (its section header table inside the file). Inductor writes a graph's metadata and library
    into its cache directory under a lock, but aoti_compile_and_package zips them up after
    releasing it: another compile of the same graph sharing that cache (two kiln-run or
    kiln-node processes on one host, two keys whose graphs are equal) can truncate or rewrite them
    in between, and the package then carries an empty metadata file (seen: kiln-canary's "cannot
    read metadata: ... attempting to parse an empty input") or the other compile's key."""
    import json
    import struct
    import zipfile
    try:
        with zipfile.ZipFile(package_path) as z:
            names = z.namelist()
            metadata = [n for n in names if n.endswith("_metadata.json")]
            if not metadata:
                return "no *_metadata.json in the package"
            for name in metadata:
                try:
                    md = json.loads(z.read(name) or b"null")
                except ValueError as e:
                    return f"{name} is not JSON ({e})"
                if not isinstance(md, dict):
                    return f"{name} is empty or not a JSON object"
                if md.get("kiln.digest") != digest:
                    return (f"{name} names digest {str(md.get('kiln.digest'))[:12]!r}, "
                            f"not this compile's {str(digest)[:12]!r}")
            for name in (n for n in names if n.endswith(".so")):
                data = z.read(name)
                if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:
                    return f"{name} is not a 64-bit ELF file ({len(data)} bytes)"
                fmt = "<" if data[5] == 1 else ">"
                shoff, = struct.unpack_from(fmt + "Q", data, 0x28)
                shentsize, shnum = struct.unpack_from(fmt + "HH", data, 0x3A)
                if shoff + shentsize * shnum > len(data):
                    return (f"{name} is truncated ({len(data)} bytes; its section headers end at "
                            f"{shoff + shentsize * shnum})")
    except (OSError, zipfile.BadZipFile) as e:
        return f"not a readable zip ({e})"
    return None


def aoti_package(ep, package_path: str, inductor_configs: dict, digest: str | None) -> None:
    """torch._inductor.aoti_compile_and_package, checked (package_problem): a package another
    compile spoiled is compiled again, without Inductor's FX graph cache (a hit would package the
    same shared files again), up to PACKAGE_ATTEMPTS times; then a clear error."""
    import torch
    configs = dict(inductor_configs)
    problem = None
    for attempt in range(1, PACKAGE_ATTEMPTS + 1):
        torch._inductor.aoti_compile_and_package(ep, package_path=package_path,
                                                 inductor_configs=configs)
        problem = package_problem(package_path, digest)
        if problem is None:
            return
        print(f"kiln-compile: {package_path}: {problem} (attempt {attempt} of "
              f"{PACKAGE_ATTEMPTS}): another compile sharing the Inductor cache "
              f"(TORCHINDUCTOR_CACHE_DIR) changed its files while this one packaged them; "
              "compiling again", file=sys.stderr, flush=True)
        configs["fx_graph_cache"] = False
    raise RuntimeError(f"{package_path}: {problem} after {PACKAGE_ATTEMPTS} attempts (other "
                       "compiles sharing the Inductor cache keep changing its files)")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _specs(specs) -> list[dict]:
    return [{"name": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
            for name, shape, dtype in specs]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_out_root(out_root: str, nbytes: int = 1 << 20) -> None:
    """Writes, fsyncs and deletes a 1 MiB file in `out_root` before any work: a full or read-only
    package directory is then an OSError here (exit 3 / 4 with one line), not an abort inside
    torch's zip writer (which cannot be caught) after minutes of compiling."""
    os.makedirs(out_root, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".kiln-compile-probe-", dir=out_root)
    try:
        block = memoryview(b"\0" * nbytes)
        while block:  # a nearly full disk takes a short write first, then ENOSPC
            block = block[os.write(fd, block):]
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def constant_table(module, ep) -> tuple[dict[str, dict], dict]:
    """The manifest's `constants` for the exported program `ep` of `module`, and the tensors that
    ship in constants.safetensors.

    Checkpoint tensors come from the model repository at run time ("source": "checkpoint", with
    "derive" when the loader computes them from checkpoint tensors: kiln/models/quant.py);
    anything else (non-persistent buffers, lifted constants) ships beside the package
    ("source": "package"). Only constants the graph uses are listed: the C++ loader insists that
    the package asks for every one of them (none baked into its code)."""
    import torch
    from kiln import components

    checkpoint_names = set(module.state_dict().keys())
    derived = components.derivations(module)
    sig = ep.graph_signature
    placeholder_to_fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                          **sig.inputs_to_lifted_tensor_constants}
    used = {placeholder_to_fqn[n.name] for n in ep.graph.nodes
            if n.op == "placeholder" and n.users and n.name in placeholder_to_fqn}
    constants: dict[str, dict] = {}
    extra: dict[str, torch.Tensor] = {}
    for name, tensor in list(ep.state_dict.items()) + list(ep.constants.items()):
        if not isinstance(tensor, torch.Tensor) or name not in used:
            continue
        source = "checkpoint" if name in checkpoint_names else "package"
        constants[name] = {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
                           "source": source}
        if source == "checkpoint" and name in derived:
            constants[name]["derive"] = derived[name].to_json()
        if source == "package":
            extra[name] = tensor.detach().to("cpu").contiguous()
    return constants, extra


def compile_package(model: str, component: str, precision: str, bucket_args: dict, target: str,
                    compile_options: dict, out_root: str, workers: list | None = None) -> dict:
    """Compiles (or finds) the package; `workers` (kiln.region_workers.start_workers),
    for a regional transformer, are processes started earlier that compile its regions."""
    import torch
    from kiln import components

    key, config = make_key(model, component, precision, bucket_args, target, compile_options)
    compile_options = component_compile_options(compile_options, component)
    digest = key.digest()
    final_dir = os.path.join(out_root, digest)
    if os.path.exists(os.path.join(final_dir, MANIFEST_FILE)):
        with open(os.path.join(final_dir, MANIFEST_FILE)) as f:
            return json.load(f)

    probe_out_root(out_root)
    device = "cpu" if target == "cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--target {target} needs a CUDA device and none is visible")
    if component == "transformer" and compile_options.get("layout") == "regional":
        return _compile_regional(key, digest, config, model, precision, device,
                                 compile_options, out_root, final_dir, workers)
    t0 = time.monotonic()
    module, example_inputs = components.build(config, component, precision, key.bucket,
                                              device=device, compile_options=compile_options)
    module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, tuple(example_inputs), strict=False)
    export_seconds = time.monotonic() - t0

    constants, extra = constant_table(module, ep)

    os.makedirs(out_root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=out_root)
    try:
        pkg_path = os.path.join(tmp_dir, PACKAGE_FILE)
        t1 = time.monotonic()
        aoti_package(ep, pkg_path, _inductor_configs(key, digest, compile_options), digest)
        compile_seconds = time.monotonic() - t1
        if extra:
            from safetensors.torch import save_file
            save_file(extra, os.path.join(tmp_dir, EXTRA_CONSTANTS_FILE))
        with open(pkg_path, "rb") as f:
            pkg_sha = ak.sha256_hex(f.read())
        manifest = {
            "format": MANIFEST_FORMAT,
            "digest": digest,
            "key": key.to_json(),
            "package": {"file": PACKAGE_FILE, "sha256": pkg_sha, "bytes": os.path.getsize(pkg_path)},
            "extra_constants": EXTRA_CONSTANTS_FILE if extra else "",
            "constants": constants,
            "inputs": _specs(components.input_spec(config, component, precision, key.bucket)),
            "outputs": _specs(components.output_spec(config, component, precision, key.bucket)),
            "compile_options": compile_options,
            "canary": None,
            "export_seconds": round(export_seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "built_by": socket.gethostname(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "toolchain": dict(key.toolchain, python=platform.python_version(),
                              platform=f"{platform.system()}-{platform.machine()}"),
        }
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            manifest["tuned_on"] = {"gpu": props.name, "sm_count": props.multi_processor_count}
        # The canary runs in kiln-canary (another process), which loads a full set of synthetic
        # constants on the device: the module built here (the whole checkpoint's size on the
        # device) is released first, so that peak device memory is one copy, not two (two
        # plus a VAE compile beside them did not fit an 80 GB H100 at 1024² batch 2).
        del module, ep, extra
        if device == "cuda":
            import gc
            gc.collect()
            torch.cuda.empty_cache()
        t2 = time.monotonic()
        manifest["canary"] = canary.record(pkg_path, manifest, example_inputs, precision, tmp_dir)
        manifest["canary"]["seconds"] = round(time.monotonic() - t2, 3)
        return _publish(tmp_dir, final_dir, out_root, manifest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _publish(tmp_dir: str, final_dir: str, out_root: str, manifest: dict) -> dict:
    """Writes the manifest into tmp_dir, fsyncs and renames it to final_dir (or returns the
    manifest of a concurrent compiler that published first)."""
    with open(os.path.join(tmp_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    for name in os.listdir(tmp_dir):
        with open(os.path.join(tmp_dir, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp_dir)
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not os.path.exists(os.path.join(final_dir, MANIFEST_FILE)):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
        with open(os.path.join(final_dir, MANIFEST_FILE)) as f:
            return json.load(f)
    _fsync_dir(out_root)
    return manifest


def _compile_regional(key, digest: str, config: dict, model_dir: str, precision: str, device: str,
                      compile_options: dict, out_root: str, final_dir: str,
                      workers: list | None = None) -> dict:
    """The regional layout of the transformer (kiln/regional.py): PACKAGES/<digest>/ holds
    head.pt2, double.pt2, single.pt2, tail.pt2 and a manifest with `layout: "regional"` and a
    `regions` object (per region: package, inputs, outputs, weights, layer prefixes). No
    `package` and no `constants`: every weight is a region input. A sequence-parallel set
    (compile option `sequence_parallel` > 1) also records `process_group`, the c10d group name
    its blocks' all-to-alls resolve."""
    import torch
    from kiln import components, regional

    os.makedirs(out_root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=out_root)
    try:
        t0 = time.monotonic()
        table = regional.compile_regions(
            {"model": model_dir, "precision": precision, "bucket": dataclasses.asdict(key.bucket),
             "options": compile_options, "device": device,
             "inductor_configs": _inductor_configs(key, digest, compile_options)}, tmp_dir,
            workers=workers)
        seconds = time.monotonic() - t0
        manifest = {
            "format": MANIFEST_FORMAT,
            "digest": digest,
            "key": key.to_json(),
            "layout": "regional",
            "regions": table,
            # What the blocks' all-to-alls resolve (sequence-parallel sets only).
            **({"process_group": regional.process_group(compile_options)}
               if regional.sequence_parallel(compile_options) > 1 else {}),
            "constants": {},
            "extra_constants": "",
            "inputs": _specs(components.input_spec(config, "transformer", precision, key.bucket)),
            "outputs": _specs(components.output_spec(config, "transformer", precision,
                                                     key.bucket)),
            "compile_options": compile_options,
            # Per-region sums; the regions compile concurrently, total_seconds is the wall time.
            "export_seconds": round(sum(r["export_seconds"] for r in table.values()), 3),
            "compile_seconds": round(sum(r["compile_seconds"] for r in table.values()), 3),
            "total_seconds": round(seconds, 3),
            "built_by": socket.gethostname(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "toolchain": dict(key.toolchain, python=platform.python_version(),
                              platform=f"{platform.system()}-{platform.machine()}"),
        }
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            manifest["tuned_on"] = {"gpu": props.name, "sm_count": props.multi_processor_count}
        return _publish(tmp_dir, final_dir, out_root, manifest)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers-layout model repository")
    p.add_argument("--component", required=True, choices=ak.COMPONENTS)
    p.add_argument("--precision", default="fp32", choices=ak.PRECISIONS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--height", type=int, default=0, help="image height in pixels")
    p.add_argument("--width", type=int, default=0, help="image width in pixels")
    p.add_argument("--text-len", type=int, default=0, help="T5 text length in tokens")
    p.add_argument("--target", default="cpu", help="cpu or cuda:sm_XX")
    p.add_argument("--compile-options", default=None,
                   help="JSON object of compile options (default: kiln's defaults)")
    p.add_argument("--out-root", default="packages", help="package directory root")
    p.add_argument("--print-key", action="store_true", help="print the key and digest only")
    p.add_argument("--kiln-revision", default=None,
                   help="refuse (exit 5) unless this is kiln-compile's own code revision")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mismatch = revision_mismatch(args.kiln_revision)
    if mismatch:
        print(f"kiln-compile: {mismatch}", file=sys.stderr)
        return REVISION_MISMATCH
    # Before anything imports torch here or in the region workers (region_workers.bytecode_cache).
    region_workers.bytecode_cache()
    try:
        options = (json.loads(args.compile_options) if args.compile_options
                   else ak.default_compile_options())
        bucket_args = {"batch": args.batch, "height": args.height, "width": args.width,
                       "text_len": args.text_len}
        if args.component in ("transformer", "vae_decoder"):
            for name in ("height", "width"):
                v = bucket_args[name]
                if v <= 0 or v % 16:
                    raise UsageError(f"--{name} {v}: must be a positive multiple of 16")
        if args.component in ("transformer", "text_encoder_2") and args.text_len <= 0:
            raise UsageError(f"--text-len {args.text_len}: must be positive for {args.component}")
        if args.print_key:
            key, _ = make_key(args.model, args.component, args.precision, bucket_args,
                              args.target, options)
            print(ak.canonical_json({"key": key.to_json(), "digest": key.digest()}))
            return 0
        workers = None
        jobs = min(region_workers.regional_jobs(), region_workers.REGION_COUNT)
        if args.component == "transformer" and options.get("layout") == "regional" and jobs > 1:
            # Started before this process imports torch, so that their start-up overlaps it
            workers = region_workers.start_workers("cpu" if args.target == "cpu" else "cuda",
                                                   jobs)
        try:
            manifest = compile_package(args.model, args.component, args.precision, bucket_args,
                                       args.target, options, args.out_root, workers)
        finally:
            if workers:
                region_workers.stop_workers(workers)
    except json.JSONDecodeError as e:
        print(f"kiln-compile: --compile-options is not JSON: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"kiln-compile: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A full or unwritable package directory: the traceback for the log, then one line that
        # says what and where; the exit status tells the caller which (cache/compiler.cc).
        if e.errno not in DISK_FULL + DISK_DENIED:
            raise
        traceback.print_exc()
        print(f"kiln-compile: cannot write packages to {args.out_root}: {e.strerror}"
              f"{f' ({e.filename})' if e.filename else ''}", file=sys.stderr)
        return 3 if e.errno in DISK_FULL else 4
    print(json.dumps(manifest, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
