"""The four exportable pipeline components (pipeline/README.md "Components and their package
signatures"): export wrappers, their builders, the checkpoint loader and the input/output specs.

Called by kiln-compile (kiln/compile.py) and the tests. Each wrapper's forward takes exactly the
contract's positional inputs and returns a 1-tuple; each wrapper is a subclass of the model it
exports, so its state_dict keys are the checkpoint names with no wrapper prefix.

    module, example_inputs = build(config, "transformer", "bf16", bucket, device="cuda")
    load_weights(module, repo_dir, "transformer")       # only to run it eagerly; export needs none

Precision fp8 applies to the transformer only: its block linears become e4m3 Fp8Linear
(kiln.models.quant) with bf16 activations. The other components of an fp8 pipeline run bf16 math;
their packages are compiled under precision "fp8" keys (the C++ pipeline uses one precision for
every component) and are otherwise identical to the bf16 ones.

Compile options that shape the model (kiln-compile --compile-options): `fuse_qkv` (bool, default
false) fuses the transformer's attention projections (see kiln.models.flux); `attention` picks the
attention kernel, "fp8" being kiln's own e4m3 kernel (kiln.models.fp8_attention), allowed with
precision fp8 only; `fused_quant` (bool, default false, fp8 only) quantizes the fp8 linears'
inputs inside the kernels that make them (kiln.models.fused_quant). Parameters that are
not checkpoint tensors as they are (fused, fp8) are derived at weight-load time: `derivations()`
says how, and load_weights / the C++ loader compute them from the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable

import torch
from torch import nn

from kiln import artifact_key as ak
from kiln.models.clip import ClipTextModel
from kiln.models.flux import ATTENTION_BACKENDS, FluxTransformer
from kiln.models.quant import Derive, derive, derivations, fp8_rowwise
from kiln.models.t5 import T5Encoder
from kiln.models.vae import VaeDecoder, downscale_factor

# Repository folder holding each component's config.json and weights.
FOLDERS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "transformer": "transformer",
    "vae_decoder": "vae",
}
# Weight file stems: diffusers models use the first, transformers models the second.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# Image pixels per packed transformer token along each side: VAE 8x, then 2x2 patch packing.
PIXELS_PER_TOKEN = 16

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int64: "int64"}


class WeightsError(ValueError):
    """A checkpoint does not provide what the component needs (missing names, wrong shapes)."""


def activation_dtype(precision: str) -> torch.dtype:
    """fp32 -> float32; bf16 and fp8 -> bfloat16 (fp8 runs e4m3 linears with bf16 activations)."""
    if precision == "fp32":
        return torch.float32
    if precision in ("bf16", "fp8"):
        return torch.bfloat16
    raise ValueError(f"precision {precision!r} is not one of {ak.PRECISIONS}")


def _check_component(component: str) -> None:
    if component not in FOLDERS:
        raise ValueError(f"component {component!r} is not one of {ak.COMPONENTS}")


def read_component_config(repo_dir: str, component: str) -> dict:
    """The component's config.json (vae_decoder reads vae/config.json) as a dict."""
    _check_component(component)
    path = os.path.join(repo_dir, FOLDERS[component], "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


# ---------------------------------------------------------------------------------------------
# Export wrappers.


class ClipPooledExport(ClipTextModel):
    """text_encoder: input_ids int64 [B, 77] -> (pooled act [B, hidden_size],)."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (super().forward(input_ids)[1],)


class T5Export(T5Encoder):
    """text_encoder_2: input_ids int64 [B, L] -> (last hidden act [B, L, d_model],)."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (super().forward(input_ids),)


class FluxTransformerExport(FluxTransformer):
    """transformer: (hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance)
    -> (velocity act [B, S, in_channels],). The RoPE ids and tables are built in the graph from
    the bucket's static sizes; guidance is ignored by configs without guidance_embeds."""

    def __init__(self, config: dict, bucket: ak.Bucket, fuse_qkv: bool = False,
                 fp8: bool = False, attention: str = "sdpa", fused_quant: bool = False):
        super().__init__(config, fuse_qkv=fuse_qkv, fp8=fp8, attention=attention,
                         fused_quant=fused_quant)
        self.rows = bucket.height // PIXELS_PER_TOKEN
        self.cols = bucket.width // PIXELS_PER_TOKEN
        self.text_len = bucket.text_len

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor,
                guidance: torch.Tensor) -> tuple[torch.Tensor]:
        if hidden_states.shape[1] != self.rows * self.cols:
            raise ValueError(f"transformer: hidden_states has {hidden_states.shape[1]} tokens, "
                             f"the bucket {self.rows}x{self.cols}")
        if encoder_hidden_states.shape[1] != self.text_len:
            raise ValueError(f"transformer: encoder_hidden_states has "
                             f"{encoder_hidden_states.shape[1]} tokens, the bucket {self.text_len}")
        rope = self.rope_for(self.rows, self.cols, self.text_len, hidden_states.device)
        out = super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                              guidance, rope)
        return (out,)


class VaeDecoderExport(VaeDecoder):
    """vae_decoder: latents act [B, C, H/8, W/8] in transformer space -> (float32 [B, 3, H, W]
    in [-1, 1],). Undoes the latent normalisation itself: z / scaling_factor + shift_factor."""

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        z = latents / self.scaling_factor + self.shift_factor
        return (super().forward(z).clamp(-1.0, 1.0).float(),)


# ---------------------------------------------------------------------------------------------
# Shapes.


def _validate_bucket(config: dict, component: str, bucket: ak.Bucket) -> None:
    if bucket.batch < 1:
        raise ValueError(f"{component}: bucket.batch {bucket.batch} must be >= 1")
    if component == "text_encoder":
        n = int(config["max_position_embeddings"])
        if bucket.text_len not in (0, n):
            raise ValueError(f"text_encoder: bucket.text_len {bucket.text_len} must be 0 or the "
                             f"CLIP length {n}")
    if component in ("text_encoder_2", "transformer") and bucket.text_len < 1:
        raise ValueError(f"{component}: bucket.text_len {bucket.text_len} must be >= 1")
    if component in ("transformer", "vae_decoder"):
        step = PIXELS_PER_TOKEN if component == "transformer" else downscale_factor(config)
        for name in ("height", "width"):
            v = getattr(bucket, name)
            if v < 1 or v % step:
                raise ValueError(f"{component}: bucket.{name} {v} must be a positive multiple "
                                 f"of {step}")


def _input_shapes(config: dict, component: str, precision: str, bucket: ak.Bucket
                  ) -> list[tuple[str, list[int], torch.dtype]]:
    _check_component(component)
    _validate_bucket(config, component, bucket)
    act = activation_dtype(precision)
    b = bucket.batch
    if component == "text_encoder":
        return [("input_ids", [b, int(config["max_position_embeddings"])], torch.int64)]
    if component == "text_encoder_2":
        return [("input_ids", [b, bucket.text_len], torch.int64)]
    if component == "transformer":
        s = (bucket.height // PIXELS_PER_TOKEN) * (bucket.width // PIXELS_PER_TOKEN)
        return [("hidden_states", [b, s, int(config["in_channels"])], act),
                ("encoder_hidden_states", [b, bucket.text_len, int(config["joint_attention_dim"])],
                 act),
                ("pooled_projections", [b, int(config["pooled_projection_dim"])], act),
                ("timestep", [b], torch.float32),
                ("guidance", [b], torch.float32)]
    f = downscale_factor(config)
    return [("latents", [b, int(config.get("latent_channels", 4)), bucket.height // f,
                         bucket.width // f], act)]


def _output_shapes(config: dict, component: str, precision: str, bucket: ak.Bucket
                   ) -> list[tuple[str, list[int], torch.dtype]]:
    inputs = _input_shapes(config, component, precision, bucket)
    act = activation_dtype(precision)
    b = bucket.batch
    if component == "text_encoder":
        return [("pooled", [b, int(config["hidden_size"])], act)]
    if component == "text_encoder_2":
        return [("last_hidden_state", [b, bucket.text_len, int(config["d_model"])], act)]
    if component == "transformer":
        out_ch = int(config.get("out_channels") or config["in_channels"])
        return [("sample", [b, inputs[0][1][1], out_ch], act)]
    return [("image", [b, int(config.get("out_channels", 3)), bucket.height, bucket.width],
             torch.float32)]


def input_spec(config: dict, component: str, precision: str, bucket: ak.Bucket
               ) -> list[tuple[str, list[int], str]]:
    """The package's positional inputs: (name, shape, dtype name) in call order."""
    return [(n, s, _DTYPE_NAMES[d]) for n, s, d in _input_shapes(config, component, precision,
                                                                  bucket)]


def output_spec(config: dict, component: str, precision: str, bucket: ak.Bucket
                ) -> list[tuple[str, list[int], str]]:
    """The package's outputs: (name, shape, dtype name)."""
    return [(n, s, _DTYPE_NAMES[d]) for n, s, d in _output_shapes(config, component, precision,
                                                                   bucket)]


# ---------------------------------------------------------------------------------------------
# Building.


# Compile options that change the model built (the others only change how it is compiled).
MODEL_OPTIONS = {"fuse_qkv": False, "attention": "sdpa", "fused_quant": False}
# Allowed values of each model option (a type, or a tuple of allowed values).
MODEL_OPTION_VALUES = {"fuse_qkv": bool, "attention": ATTENTION_BACKENDS, "fused_quant": bool}


def option_value_error(name: str, value, allowed) -> str | None:
    """Why `value` is not an allowed value of the option `name` (`allowed`: a type or a tuple of
    values), or None. kiln-compile checks every compile option with it."""
    if isinstance(allowed, tuple):
        if value not in allowed:
            return f"{name} must be one of {', '.join(allowed)}, got {json.dumps(value)}"
    elif allowed is bool and not isinstance(value, bool):
        return f"{name} must be true or false, got {json.dumps(value)}"
    return None


def _construct(config: dict, component: str, precision: str, bucket: ak.Bucket,
               options: dict) -> nn.Module:
    if component == "text_encoder":
        return ClipPooledExport(config)
    if component == "text_encoder_2":
        return T5Export(config)
    if component == "transformer":
        return FluxTransformerExport(config, bucket, fuse_qkv=bool(options["fuse_qkv"]),
                                     fp8=precision == "fp8", attention=options["attention"],
                                     fused_quant=bool(options["fused_quant"]))
    return VaeDecoderExport(config)


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """module.to(dtype) for floating parameters and buffers, except those a submodule lists in
    KEEP_DTYPE (an Fp8Linear's float8 weight and float32 scale)."""
    for sub in module.modules():
        keep = getattr(sub, "KEEP_DTYPE", ())
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None or name in keep or not t.is_floating_point() or t.dtype == dtype:
                    continue
                cast = t.detach().to(dtype)
                table[name] = nn.Parameter(cast, requires_grad=False) \
                    if isinstance(t, nn.Parameter) else cast


def _example_inputs(specs: list[tuple[str, list[int], torch.dtype]], component: str,
                    device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, shape, dtype in specs:
        if dtype == torch.int64:
            t = torch.zeros(shape, dtype=dtype)
        elif name == "timestep":
            t = torch.full(shape, 0.5, dtype=dtype)
        elif name == "guidance":
            t = torch.full(shape, 3.5, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen).to(dtype)
        out.append(t if device.type == "cpu" else t.to(device))
    return tuple(out)


def precision_option_error(precision: str, options: dict) -> str | None:
    """Why the model options `options` cannot be built at `precision`, or None: kiln's fp8
    attention kernel (attention "fp8") and fused quantization belong to the fp8 precision."""
    if options.get("attention") == "fp8" and precision != "fp8":
        return f"compile option attention \"fp8\" needs precision fp8, not {precision}"
    if options.get("fused_quant") and precision != "fp8":
        return f"compile option fused_quant needs precision fp8, not {precision}"
    return None


def model_options(compile_options: dict | None) -> dict:
    """The model-shaping options (MODEL_OPTIONS) of a compile-options dict, defaults filled in.
    ValueError for a model option of the wrong type."""
    out = dict(MODEL_OPTIONS)
    for name in MODEL_OPTIONS:
        if compile_options and name in compile_options:
            value = compile_options[name]
            error = option_value_error(name, value, MODEL_OPTION_VALUES[name])
            if error:
                raise ValueError(f"compile option {error}")
            out[name] = value
    return out


def build(config: dict, component: str, precision: str, bucket: ak.Bucket, device="cpu",
          materialize: str = "empty", compile_options: dict | None = None
          ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The export wrapper of `component` for `config`, in eval mode with parameters in the
    precision's activation dtype (fp8 weights and their scales excepted), and example inputs of
    the bucket's exact shapes and dtypes. `compile_options` may hold model options
    (MODEL_OPTIONS, e.g. {"fuse_qkv": true}); other keys are ignored here.

    The module is constructed on the meta device and cast there, so even flux-dev costs nothing
    until materialised. materialize="empty": parameters are allocated uninitialised on `device`
    (call load_weights before running it); "meta": parameters and example inputs stay on meta.
    Raises ValueError for a bad component, precision, bucket or model option, or for fp8 with a
    transformer whose linear sizes are not multiples of 16.
    """
    _check_component(component)
    act = activation_dtype(precision)
    options = model_options(compile_options)
    error = precision_option_error(precision, options)
    if error:
        raise ValueError(error)
    if materialize not in ("empty", "meta"):
        raise ValueError(f"materialize {materialize!r} is not 'empty' or 'meta'")
    specs = _input_shapes(config, component, precision, bucket)
    with torch.device("meta"):
        module = _construct(config, component, precision, bucket, options)
    _cast(module, act)
    target = torch.device("meta") if materialize == "meta" else torch.device(device)
    if target.type != "meta":
        module = module.to_empty(device=target)
    module.eval().requires_grad_(False)
    if target.type == "meta":
        example = tuple(torch.empty(s, dtype=d, device="meta") for _, s, d in specs)
    else:
        example = _example_inputs(specs, component, target)
    return module, example


# ---------------------------------------------------------------------------------------------
# Weights.


def weight_files(repo_dir: str, component: str) -> list[str]:
    """The safetensors files of the component's folder: the shards named by a
    `*.safetensors.index.json`, or the single `*.safetensors` file."""
    _check_component(component)
    folder = os.path.join(repo_dir, FOLDERS[component])
    for stem in _WEIGHT_STEMS:
        index = os.path.join(folder, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{index}: no weight_map")
            return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    for stem in _WEIGHT_STEMS:
        single = os.path.join(folder, f"{stem}.safetensors")
        if os.path.exists(single):
            return [single]
    raise FileNotFoundError(f"{folder}: no {' or '.join(s + '.safetensors' for s in _WEIGHT_STEMS)}"
                            " (nor a sharded .safetensors.index.json)")


def _aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    return dict(getattr(type(module), "TIED_ALIASES", {}))


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def load_weights(module: nn.Module, repo_dir: str, component: str) -> None:
    """Fills every parameter of `module` (from build) from the component's safetensors in the
    repository, cast to the parameter's dtype and device. Derived parameters (fused QKV, fp8
    weights and scales: `derivations(module)`) are computed from their checkpoint sources with
    kiln.models.quant.derive, as the C++ loader does. Checkpoint tensors the module does not use
    are ignored (VAE encoder, CLIP position_ids, ...). Raises WeightsError naming every missing
    tensor (and what needed it), or a tensor whose shape differs; FileNotFoundError without weight
    files."""
    from safetensors import safe_open

    files = weight_files(repo_dir, component)
    wanted = module.state_dict(keep_vars=True)
    derived = derivations(module)
    available: dict[str, str] = {}  # checkpoint name -> file
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                available.setdefault(key, path)
    aliases = _aliases(module)
    sources: dict[str, list[str]] = {}  # module name -> checkpoint names it is made of
    missing = []
    for name in wanted:
        found = []
        for wanted_source in (derived[name].sources if name in derived else (name,)):
            for candidate in (wanted_source, *aliases.get(wanted_source, ())):
                if candidate in available:
                    found.append(candidate)
                    break
            else:
                missing.append(wanted_source if name not in derived
                               else f"{wanted_source} (for {name})")
        sources[name] = found
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20
                                           else "")
        raise WeightsError(f"{component}: checkpoint in {os.path.dirname(files[0])} lacks "
                           f"{len(missing)} tensor(s): {shown}")

    with torch.no_grad(), contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt", device="cpu"))
                   for path in files}

        def read(ckpt: str, device: torch.device | None = None) -> torch.Tensor:
            t = handles[available[ckpt]].get_tensor(ckpt)
            # Derivations run where the parameter lives (the ops are exactly rounded, so the
            # bytes do not depend on the device; a GPU quantizes flux-dev in seconds).
            return t if device is None or device.type == "meta" else t.to(device)

        # An fp8 weight and its scale come from one quantization: the second is kept here
        # until its parameter is filled.
        pending: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        rules = set(derived.values())
        for name, dest in wanted.items():
            if name not in derived:
                _load_one(module, name, dest, read(sources[name][0]),
                          f"checkpoint tensor {sources[name][0]}", component)
                continue
            rule = derived[name]
            srcs = tuple(sources[name])
            what = f"{rule.op} of {', '.join(srcs)}"
            try:
                value = pending.pop((rule.op, rule.sources), None)
                if value is None and rule.op in ("fp8_rowwise", "fp8_rowwise_scale"):
                    q, scale = fp8_rowwise([read(c, dest.device) for c in srcs])
                    both = {"fp8_rowwise": q, "fp8_rowwise_scale": scale}
                    value = both.pop(rule.op)
                    ((other_op, other),) = both.items()
                    if Derive(other_op, rule.sources) in rules:
                        pending[(other_op, rule.sources)] = other
                elif value is None:
                    value = derive(rule.op, [read(c, dest.device) for c in srcs], dest.dtype)
                if value.dtype != dest.dtype:
                    raise ValueError(f"{rule.op} makes {value.dtype}, the parameter is "
                                     f"{dest.dtype}")
            except (RuntimeError, ValueError) as e:
                raise WeightsError(f"{component}: {name} = {what}: {e}") from e
            _load_one(module, name, dest, value, what, component)


def _load_one(module: nn.Module, name: str, dest: torch.Tensor, value: torch.Tensor,
              what: str, component: str) -> None:
    if tuple(value.shape) != tuple(dest.shape):
        raise WeightsError(f"{component}: {what} has shape "
                           f"{list(value.shape)}, the model's {name} {list(dest.shape)}")
    if dest.is_meta:
        _assign(module, name, value.to(dest.dtype))
    else:
        dest.copy_(value)  # casts dtype and moves device in one step


def parameter_count(module: nn.Module, names: Iterable[str] | None = None) -> int:
    """Number of scalars in the module's parameters (works on meta modules)."""
    params = dict(module.named_parameters())
    return sum(params[n].numel() for n in (names if names is not None else params))
