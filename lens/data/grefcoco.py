"""gRefCOCO loader (generalized referring expressions, GRES layout).

Expected layout under ``root`` (upstream ``datasets/``)::

    refer_seg/
      grefcoco/  grefs(unc).json  instances.json
      images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg

``grefs(unc).json`` is a JSON list of refs: ``ref_id``, ``image_id``, ``split`` (train / val / testA
/ testB, matched exactly), ``sentences`` ([{sent, sent_id, raw, tokens}]), ``ann_id`` and
``category_id`` (lists, one entry per target; a bare int is read as a one-element list) and
``no_target``. A no-target ref carries ``ann_id: [-1]`` (and ``category_id: [-1]``), cleaned to an
empty target list. A ``grefs(unc).p`` pickle (as the GRES API also accepts) is read when the JSON is
absent. Crowd annotations among a ref's targets are skipped, as the GRES loader does.

Each ref becomes one :class:`Reference`:

* ``meta["target_count"]`` = k, the number of (distinct, non-crowd) target annotations;
* ``meta["no_target"]`` = ``k == 0``;
* mask = union (0/1) of the targets' masks (:class:`~lens.data.base.UnionMask`), all zeros when k = 0;
* ``box`` = xyxy box enclosing the targets' COCO boxes, ``None`` when k = 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lens.data.base import Reference, UnionMask, require
from lens.data.files import read_json
from lens.data.refer import (
    IMAGE_DIR,
    _check_images_exist,
    _check_ref,
    _is_id,
    _resolve_image,
    checked_annotation,
    load_instances,
    safe_load_pickle,
)

DATASET = "grefcoco"
SPLITS = ("train", "val", "testA", "testB")
NO_TARGET_ANN_ID = -1


def expected_tree(split_by: str = "unc") -> str:
    """The directory tree this loader expects (for error messages)."""
    return (
        "refer_seg/\n"
        f"  {DATASET}/\n"
        f"    grefs({split_by}).json   (JSON list of refs; ann_id lists, [-1] = no target)\n"
        "    instances.json\n"
        "  images/mscoco/images/train2014/\n"
        "    COCO_train2014_000000000001.jpg  (COCO_train2014_{image_id:012d}.jpg)\n"
    )


def load_grefcoco(
    root: str | Path,
    split: str | None,
    split_by: str = "unc",
    *,
    check_images: bool = True,
) -> list[Reference]:
    """One :class:`Reference` per gRefCOCO ref of ``split`` (``None`` = all), all sentences kept."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown gRefCOCO split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    tree = expected_tree(split_by)
    ds_dir = root / "refer_seg" / DATASET
    refs_json, refs_pickle = ds_dir / f"grefs({split_by}).json", ds_dir / f"grefs({split_by}).p"
    if not refs_json.is_file() and refs_pickle.is_file():
        refs_path, refs = refs_pickle, safe_load_pickle(refs_pickle)
    else:
        refs_path = require(refs_json, root, tree, "gRefCOCO refs file")
        refs, _ = read_json(refs_path, ("utf-8",), "gRefCOCO refs")
    inst_path = require(ds_dir / "instances.json", root, tree, "gRefCOCO instances.json")
    image_dir = require(root / IMAGE_DIR, root, tree, "gRefCOCO image directory")
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of ref objects, got {type(refs).__name__}")
    images, anns, cats = load_instances(inst_path)

    out: list[Reference] = []
    resolved: dict[int, Path] = {}
    for i, ref in enumerate(refs):
        _check_ref(ref, i, refs_path, ann_list=True)
        if split is not None and ref["split"] != split:
            continue
        out.append(_make_reference(ref, i, refs_path, split_by, images, anns, cats, image_dir, resolved, inst_path))
    if check_images:
        _check_images_exist(out, root, tree)
    return out


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def target_ann_ids(ref: dict, where: str) -> list[int]:
    """The ref's target annotation ids: ``[-1]`` -> ``[]``; duplicates dropped (order kept);
    ``no_target`` (when present) must agree."""
    ids = _as_list(ref["ann_id"])
    if ids == [NO_TARGET_ANN_ID]:
        ids = []
    elif NO_TARGET_ANN_ID in ids or not ids:
        raise ValueError(f"{where}: field 'ann_id' {ref['ann_id']!r}: use [-1] alone for a no-target ref")
    ids = list(dict.fromkeys(ids))
    if "no_target" in ref:
        flag = ref["no_target"]
        if not isinstance(flag, bool):
            raise ValueError(f"{where}: field 'no_target' must be true or false, got {flag!r}")
        if flag != (not ids):
            raise ValueError(f"{where}: field 'no_target' is {flag} but field 'ann_id' is {ref['ann_id']!r}")
    return ids


def _make_reference(
    ref: dict,
    index: int,
    refs_path: Path,
    split_by: str,
    images: dict[int, dict],
    anns: dict[int, dict],
    cats: dict[int, str],
    image_dir: Path,
    resolved: dict[int, Path],
    inst_path: Path,
) -> Reference:
    where = f"{refs_path}: ref #{index} (ref_id={ref['ref_id']})"
    image_id = int(ref["image_id"])
    image = images.get(image_id, {})
    h, w = image.get("height"), image.get("width")
    segs, boxes, kept, crowd = [], [], [], 0
    for ann_id in target_ann_ids(ref, where):
        ann = anns.get(ann_id)
        if ann is None:
            raise ValueError(f"{inst_path}: annotation id {ann_id} (ref_id={ref['ref_id']} in {refs_path.name}) not found")
        what = f"{inst_path.name} annotation id {ann_id} (ref_id={ref['ref_id']})"
        if ann.get("image_id", image_id) != image_id:
            raise ValueError(f"{what}: field 'image_id' is {ann.get('image_id')}, the ref's image is {image_id}")
        if ann.get("iscrowd"):
            crowd += 1
            continue
        seg, box, rle_hw = checked_annotation(ann, what, f"{what} field 'segmentation'", h, w)
        if not (h and w) and rle_hw is not None:
            h, w = rle_hw
        segs.append(seg)
        boxes.append(box)
        kept.append(ann_id)
    if crowd and not kept:
        raise ValueError(f"{where}: every target annotation is a crowd annotation; a target ref needs one that is not")
    if image_id not in resolved:
        resolved[image_id] = _resolve_image(image_dir, image_id, ref.get("file_name"), image.get("file_name"))
    box = None
    if boxes:
        box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    cat_ids = [c for c in _as_list(ref.get("category_id", [])) if _is_id(c) and c != NO_TARGET_ANN_ID]
    if not kept:
        cat_ids = []
    meta = {
        "dataset": DATASET,
        "split_by": split_by,
        "split": ref["split"],
        "image_id": image_id,
        "ann_ids": kept,
        "category_ids": cat_ids,
        "categories": [cats.get(c) for c in cat_ids],
        "sent_ids": [s.get("sent_id") for s in ref["sentences"]],
        "no_target": not kept,
        "target_count": len(kept),
        "height": h or None,
        "width": w or None,
    }
    if crowd:
        meta["crowd_targets_skipped"] = crowd
    return Reference(
        ref_id=f"{DATASET}/{ref['ref_id']}",
        image_path=resolved[image_id],
        expressions=[str(s["sent"]) for s in ref["sentences"]],
        box=box,
        source=DATASET,
        meta=meta,
        mask_source=UnionMask(tuple(segs), h or None, w or None, f"{refs_path.name} ref_id={ref['ref_id']}"),
    )
