"""kiln's own torch.nn definitions of the Flux.1 pipeline models, written for torch.export.

Each model is built from the component's config.json dict, holds parameters only (no buffers), and
names them exactly as the diffusers / transformers checkpoints do, so checkpoint tensors load
without renaming and an exported package asks for checkpoint names (`get_constant_fqns()`).
"""
from kiln.models.clip import ClipTextModel
from kiln.models.flux import FluxTransformer
from kiln.models.t5 import T5Encoder
from kiln.models.vae import VaeDecoder, VaeEncoder

__all__ = ["ClipTextModel", "FluxTransformer", "T5Encoder", "VaeDecoder", "VaeEncoder"]
