"""Records a numerical canary into an existing package with kiln.canary (what kiln-compile does at
compile time), for tests of the C++ side: the fixtures may predate canaries, and a test needs a
record it can alter.

    add_canary.py PACKAGE_DIR [--scale S]

--scale multiplies the recorded outputs (a record the package's output disagrees with).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

from kiln import canary


def main() -> None:
    pkg_dir = sys.argv[1]
    scale = float(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 1.0
    manifest_path = os.path.join(pkg_dir, "manifest.json")
    manifest = json.load(open(manifest_path))
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for spec in manifest["inputs"]:
        dtype = getattr(torch, spec["dtype"])
        if dtype == torch.int64:
            inputs.append(torch.zeros(spec["shape"], dtype=dtype))
        else:
            inputs.append(torch.randn(spec["shape"], generator=gen).to(dtype))
    precision = manifest["key"]["precision"]
    record = canary.record(os.path.join(pkg_dir, manifest["package"]["file"]),
                           manifest, inputs, precision, pkg_dir)
    if scale != 1.0:
        path = os.path.join(pkg_dir, record["file"])
        tensors = load_file(path)
        for name in list(tensors):
            if name.startswith("output."):
                tensors[name] = tensors[name] * scale
        save_file(tensors, path)
    manifest["canary"] = record
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
