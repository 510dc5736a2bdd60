"""RefCOCO / RefCOCO+ / RefCOCOg loader (REFER layout, as used upstream).

Expected layout under ``root`` (upstream ``datasets/``)::

    refer_seg/
      refcoco/   refs(unc).p  instances.json
      refcoco+/  refs(unc).p  instances.json
      refcocog/  refs(umd).p  instances.json
      images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg

The pickle is read with a restricted unpickler that only builds plain builtin containers/scalars.
"""

from __future__ import annotations

import builtins
import json
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

from lens.data.base import CocoMask, Reference, layout_error, require
from lens.data.masks import segmentation_size, validate_segmentation

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
IMAGE_DIR = Path("refer_seg/images/mscoco/images/train2014")

_SAFE_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool", "complex"}
)


def expected_tree(dataset: str = "refcoco", split_by: str | None = None) -> str:
    """The directory tree this loader expects (for error messages)."""
    split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
    return (
        "refer_seg/\n"
        f"  {dataset}/\n"
        f"    refs({split_by}).p\n"
        "    instances.json\n"
        "  images/mscoco/images/train2014/\n"
        "    COCO_train2014_000000000001.jpg  (COCO_train2014_{image_id:012d}.jpg)\n"
    )


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except plain builtin types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles from Python 3 store bytes
            return _latin1_encode
        raise pickle.UnpicklingError(f"unsafe pickle: refusing to load global {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unsafe pickle: refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only builtin data; raise ``ValueError`` naming ``path`` otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(fh, encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot load refs pickle {path}: {exc}") from exc


def split_matches(ref_split: str, wanted: str | None) -> bool:
    """REFER split filter: train/val exact; ``test`` matches any test split; ``testA`` matches
    test splits containing ``A`` (testA, testAB); multi-letter ``testAB`` is exact; ``None`` = all."""
    if wanted is None:
        return True
    if wanted == "test":
        return "test" in ref_split
    if wanted.startswith("test") and len(wanted) == 5:
        return ref_split.startswith("test") and wanted[-1] in ref_split[4:]
    return ref_split == wanted


def load_refer(
    root: str | Path,
    dataset: str,
    split: str | None,
    split_by: str | None = None,
    *,
    check_images: bool = True,
) -> list[Reference]:
    """One :class:`Reference` per REFER ref of ``split`` (all sentences as expressions).

    Box = annotation ``bbox [x, y, w, h]`` -> ``[x, y, x + w, y + h]``. Mask = polygon parts SUMMED
    (overlaps hold 2), RLE supported. ``check_images`` fails early, listing missing image files.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown REFER dataset {dataset!r}; expected one of {DATASETS}")
    root = Path(root)
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    tree = expected_tree(dataset, split_by)
    ds_dir = root / "refer_seg" / dataset
    refs_path = require(ds_dir / f"refs({split_by}).p", root, tree, "REFER refs pickle")
    inst_path = require(ds_dir / "instances.json", root, tree, "REFER instances.json")
    image_dir = require(root / IMAGE_DIR, root, tree, "REFER image directory")

    refs = safe_load_pickle(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of ref dicts, got {type(refs).__name__}")
    images, anns, cats = _load_instances(str(inst_path), inst_path.stat().st_mtime_ns)

    out: list[Reference] = []
    resolved: dict[int, Path] = {}
    for i, ref in enumerate(refs):
        _check_ref(ref, i, refs_path)
        if not split_matches(str(ref["split"]), split):
            continue
        out.append(_make_reference(ref, dataset, split_by, images, anns, cats, image_dir, resolved, inst_path))
    if check_images:
        _check_images_exist(out, root, tree)
    return out


def _check_ref(ref: Any, index: int, path: Path) -> None:
    if not isinstance(ref, dict):
        raise ValueError(f"{path}: ref #{index} is a {type(ref).__name__}, expected a dict")
    missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
    if missing:
        raise ValueError(f"{path}: ref #{index} (ref_id={ref.get('ref_id')}) lacks fields {missing}")
    sents = ref["sentences"]
    if not isinstance(sents, list) or not sents or not all(isinstance(s, dict) and "sent" in s for s in sents):
        raise ValueError(f"{path}: ref_id={ref['ref_id']} needs a non-empty 'sentences' list of {{'sent': ...}}")


def _make_reference(
    ref: dict,
    dataset: str,
    split_by: str,
    images: dict[int, dict],
    anns: dict[int, dict],
    cats: dict[int, str],
    image_dir: Path,
    resolved: dict[int, Path],
    inst_path: Path,
) -> Reference:
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise ValueError(f"{inst_path}: annotation id {ref['ann_id']} (ref_id={ref['ref_id']}) not found")
    what = f"{inst_path.name} annotation id {ann.get('id')} (ref_id={ref['ref_id']})"
    seg, bbox = ann.get("segmentation"), ann.get("bbox")
    validate_segmentation(seg, what)
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"{what}: 'bbox' must be [x, y, w, h], got {bbox!r}")
    image = images.get(ref["image_id"], {})
    h, w = image.get("height"), image.get("width")
    rle_hw = segmentation_size(seg)
    if rle_hw is not None and h and w and rle_hw != (h, w):
        raise ValueError(f"{what}: RLE size {list(rle_hw)} differs from image size {[h, w]}")
    mh, mw = (h, w) if h and w else (rle_hw or (None, None))
    image_id = int(ref["image_id"])
    if image_id not in resolved:
        resolved[image_id] = _resolve_image(image_dir, image_id, ref.get("file_name"), image.get("file_name"))
    x, y, bw, bh = (float(v) for v in bbox)
    cat_id = ann.get("category_id", ref.get("category_id"))
    return Reference(
        ref_id=f"{dataset}/{ref['ref_id']}",
        image_path=resolved[image_id],
        expressions=[str(s["sent"]) for s in ref["sentences"]],
        box=(x, y, x + bw, y + bh),
        source=dataset,
        meta={
            "dataset": dataset,
            "split_by": split_by,
            "split": ref["split"],
            "image_id": image_id,
            "ann_id": ref["ann_id"],
            "category_id": cat_id,
            "category": cats.get(cat_id),
            "sent_ids": [s.get("sent_id") for s in ref["sentences"]],
            "height": h,
            "width": w,
        },
        mask_source=CocoMask(seg, mh, mw, "sum", what),
    )


def _resolve_image(image_dir: Path, image_id: int, *file_names: str | None) -> Path:
    """Upstream name from the image id; else a ``file_name`` (ref's, then image entry's) that exists."""
    default = image_dir / f"COCO_train2014_{image_id:012d}.jpg"
    if default.is_file():
        return default
    for name in file_names:
        if name and (image_dir / name).is_file():
            return image_dir / name
    return default


def _check_images_exist(refs: list[Reference], root: Path, tree: str) -> None:
    missing = sorted({str(r.image_path) for r in refs if not Path(r.image_path).is_file()})
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        listing = f"\n{len(missing)} image(s) missing:\n  {shown}{more}"
        raise layout_error(Path(missing[0]), root, tree + listing, "image")


@lru_cache(maxsize=2)
def _load_instances(path: str, mtime_ns: int) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """Parse ``instances.json`` into id-indexed images, annotations and category names (cached)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: expected a COCO dict with 'images', 'annotations', 'categories'")
    images = {int(im["id"]): im for im in data.get("images", [])}
    anns = {int(a["id"]): a for a in data["annotations"]}
    cats = {int(c["id"]): str(c.get("name")) for c in data.get("categories", [])}
    return images, anns, cats
