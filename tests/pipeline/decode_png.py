"""Decodes a PNG with PIL for tests/pipeline/png_test.cc.

    decode_png.py PNG_PATH OUT_RAW

Writes OUT_RAW: the pixels as 8-bit RGB, rows top to bottom, and OUT_RAW.json:
{"mode": <PIL mode as decoded>, "width": w, "height": h}.
"""
from __future__ import annotations

import json
import sys

from PIL import Image


def main(png_path: str, out_raw: str) -> None:
    with Image.open(png_path) as im:
        im.load()
        info = {"mode": im.mode, "width": im.width, "height": im.height, "format": im.format}
        with open(out_raw, "wb") as f:
            f.write(im.convert("RGB").tobytes())
    with open(out_raw + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
