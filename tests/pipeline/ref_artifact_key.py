"""Python side of the artifact key for tests/cache/artifact_key_test.cc.

    ref_artifact_key.py REQUEST_JSON OUT_JSON

REQUEST_JSON: {"config_files": [path, ...], "keys": [ArtifactKey.to_json()-shaped objects],
"json_files": [path, ...], "code_roots": [path, ...]}. Each config file is read as text with
json.load, as kiln-compile reads a component's config.json. Writes OUT_JSON: {"configs":
[{"canonical", "architecture_digest"}], "keys": [{"canonical", "digest"}], "json_files":
[{"canonical", "elements"}], "code": [{"revision", "files"}]} using kiln.artifact_key
("elements": canonical_json of each item when the value is a list; "code": code_revision and
code_files of each code root, a kiln package directory).
"""
from __future__ import annotations

import json
import sys

from kiln.artifact_key import (ArtifactKey, Bucket, architecture_digest, canonical_json,
                               code_files, code_revision)


def main(request_path: str, out_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    out: dict = {"configs": [], "keys": [], "json_files": [], "code": []}
    for path in request["config_files"]:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        out["configs"].append({"canonical": canonical_json(config),
                               "architecture_digest": architecture_digest(config)})
    for k in request["keys"]:
        key = ArtifactKey(architecture=k["architecture"], component=k["component"],
                          precision=k["precision"], bucket=Bucket(**k["bucket"]),
                          compile=k["compile"], target=k["target"], toolchain=k["toolchain"])
        key.validate()
        out["keys"].append({"canonical": canonical_json(key.to_json()), "digest": key.digest()})
    for path in request["json_files"]:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        out["json_files"].append({
            "canonical": canonical_json(value),
            "elements": [canonical_json(v) for v in value] if isinstance(value, list) else [],
        })
    for root in request.get("code_roots", []):
        out["code"].append({"revision": code_revision(root), "files": code_files(root)})
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
