"""Rewrites metadata entries inside a compiled package (for tests of the checks made before a
package is loaded), then updates the manifest's sha256/bytes so the store still accepts it.

    tamper_package.py PACKAGE_DIR KEY=VALUE [KEY=VALUE ...]
"""
import hashlib
import json
import os
import shutil
import sys
import zipfile


def main() -> None:
    pkg_dir, changes = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    path = os.path.join(pkg_dir, "model.pt2")
    tmp = path + ".new"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("metadata.json"):
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            dst.writestr(info, data)
    shutil.move(tmp, path)
    manifest_path = os.path.join(pkg_dir, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(path, "rb") as f:
        manifest["package"]["sha256"] = hashlib.sha256(f.read()).hexdigest()
    manifest["package"]["bytes"] = os.path.getsize(path)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
