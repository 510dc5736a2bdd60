"""GroundingSuite-Eval loader.

Expected layout (upstream ``datasets/``)::

    GroundingSuite-Eval.jsonl   one object a line: image_path, box [x1,y1,x2,y2], segmentation, caption
    coco/unlabeled2017/<image_path>

``segmentation`` is an RLE dict (``counts`` as a str, or an uncompressed list of run lengths), a
list of RLE dicts, or a polygon list; parts are summed like REFER. The file may start with a UTF-8
byte-order mark and use CRLF line ends; errors name ``file:line`` and the field. Images may be
stored under another extension or letter case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lens.data.base import CocoMask, Reference, layout_error, require
from lens.data.files import iter_jsonl, resolve_image
from lens.data.masks import segmentation_size, validate_segmentation

DEFAULT_JSONL = "GroundingSuite-Eval.jsonl"
DEFAULT_IMAGE_DIR = Path("coco/unlabeled2017")
EXPECTED_TREE = (
    "GroundingSuite-Eval.jsonl\n"
    "coco/\n"
    "  unlabeled2017/\n"
    "    <image_path>.jpg\n"
)


def clean_caption_upstream(caption: str) -> str:
    """Upstream question text: ``caption.replace('is', '').replace('are', '').lower()``.

    Quirk kept on purpose: it deletes the substrings anywhere ("this" -> "th", "disk" -> "dk")
    and runs before ``lower()``, so "Is"/"Are" survive.
    """
    return caption.replace("is", "").replace("are", "").lower()


def load_groundingsuite(
    jsonl_path: str | Path,
    image_root: str | Path | None = None,
    *,
    upstream_caption_cleanup: bool = True,
    check_images: bool = True,
) -> list[Reference]:
    """One :class:`Reference` per line. ``image_root`` defaults to ``<jsonl dir>/coco/unlabeled2017``.

    With ``upstream_caption_cleanup=True`` (default, matches upstream scoring) the expression is
    :func:`clean_caption_upstream` of the caption; otherwise the raw caption. The raw caption is
    always in ``meta["caption"]``.
    """
    jsonl_path = Path(jsonl_path)
    root = jsonl_path.parent
    require(jsonl_path, root, EXPECTED_TREE, "GroundingSuite jsonl")
    image_root = Path(image_root) if image_root is not None else root / DEFAULT_IMAGE_DIR
    require(image_root, root, EXPECTED_TREE, "GroundingSuite image directory")
    clean = clean_caption_upstream if upstream_caption_cleanup else str
    refs = [_reference(item, line_no, jsonl_path, image_root, clean) for line_no, item in iter_jsonl(jsonl_path)]
    if check_images:
        missing = [r for r in refs if not Path(r.image_path).is_file()]
        if missing:
            raise layout_error(Path(missing[0].image_path), root, EXPECTED_TREE
                               + f"\n{len(missing)} image(s) missing (first: line {missing[0].meta['line']})", "image")
    return refs


def _reference(item: object, line_no: int, jsonl_path: Path, image_root: Path,
               clean: Callable[[str], str]) -> Reference:
    where = f"{jsonl_path}:{line_no}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key, kind in (("image_path", str), ("caption", str), ("box", list)):
        if not isinstance(item.get(key), kind):
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {item.get(key)!r}")
    box = item["box"]
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{where}: field 'box' must be [x1, y1, x2, y2], got {box!r}")
    seg = item.get("segmentation")
    validate_segmentation(seg, f"{where} field 'segmentation' (id={item.get('id', line_no)})")
    hw = segmentation_size(seg) or (None, None)
    ref_id = f"groundingsuite/{item['id']}" if "id" in item else f"groundingsuite/{line_no - 1}"
    try:
        image_path = _resolve(item["image_path"], image_root, jsonl_path.parent)
    except FileNotFoundError as exc:  # an ambiguous image name
        raise FileNotFoundError(f"{where}: field 'image_path': {exc}") from None
    return Reference(
        ref_id=ref_id,
        image_path=image_path,
        expressions=[clean(item["caption"])],
        box=tuple(float(v) for v in box),
        source="groundingsuite",
        meta={"caption": item["caption"], "line": line_no, "height": hw[0], "width": hw[1]},
        mask_source=CocoMask(seg, hw[0], hw[1], "sum", f"{where} field 'segmentation'"),
    )


def _resolve(image_path: str, image_root: Path, jsonl_dir: Path) -> Path:
    """Under ``image_root`` (or absolute), else beside the JSONL; other extensions / case tried."""
    path = Path(image_path)
    if path.is_absolute():
        return resolve_image(path)
    primary = resolve_image(image_root / path)
    if not primary.is_file():
        beside = resolve_image(jsonl_dir / path)
        if beside.is_file():
            return beside
    return primary
