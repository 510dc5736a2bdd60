"""Overlays for the demo and for error analysis in evaluation."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def overlay(image: Image.Image, mask: np.ndarray, box: list[float] | None, text: str) -> Image.Image:
    """Red mask (alpha 128), green 4-px box when valid and inside the image, and the answer text."""
    base = image.convert("RGBA")
    red = np.zeros((*mask.shape, 4), dtype=np.uint8)
    red[mask] = (255, 0, 0, 128)
    out = Image.alpha_composite(base, Image.fromarray(red, "RGBA"))
    draw = ImageDraw.Draw(out)
    w, h = image.size
    if box is not None:
        x1, y1, x2, y2 = box
        if 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h:
            draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0, 255), width=4)
    label = text.strip().replace("\n", " ")[:120] or "(empty answer)"
    draw.rectangle([0, 0, w, 14], fill=(0, 0, 0, 160))
    draw.text((3, 1), label, fill=(255, 255, 255, 255))
    return out.convert("RGB")
