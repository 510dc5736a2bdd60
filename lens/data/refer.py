"""RefCOCO / RefCOCO+ / RefCOCOg loader (REFER layout, as used upstream).

Expected layout under ``root`` (upstream ``datasets/``)::

    refer_seg/
      refcoco/   refs(unc).p  instances.json
      refcoco+/  refs(unc).p  instances.json
      refcocog/  refs(umd).p  instances.json
      images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg

The pickle is read with a restricted unpickler that only builds plain builtin containers/scalars.
The original pickles were written by Python 2 (``refer`` API), where text is a byte string: such
strings are decoded as UTF-8 when valid, else as latin-1 (never lossy); Python 3 pickles load as
they are. ``instances.json`` may carry a UTF-8 byte-order mark. Images are looked up as
``COCO_train2014_{image_id:012d}.jpg``, then under another extension or letter case (``.JPG``,
``.png``), then by the ``file_name`` of the ref or of the image entry.
"""

from __future__ import annotations

import builtins
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

from lens.data.base import CocoMask, Reference, layout_error, require
from lens.data.files import read_json, resolve_image
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


class _Bytes(bytes):
    """Marks bytes that were bytes in the writer (Python 3 ``bytes``), not Python 2 text."""


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
    return _Bytes(text.encode("latin1"))


def py2_text(raw: bytes) -> str:
    """A Python 2 byte string as text: UTF-8 when it is valid UTF-8, else latin-1 (every byte maps)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_LEAVES = (int, float, str, bool, type(None))  # left as they are; tested inline, saving a call per number


def _fix_text(obj: Any) -> Any:
    """Replace Python 2 byte strings (loaded as plain ``bytes``) by text, recursively; real bytes stay."""
    if type(obj) is bytes:
        return py2_text(obj)
    if isinstance(obj, _Bytes):
        return bytes(obj)
    if isinstance(obj, list):
        return [v if type(v) in _LEAVES else _fix_text(v) for v in obj]
    if isinstance(obj, dict):
        return {(k if type(k) in _LEAVES else _fix_text(k)): (v if type(v) in _LEAVES else _fix_text(v))
                for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_fix_text(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_fix_text(v) for v in obj)
    return obj


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only builtin data; raise ``ValueError`` naming ``path`` otherwise.

    Python 2 ``str`` values (and keys) become text via :func:`py2_text`; Python 2 ``unicode`` and
    Python 3 ``str`` are text already.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = _SafeUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot load refs pickle {path}: {exc}") from exc
    return _fix_text(data)


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
    images, anns, cats = load_instances(inst_path)

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


def _check_ref(ref: Any, index: int, path: Path, *, ann_list: bool = False) -> None:
    """Field checks shared with the gRefCOCO loader (``ann_list``: ``ann_id`` may be a list)."""
    if not isinstance(ref, dict):
        raise ValueError(f"{path}: ref #{index} is a {type(ref).__name__}, expected a dict")
    missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
    if missing:
        raise ValueError(f"{path}: ref #{index} (ref_id={ref.get('ref_id')}) lacks fields {missing}")
    where = f"{path}: ref #{index} (ref_id={ref['ref_id']})"
    for key in ("image_id",) if ann_list else ("image_id", "ann_id"):
        if not _is_id(ref[key]):
            raise ValueError(f"{where}: field {key!r} must be an integer id, got {ref[key]!r}")
    if ann_list and not (_is_id(ref["ann_id"]) or (isinstance(ref["ann_id"], list)
                                                   and all(_is_id(a) for a in ref["ann_id"]))):
        raise ValueError(f"{where}: field 'ann_id' must be an integer id or a list of them, got {ref['ann_id']!r}")
    if not isinstance(ref["split"], str):
        raise ValueError(f"{where}: field 'split' must be a string, got {ref['split']!r}")
    sents = ref["sentences"]
    if not isinstance(sents, list) or not sents or not all(isinstance(s, dict) and "sent" in s for s in sents):
        raise ValueError(f"{where}: field 'sentences' must be a non-empty list of {{'sent': ...}}")
    for k, sent in enumerate(sents):
        if not isinstance(sent["sent"], str):
            raise ValueError(f"{where}: field 'sentences[{k}].sent' must be a string, got {sent['sent']!r}")


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def checked_annotation(ann: dict, what: str, seg_what: str, h: int | None, w: int | None):
    """A COCO annotation's segmentation (validated; errors say `seg_what`), its box as xyxy floats, and its RLE's
    (h, w) if it has one, which must equal the image's `h, w` when those are known. Errors say `what`."""
    seg, bbox = ann.get("segmentation"), ann.get("bbox")
    validate_segmentation(seg, seg_what)
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise ValueError(f"{what}: field 'bbox' must be [x, y, w, h], got {bbox!r}")
    rle_hw = segmentation_size(seg)
    if rle_hw is not None and h and w and rle_hw != (h, w):
        raise ValueError(f"{what}: RLE size {list(rle_hw)} differs from image size {[h, w]}")
    x, y, bw, bh = (float(v) for v in bbox)
    return seg, (x, y, x + bw, y + bh), rle_hw


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
    image = images.get(ref["image_id"], {})
    h, w = image.get("height"), image.get("width")
    seg, box, rle_hw = checked_annotation(ann, what, what, h, w)
    mh, mw = (h, w) if h and w else (rle_hw or (None, None))
    image_id = int(ref["image_id"])
    if image_id not in resolved:
        resolved[image_id] = _resolve_image(image_dir, image_id, ref.get("file_name"), image.get("file_name"))
    cat_id = ann.get("category_id", ref.get("category_id"))
    return Reference(
        ref_id=f"{dataset}/{ref['ref_id']}",
        image_path=resolved[image_id],
        expressions=[str(s["sent"]) for s in ref["sentences"]],
        box=box,
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
    """Upstream name from the image id (any extension / case); else a ``file_name`` (ref's, then the
    image entry's) that exists, also under another extension or case."""
    default = image_dir / f"COCO_train2014_{image_id:012d}.jpg"
    found = resolve_image(default)
    if found.is_file():
        return found
    for name in file_names:
        if isinstance(name, str) and name:
            found = resolve_image(image_dir / name)
            if found.is_file():
                return found
    return default


def _check_images_exist(refs: list[Reference], root: Path, tree: str) -> None:
    missing = sorted({str(r.image_path) for r in refs if not Path(r.image_path).is_file()})
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        listing = f"\n{len(missing)} image(s) missing:\n  {shown}{more}"
        raise layout_error(Path(missing[0]), root, tree + listing, "image")


def load_instances(path: str | Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """``instances.json`` as id-indexed images, annotations and category names (cached per file
    modification time; errors name the file, the entry and the field)."""
    path = Path(path)
    return _load_instances(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=2)
def _load_instances(path: str, mtime_ns: int) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    data, _ = read_json(path, ("utf-8",), "COCO instances.json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: expected a COCO dict with 'images', 'annotations', 'categories' lists")
    tables = []
    for key in ("images", "annotations", "categories"):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise ValueError(f"{path}: field {key!r} must be a list, got {type(entries).__name__}")
        table = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not _is_id(entry.get("id")):
                got = entry.get("id") if isinstance(entry, dict) else entry
                raise ValueError(f"{path}: {key}[{i}] field 'id' must be an integer id, got {got!r}")
            table[entry["id"]] = entry
        tables.append(table)
    images, anns, cat_entries = tables
    cats = {cid: str(c.get("name")) for cid, c in cat_entries.items()}
    return images, anns, cats
