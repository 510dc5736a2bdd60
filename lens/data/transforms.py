"""Image / box transforms shared by loaders, datasets and inference.

Coordinate frames (see docs/CONTRACTS.md):

* original pixels: the image file as stored (no EXIF rotation is applied);
* LLM pixels: the image after an optional longest-side cap and ``smart_resize`` (factor = the vision tower's
  patch x merge: 28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL; ``lens.modeling.families.image_factor``);
* box frame: what answer boxes are written in, LLM pixels (Qwen2.5-VL) or 0-1000 of the image (Qwen2-VL,
  Qwen3-VL): ``box_to_llm_pixels`` / ``box_from_llm_pixels`` take its size (``lens.modeling.families.box_frame_size``);
* SAM image: the original resized straight (aspect not kept) to ``S x S``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch / qwen_vl_utils are imported lazily: loaders and the generator stay light
    import torch

IMAGE_FACTOR = 28  # Qwen2.5-VL's (the default); a model's own: lens.modeling.families.image_factor(processor)
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 1_000_000


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` as a fully decoded RGB ``PIL.Image``; errors name the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {path}: corrupt or unsupported ({exc})") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """``(h, w)`` of an image file, reading only its header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {path}: corrupt or unsupported ({exc})") from exc
    return h, w


def cap_longest_side(h: int, w: int, longest_side: int | None) -> tuple[int, int]:
    """Size after shrinking so that ``max(h, w) <= longest_side`` (never enlarges)."""
    if longest_side is None or max(h, w) <= longest_side:
        return h, w
    scale = longest_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def llm_image_size(
    h: int,
    w: int,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    longest_side: int | None = None,
    factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """``(rh, rw)`` the LLM sees: optional longest-side cap, then ``smart_resize`` to multiples of ``factor``."""
    from qwen_vl_utils import smart_resize

    h, w = cap_longest_side(h, w, longest_side)
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(rh), int(rw)


def resize_for_llm(
    img: Image.Image,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    longest_side: int | None = None,
    factor: int = IMAGE_FACTOR,
) -> Image.Image:
    """Resize ``img`` to :func:`llm_image_size` (ReasonSeg uses ``longest_side=640``)."""
    w, h = img.size
    ch, cw = cap_longest_side(h, w, longest_side)
    if (ch, cw) != (h, w):
        img = img.resize((cw, ch), Image.Resampling.BICUBIC)
    rh, rw = llm_image_size(ch, cw, min_pixels, max_pixels, factor=factor)
    if (rh, rw) != (ch, cw):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    return img


def box_to_llm_pixels(
    box_xyxy_orig: Sequence[float], orig_hw: tuple[int, int], llm_hw: tuple[int, int]
) -> list[int]:
    """Original-pixel box -> integer box in a frame of size ``llm_hw``, ``round(x / orig_w * llm_w)`` as upstream
    (the LLM image for Qwen2.5-VL; ``(1000, 1000)`` gives the 0-1000 coordinates of Qwen2-VL and Qwen3-VL)."""
    sx, sy = llm_hw[1] / orig_hw[1], llm_hw[0] / orig_hw[0]
    x1, y1, x2, y2 = box_xyxy_orig
    return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]


def box_from_llm_pixels(
    box_xyxy_llm: Sequence[float], llm_hw: tuple[int, int], orig_hw: tuple[int, int]
) -> list[float]:
    """Box in a frame of size ``llm_hw`` (LLM pixels or 0-1000) -> original-pixel box (floats, no rounding)."""
    sx, sy = orig_hw[1] / llm_hw[1], orig_hw[0] / llm_hw[0]
    x1, y1, x2, y2 = box_xyxy_llm
    return [float(x1) * sx, float(y1) * sy, float(x2) * sx, float(y2) * sy]


def pil_to_tensor(img: Image.Image) -> "torch.Tensor":
    """RGB ``PIL.Image`` -> ``uint8`` tensor ``(3, H, W)``."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def sam_image(img: Image.Image, size: int) -> "torch.Tensor":
    """Original RGB resized straight to ``size x size`` (bilinear, antialias) as ``uint8 (3, S, S)``."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(pil_to_tensor(img), [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight ``xyxy`` box of the nonzero pixels of ``mask`` (pixel-edge convention: ``x2 = last col + 1``).

    Returns ``None`` for an empty mask. Pass ``mask == 1`` to box only the target value.
    """
    mask = np.asarray(mask)
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
