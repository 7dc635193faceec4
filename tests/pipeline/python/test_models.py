"""kiln's own model definitions (kiln.models via kiln.components) against the reference
implementations (diffusers FluxTransformer2DModel / AutoencoderKL, transformers CLIPTextModel /
T5EncoderModel) loaded with from_pretrained from the same repository; plus the builders, the
loader, torch.export of the wrappers, the flux-dev shapes and make_tiny's determinism.

Run: PYTHONPATH=pipeline/python .venv/bin/python -m pytest -q tests/pipeline/python/test_models.py
"""
from __future__ import annotations

import copy
import filecmp
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln import artifact_key as ak
from kiln import components as C
from kiln import configs, make_tiny
from kiln.models.vae import VaeDecoder

COMPONENTS = ak.COMPONENTS
REF_SUBFOLDER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                 "transformer": "transformer", "vae_decoder": "vae"}

# A second config with non-trivial, mutually different sizes, exercising the paths flux-tiny
# does not: no guidance embedding (schnell-style), head_dim != hidden/heads layouts, channel
# changes and conv shortcuts in the VAE, post_quant_conv, shift_factor None, CLIP's legacy
# eos_token_id 2 (argmax pooling), T5 with inner_dim != d_model and relative distances past
# max_distance.
SMALL = configs.flux_tiny(clip_vocab_size=500, t5_vocab_size=300)
SMALL["transformer"].update(num_attention_heads=3, attention_head_dim=24,
                            axes_dims_rope=[4, 10, 10], num_layers=1, num_single_layers=2,
                            joint_attention_dim=48, pooled_projection_dim=40,
                            guidance_embeds=False)
SMALL["vae"].update(block_out_channels=[16, 32, 32, 64], layers_per_block=2, norm_num_groups=8,
                    use_post_quant_conv=True, use_quant_conv=True, scaling_factor=0.18215,
                    shift_factor=None)
SMALL["text_encoder"].update(hidden_size=40, num_attention_heads=4, intermediate_size=80,
                             num_hidden_layers=3, eos_token_id=2, bos_token_id=498,
                             pad_token_id=499, projection_dim=40)
SMALL["text_encoder_2"].update(d_model=48, d_kv=8, num_heads=4, d_ff=72, num_layers=3,
                               relative_attention_num_buckets=8,
                               relative_attention_max_distance=16)

TINY_BUCKETS = {
    "text_encoder": ak.Bucket(batch=2, text_len=77),
    "text_encoder_2": ak.Bucket(batch=2, text_len=24),
    "transformer": ak.Bucket(batch=2, height=64, width=48, text_len=24),
    "vae_decoder": ak.Bucket(batch=2, height=64, width=48),
}
SMALL_BUCKETS = {
    "text_encoder": ak.Bucket(batch=2, text_len=77),
    "text_encoder_2": ak.Bucket(batch=2, text_len=40),
    "transformer": ak.Bucket(batch=2, height=80, width=48, text_len=40),
    "vae_decoder": ak.Bucket(batch=2, height=48, width=32),
}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("flux-tiny"))
    make_tiny.make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("flux-small"))
    make_tiny.write_repo(out, SMALL, seed=3)
    return out


# ---------------------------------------------------------------------------------------------
# Reference implementations.


def _reference(repo: str, component: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if component == "transformer":
            from diffusers import FluxTransformer2DModel
            return FluxTransformer2DModel.from_pretrained(repo, subfolder="transformer").eval()
        if component == "vae_decoder":
            from diffusers import AutoencoderKL
            return AutoencoderKL.from_pretrained(repo, subfolder="vae").eval()
        if component == "text_encoder":
            from transformers import CLIPTextModel
            return CLIPTextModel.from_pretrained(repo, subfolder="text_encoder").eval()
        from transformers import T5EncoderModel
        return T5EncoderModel.from_pretrained(repo, subfolder="text_encoder_2").eval()


def _inputs(config: dict, component: str, bucket: ak.Bucket, seed: int) -> tuple:
    """Seeded inputs of the package signature's shapes, different per batch row."""
    g = torch.Generator().manual_seed(seed)
    b = bucket.batch
    if component == "text_encoder":
        n = int(config["max_position_embeddings"])
        vocab = int(config["vocab_size"])
        eos = vocab - 1 if config["eos_token_id"] == 2 else int(config["eos_token_id"])
        ids = torch.randint(0, vocab - 2, (b, n), generator=g)
        for row in range(b):  # text, EOS, then EOS padding (as Flux pads)
            ids[row, 9 + 31 * row:] = eos
        return (ids,)
    if component == "text_encoder_2":
        return (torch.randint(0, int(config["vocab_size"]), (b, bucket.text_len), generator=g),)
    if component == "transformer":
        s = (bucket.height // 16) * (bucket.width // 16)
        return (torch.randn(b, s, int(config["in_channels"]), generator=g),
                torch.randn(b, bucket.text_len, int(config["joint_attention_dim"]), generator=g),
                torch.randn(b, int(config["pooled_projection_dim"]), generator=g),
                torch.rand(b, generator=g), 1.0 + 4.0 * torch.rand(b, generator=g))
    return (torch.randn(b, int(config["latent_channels"]), bucket.height // 8, bucket.width // 8,
                        generator=g),)


def _run_reference(ref, config: dict, component: str, bucket: ak.Bucket, inputs: tuple
                   ) -> torch.Tensor:
    with torch.no_grad():
        if component == "text_encoder":
            return ref(inputs[0]).pooler_output
        if component == "text_encoder_2":
            return ref(inputs[0]).last_hidden_state
        if component == "vae_decoder":
            z = inputs[0] / config["scaling_factor"] + (config["shift_factor"] or 0.0)
            return ref.decode(z).sample.clamp(-1, 1)
        rows, cols = bucket.height // 16, bucket.width // 16
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        hidden, context, pooled, timestep, guidance = inputs
        return ref(hidden_states=hidden, encoder_hidden_states=context,
                   pooled_projections=pooled, timestep=timestep,
                   guidance=guidance if config.get("guidance_embeds") else None,
                   img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(bucket.text_len, 3),
                   return_dict=False)[0]


def _ours(repo: str, component: str, bucket: ak.Bucket, precision: str = "fp32"):
    config = C.read_component_config(repo, component)
    module, example = C.build(config, component, precision, bucket)
    C.load_weights(module, repo, component)
    return config, module, example


@pytest.fixture(scope="session")
def pair():
    """pair(repo, component, bucket) -> (config, our module, inputs, reference output), computed
    once per repo and component for the whole session."""
    cache: dict = {}

    def get(repo: str, component: str, bucket: ak.Bucket):
        if (repo, component) not in cache:
            config, module, _ = _ours(repo, component, bucket)
            inputs = _inputs(config, component, bucket, seed=11)
            ref_out = _run_reference(_reference(repo, component), config, component, bucket,
                                     inputs)
            cache[(repo, component)] = (config, module, inputs, ref_out)
        return cache[(repo, component)]

    return get


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Both sides compute the same float32 math; they differ only where kernels differ (SDPA
    backend vs explicit softmax, tanh-GELU formula, reduction order), measured at <= 4e-6 here.
    1e-4 of the output's scale leaves ~25x margin for other CPUs / BLAS builds, while any
    structural mistake (wrong weight, op order, eps, scale, RoPE layout) moves outputs by far more:
    test_tolerance_catches_one_percent_weight_error shows a 1% change of one weight fails it."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype == torch.float32, f"{what}: dtype {ours.dtype} / {ref.dtype}"
    scale = max(ref.abs().max().item(), 1.0)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: max |ours - ref| = {err:.3g} > 1e-4 * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# Numerical parity with the references.


@pytest.mark.parametrize("component", COMPONENTS)
def test_tiny_matches_reference(pair, tiny_repo, component):
    _, module, inputs, ref_out = pair(tiny_repo, component, TINY_BUCKETS[component])
    with torch.no_grad():
        out = module(*inputs)
    assert isinstance(out, tuple) and len(out) == 1
    assert_matches(out[0], ref_out, f"flux-tiny {component}")
    # Non-trivial outputs: batch rows got different inputs and must differ clearly.
    assert ref_out.abs().max().item() > 0.1
    assert (ref_out[0] - ref_out[1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("component", COMPONENTS)
def test_small_matches_reference(pair, small_repo, component):
    _, module, inputs, ref_out = pair(small_repo, component, SMALL_BUCKETS[component])
    with torch.no_grad():
        (out,) = module(*inputs)
    assert_matches(out, ref_out, f"flux-small {component}")
    assert (ref_out[0] - ref_out[1]).abs().max().item() > 1e-2


def test_vae_unclamped_decoder_matches_reference(pair, tiny_repo):
    # The package clamps to [-1, 1]; compare the raw decoder too so saturated pixels hide nothing.
    config, module, inputs, _ = pair(tiny_repo, "vae_decoder", TINY_BUCKETS["vae_decoder"])
    z = inputs[0] / config["scaling_factor"] + config["shift_factor"]
    with torch.no_grad():
        ours = VaeDecoder.forward(module, z)
        ref = _reference(tiny_repo, "vae_decoder").decode(z).sample
    assert ref.abs().max() > 1.5  # the clamp does cut here
    assert_matches(ours, ref, "vae decoder before clamp")


PERTURBED = {
    "text_encoder": "text_model.encoder.layers.1.mlp.fc2.weight",
    "text_encoder_2": "encoder.block.1.layer.1.DenseReluDense.wo.weight",
    "transformer": "transformer_blocks.0.attn.norm_added_k.weight",
    "vae_decoder": "decoder.up_blocks.3.resnets.0.conv2.weight",
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_tolerance_catches_one_percent_weight_error(pair, tiny_repo, component):
    _, module, inputs, ref_out = pair(tiny_repo, component, TINY_BUCKETS[component])
    param = module.get_parameter(PERTURBED[component])
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param.mul_(1.01)
            (out,) = module(*inputs)
        with pytest.raises(AssertionError, match="max \\|ours - ref\\|"):
            assert_matches(out, ref_out, component)
    finally:
        with torch.no_grad():
            param.copy_(saved)


def test_clip_pools_first_eos_when_padding_is_eos(tiny_repo):
    config, module, _ = _ours(tiny_repo, "text_encoder", TINY_BUCKETS["text_encoder"])
    eos = config["eos_token_id"]
    ids = torch.full((2, 77), 5, dtype=torch.int64)
    ids[0, 3:] = eos       # EOS at 3, padded with EOS
    ids[1, 3] = eos        # EOS at 3, then other tokens: pooling must not move
    with torch.no_grad():
        hidden, pooled = module.text_model(ids)
    torch.testing.assert_close(pooled, hidden[:, 3], rtol=0, atol=0)


def test_bf16_transformer_matches_reference_in_bf16(tiny_repo):
    # In bf16 both diffusers and kiln round timestep*1000 and guidance*1000 to bfloat16 before the
    # sinusoidal embedding (as the reference pipelines do), so bf16 is compared with bf16, not
    # with fp32: with random tiny weights that rounding alone moves outputs by ~40%.
    from diffusers import FluxTransformer2DModel
    bucket = TINY_BUCKETS["transformer"]
    config, module, example = _ours(tiny_repo, "transformer", bucket, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert [e.dtype for e in example] == [torch.bfloat16] * 3 + [torch.float32] * 2
    inputs = tuple(x.bfloat16() if i < 3 else x
                   for i, x in enumerate(_inputs(config, "transformer", bucket, seed=11)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = FluxTransformer2DModel.from_pretrained(tiny_repo, subfolder="transformer",
                                                     torch_dtype=torch.bfloat16).eval()
    expected = _run_reference(ref, config, "transformer", bucket, inputs)
    with torch.no_grad():
        (out,) = module(*inputs)
    assert out.dtype == torch.bfloat16
    # bf16 has 8 significant bits; kernels differ in where they round (fused vs unfused ops),
    # measured 0.6% relative L2. 3% still fails for any structural error (those are >= 10%).
    rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 0.03, f"bf16 ours vs diffusers relative error {rel:.3g}"


# ---------------------------------------------------------------------------------------------
# Parameter names equal the checkpoint names.


def _checkpoint_names(repo: str, component: str) -> set[str]:
    names: set[str] = set()
    for path in C.weight_files(repo, component):
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def _reference_checkpoint_names(repo: str, component: str, tmp_path) -> set[str]:
    """Names the reference library writes with save_pretrained (transformers 5 renames modules
    internally, e.g. CLIPTextModel drops `text_model.`, but saves the checkpoint layout)."""
    out = tmp_path / component
    _reference(repo, component).save_pretrained(str(out), safe_serialization=True)
    names: set[str] = set()
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            with safe_open(str(out / name), framework="pt") as f:
                names.update(f.keys())
    return names


@pytest.mark.parametrize("component", COMPONENTS)
def test_state_dict_names_are_reference_checkpoint_names(tiny_repo, component, tmp_path):
    config = C.read_component_config(tiny_repo, component)
    module, _ = C.build(config, component, "fp32", TINY_BUCKETS[component], materialize="meta")
    ours = set(module.state_dict())
    ref = _reference_checkpoint_names(tiny_repo, component, tmp_path)
    if component == "vae_decoder":
        # Documented exclusion: the decoder package needs no encoder half of AutoencoderKL.
        ref = {k for k in ref if not k.startswith(("encoder.", "quant_conv."))}
    assert ours == ref, f"only ours: {sorted(ours - ref)[:5]}, only ref: {sorted(ref - ours)[:5]}"
    # make_tiny writes exactly what the reference library writes (full VAE included).
    assert _checkpoint_names(tiny_repo, component) == _reference_checkpoint_names(
        tiny_repo, component, tmp_path / "again")


def test_key_examples_from_the_contract():
    cfg = configs.flux_tiny()
    names = {}
    for component, entry in (("transformer", "transformer"), ("vae_decoder", "vae"),
                             ("text_encoder", "text_encoder"),
                             ("text_encoder_2", "text_encoder_2")):
        module, _ = C.build(cfg[entry], component, "fp32", TINY_BUCKETS[component],
                            materialize="meta")
        names[component] = set(module.state_dict())
    for name in ("transformer_blocks.0.attn.to_q.weight",
                 "transformer_blocks.0.attn.norm_added_q.weight",
                 "single_transformer_blocks.0.proj_mlp.weight",
                 "time_text_embed.guidance_embedder.linear_1.weight", "norm_out.linear.weight"):
        assert name in names["transformer"]
    for name in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                 "encoder.final_layer_norm.weight"):
        assert name in names["text_encoder_2"]
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in \
        names["text_encoder_2"]
    assert "encoder.embed_tokens.weight" not in names["text_encoder_2"]
    for name in ("text_model.embeddings.token_embedding.weight",
                 "text_model.encoder.layers.0.self_attn.q_proj.weight",
                 "text_model.final_layer_norm.weight"):
        assert name in names["text_encoder"]
    for name in ("decoder.conv_in.weight", "decoder.mid_block.attentions.0.to_q.weight",
                 "decoder.up_blocks.0.resnets.0.conv1.weight",
                 "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.conv_norm_out.weight"):
        assert name in names["vae_decoder"]


# ---------------------------------------------------------------------------------------------
# flux-dev shapes.


def test_flux_dev_builds_on_meta_with_published_sizes():
    cfg = configs.flux_dev()
    bucket = {"transformer": ak.Bucket(1, 1024, 1024, 512),
              "vae_decoder": ak.Bucket(1, 1024, 1024),
              "text_encoder": ak.Bucket(1, text_len=77),
              "text_encoder_2": ak.Bucket(1, text_len=512)}
    entry = {"transformer": "transformer", "vae_decoder": "vae", "text_encoder": "text_encoder",
             "text_encoder_2": "text_encoder_2"}
    # FLUX.1-dev transformer 11.9B, T5-v1.1-XXL encoder 4.76B, CLIP ViT-L/14 text 123M,
    # Flux VAE decoder 49.5M (counts of the published checkpoints).
    expected = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656,
                "text_encoder": 123_060_480, "vae_decoder": 49_545_475}
    for component, count in expected.items():
        module, example = C.build(cfg[entry[component]], component, "bf16", bucket[component],
                                  materialize="meta")
        assert all(p.is_meta for p in module.parameters()), component
        assert all(p.dtype == torch.bfloat16 for p in module.parameters()), component
        assert C.parameter_count(module) == count, component
        spec = C.input_spec(cfg[entry[component]], component, "bf16", bucket[component])
        assert [(list(e.shape), str(e.dtype)[6:]) for e in example] == \
            [(s, d) for _, s, d in spec]
    assert C.input_spec(cfg["transformer"], "transformer", "bf16", bucket["transformer"]) == [
        ("hidden_states", [1, 4096, 64], "bfloat16"),
        ("encoder_hidden_states", [1, 512, 4096], "bfloat16"),
        ("pooled_projections", [1, 768], "bfloat16"),
        ("timestep", [1], "float32"), ("guidance", [1], "float32")]
    assert C.output_spec(cfg["vae"], "vae_decoder", "bf16", bucket["vae_decoder"]) == [
        ("image", [1, 3, 1024, 1024], "float32")]


def test_flux_dev_transformer_count_matches_diffusers_on_meta():
    from diffusers import FluxTransformer2DModel
    cfg = configs.flux_dev()["transformer"]
    with torch.device("meta"):
        ref = FluxTransformer2DModel.from_config(cfg)
    ours, _ = C.build(cfg, "transformer", "bf16", ak.Bucket(1, 256, 256, 16), materialize="meta")
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


# ---------------------------------------------------------------------------------------------
# build / specs.


@pytest.mark.parametrize("component", COMPONENTS)
def test_specs_describe_example_inputs_and_outputs(tiny_repo, component):
    bucket = TINY_BUCKETS[component]
    config, module, example = _ours(tiny_repo, component, bucket)
    ins = C.input_spec(config, component, "fp32", bucket)
    outs = C.output_spec(config, component, "fp32", bucket)
    assert [(list(e.shape), str(e.dtype)[6:]) for e in example] == [(s, d) for _, s, d in ins]
    with torch.no_grad():
        result = module(*example)
    assert [(list(r.shape), str(r.dtype)[6:]) for r in result] == [(s, d) for _, s, d in outs]
    json.dumps(ins + outs)  # goes into the compile manifest


def test_contract_input_names_and_clip_length(tiny_repo):
    config = C.read_component_config(tiny_repo, "text_encoder")
    assert C.input_spec(config, "text_encoder", "fp32", ak.Bucket(3, text_len=77)) == [
        ("input_ids", [3, 77], "int64")]
    config = C.read_component_config(tiny_repo, "transformer")
    names = [n for n, _, _ in C.input_spec(config, "transformer", "fp32",
                                           TINY_BUCKETS["transformer"])]
    assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                     "guidance"]


def test_vae_config_is_read_from_vae_folder(tiny_repo):
    assert C.read_component_config(tiny_repo, "vae_decoder")["_class_name"] == "AutoencoderKL"


@pytest.mark.parametrize("component,bucket,field", [
    ("transformer", ak.Bucket(1, 72, 64, 8), "bucket.height 72"),
    ("transformer", ak.Bucket(1, 64, 64, 0), "bucket.text_len 0"),
    ("vae_decoder", ak.Bucket(1, 64, 60), "bucket.width 60"),
    ("text_encoder_2", ak.Bucket(0, text_len=8), "bucket.batch 0"),
    ("text_encoder", ak.Bucket(1, text_len=64), "bucket.text_len 64"),
])
def test_bad_bucket_is_rejected_naming_the_field(component, bucket, field):
    entry = REF_SUBFOLDER[component]
    with pytest.raises(ValueError, match=field):
        C.build(configs.flux_tiny()[entry], component, "fp32", bucket, materialize="meta")


def test_precisions():
    assert C.activation_dtype("fp32") == torch.float32
    assert C.activation_dtype("bf16") == torch.bfloat16
    assert C.activation_dtype("fp8") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        C.activation_dtype("fp16")
    # fp8: e4m3 linears in the transformer blocks (tests/pipeline/python/test_quant.py), which
    # torch._scaled_mm only takes with sizes that are multiples of 16 (flux-small's 72 is not).
    module, _ = C.build(configs.flux_tiny()["transformer"], "transformer", "fp8",
                        TINY_BUCKETS["transformer"], materialize="meta")
    assert module.get_parameter("transformer_blocks.0.attn.to_q.weight").dtype == \
        torch.float8_e4m3fn
    with pytest.raises(ValueError, match="multiples of 16"):
        C.build(SMALL["transformer"], "transformer", "fp8", SMALL_BUCKETS["transformer"],
                materialize="meta")
    with pytest.raises(ValueError, match="unet"):
        C.build(configs.flux_tiny()["transformer"], "unet", "fp32", TINY_BUCKETS["transformer"])


# ---------------------------------------------------------------------------------------------
# load_weights.


def _copy_component(repo: str, folder: str, dst) -> str:
    out = dst / "repo"
    shutil.copytree(os.path.join(repo, folder), out / folder)
    return str(out)


def test_load_weights_names_every_missing_tensor(tiny_repo, tmp_path):
    repo = _copy_component(tiny_repo, "transformer", tmp_path)
    path = os.path.join(repo, "transformer", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    del tensors["norm_out.linear.weight"]
    del tensors["single_transformer_blocks.1.attn.norm_k.weight"]
    save_file(tensors, path)
    module, _ = _ours_unloaded(repo, "transformer")
    with pytest.raises(C.WeightsError, match="lacks 2 tensor") as e:
        C.load_weights(module, repo, "transformer")
    assert "norm_out.linear.weight" in str(e.value)
    assert "single_transformer_blocks.1.attn.norm_k.weight" in str(e.value)


def test_load_weights_rejects_wrong_shape(tiny_repo, tmp_path):
    repo = _copy_component(tiny_repo, "text_encoder", tmp_path)
    path = os.path.join(repo, "text_encoder", "model.safetensors")
    tensors = load_file(path)
    tensors["text_model.final_layer_norm.weight"] = torch.ones(7)
    save_file(tensors, path)
    module, _ = _ours_unloaded(repo, "text_encoder")
    with pytest.raises(C.WeightsError,
                       match="text_model.final_layer_norm.weight has shape \\[7\\]"):
        C.load_weights(module, repo, "text_encoder")


def test_load_weights_ignores_unused_and_casts(tiny_repo, tmp_path):
    # A transformers 4.x CLIP checkpoint also holds the position_ids buffer; the VAE checkpoint
    # holds the encoder. Both are ignored. bf16 modules get bf16 copies of the float32 file.
    repo = _copy_component(tiny_repo, "text_encoder", tmp_path)
    path = os.path.join(repo, "text_encoder", "model.safetensors")
    tensors = load_file(path)
    tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors, path)
    config = C.read_component_config(repo, "text_encoder")
    module, _ = C.build(config, "text_encoder", "bf16", TINY_BUCKETS["text_encoder"])
    C.load_weights(module, repo, "text_encoder")
    w = module.get_parameter("text_model.final_layer_norm.weight")
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, tensors["text_model.final_layer_norm.weight"].bfloat16())
    assert any(k.startswith("encoder.") for k in _checkpoint_names(tiny_repo, "vae_decoder"))


def test_load_weights_accepts_embed_tokens_for_shared(tiny_repo, tmp_path):
    repo = _copy_component(tiny_repo, "text_encoder_2", tmp_path)
    folder = os.path.join(repo, "text_encoder_2")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = index["weight_map"].pop("shared.weight")
    tensors = load_file(os.path.join(folder, shard))
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, os.path.join(folder, shard))
    index["weight_map"]["encoder.embed_tokens.weight"] = shard
    with open(index_path, "w") as f:
        json.dump(index, f)
    module, _ = _ours_unloaded(repo, "text_encoder_2")
    C.load_weights(module, repo, "text_encoder_2")
    torch.testing.assert_close(module.get_parameter("shared.weight"),
                               tensors["encoder.embed_tokens.weight"], rtol=0, atol=0)


def test_load_weights_into_meta_module_assigns(pair, tiny_repo):
    config = C.read_component_config(tiny_repo, "vae_decoder")
    module, _ = C.build(config, "vae_decoder", "fp32", TINY_BUCKETS["vae_decoder"],
                        materialize="meta")
    C.load_weights(module, tiny_repo, "vae_decoder")
    assert not any(p.is_meta for p in module.parameters())
    _, loaded, inputs, ref_out = pair(tiny_repo, "vae_decoder", TINY_BUCKETS["vae_decoder"])
    with torch.no_grad():
        assert_matches(module(*inputs)[0], ref_out, "vae_decoder (meta-loaded)")


def test_missing_weight_files_raise(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        C.weight_files(str(tmp_path), "transformer")


def _ours_unloaded(repo: str, component: str):
    config = C.read_component_config(repo, component)
    return C.build(config, component, "fp32", TINY_BUCKETS[component])


# ---------------------------------------------------------------------------------------------
# torch.export of the wrappers (export only; AOTInductor compiles are tested elsewhere).


EXPORT_BUCKETS = {
    "text_encoder": ak.Bucket(1, text_len=77),
    "text_encoder_2": ak.Bucket(1, text_len=16),
    "transformer": ak.Bucket(1, 64, 48, 16),
    "vae_decoder": ak.Bucket(1, 64, 48),
}


@pytest.mark.parametrize("component", COMPONENTS)
def test_export_wrapper(tiny_repo, component):
    bucket = EXPORT_BUCKETS[component]
    config, module, example = _ours(tiny_repo, component, bucket)
    ep = torch.export.export(module, example, strict=False)
    # The package will ask for checkpoint names only: no lifted constants, no buffers.
    assert set(ep.state_dict) == set(module.state_dict())
    assert dict(ep.constants) == {}
    kinds = {s.kind.name for s in ep.graph_signature.input_specs}
    assert kinds == {"PARAMETER", "USER_INPUT"}
    user_inputs = [s.arg.name for s in ep.graph_signature.input_specs
                   if s.kind.name == "USER_INPUT"]
    assert user_inputs == [n for n, _, _ in C.input_spec(config, component, "fp32", bucket)]
    assert len(ep.graph_signature.output_specs) == 1
    inputs = _inputs(config, component, bucket, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*inputs)[0], module(*inputs)[0], rtol=0,
                                   atol=1e-6)


# ---------------------------------------------------------------------------------------------
# make_tiny.


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def test_make_tiny_is_deterministic(tiny_repo, tmp_path):
    again = str(tmp_path / "again")
    make_tiny.main([again, "--seed", "0"])
    files = _files(tiny_repo)
    assert files == _files(again)
    _, mismatch, errors = filecmp.cmpfiles(tiny_repo, again, files, shallow=False)
    assert mismatch == [] and errors == []
    other = str(tmp_path / "seed1")
    make_tiny.make_tiny(other, seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert not filecmp.cmp(os.path.join(tiny_repo, name), os.path.join(other, name),
                           shallow=False)


def test_make_tiny_layout(tiny_repo):
    files = set(_files(tiny_repo))
    for name in ("model_index.json", "scheduler/scheduler_config.json",
                 "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors",
                 "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
                 "text_encoder_2/model-00001-of-00002.safetensors",
                 "text_encoder_2/model-00002-of-00002.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model"):
        assert name in files, name
    with open(os.path.join(tiny_repo, "text_encoder_2", "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors",
                                                "model-00002-of-00002.safetensors"]
    tokenizer_fields = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
    for entry, rel in configs.CONFIG_FILES.items():
        with open(os.path.join(tiny_repo, rel)) as f:
            written = json.load(f)
        expected = configs.FLUX_TINY[entry]
        assert written.keys() == expected.keys(), entry
        for key, value in expected.items():
            if not (entry.startswith("text_encoder") and key in tokenizer_fields):
                assert written[key] == value, f"{entry}.{key}"
    # Weights are float32 and every tensor is non-zero (outputs depend on every layer).
    for component in COMPONENTS:
        for path in C.weight_files(tiny_repo, component):
            for name, t in load_file(path).items():
                assert t.dtype == torch.float32, name
                assert t.abs().max() > 0, name


def test_make_tiny_vocab_matches_tokenizers(tiny_repo):
    from transformers import CLIPTokenizer, T5TokenizerFast
    clip_cfg = C.read_component_config(tiny_repo, "text_encoder")
    t5_cfg = C.read_component_config(tiny_repo, "text_encoder_2")
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tiny_repo, "tokenizer"))
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(tiny_repo, "tokenizer_2"))
    assert len(clip_tok) == clip_cfg["vocab_size"]
    assert clip_tok.eos_token_id == clip_cfg["eos_token_id"]
    assert len(t5_tok) <= t5_cfg["vocab_size"]
    prompt = "a lighthouse on a cliff at dusk"
    ids = clip_tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert max(ids) < clip_cfg["vocab_size"] and ids.count(clip_cfg["eos_token_id"]) >= 1
    ids2 = t5_tok(prompt, padding="max_length", max_length=32, truncation=True).input_ids
    assert max(ids2) < t5_cfg["vocab_size"]


def test_flux_tiny_config_fields():
    cfg = configs.flux_tiny(clip_vocab_size=77, t5_vocab_size=99, clip_eos_token_id=76)
    assert cfg["text_encoder"]["vocab_size"] == 77 and cfg["text_encoder"]["eos_token_id"] == 76
    assert cfg["text_encoder_2"]["vocab_size"] == 99
    t = cfg["transformer"]
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert t["in_channels"] == 4 * cfg["vae"]["latent_channels"] == 64
    assert t["joint_attention_dim"] == cfg["text_encoder_2"]["d_model"]
    assert t["pooled_projection_dim"] == cfg["text_encoder"]["hidden_size"]
    dev_vae = configs.FLUX_DEV["vae"]
    assert len(cfg["vae"]["block_out_channels"]) == len(dev_vae["block_out_channels"])
    # Copies, not shared state.
    cfg["transformer"]["num_layers"] = 99
    assert configs.flux_tiny()["transformer"]["num_layers"] == 2
    assert copy.deepcopy(configs.flux_dev()) == configs.FLUX_DEV


def test_export_keeps_unused_guidance_input(small_repo):
    # flux-small has no guidance embedding (schnell-style); the package signature stays 5 inputs.
    bucket = SMALL_BUCKETS["transformer"]
    config, module, example = _ours(small_repo, "transformer", bucket)
    assert not config["guidance_embeds"]
    ep = torch.export.export(module, example, strict=False)
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                     "guidance"]
