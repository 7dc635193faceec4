"""Reference outputs for tests/pipeline/component_parity_test.cc: runs one flux-tiny component
eagerly (kiln.components, weights from the repository) on seeded inputs and saves the inputs and
outputs as safetensors ("input.0", ..., "output.0").

    ref_component.py REPO COMPONENT WIDTH HEIGHT TEXT_LEN OUT.safetensors [COMPILE_OPTIONS_JSON]

COMPILE_OPTIONS_JSON: the package's compile options; the model options among them (fuse_qkv)
build the same model the package was compiled from.
"""
import json
import sys

import torch
from safetensors.torch import save_file

from kiln import compile as kc
from kiln import components


def main() -> None:
    repo, component, width, height, text_len, out = sys.argv[1:7]
    width, height, text_len = int(width), int(height), int(text_len)
    options = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    config = components.read_component_config(repo, component)
    bucket = kc.component_bucket(component, config, batch=1, height=height, width=width,
                                 text_len=text_len)
    module, example = components.build(config, component, "fp32", bucket, device="cpu",
                                      compile_options=options)
    components.load_weights(module, repo, component)
    module.eval()
    g = torch.Generator().manual_seed(1234)
    inputs = []
    for x in example:
        if x.dtype == torch.int64:
            vocab = int(config.get("vocab_size", 100))
            inputs.append(torch.randint(0, vocab, x.shape, generator=g, dtype=torch.int64))
        elif x.ndim == 1:  # timestep (sigma in [0, 1]) or guidance scale
            inputs.append(torch.rand(x.shape, generator=g) * (1.0 if len(inputs) == 3 else 4.0))
        else:
            inputs.append(torch.randn(x.shape, generator=g, dtype=x.dtype))
    with torch.no_grad():
        (out_t,) = module(*inputs)
    tensors = {f"input.{i}": t.contiguous() for i, t in enumerate(inputs)}
    tensors["output.0"] = out_t.contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    main()
