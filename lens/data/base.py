"""The :class:`Reference` record shared by all loaders.

A reference is one target object (or region) in one image with one or more referring expressions.
Masks are decoded lazily by a small picklable *mask source* (DataLoader workers may use spawn),
so creating tens of thousands of references stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from lens.data.masks import Segmentation, decode_segmentation
from lens.data.transforms import image_size, load_rgb, mask_box

Box = tuple[float, float, float, float]


class MaskSource(Protocol):
    """Anything that can produce the RAW target mask of a reference."""

    def load(self, image_path: Path) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class CocoMask:
    """COCO segmentation (polygons or RLE); parts are summed (``combine="sum"``) or OR-ed.

    ``height``/``width`` may be ``None`` for polygons: the image header is read on demand.
    """

    segmentation: Segmentation
    height: int | None = None
    width: int | None = None
    combine: Literal["sum", "union"] = "sum"
    what: str = "segmentation"

    def load(self, image_path: Path) -> np.ndarray:
        h, w = (self.height, self.width) if self.height and self.width else image_size(image_path)
        return decode_segmentation(self.segmentation, h, w, combine=self.combine, what=self.what)


@dataclass(frozen=True, slots=True)
class UnionMask:
    """Union (0/1) of several annotations' masks, e.g. a multi-target gRefCOCO expression.

    Each annotation's polygon parts / RLE parts are OR-ed, then the annotations are OR-ed (GRES's
    ``merged[merged > 1] = 1``). With no segmentations (a no-target expression) it returns an
    all-zero mask of the image size.
    """

    segmentations: tuple[Segmentation, ...]
    height: int | None = None
    width: int | None = None
    what: str = "segmentations"

    def load(self, image_path: Path) -> np.ndarray:
        h, w = (self.height, self.width) if self.height and self.width else image_size(image_path)
        mask = np.zeros((h, w), dtype=np.uint8)
        for k, seg in enumerate(self.segmentations):
            mask |= decode_segmentation(seg, h, w, combine="union", what=f"{self.what} target {k}")
        return mask


@dataclass(slots=True)
class Reference:
    """One referred target (or target set). ``box`` is xyxy in original pixels, or ``None`` =
    derive from the mask.

    ``load_mask()`` returns ``np.uint8 (H, W)`` with RAW values (0 bg, 1 target, >=2 overlap of
    summed polygon parts, 255 ignore), see docs/CONTRACTS.md. Generalized references (gRefCOCO)
    carry ``meta["target_count"]`` (k >= 0) and ``meta["no_target"]`` (True when k == 0: the mask
    is all zeros and ``box`` is ``None``); other loaders omit both (read them as 1 and False).
    """

    ref_id: str
    image_path: Path
    expressions: list[str]
    box: Box | None
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    mask_source: MaskSource | None = field(default=None, repr=False, compare=False)

    def load_mask(self) -> np.ndarray:
        """Decode the RAW target mask at original image size."""
        if self.mask_source is None:
            raise ValueError(f"reference {self.ref_id} has no mask")
        return self.mask_source.load(Path(self.image_path))

    def load_image(self) -> Image.Image:
        """The original RGB image (errors name the path)."""
        return load_rgb(self.image_path)

    def target_box(self, mask: np.ndarray | None = None) -> Box | None:
        """``box`` if stored, else the tight box of pixels == 1 (decoding the mask if not given)."""
        if self.box is not None:
            return self.box
        return mask_box((self.load_mask() if mask is None else mask) == 1)

    @property
    def image_key(self) -> str:
        """Key identifying the image (for de-duplicating image work within a batch)."""
        return str(self.image_path)


def layout_error(missing: Path, root: Path, tree: str, what: str = "file") -> FileNotFoundError:
    """A ``FileNotFoundError`` naming the missing path and printing the expected tree under ``root``."""
    return FileNotFoundError(f"missing {what}: {missing}\nexpected layout under {root}:\n{tree.rstrip()}")


def require(path: Path, root: Path, tree: str, what: str = "file") -> Path:
    """Return ``path`` if it exists, else raise :func:`layout_error`."""
    if not path.exists():
        raise layout_error(path, root, tree, what)
    return path
