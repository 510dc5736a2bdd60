"""Loaders on the synthetic data (REFER, ReasonSeg, GroundingSuite, custom, registry) and bad inputs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lens.data import (
    BENCHMARKS,
    EVAL_BENCHMARKS,
    load_benchmark,
    load_custom,
    load_groundingsuite,
    load_reasonseg,
    load_refer,
    write_custom_jsonl,
)
from lens.data.groundingsuite import clean_caption_upstream
from lens.data.masks import polygon_mask
from lens.data.refer import split_matches
from lens.data.synthetic import load_synthetic_meta
from lens.data.transforms import mask_box


@pytest.fixture(scope="module")
def meta(synthetic_root):
    return load_synthetic_meta(synthetic_root)


def _object(meta, ref):
    info = meta["refs"][ref.ref_id]
    scene = meta["scenes"][info["scene"]]
    return scene, scene.objects[info["target"]], info


def _perimeter(poly):
    xy = np.asarray(poly, dtype=float).reshape(-1, 2)
    return float(np.linalg.norm(xy - np.roll(xy, -1, axis=0), axis=1).sum())


def _polygon_area(poly):
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ----------------------------------------------------------------------------- REFER


def test_refer_splits_counts_and_boxes(synthetic_root, meta):
    for ds, splits in (("refcoco", ("train", "val", "testA", "testB")), ("refcocog", ("train", "val", "test"))):
        for split in splits:
            refs = load_refer(synthetic_root, ds, split)
            expected = [k for k, v in meta["refs"].items() if k.startswith(f"{ds}/") and v["split"] == split]
            assert sorted(r.ref_id for r in refs) == sorted(expected) and refs
            for ref in refs:
                scene, obj, info = _object(meta, ref)
                assert ref.expressions == info["texts"] and ref.source == ds
                assert np.allclose(ref.box, obj.bbox, atol=0.02)  # [x, y, w, h] -> xyxy, no +1
                assert ref.image_path.name == f"COCO_train2014_{ref.meta['image_id']:012d}.jpg"  # file_name fallback
    both = load_refer(synthetic_root, "refcoco", "test")
    assert {r.meta["split"] for r in both} == {"testA", "testB"}


def test_refer_masks_match_polygons_and_overlap_sums_to_two(synthetic_root, meta):
    refs = load_refer(synthetic_root, "refcoco", "train") + load_refer(synthetic_root, "refcoco", "val")
    n_overlap, mask_total, poly_total = 0, 0, 0.0
    for ref in refs:
        scene, obj, info = _object(meta, ref)
        mask = ref.load_mask()
        assert mask.dtype == np.uint8 and mask.shape == (scene.height, scene.width)
        fg = mask > 0
        assert np.array_equal(fg, polygon_mask(obj.polygon, scene.height, scene.width) > 0)
        # pixel-centre rasterisation: per-object error bounded by the boundary length
        assert abs(fg.sum() - _polygon_area(obj.polygon)) <= 0.75 * _perimeter(obj.polygon)
        mask_total, poly_total = mask_total + int(fg.sum()), poly_total + _polygon_area(obj.polygon)
        assert np.allclose(mask_box(fg), ref.box, atol=2.0)  # sharp star tips lose up to ~1.5 px
        if info["overlap"]:
            n_overlap += 1
            assert set(np.unique(mask)) == {0, 1, 2}
            assert abs((mask == 2).sum() - (0.5 * obj.r) ** 2) <= 0.25 * (0.5 * obj.r) ** 2 + 4
        else:
            assert mask.max() == 1
    assert 0 < n_overlap < len(refs) / 2  # a few, not the majority
    assert abs(mask_total - poly_total) <= 0.02 * poly_total  # unbiased on aggregate


def test_split_filter_follows_refer():
    assert split_matches("testA", "test") and split_matches("testB", "test") and split_matches("test", "test")
    assert split_matches("testA", "testA") and not split_matches("testB", "testA")
    assert split_matches("testAB", "testA") and not split_matches("val", "testA")
    assert split_matches("val", "val") and not split_matches("train", "val") and split_matches("x", None)


def test_refer_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_refer(tmp_path / "nowhere", "refcocog", "val")
    msg = str(err.value)
    assert "nowhere" in msg and "refs(umd).p" in msg and "instances.json" in msg
    assert "COCO_train2014_" in msg and "expected layout" in msg
    with pytest.raises(ValueError, match="unknown REFER dataset"):
        load_refer(tmp_path, "refclef", "val")


def _copy_refer(src: Path, dst: Path, ds: str = "refcoco") -> Path:
    shutil.copytree(src / "refer_seg" / ds, dst / "refer_seg" / ds)
    (dst / "refer_seg" / "images").symlink_to(src / "refer_seg" / "images", target_is_directory=True)
    return dst


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_refer_rejects_unsafe_pickle(synthetic_root, tmp_path):
    root = _copy_refer(synthetic_root, tmp_path)
    (root / "refer_seg/refcoco/refs(unc).p").write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(ValueError, match=r"unsafe pickle.*posix\.getcwd|unsafe pickle.*getcwd"):
        load_refer(root, "refcoco", "val")


def test_safe_pickle_accepts_plain_data_only(tmp_path):
    from collections import OrderedDict

    from lens.data.refer import safe_load_pickle

    data = [{"ref_id": 1, "s": {1, 2}, "t": (1.5, "é"), "b": b"\x00\xff", "n": None, "ok": True}]
    (tmp_path / "ok.p").write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load_pickle(tmp_path / "ok.p") == data
    (tmp_path / "od.p").write_bytes(pickle.dumps([OrderedDict(a=1)], protocol=2))
    with pytest.raises(ValueError, match=r"od\.p.*collections\.OrderedDict"):
        safe_load_pickle(tmp_path / "od.p")


def test_refer_corrupt_annotation_names_its_id(synthetic_root, tmp_path):
    root = _copy_refer(synthetic_root, tmp_path)
    inst_path = root / "refer_seg/refcoco/instances.json"
    inst = json.loads(inst_path.read_text())
    refs = pickle.loads((root / "refer_seg/refcoco/refs(unc).p").read_bytes())
    victim = next(r for r in refs if r["split"] == "val")["ann_id"]
    next(a for a in inst["annotations"] if a["id"] == victim)["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=f"annotation id {victim}"):
        load_refer(root, "refcoco", "val")


def test_refer_missing_image_is_reported(synthetic_root, tmp_path):
    shutil.copytree(synthetic_root / "refer_seg", tmp_path / "refer_seg")
    victim = next((tmp_path / "refer_seg/images/mscoco/images/train2014").iterdir())
    victim.unlink()
    refs = load_refer(tmp_path, "refcoco", None, check_images=False)
    assert any(r.image_path == victim for r in refs)
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_refer(tmp_path, "refcoco", None)


# ----------------------------------------------------------------------------- ReasonSeg


def _upstream_reasonseg_mask(json_path: Path, h: int, w: int) -> np.ndarray:
    """The original get_mask_from_json, restated here independently of lens.data.masks."""
    import cv2

    anno = json.loads(json_path.read_text())
    kept = [sh for sh in anno["shapes"] if sh["label"].lower() != "flag"]
    areas = []
    for sh in kept:
        tmp = np.zeros((h, w), np.uint8)
        pts = np.array([sh["points"]], dtype=np.int32)
        cv2.polylines(tmp, pts, True, 1, 1)
        cv2.fillPoly(tmp, pts, 1)
        areas.append(tmp.sum())
    mask = np.zeros((h, w), np.uint8)
    for k in np.argsort(areas)[::-1]:
        sh = kept[k]
        value = 255 if "ignore" in sh["label"].lower() else 1
        pts = np.array([sh["points"]], dtype=np.int32)
        cv2.polylines(mask, pts, True, value, 1)
        cv2.fillPoly(mask, pts, value)
    return mask


def test_reasonseg_masks_ignore_flag_and_multipart(synthetic_root, meta):
    seen = {"ignore": 0, "flag": 0, "multipart": 0, "no_size": 0}
    for split in ("train", "val", "test"):
        refs = load_reasonseg(synthetic_root, split)
        assert len(refs) == len([k for k in meta["refs"] if k.startswith(f"reasonseg/{split}/")])
        for ref in refs:
            scene, obj, info = _object(meta, ref)
            assert ref.expressions == info["texts"] and ref.box is None
            assert ref.meta["encoding"] == "utf-8" and ref.meta["flag_shapes"] == int(info["flag"])
            mask = ref.load_mask()
            # exactly the original OpenCV drawing (truncated points, fill + 1 px outline, largest first)
            assert np.array_equal(mask, _upstream_reasonseg_mask(Path(ref.meta["annotation"]), scene.height, scene.width))
            # ... which is the polygon fill up to about a pixel along the border
            target = polygon_mask(obj.polygon, scene.height, scene.width) > 0
            drawn = mask > 0
            assert (target & ~drawn).sum() <= 0.5 * _perimeter(obj.polygon)  # truncation shifts edges < 1 px
            assert (drawn & ~target).sum() <= 2.5 * _perimeter(obj.polygon) + 8
            if info["ignore"]:
                seen["ignore"] += 1
                patch = polygon_mask(_ignore_patch(obj), scene.height, scene.width) > 0
                assert (patch & ~(mask == 255)).sum() == 0  # the smaller ignore patch is painted after the target
                assert (mask == 255).sum() <= patch.sum() + 2 * _perimeter(_ignore_patch(obj)) + 4
            else:
                assert not (mask == 255).any()
            seen["flag"] += info["flag"]
            seen["multipart"] += info["multipart"]
            seen["no_size"] += ref.meta["height"] is None
            box = ref.target_box(mask)
            assert np.allclose(box, mask_box(mask == 1))
    assert all(v > 0 for v in seen.values()), seen


def _ignore_patch(obj):
    cx, cy, h = obj.cx + 0.9 * obj.r, obj.cy, 0.3 * obj.r
    return [round(v, 2) for v in (cx - h, cy - h, cx + h, cy - h, cx + h, cy + h, cx - h, cy + h)]


def test_reasonseg_errors(synthetic_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)reason_seg.*ReasonSeg.*expected layout"):
        load_reasonseg(tmp_path, "val")
    with pytest.raises(ValueError, match="unknown ReasonSeg split"):
        load_reasonseg(synthetic_root, "dev")
    split_dir = tmp_path / "reason_seg/ReasonSeg/val"
    shutil.copytree(synthetic_root / "reason_seg/ReasonSeg/val", split_dir)
    victim = sorted(split_dir.glob("*.json"))[0]
    data = json.loads(victim.read_text())
    data["shapes"][0]["points"] = data["shapes"][0]["points"][:2]  # two points: drawn as a line, as upstream
    victim.write_text(json.dumps(data))
    assert load_reasonseg(tmp_path, "val")[0].load_mask().sum() > 0
    data["shapes"][0]["points"][1] = [3.0, "x"]
    victim.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{victim.name}: shapes\[0\] .* field 'points': point 1 must be an \[x, y\] pair"):
        load_reasonseg(tmp_path, "val")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_reasonseg(tmp_path, "val")


# ----------------------------------------------------------------------------- GroundingSuite


def test_groundingsuite_caption_cleanup_and_masks(synthetic_root, meta):
    jsonl = synthetic_root / "GroundingSuite-Eval.jsonl"
    refs = load_groundingsuite(jsonl)
    raw = load_groundingsuite(jsonl, upstream_caption_cleanup=False)
    assert len(refs) == len(raw) == len([k for k in meta["refs"] if k.startswith("groundingsuite/")])
    assert clean_caption_upstream("The red square is on this list") == "the red squ  on th lt"
    n_overlap = 0
    for ref, ref_raw in zip(refs, raw):
        scene, obj, info = _object(meta, ref)
        assert ref_raw.expressions == info["texts"] == [ref.meta["caption"]]
        assert ref.expressions == [clean_caption_upstream(ref.meta["caption"])]
        assert ref.image_path.parent.name == "unlabeled2017" and np.allclose(ref.box, obj.bbox)
        mask = ref.load_mask()
        assert np.array_equal(mask > 0, polygon_mask(obj.polygon, scene.height, scene.width) > 0)
        n_overlap += int(mask.max() == 2)
        assert mask.max() == (2 if info["overlap"] else 1)
    assert n_overlap > 0


def test_groundingsuite_bad_line_names_line(synthetic_root, tmp_path):
    lines = (synthetic_root / "GroundingSuite-Eval.jsonl").read_text().splitlines()
    item = json.loads(lines[1])
    item["box"] = [1, 2, 3]
    lines[1] = json.dumps(item)
    bad = tmp_path / "GroundingSuite-Eval.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"GroundingSuite-Eval\.jsonl:2: field 'box'"):
        load_groundingsuite(bad, synthetic_root / "coco/unlabeled2017")
    with pytest.raises(FileNotFoundError, match="unlabeled2017"):
        load_groundingsuite(bad)


# ----------------------------------------------------------------------------- custom


def test_custom_loads_masks_boxes_and_swaps(synthetic_root, meta):
    refs = load_custom(synthetic_root / "custom" / "val.jsonl")
    assert refs and all(r.source == "custom" for r in refs)
    kinds = set()
    for ref in refs:
        scene, obj, info = _object(meta, ref)
        mask = ref.load_mask()
        assert mask.max() == 1 and np.array_equal(mask, polygon_mask(obj.polygon, scene.height, scene.width))
        kinds.add(ref.box is None)
        assert np.allclose(ref.target_box(mask), obj.bbox, atol=2.0)
        assert ref.meta["swap_expressions"] == info["swap_expressions"] and ref.expressions == info["texts"]
    assert kinds == {True, False}  # some boxes given, some derived from the mask


def _write_lines(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_custom_errors_name_line_and_field(synthetic_root, tmp_path):
    good = json.loads((synthetic_root / "custom/val.jsonl").read_text().splitlines()[0])
    good["image"] = str(synthetic_root / "custom" / good["image"])
    cases = [
        ({**good, "expressions": []}, r":2: field 'expressions' must be a non-empty list"),
        ({k: v for k, v in good.items() if k != "expressions"}, r":2: field 'expressions' is missing"),
        ({**good, "box": [5, 5, 1, 1]}, r":2: field 'box' must be \[x1, y1, x2, y2\]"),
        ({**good, "polygons": [[1, 2, 3, 4, 5, 6]], "mask": {"size": [2, 2], "counts": "x"}}, r":2: exactly one of field 'mask'"),
        ({**good, "expression": ["x"]}, r":2: unknown field\(s\) \['expression'\]"),
        ({**good, "image": "missing.jpg", "id": "other"}, r":2: field 'image': file not found: .*missing\.jpg"),
        ("{not json", r":2: invalid JSON"),
    ]
    for record, pattern in cases:
        path = _write_lines(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            load_custom(path)
    path = _write_lines(tmp_path / "dup.jsonl", [good, good])
    with pytest.raises(ValueError, match=r":2: field 'id' .* already used on line 1"):
        load_custom(path)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_custom(tmp_path / "absent.jsonl")


def test_write_custom_jsonl_round_trip(tmp_path):
    img = tmp_path / "img.jpg"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(img)
    records = [{"image": "../img.jpg", "expressions": ["the thing"], "polygons": [[2, 2, 20, 2, 20, 12, 2, 12]]},
               {"image": str(img), "expressions": ["b"], "mask": {"size": [30, 40], "counts": [0, 1200]}, "id": 9}]
    path = write_custom_jsonl(tmp_path / "out" / "x.jsonl", records)
    refs = load_custom(path)
    assert [r.ref_id for r in refs] == ["x:1", "9"]
    assert refs[0].image_path == tmp_path / "out" / "../img.jpg" and refs[1].image_path == img
    assert refs[0].load_mask().sum() == 18 * 10 and refs[1].load_mask().sum() == 30 * 40  # counts [0, 1200]: all ones
    with pytest.raises(ValueError, match="record 1: field 'expressions'"):
        write_custom_jsonl(tmp_path / "y.jsonl", [{"image": "a.jpg", "expressions": "no", "polygons": []}])


def test_custom_relative_image_and_polygon_size_from_header(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "a.png")
    path = write_custom_jsonl(tmp_path / "d.jsonl", [
        {"image": "imgs/a.png", "expressions": ["x"], "polygons": [[2, 2, 20, 2, 20, 12, 2, 12], [10, 5, 30, 5, 30, 25]]}])
    (ref,) = load_custom(path)
    mask = ref.load_mask()
    assert ref.image_path == tmp_path / "imgs" / "a.png" and mask.shape == (30, 40) and mask.max() == 1
    assert ref.target_box(mask) == mask_box(mask) and np.allclose(ref.target_box(mask), (2, 2, 30, 25), atol=1)


def test_large_circle_area_within_two_percent(tmp_path):
    from PIL import Image

    from lens.data.synthetic import shape_polygon

    Image.new("RGB", (120, 100)).save(tmp_path / "c.jpg")
    poly = shape_polygon("circle", 60.3, 49.7, 40.0)
    (ref,) = load_custom(write_custom_jsonl(tmp_path / "c.jsonl", [{"image": "c.jpg", "expressions": ["c"], "polygons": [poly]}]))
    area = ref.load_mask().sum()
    assert abs(area - _polygon_area(poly)) <= 0.02 * _polygon_area(poly)
    assert abs(area - np.pi * 40**2) <= 0.02 * np.pi * 40**2


# ----------------------------------------------------------------------------- registry


def test_registry_loads_every_eval_benchmark(synthetic_root):
    assert set(EVAL_BENCHMARKS) <= set(BENCHMARKS)
    sizes = {name: len(load_benchmark(name, synthetic_root)) for name in EVAL_BENCHMARKS}
    assert all(n > 0 for n in sizes.values()), sizes
    custom = load_benchmark("custom:custom/test.jsonl", synthetic_root)
    assert custom and custom[0].source == "custom"
    with pytest.raises(KeyError, match="unknown benchmark"):
        load_benchmark("refcoco_dev", synthetic_root)
