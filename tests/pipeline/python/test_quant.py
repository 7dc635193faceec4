"""Load-time derived constants and the fp8 / fused-QKV transformer (kiln.models.quant,
kiln.models.flux options, kiln.components, kiln-compile's manifest):

- the derivation ops (row-wise e4m3 quantization, concat0) and what models declare;
- fused QKV in float32 against the unfused model (same math, one matmul instead of three);
- the fp8 transformer against the bf16 one on flux-tiny (quantization error, bounded);
- torch.export of the fp8 transformer on the CPU and the manifest constants it yields
  (fp8 packages are compiled for CUDA only; the C++ side of the derivations is
  tests/pipeline/weights_test.cc, the compiled fused transformer tests/pipeline/
  component_parity_test.cc).

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q tests/pipeline/python/test_quant.py
"""
from __future__ import annotations

import collections
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kiln import artifact_key as ak
from kiln import compile as kc
from kiln import components as C
from kiln import configs, make_tiny
from kiln.models import quant
from kiln.models.quant import Derive, Fp8Linear

BUCKET = ak.Bucket(batch=2, height=64, width=48, text_len=24)  # 12 image + 24 text tokens


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("flux-tiny"))
    make_tiny.make_tiny(out, seed=0)
    return out


def _inputs(config: dict, bucket: ak.Bucket, dtype: torch.dtype, seed: int = 11) -> tuple:
    g = torch.Generator().manual_seed(seed)
    b, s = bucket.batch, (bucket.height // 16) * (bucket.width // 16)
    acts = (torch.randn(b, s, int(config["in_channels"]), generator=g),
            torch.randn(b, bucket.text_len, int(config["joint_attention_dim"]), generator=g),
            torch.randn(b, int(config["pooled_projection_dim"]), generator=g))
    return tuple(a.to(dtype) for a in acts) + (torch.rand(b, generator=g),
                                               1.0 + 4.0 * torch.rand(b, generator=g))


def _transformer(repo: str, precision: str, fuse_qkv: bool = False, bucket=BUCKET):
    config = C.read_component_config(repo, "transformer")
    module, _ = C.build(config, "transformer", precision, bucket,
                        compile_options={"fuse_qkv": fuse_qkv})
    C.load_weights(module, repo, "transformer")
    return config, module


def _run(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------------
# The ops.


def test_fp8_rowwise_quantizes_each_row_to_the_e4m3_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g) * torch.logspace(-3, 3, 48)[:, None]
    w[5] = 0.0
    q, scale = quant.fp8_rowwise([w])
    assert q.dtype == torch.float8_e4m3fn and list(q.shape) == [48, 32]
    assert scale.dtype == torch.float32 and list(scale.shape) == [1, 48]
    amax = w.abs().amax(dim=1)
    # Each row's largest element maps onto +-448 exactly; the all-zero row gets the floor scale.
    assert torch.equal(q.float().abs().amax(dim=1)[amax > 0], torch.full((47,), 448.0))
    assert scale[0, 5].item() == pytest.approx(1e-12 / 448) and not q[5].float().any()
    # Dequantized, every element is within half an e4m3 step (relative 2^-4) of the original,
    # or an absolute subnormal step (2^-9 * scale) for the smallest.
    deq = q.float() * scale.t()
    bound = torch.maximum(w.abs() * 2.0**-4, scale.t() * 2.0**-10)
    assert bool(((deq - w).abs() <= bound).all())
    # Per row, independent of the others: fusing rows changes nothing.
    q2, s2 = quant.fp8_rowwise([w[:20], w[20:]])
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, scale)


def test_fp8_rowwise_rounds_to_nearest_even():
    w = torch.tensor([[448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 232.0, 17.0, 500.0]])
    q, scale = quant.fp8_rowwise([w])
    assert scale.item() == pytest.approx(500.0 / 448.0)
    q, scale = quant.fp8_rowwise([w[:, :7]])
    assert scale.item() == 1.0
    assert q.float().tolist() == [[448.0, 1.0, 1.25, 0.0, 2.0**-8, 224.0, 16.0]]


def test_derive_ops_and_their_dtypes():
    a, b = torch.randn(4, 16), torch.randn(2, 16).bfloat16()
    cat = quant.derive("concat0", [a, b], torch.bfloat16)
    assert cat.dtype == torch.bfloat16 and torch.equal(cat, torch.cat([a.bfloat16(), b]))
    q = quant.derive("fp8_rowwise", [a, b], torch.float8_e4m3fn)
    s = quant.derive("fp8_rowwise_scale", [a, b], torch.float32)
    assert list(q.shape) == [6, 16] and list(s.shape) == [1, 6]
    with pytest.raises(ValueError, match="fp8_rowwise makes"):
        quant.derive("fp8_rowwise", [a], torch.bfloat16)
    with pytest.raises(ValueError, match="op"):
        Derive("int4", ("a",))
    with pytest.raises(ValueError, match="source"):
        Derive("concat0", ())
    assert Derive("concat0", ("x", "y")).to_json() == {"op": "concat0", "from": ["x", "y"]}


def test_fp8_linear_matches_linear_within_e4m3_rounding():
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(96, generator=g))
    f8 = Fp8Linear(64, 96)
    q, s = quant.fp8_rowwise([lin.weight.detach()])
    f8.weight.data, f8.weight_scale.data = q, s
    f8.bias.data = lin.bias.detach().bfloat16()
    x = torch.randn(3, 7, 64, generator=g).bfloat16()
    y = f8(x)
    assert y.dtype == torch.bfloat16 and list(y.shape) == [3, 7, 96]
    ref = F.linear(x.float(), lin.weight, lin.bias)
    # x and W each carry ~2.4% RMS e4m3 rounding (3 mantissa bits): ~3.4% on the product.
    assert _rel(y, ref) < 0.06
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(24, 32)


# ---------------------------------------------------------------------------------------------
# What the models declare.


def test_derivations_of_the_flux_transformer():
    cfg = configs.flux_tiny()["transformer"]

    def derived(precision, fuse):
        m, _ = C.build(cfg, "transformer", precision, BUCKET, materialize="meta",
                       compile_options={"fuse_qkv": fuse})
        return m, C.derivations(m)

    m, d = derived("fp32", False)
    assert d == {}
    m, d = derived("fp32", True)
    qkv = tuple(f"transformer_blocks.0.attn.to_{x}.weight" for x in "qkv")
    assert d["transformer_blocks.0.attn.to_qkv.weight"] == Derive("concat0", qkv)
    assert d["transformer_blocks.1.attn.add_qkv_proj.bias"] == Derive(
        "concat0", tuple(f"transformer_blocks.1.attn.add_{x}_proj.bias" for x in "qkv"))
    assert d["single_transformer_blocks.1.attn.to_qkv.bias"].sources[2] == \
        "single_transformer_blocks.1.attn.to_v.bias"
    assert set(d) == {n for n in m.state_dict() if "qkv" in n} and len(d) == 2 * 4 + 2 * 2
    assert not any(".to_q." in n or "add_k_proj" in n for n in m.state_dict())

    m, d = derived("fp8", False)
    sd = m.state_dict()
    fp8_weights = {n for n, t in sd.items() if t.dtype == torch.float8_e4m3fn}
    # 12 linears per double block, 5 per single block; never the modulation, embedders, output.
    assert len(fp8_weights) == 2 * 12 + 2 * 5
    assert not any(n.startswith(("time_text_embed", "x_embedder", "context_embedder",
                                 "norm_out", "proj_out")) or ".norm" in n for n in fp8_weights)
    for name in ("transformer_blocks.0.attn.to_out.0.weight",
                 "transformer_blocks.1.ff.net.2.weight",
                 "transformer_blocks.0.ff_context.net.0.proj.weight",
                 "transformer_blocks.0.attn.to_add_out.weight",
                 "single_transformer_blocks.0.proj_mlp.weight",
                 "single_transformer_blocks.1.proj_out.weight"):
        assert d[name] == Derive("fp8_rowwise", (name,))
        scale = name.replace(".weight", ".weight_scale")
        assert d[scale] == Derive("fp8_rowwise_scale", (name,))
        assert sd[scale].dtype == torch.float32 and sd[scale].shape[0] == 1
    assert sd["transformer_blocks.0.norm1.linear.weight"].dtype == torch.bfloat16
    assert sd["transformer_blocks.0.attn.to_q.bias"].dtype == torch.bfloat16
    assert "transformer_blocks.0.attn.to_q.bias" not in d  # a checkpoint tensor as it is

    m, d = derived("fp8", True)
    assert d["transformer_blocks.0.attn.to_qkv.weight"] == Derive("fp8_rowwise", qkv)
    assert d["transformer_blocks.0.attn.to_qkv.weight_scale"] == Derive("fp8_rowwise_scale", qkv)
    assert d["transformer_blocks.0.attn.to_qkv.bias"].op == "concat0"
    assert m.state_dict()["transformer_blocks.0.attn.to_qkv.bias"].dtype == torch.bfloat16


def test_other_components_build_bf16_math_under_fp8():
    # Only the transformer has e4m3 linears; an fp8 pipeline's other packages are bf16 math.
    cfg = configs.flux_tiny()
    for component, entry, bucket in (
            ("text_encoder", "text_encoder", ak.Bucket(1, text_len=77)),
            ("text_encoder_2", "text_encoder_2", ak.Bucket(1, text_len=16)),
            ("vae_decoder", "vae", ak.Bucket(1, 64, 48))):
        m8, _ = C.build(cfg[entry], component, "fp8", bucket, materialize="meta")
        m16, _ = C.build(cfg[entry], component, "bf16", bucket, materialize="meta")
        assert {n: t.dtype for n, t in m8.state_dict().items()} == \
            {n: t.dtype for n, t in m16.state_dict().items()}
        assert C.derivations(m8) == {}


def test_model_options_are_checked():
    assert C.model_options(None) == {"fuse_qkv": False, "attention": "sdpa",
                                     "fused_quant": False}
    assert C.model_options({"fuse_qkv": True, "max_autotune": True, "attention": "cudnn",
                            "fused_quant": True}) == \
        {"fuse_qkv": True, "attention": "cudnn", "fused_quant": True}
    with pytest.raises(ValueError, match="fuse_qkv"):
        C.model_options({"fuse_qkv": 1})
    with pytest.raises(ValueError, match="attention.*cudnn, flash"):
        C.model_options({"attention": "xformers"})


def test_kiln_compile_refuses_unknown_or_mistyped_options(tiny_repo, capsys):
    base = ["--model", tiny_repo, "--component", "transformer", "--height", "256", "--width",
            "256", "--text-len", "512", "--print-key"]
    assert kc.main(base + ["--compile-options", '{"fuse_qkv": true}']) == 0
    fused = json.loads(capsys.readouterr().out)["digest"]
    assert kc.main(base) == 0
    assert json.loads(capsys.readouterr().out)["digest"] != fused
    assert kc.main(base + ["--compile-options", '{"fuse_qvk": true}']) == 2
    assert "unknown option 'fuse_qvk'" in capsys.readouterr().err
    assert kc.main(base + ["--compile-options", '{"fuse_qkv": "yes"}']) == 2
    assert "fuse_qkv must be true or false" in capsys.readouterr().err
    assert kc.main(base + ["--compile-options", '{"attention": "fa3"}']) == 2
    assert 'attention must be one of sdpa, cudnn, flash, efficient, fp8, got "fa3"' in \
        capsys.readouterr().err
    assert kc.main(base + ["--compile-options", '{"attention": "cudnn"}']) == 0
    assert json.loads(capsys.readouterr().out)["digest"] not in (fused,)
    # fp8 packages are CUDA-only: the key refuses a cpu target.
    assert kc.main(base + ["--precision", "fp8"]) == 2
    assert "fp8 needs a cuda target" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Numerics on flux-tiny.


def test_fused_qkv_fp32_equals_unfused(tiny_repo):
    config, plain = _transformer(tiny_repo, "fp32")
    _, fused = _transformer(tiny_repo, "fp32", fuse_qkv=True)
    x = _inputs(config, BUCKET, torch.float32)
    ref, out = _run(plain, x), _run(fused, x)
    # One matmul over the concatenated weight computes each output column as the separate ones
    # do (same dot products); only the BLAS blocking may differ, at float32 rounding.
    assert _rel(out, ref) <= 1e-5, _rel(out, ref)
    assert ref.abs().max() > 0.1


def test_derived_parameters_load_as_the_derivations(tiny_repo):
    _, fused = _transformer(tiny_repo, "bf16", fuse_qkv=True)
    ckpt = load_file(os.path.join(tiny_repo, "transformer", "diffusion_pytorch_model.safetensors"))
    p = "transformer_blocks.1.attn."
    assert torch.equal(fused.get_parameter(p + "add_qkv_proj.weight"),
                       torch.cat([ckpt[p + f"add_{x}_proj.weight"] for x in "qkv"]).bfloat16())
    assert torch.equal(fused.get_parameter(p + "to_qkv.bias"),
                       torch.cat([ckpt[p + f"to_{x}.bias"] for x in "qkv"]).bfloat16())
    _, fp8 = _transformer(tiny_repo, "fp8", fuse_qkv=True)
    q, scale = quant.fp8_rowwise([ckpt[p + f"to_{x}.weight"] for x in "qkv"])
    assert torch.equal(fp8.get_parameter(p + "to_qkv.weight").view(torch.uint8),
                       q.view(torch.uint8))
    assert torch.equal(fp8.get_parameter(p + "to_qkv.weight_scale"), scale)
    name = "single_transformer_blocks.0.proj_out.weight"
    q, scale = quant.fp8_rowwise([ckpt[name]])
    assert torch.equal(fp8.get_parameter(name).view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(fp8.get_parameter(name + "_scale"), scale)


# fp8 vs bf16 on flux-tiny (seed 0), relative L2 error of the output: 0.036 for these inputs;
# 0.033-0.049 over 8 input draws at this bucket and at 256x256 / 512 text tokens; fused or not
# the same (quantization is per output row and per token). One e4m3 x e4m3 matmul with row-wise
# scales measures ~3.5% (2.4% RMS rounding of a 3-bit mantissa on each operand); through the
# residual stream the errors of the 34 quantized linears partly average out. 0.08 is ~2x the
# measurement here and 1.6x the worst draw; a systematic error (every scale applied to the wrong
# output row) moves the output by 27-34% (test_fp8_bound_catches_misapplied_scales). A wrong
# weight or scale of a single layer hides inside this bound: the byte-exact derivation tests
# (here and tests/pipeline/weights_test.cc) cover those.
FP8_VS_BF16_BOUND = 0.08


@pytest.fixture(scope="module")
def fp8_pair(tiny_repo):
    config, bf16 = _transformer(tiny_repo, "bf16")
    _, fp8 = _transformer(tiny_repo, "fp8")
    x = _inputs(config, BUCKET, torch.bfloat16)
    return config, fp8, x, _run(bf16, x)


def test_fp8_transformer_vs_bf16(tiny_repo, fp8_pair):
    config, fp8, x, ref = fp8_pair
    out = _run(fp8, x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = _rel(out, ref)
    assert 1e-3 < err < FP8_VS_BF16_BOUND, f"fp8 vs bf16 relative error {err:.4f}"
    _, fused = _transformer(tiny_repo, "fp8", fuse_qkv=True)
    assert _rel(_run(fused, x), out) < 1e-3  # fusing changes no quantization (measured 0)


def test_fp8_bound_catches_misapplied_scales(fp8_pair):
    _, fp8, x, ref = fp8_pair
    scales = {n: p for n, p in fp8.named_parameters() if n.endswith(".weight_scale")}
    saved = {n: p.detach().clone() for n, p in scales.items()}
    try:
        with torch.no_grad():
            for p in scales.values():
                p.copy_(p.flip(-1))  # each row's scale on the mirrored row
        assert _rel(_run(fp8, x), ref) > FP8_VS_BF16_BOUND * 2.5
    finally:
        with torch.no_grad():
            for n, p in scales.items():
                p.copy_(saved[n])


def test_fp8_transformer_exports_on_cpu():
    # fp8 packages compile for CUDA only (the artifact key refuses fp8 on cpu); here: torch.export
    # of the fused fp8 transformer (one double and one single block, seeded weights derived as the
    # loader would) and the manifest constants kiln-compile would write for it.
    config = dict(configs.flux_tiny()["transformer"], num_layers=1, num_single_layers=1)
    bucket = ak.Bucket(1, 64, 48, 16)
    module, example = C.build(config, "transformer", "fp8", bucket,
                              compile_options={"fuse_qkv": True})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                q, s = quant.fp8_rowwise([torch.randn(p.shape, generator=g) * 0.2])
                p.copy_(q)
                module.get_parameter(name + "_scale").copy_(s)
            elif not name.endswith("_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ep = torch.export.export(module, example, strict=False)
    ops = collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert ops["aten._scaled_mm.default"] == 8 + 3  # fused: 8 per double block, 3 per single
    assert {s.kind.name for s in ep.graph_signature.input_specs} == {"PARAMETER", "USER_INPUT"}
    assert dict(ep.constants) == {}
    x = _inputs(config, bucket, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ep.module()(*x)[0], module(*x)[0])

    constants, extra = kc.constant_table(module, ep)
    assert extra == {}
    assert set(constants) == set(module.state_dict())
    w = constants["transformer_blocks.0.attn.to_qkv.weight"]
    assert w == {"shape": [96, 32], "dtype": "float8_e4m3fn", "source": "checkpoint",
                 "derive": {"op": "fp8_rowwise",
                            "from": [f"transformer_blocks.0.attn.to_{x}.weight" for x in "qkv"]}}
    assert constants["single_transformer_blocks.0.proj_out.weight_scale"] == {
        "shape": [1, 32], "dtype": "float32", "source": "checkpoint",
        "derive": {"op": "fp8_rowwise_scale",
                   "from": ["single_transformer_blocks.0.proj_out.weight"]}}
    assert constants["transformer_blocks.0.attn.to_qkv.bias"]["derive"]["op"] == "concat0"
    assert constants["transformer_blocks.0.norm1.linear.weight"] == {
        "shape": [192, 32], "dtype": "bfloat16", "source": "checkpoint"}


def test_load_weights_names_the_missing_source_of_a_derived_parameter(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(tiny_repo, "transformer"), repo / "transformer")
    path = str(repo / "transformer" / "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    del tensors["single_transformer_blocks.0.attn.to_k.weight"]
    save_file(tensors, path)
    config = C.read_component_config(str(repo), "transformer")
    module, _ = C.build(config, "transformer", "fp32", BUCKET,
                        compile_options={"fuse_qkv": True})
    with pytest.raises(C.WeightsError, match="lacks 1 tensor") as e:
        C.load_weights(module, str(repo), "transformer")
    assert "single_transformer_blocks.0.attn.to_k.weight (for " \
        "single_transformer_blocks.0.attn.to_qkv.weight)" in str(e.value)


def test_attention_backend_option_builds_the_same_function_on_cpu(tiny_repo):
    """Every attention choice is a build option of the same function: on the CPU each one runs
    F.scaled_dot_product_attention, so the outputs are identical (the CUDA kernels are compared
    on the GPU host by bench/gpu/baselines.py)."""
    outs = {}
    for backend in ("sdpa", "cudnn", "flash", "efficient"):
        cfg = C.read_component_config(tiny_repo, "transformer")
        module, example = C.build(cfg, "transformer", "fp32", BUCKET,
                                  compile_options={"attention": backend})
        C.load_weights(module, tiny_repo, "transformer")
        assert {m.attention for m in module.modules() if hasattr(m, "fuse_qkv")} == {backend}
        with torch.no_grad():
            outs[backend] = module(*example)[0]
    for backend, out in outs.items():
        assert torch.equal(out, outs["sdpa"]), backend
