"""LENS's own simple JSONL format for custom data.

One JSON object a line::

    {"image": "images/0001.jpg",             # relative to the .jsonl's folder, or absolute
     "expressions": ["the red mug", ...],     # non-empty list of non-empty strings
     "mask": {"size": [h, w], "counts": "..."}  # COCO RLE (str counts, or a list of ints) ...
     "polygons": [[x0, y0, x1, y1, ...], ...],  # ... OR polygons (exactly one of mask/polygons)
     "box": [x1, y1, x2, y2],                # optional, original pixels; else tight box of the mask
     "id": "any-unique-id",                  # optional; default "<file stem>:<line>"
     "swap_expressions": ["..."],            # optional: expressions naming OTHER objects
     "meta": {...}}                          # optional free-form dict

Unlike REFER, polygon parts are OR-ed (mask values are 0/1 only). Polygon parts with fewer than 3
points are dropped (at least one part needs >= 3). The file may start with a UTF-8 byte-order mark
(or be UTF-16 with one) and use CRLF line ends; an image missing under its stored name is looked up
under another extension or letter case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from lens.data.base import CocoMask, Reference, require
from lens.data.files import iter_jsonl, resolve_image
from lens.data.masks import segmentation_size, validate_segmentation

FIELDS = ("image", "expressions", "mask", "polygons", "box", "id", "swap_expressions", "meta")
EXPECTED = "<file>.jsonl with one JSON object a line (see lens/data/custom.py for the schema)"


def load_custom(jsonl_path: str | Path, *, check_images: bool = True) -> list[Reference]:
    """Read and validate a custom JSONL file; errors name the line, the field and what was expected."""
    jsonl_path = Path(jsonl_path)
    require(jsonl_path, jsonl_path.parent, EXPECTED, "custom JSONL file")
    refs: list[Reference] = []
    seen: dict[str, int] = {}
    for line_no, record in iter_jsonl(jsonl_path):
        where = f"{jsonl_path}:{line_no}"
        validate_record(record, where)
        try:
            ref = _reference(record, jsonl_path, line_no)
        except FileNotFoundError as exc:  # an ambiguous image name
            raise FileNotFoundError(f"{where}: field 'image': {exc}") from None
        if ref.ref_id in seen:
            raise ValueError(f"{where}: field 'id' {ref.ref_id!r} already used on line {seen[ref.ref_id]}")
        seen[ref.ref_id] = line_no
        if check_images and not Path(ref.image_path).is_file():
            raise FileNotFoundError(f"{where}: field 'image': file not found: {ref.image_path}")
        refs.append(ref)
    return refs


def validate_record(record: Any, where: str) -> None:
    """Raise ``ValueError`` ("<where>: field 'x' must be ..., got ...") if ``record`` breaks the schema."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed fields are {list(FIELDS)}")
    if not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError(f"{where}: field 'image' must be a non-empty path string, got {record.get('image')!r}")
    _check_str_list(record, "expressions", where, required=True)
    _check_str_list(record, "swap_expressions", where, required=False)
    if ("mask" in record) == ("polygons" in record):
        raise ValueError(f"{where}: exactly one of field 'mask' (RLE dict) or field 'polygons' (list) is required")
    if "mask" in record:
        if not isinstance(record["mask"], dict):
            raise ValueError(f"{where}: field 'mask' must be an RLE dict {{'size': [h, w], 'counts': ...}}")
        validate_segmentation(record["mask"], f"{where}: field 'mask'")
    else:
        if not isinstance(record["polygons"], list):
            raise ValueError(f"{where}: field 'polygons' must be a list of [x0, y0, x1, y1, ...] lists")
        validate_segmentation(record["polygons"], f"{where}: field 'polygons'")
    if "box" in record:
        _check_box(record["box"], where)
    if "id" in record and not isinstance(record["id"], (str, int)):
        raise ValueError(f"{where}: field 'id' must be a string or int, got {record['id']!r}")
    if "meta" in record and not isinstance(record["meta"], dict):
        raise ValueError(f"{where}: field 'meta' must be a JSON object, got {record['meta']!r}")


def write_custom_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Validate ``records`` (dicts in the schema above) and write them one a line; returns ``path``."""
    path = Path(path)
    lines = []
    for i, record in enumerate(records, start=1):
        validate_record(record, f"record {i}")
        lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _reference(record: dict[str, Any], jsonl_path: Path, line_no: int) -> Reference:
    image = Path(record["image"])
    image = resolve_image(image if image.is_absolute() else jsonl_path.parent / image)
    seg = record.get("mask", record.get("polygons"))
    hw = segmentation_size(seg) or (None, None)
    meta = dict(record.get("meta", {}))
    meta.update(line=line_no, height=hw[0], width=hw[1])
    if "swap_expressions" in record:
        meta["swap_expressions"] = list(record["swap_expressions"])
    box = record.get("box")
    return Reference(
        ref_id=str(record["id"]) if "id" in record else f"{jsonl_path.stem}:{line_no}",
        image_path=image,
        expressions=list(record["expressions"]),
        box=tuple(float(v) for v in box) if box is not None else None,
        source="custom",
        meta=meta,
        mask_source=CocoMask(seg, hw[0], hw[1], "union",
                             f"{jsonl_path}:{line_no} field {'mask' if 'mask' in record else 'polygons'!r}"),
    )


def _check_str_list(record: dict[str, Any], key: str, where: str, *, required: bool) -> None:
    if key not in record:
        if required:
            raise ValueError(f"{where}: field {key!r} is missing; expected a non-empty list of strings")
        return
    value = record[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of non-empty strings, got {value!r}")


def _check_box(box: Any, where: str) -> None:
    ok = isinstance(box, list) and len(box) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
    )
    if not ok or box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: field 'box' must be [x1, y1, x2, y2] numbers with x2 >= x1, y2 >= y1, got {box!r}")
