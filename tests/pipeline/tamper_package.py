"""Tampers with a compiled package the way a hostile writer of a package directory would, then
recomputes the manifest's package sha256/bytes so that today's per-package verification (the
package against its own manifest) still accepts it.

    tamper_package.py PACKAGE_DIR KEY=VALUE [KEY=VALUE ...]   rewrite metadata.json entries
    tamper_package.py PACKAGE_DIR --shim MARKER                replace the inner .so with a shim
                                                              whose constructor writes MARKER
    tamper_package.py PACKAGE_DIR --garbage                    replace model.pt2 with random bytes

The shim is linked against the original library (kept beside it in the archive), so a loader
that dlopen()s it would run the constructor and then the original code: the job would succeed
and nothing would show. A node must refuse it before any of its code runs.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SHIM_SOURCE = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void kiln_tamper_shim(void) {
  int fd = open("%s", O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd >= 0) { (void)write(fd, "shim ran\n", 9); close(fd); }
}
"""


def rewrite(path: str, transform) -> None:
    tmp = path + ".new"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            for name, data in transform(info.filename, src.read(info)):
                out = zipfile.ZipInfo(name, date_time=info.date_time)
                out.external_attr = info.external_attr
                dst.writestr(out, data)
    shutil.move(tmp, path)


def build_shim(marker: str, original: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "shim.c"), "w") as f:
            f.write(SHIM_SOURCE % marker)
        with open(os.path.join(d, "liboriginal.so"), "wb") as f:
            f.write(original)
        out = os.path.join(d, "shim.so")
        # --no-as-needed: keep the original as a dependency although the shim calls nothing in it.
        # The original is found beside the shim wherever the loader extracts the archive.
        subprocess.run(["cc", "-shared", "-fPIC", "-o", out, os.path.join(d, "shim.c"),
                        "-Wl,--no-as-needed", "-Wl,--allow-shlib-undefined",
                        "-Wl,-rpath,$ORIGIN", "-L" + d, "-loriginal"], check=True)
        with open(out, "rb") as f:
            return f.read()


def main() -> None:
    pkg_dir, args = sys.argv[1], sys.argv[2:]
    path = os.path.join(pkg_dir, "model.pt2")
    if args and args[0] == "--shim":
        marker = os.path.abspath(args[1])

        def shim(name: str, data: bytes):
            if name.endswith(".so"):
                yield name, build_shim(marker, data)
                yield os.path.join(os.path.dirname(name), "liboriginal.so"), data
            else:
                yield name, data
        rewrite(path, shim)
    elif args and args[0] == "--garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
    else:
        changes = dict(a.split("=", 1) for a in args)

        def meta(name: str, data: bytes):
            if name.endswith("metadata.json"):
                m = json.loads(data)
                m.update(changes)
                data = json.dumps(m).encode()
            yield name, data
        rewrite(path, meta)
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
