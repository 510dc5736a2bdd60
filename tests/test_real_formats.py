"""Loaders on small files written by hand in the real on-disk formats (not by lens.data.synthetic).

Each format gets its real variants (encodings, byte-order marks, CRLF lines, RLE counts as strings /
bytes / uncompressed lists, degenerate polygon parts, images under another extension or case) and
broken variants whose error message must name the file, the line (JSONL) and the field.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens.data import (
    load_benchmark,
    load_custom,
    load_grefcoco,
    load_groundingsuite,
    load_reasonseg,
    load_refer,
)
from lens.data.masks import decode_segmentation, rasterise_labelme, rle_string_counts
from lens.data.refer import safe_load_pickle


def _image(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (w, h), (90, 120, 150)).save(path, format=fmt)
    return path


# ============================================================================ ReasonSeg (LabelMe JSON)

# A LabelMe file as saved by a Windows tool: cp1252, with 0x92 (right single quote) in the text.
# Shapes (12 x 10 image): a target rectangle, a smaller "ignore" patch over its right part, a big
# "flag" rectangle that must be skipped, and a thin sliver (fill area ~0) that the 1-px outline draws.
REASONSEG_CP1252 = (
    '{\r\n  "version": "4.5.6",\r\n  "flags": {},\r\n  "shapes": [\r\n'
    '    {"label": "target", "points": [[1, 1], [6, 1], [6, 5], [1, 5]], "group_id": null, "shape_type": "polygon", "flags": {}},\r\n'  # noqa: E501 (one labelme shape per line, as the file is written)
    '    {"label": "ignore_region", "points": [[5.7, 2.2], [8.9, 2.2], [8.9, 4.8], [5.7, 4.8]], "group_id": null, "shape_type": "polygon", "flags": {}},\r\n'  # noqa: E501 (one labelme shape per line, as the file is written)
    '    {"label": "flag", "points": [[0, 0], [11, 0], [11, 9], [0, 9]], "group_id": null, "shape_type": "polygon", "flags": {}},\r\n'  # noqa: E501 (one labelme shape per line, as the file is written)
    '    {"label": "target", "points": [[2.9, 7.0], [9.99, 7.0], [9.5, 7.6]], "group_id": null, "shape_type": "polygon", "flags": {}}\r\n'  # noqa: E501 (one labelme shape per line, as the file is written)
    '  ],\r\n'
    '  "imagePath": "dog.jpg",\r\n  "imageData": null,\r\n  "imageHeight": 10,\r\n  "imageWidth": 12,\r\n'
    '  "text": ["What holds the dog\u2019s water?", "the dog\u2019s bowl"],\r\n  "is_sentence": true\r\n}\r\n'
).encode("cp1252")
assert REASONSEG_CP1252.count(b"\x92") == 2  # U+2019 is byte 0x92 in cp1252 (and invalid as UTF-8)

# Written out by hand: target 1 on rows 1-5 x cols 1-6 (fill + outline of the integer rectangle);
# the ignore patch truncates to (5,2)-(8,4) -> 255 on rows 2-4 x cols 5-8, drawn after the larger
# target; the flag rectangle is not drawn; the sliver truncates to (2,7),(9,7),(9,7) -> row 7, cols 2-9.
REASONSEG_EXPECTED = np.array([
    # 0  1  2  3  4    5    6    7    8  9 10 11
    [0, 0, 0, 0, 0,   0,   0,   0,   0, 0, 0, 0],  # 0
    [0, 1, 1, 1, 1,   1,   1,   0,   0, 0, 0, 0],  # 1
    [0, 1, 1, 1, 1, 255, 255, 255, 255, 0, 0, 0],  # 2
    [0, 1, 1, 1, 1, 255, 255, 255, 255, 0, 0, 0],  # 3
    [0, 1, 1, 1, 1, 255, 255, 255, 255, 0, 0, 0],  # 4
    [0, 1, 1, 1, 1,   1,   1,   0,   0, 0, 0, 0],  # 5
    [0, 0, 0, 0, 0,   0,   0,   0,   0, 0, 0, 0],  # 6
    [0, 0, 1, 1, 1,   1,   1,   1,   1, 1, 0, 0],  # 7
    [0, 0, 0, 0, 0,   0,   0,   0,   0, 0, 0, 0],  # 8
    [0, 0, 0, 0, 0,   0,   0,   0,   0, 0, 0, 0],  # 9
], dtype=np.uint8)

# UTF-8 with a byte-order mark; the small target is listed FIRST, inside a larger ignore region:
# largest-first drawing puts the target on top (file order would hide it).
REASONSEG_BOM = "\ufeff" + json.dumps({
    "shapes": [{"label": "Target", "points": [[3, 2], [4, 2], [4, 3], [3, 3]]},
               {"label": "IGNORE", "points": [[1, 1], [6, 1], [6, 4], [1, 4]]}],
    "text": "the café sign", "is_sentence": False, "imageHeight": 6, "imageWidth": 8,
}, ensure_ascii=False)


@pytest.fixture()
def reasonseg_root(tmp_path: Path) -> Path:
    split = tmp_path / "reason_seg/ReasonSeg/val"
    split.mkdir(parents=True)
    (split / "dog.json").write_bytes(REASONSEG_CP1252)
    _image(split / "dog.JPG", 12, 10)  # stored upper-case
    (split / "sign.json").write_bytes(REASONSEG_BOM.encode("utf-8"))
    _image(split / "sign.png", 8, 6)  # stored as PNG
    return tmp_path


def test_reasonseg_cp1252_ignore_flag_thin_polygon(reasonseg_root):
    dog, sign = load_reasonseg(reasonseg_root, "val")
    assert dog.image_path.name == "dog.JPG" and sign.image_path.name == "sign.png"
    assert dog.meta["encoding"] == "cp1252" and dog.meta["flag_shapes"] == 1
    assert dog.expressions == ["What holds the dog\u2019s water?", "the dog\u2019s bowl"]  # 0x92 -> U+2019
    assert dog.meta["is_sentence"] is True
    np.testing.assert_array_equal(dog.load_mask(), REASONSEG_EXPECTED)
    assert dog.target_box() == (1.0, 1.0, 10.0, 8.0)  # tight box of mask == 1 (x2, y2 exclusive)
    # the sliver has (almost) no area as a filled polygon: only the outline draws it
    sliver = decode_segmentation([[2.9, 7.0, 9.99, 7.0, 9.5, 7.6]], 10, 12, combine="union")
    assert sliver.sum() < 8 == (REASONSEG_EXPECTED[7] == 1).sum()

    assert sign.meta["encoding"] == "utf-8-sig" and sign.expressions == ["the café sign"]
    mask = sign.load_mask()
    expected = np.zeros((6, 8), np.uint8)
    expected[1:5, 1:7] = 255  # IGNORE (any case) -> 255, drawn first: larger
    expected[2:4, 3:5] = 1  # Target drawn last, on top
    np.testing.assert_array_equal(mask, expected)


def test_reasonseg_mask_has_the_image_size_not_the_json_size(reasonseg_root):
    dog = reasonseg_root / "reason_seg/ReasonSeg/val/dog.json"
    dog.write_bytes(REASONSEG_CP1252.replace(b'"imageHeight": 10', b'"imageHeight": 20'))
    ref = load_reasonseg(reasonseg_root, "val")[0]
    assert ref.meta["height"] == 20  # as written in the file
    np.testing.assert_array_equal(ref.load_mask(), REASONSEG_EXPECTED)  # drawn on the 12 x 10 image, as upstream


def test_reasonseg_rasteriser_is_the_one_training_uses(reasonseg_root):
    from lens.data.dataset import GroundingDataset

    ref = load_reasonseg(reasonseg_root, "val")[0]
    item = GroundingDataset([ref], sam_size=32, llm_longest_side=640)[0]
    np.testing.assert_array_equal(item["mask"], REASONSEG_EXPECTED)  # training targets take mask == 1 of this
    shapes = [(label, [list(p) for p in pts]) for label, pts in ref.mask_source.shapes]
    np.testing.assert_array_equal(rasterise_labelme(shapes, 10, 12), REASONSEG_EXPECTED)


def test_reasonseg_broken_files_name_file_and_field(reasonseg_root):
    split = reasonseg_root / "reason_seg/ReasonSeg/val"
    dog = split / "dog.json"
    dog.write_bytes(REASONSEG_CP1252.replace(b"\x92", b"\x81"))  # 0x81: invalid UTF-8, undefined in cp1252
    with pytest.raises(ValueError, match=r"dog\.json: cannot decode as utf-8 or cp1252 .*byte 0x81"):
        load_reasonseg(reasonseg_root, "val")
    dog.write_bytes(REASONSEG_CP1252.replace(b'"text"', b'"text" ='))
    with pytest.raises(ValueError, match=r"dog\.json: invalid JSON .* line 14 column 10"):
        load_reasonseg(reasonseg_root, "val")
    dog.write_bytes(REASONSEG_CP1252.replace(b"[[1, 1], [6, 1]", b"[[1, 1, 2], [6, 1]"))
    with pytest.raises(ValueError, match=r"dog\.json: shapes\[0\] \('target'\) field 'points': point 0 must be an \[x, y\] pair"):
        load_reasonseg(reasonseg_root, "val")
    dog.write_bytes(REASONSEG_CP1252.replace(b'"points": [[2.9, 7.0], [9.99, 7.0], [9.5, 7.6]]', b'"points": []'))
    with pytest.raises(ValueError,
                       match=r"dog\.json: shapes\[3\] \('target'\) field 'points': 'points' must be a non-empty list"):
        load_reasonseg(reasonseg_root, "val")
    dog.write_bytes(REASONSEG_CP1252.replace(b'"text": [', b'"text": [], "x": ['))
    with pytest.raises(ValueError, match=r"dog\.json: field 'text' must be a non-empty"):
        load_reasonseg(reasonseg_root, "val")
    dog.write_bytes(REASONSEG_CP1252)
    _image(split / "sign.jpg", 8, 6)  # now two images share the stem "sign"
    with pytest.raises(ValueError, match=r"two images for one ReasonSeg annotation: .*sign\."):
        load_reasonseg(reasonseg_root, "val")
    (split / "sign.jpg").unlink()
    (split / "sign.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sign\.json has no image"):
        load_reasonseg(reasonseg_root, "val")


# ============================================================================ REFER (Python 2 pickle)


def py2_pickle(obj) -> bytes:
    """Serialise like Python 2's cPickle.dump(obj, f, 2): ``bytes`` are Python 2 ``str`` (SHORT_BINSTRING /
    BINSTRING, raw bytes), ``str`` is Python 2 ``unicode`` (BINUNICODE), containers memoised with BINPUT."""
    out = bytearray(b"\x80\x02")
    memo = [0]

    def put():
        out.extend(b"q" + bytes([memo[0]]) if memo[0] < 256 else b"r" + struct.pack("<I", memo[0]))
        memo[0] += 1

    def w(o):
        if isinstance(o, bytes):
            out.extend((b"U" + bytes([len(o)])) if len(o) < 256 else (b"T" + struct.pack("<i", len(o))))
            out.extend(o)
            put()
        elif isinstance(o, str):
            raw = o.encode("utf-8")
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
            put()
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else (b"M" + struct.pack("<H", o) if 0 <= o < 65536
                                                                else b"J" + struct.pack("<i", o)))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, list):
            out.extend(b"]")
            put()
            if o:
                out.extend(b"(")
                for v in o:
                    w(v)
                out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}")
            put()
            if o:
                out.extend(b"(")
                for k, v in o.items():
                    w(k)
                    w(v)
                out.extend(b"u")
        else:
            raise TypeError(type(o))

    w(obj)
    out.extend(b".")
    return bytes(out)


def _py2_ref(ref_id, ann_id, image_id, split, sents, cat=1):
    return {b"image_id": image_id, b"split": split, b"sentences": [
        {b"tokens": s.split(b" ") if isinstance(s, bytes) else s.split(" "), b"raw": s, b"sent_id": 10 * ref_id + k, b"sent": s}
        for k, s in enumerate(sents)],
        b"file_name": b"COCO_train2014_%012d_%d.jpg" % (image_id, ann_id), b"category_id": cat,
        b"ann_id": ann_id, b"sent_ids": [10 * ref_id + k for k in range(len(sents))], b"ref_id": ref_id}


REFER_REFS = [
    _py2_ref(0, 420, 42, b"testA", [b"the caf\xe9 table", b"na\xc3\xafve left one"]),  # latin-1 bytes, UTF-8 bytes
    _py2_ref(1, 71, 7, b"testB", ["right \u2019quoted\u2019 thing"]),  # a Python 2 unicode sentence
    _py2_ref(2, 72, 7, b"val", [b"the other one"]),
]

# instances.json with a UTF-8 byte-order mark and CRLF lines; image 42 (12 x 10) holds a polygon plus a
# degenerate 2-point part (COCO has some); image 7 (4 x 3) an uncompressed RLE and a compressed string
# RLE, both encoding runs [1, 2, 3, 6] (column-major).
REFER_INSTANCES = "\ufeff" + json.dumps({
    "info": {"description": "hand-written"},
    "images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 10, "width": 12},
               {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 3, "width": 4}],
    "annotations": [
        {"id": 420, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 35.0, "bbox": [1.0, 1.0, 7.0, 5.0],
         "segmentation": [[1.0, 1.0, 8.0, 1.0, 8.0, 6.0, 1.0, 6.0], [3.0, 3.0, 4.0, 4.0]]},
        {"id": 71, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 8, "bbox": [0, 1, 4, 2],
         "segmentation": {"size": [3, 4], "counts": [1, 2, 3, 6]}},
        {"id": 72, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 8, "bbox": [0, 1, 4, 2],
         "segmentation": [{"size": [3, 4], "counts": "1234"}]},
    ],
    "categories": [{"id": 1, "name": "thing", "supercategory": "stuff"}],
}, indent=1).replace("\n", "\r\n")

RLE_1234 = np.array([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1]], dtype=np.uint8)  # runs 1, 2, 3, 6 down the columns


@pytest.fixture()
def refer_root(tmp_path: Path) -> Path:
    ds = tmp_path / "refer_seg/refcoco"
    ds.mkdir(parents=True)
    (ds / "refs(unc).p").write_bytes(py2_pickle(REFER_REFS))
    (ds / "instances.json").write_bytes(REFER_INSTANCES.encode("utf-8"))
    images = tmp_path / "refer_seg/images/mscoco/images/train2014"
    _image(images / "COCO_train2014_000000000042.JPG", 12, 10)  # upper-case extension
    _image(images / "COCO_train2014_000000000007.png", 4, 3)  # stored as PNG
    return tmp_path


def test_py2_pickle_writer_is_a_valid_pickle():
    import pickle

    assert pickle.loads(py2_pickle(REFER_REFS), encoding="latin1")[0]["sentences"][0]["sent"] == "the caf\xe9 table"


def test_refer_py2_pickle_latin1_bom_instances_rle_variants(refer_root):
    refs = safe_load_pickle(refer_root / "refer_seg/refcoco/refs(unc).p")
    assert refs[0]["split"] == "testA" and refs[0]["sentences"][0]["tokens"] == ["the", "caf\xe9", "table"]
    test = load_refer(refer_root, "refcoco", "test")
    assert [r.ref_id for r in test] == ["refcoco/0", "refcoco/1"]
    a, b = test
    assert a.expressions == ["the caf\u00e9 table", "na\u00efve left one"]  # latin-1 and UTF-8 byte strings
    assert b.expressions == ["right \u2019quoted\u2019 thing"]
    assert not any("\ufffd" in e for r in test for e in r.expressions)
    assert a.image_path.name == "COCO_train2014_000000000042.JPG" and b.image_path.suffix == ".png"
    assert a.box == (1.0, 1.0, 8.0, 6.0) and a.meta["category"] == "thing"
    expected = np.zeros((10, 12), np.uint8)
    expected[1:6, 1:8] = 1  # pycocotools fill of (1,1)-(8,6); the 2-point part is dropped, not read as a box
    np.testing.assert_array_equal(a.load_mask(), expected)
    np.testing.assert_array_equal(b.load_mask(), RLE_1234)  # uncompressed counts
    (val,) = load_refer(refer_root, "refcoco", "val")
    np.testing.assert_array_equal(val.load_mask(), RLE_1234)  # compressed str counts (a list of RLE parts)
    assert rle_string_counts(b"1234") == [1, 2, 3, 6]
    np.testing.assert_array_equal(decode_segmentation({"size": [3, 4], "counts": b"1234"}, 3, 4), RLE_1234)  # bytes


def test_refer_protocol0_py2_pickle(tmp_path):
    # cPickle's default protocol 0 (text opcodes), Python 2 str holding latin-1 bytes
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"(lp0\n(dp1\nS'sent'\np2\nS'caf\\xe9'\np3\nsS'ref_id'\np4\nI7\nsa.")
    assert safe_load_pickle(path) == [{"sent": "caf\u00e9", "ref_id": 7}]


def _rewrite_instances(root: Path, edit) -> Path:
    path = root / "refer_seg/refcoco/instances.json"
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_refer_broken_variants_name_file_and_field(refer_root):
    def bad_string(d):
        d["annotations"][2]["segmentation"][0]["counts"] = "b'1234'"  # str(bytes) written by mistake

    _rewrite_instances(refer_root, bad_string)
    with pytest.raises(ValueError,
                       match=r"instances\.json annotation id 72 \(ref_id=2\).*RLE 'counts' string holds \"'\" at position 1"):
        load_refer(refer_root, "refcoco", "val")

    def short_runs(d):
        d["annotations"][2]["segmentation"][0]["counts"] = "1233"

    _rewrite_instances(refer_root, short_runs)
    (val,) = load_refer(refer_root, "refcoco", "val")  # the run total is checked when the mask is decoded
    with pytest.raises(ValueError, match=r"annotation id 72 \(ref_id=2\).*cover 11 pixels, expected h\*w=12"):
        val.load_mask()

    def only_degenerate(d):
        d["annotations"][0]["segmentation"] = [[3.0, 3.0, 4.0, 4.0]]

    _rewrite_instances(refer_root, only_degenerate)
    with pytest.raises(ValueError, match=r"annotation id 420 \(ref_id=0\): no polygon part has >= 3 points"):
        load_refer(refer_root, "refcoco", "testA")

    def odd(d):
        d["annotations"][0]["segmentation"] = [[1.0, 1.0, 8.0, 1.0, 8.0]]

    _rewrite_instances(refer_root, odd)
    with pytest.raises(ValueError, match=r"annotation id 420 .*polygon part 0 needs an even number"):
        load_refer(refer_root, "refcoco", "testA")

    path = refer_root / "refer_seg/refcoco/instances.json"
    path.write_text('{"images": [],\n "annotations": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"instances\.json: invalid JSON in COCO instances\.json: .* line 3 column"):
        load_refer(refer_root, "refcoco", "val")
    path.write_text('{"images": [], "annotations": [{"id": "x"}], "categories": []}')
    with pytest.raises(ValueError, match=r"instances\.json: annotations\[0\] field 'id' must be an integer id"):
        load_refer(refer_root, "refcoco", "val")
    path.write_bytes(REFER_INSTANCES.encode("utf-8"))
    (refer_root / "refer_seg/refcoco/refs(unc).p").write_bytes(py2_pickle([{b"ref_id": 5, b"ann_id": b"x", b"image_id": 1,
                                                                         b"split": b"val", b"sentences": [{b"sent": b"a"}]}]))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref #0 \(ref_id=5\): field 'ann_id' must be an integer id"):
        load_refer(refer_root, "refcoco", "val")


# ============================================================================ GroundingSuite JSONL


def _gs_line(image: str, seg, caption: str, **extra) -> str:
    return json.dumps({"image_path": image, "box": [0, 1, 4, 3], "segmentation": seg, "caption": caption, **extra},
                      ensure_ascii=False)


@pytest.fixture()
def gs_root(tmp_path: Path) -> Path:
    lines = [
        _gs_line("000000000001.jpg", {"size": [3, 4], "counts": [1, 2, 3, 6]}, "The bowl is blue.", id=11),  # RLE list
        _gs_line("000000000002.jpg", {"size": [3, 4], "counts": "1234"}, "Two mugs are here.", id=12),  # str counts
    ]
    # a UTF-8 BOM and CRLF line ends (a file saved on Windows), plus a trailing blank line
    (tmp_path / "GroundingSuite-Eval.jsonl").write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
    _image(tmp_path / "coco/unlabeled2017/000000000001.JPG", 4, 3)  # case variant
    _image(tmp_path / "coco/unlabeled2017/000000000002.png", 4, 3)  # extension variant
    return tmp_path


def test_groundingsuite_bom_crlf_rle_list_and_string(gs_root):
    a, b = load_groundingsuite(gs_root / "GroundingSuite-Eval.jsonl")
    assert [r.ref_id for r in (a, b)] == ["groundingsuite/11", "groundingsuite/12"]
    assert a.meta["caption"] == "The bowl is blue." and a.meta["line"] == 1 and b.meta["line"] == 2
    assert a.image_path.name == "000000000001.JPG" and b.image_path.name == "000000000002.png"
    np.testing.assert_array_equal(a.load_mask(), RLE_1234)
    np.testing.assert_array_equal(b.load_mask(), RLE_1234)
    assert load_benchmark("groundingsuite", gs_root)[1].box == (0.0, 1.0, 4.0, 3.0)


def test_groundingsuite_broken_lines_name_file_line_field(gs_root):
    path = gs_root / "GroundingSuite-Eval.jsonl"
    good = path.read_bytes()
    lines = good.split(b"\r\n")
    path.write_bytes(b"\r\n".join([lines[0], lines[1].replace(b'"1234"', b'"12 4"')]))
    with pytest.raises(ValueError,
                       match=r"GroundingSuite-Eval\.jsonl:2 field 'segmentation' \(id=12\): RLE 'counts' string holds ' '"):
        load_groundingsuite(path)
    path.write_bytes(b"\r\n".join([lines[0], lines[1].replace(b'"1234"', b'"1235"')]))
    (_, b) = load_groundingsuite(path)
    with pytest.raises(ValueError, match=r"GroundingSuite-Eval\.jsonl:2 field 'segmentation': .*cover 13 pixels"):
        b.load_mask()
    path.write_bytes(b"\r\n".join([lines[0], lines[1].replace(b"[3, 4], \"counts\": \"1234\"", b"[3, 4], \"counts\": [1, 2]")]))
    with pytest.raises(ValueError, match=r"jsonl:2 field 'segmentation' \(id=12\): uncompressed RLE counts sum to 3"):
        load_groundingsuite(path)
    path.write_bytes(b"\r\n".join([lines[0], lines[1], b'{"image_path": "x.jpg", "caption": "caf\xe9"}']))
    with pytest.raises(ValueError, match=r"GroundingSuite-Eval\.jsonl:3: cannot decode line as utf-8 .*byte 0xe9"):
        load_groundingsuite(path)
    path.write_bytes(b"\r\n".join([lines[0], b'{"image_path": "x.jpg",,}']))
    with pytest.raises(ValueError, match=r"GroundingSuite-Eval\.jsonl:2: invalid JSON"):
        load_groundingsuite(path)
    path.write_bytes(b"\r\n".join([lines[0], lines[1].replace(b'"caption": "Two mugs are here."', b'"caption": 3')]))
    with pytest.raises(ValueError, match=r"GroundingSuite-Eval\.jsonl:2: field 'caption' must be a str"):
        load_groundingsuite(path)


# ============================================================================ custom JSONL


def test_custom_jsonl_bom_crlf_utf16_and_case_variants(tmp_path):
    _image(tmp_path / "imgs/A.JPG", 12, 10)
    records = [
        {"image": "imgs/a.jpg", "expressions": ["the mug’s handle"],
         "polygons": [[1, 1, 8, 1, 8, 6, 1, 6], [2, 2, 3, 3]]},  # a degenerate second part is dropped
        {"image": "imgs/A.JPG", "expressions": ["all of it"], "mask": {"size": [10, 12], "counts": [0, 120]}},
    ]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    expected = np.zeros((10, 12), np.uint8)
    expected[1:6, 1:8] = 1
    for name, data in (("bom.jsonl", ("\ufeff" + text).encode("utf-8")), ("utf16.jsonl", text.encode("utf-16"))):
        path = tmp_path / name
        path.write_bytes(data)
        first, second = load_custom(path)
        assert first.expressions == ["the mug\u2019s handle"] and first.image_path.name == "A.JPG"
        np.testing.assert_array_equal(first.load_mask(), expected)
        assert second.load_mask().sum() == 120 and second.meta["line"] == 2


def test_custom_broken_lines_name_file_line_field(tmp_path):
    _image(tmp_path / "a.jpg", 12, 10)
    good = json.dumps({"image": "a.jpg", "expressions": ["x"], "polygons": [[1, 1, 8, 1, 8, 6]]})
    cases = [
        (json.dumps({"image": "a.jpg", "expressions": ["x"], "polygons": [[1, 1, 8, 1]]}),
         r"bad\.jsonl:2: field 'polygons': no polygon part has >= 3 points"),
        (json.dumps({"image": "a.jpg", "expressions": ["x"], "mask": {"size": [10, 12], "counts": "3 y"}}),
         r"bad\.jsonl:2: field 'mask': RLE 'counts' string holds ' ' at position 1"),
        (json.dumps({"image": "a.jpg", "expressions": ["x"], "mask": {"size": [10, 12], "counts": [5, 5]}}),
         r"bad\.jsonl:2: field 'mask': uncompressed RLE counts sum to 10, expected h\*w=120"),
    ]
    for line, pattern in cases:
        path = tmp_path / "bad.jsonl"
        path.write_bytes(("\ufeff" + good + "\r\n" + line + "\r\n").encode("utf-8"))
        with pytest.raises(ValueError, match=pattern):
            load_custom(path)
    _image(tmp_path / "a.png", 12, 10)
    path.write_bytes(json.dumps({"image": "a.jpeg", "expressions": ["x"], "polygons": [[1, 1, 8, 1, 8, 6]]}).encode())
    with pytest.raises(FileNotFoundError, match=r"bad\.jsonl:1: field 'image': .*several candidates .*a\.jpg, a\.png"):
        load_custom(path)


# ============================================================================ gRefCOCO (GRES layout)

# grefs(unc).json as the GRES release writes it: ann_id / category_id lists, [-1] for no target.
GREFS = """[
 {"ref_id": 100, "image_id": 5, "split": "val", "ann_id": [51, 52], "category_id": [1, 2], "no_target": false,
  "sentences": [{"tokens": ["both", "boxes"], "raw": "both boxes", "sent_id": 1000, "sent": "both boxes"},
                {"tokens": ["the", "two", "things"], "raw": "The two things", "sent_id": 1001, "sent": "the two things"}]},
 {"ref_id": 101, "image_id": 5, "split": "val", "ann_id": [-1], "category_id": [-1], "no_target": true,
  "sentences": [{"tokens": ["the", "green", "dog"], "raw": "the green dog", "sent_id": 1002, "sent": "the green dog"}]},
 {"ref_id": 102, "image_id": 5, "split": "testA", "ann_id": [52], "category_id": [2], "no_target": false,
  "sentences": [{"tokens": ["right", "box"], "raw": "right box", "sent_id": 1003, "sent": "right box"}]},
 {"ref_id": 103, "image_id": 5, "split": "train", "ann_id": 51, "category_id": 1, "no_target": false,
  "sentences": [{"tokens": ["left"], "raw": "left", "sent_id": 1004, "sent": "left"}]}
]"""

GREF_INSTANCES = {
    "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 8, "width": 10}],
    "annotations": [
        {"id": 51, "image_id": 5, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 3, 3],
         "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]},
        {"id": 52, "image_id": 5, "category_id": 2, "iscrowd": 0, "bbox": [5, 2, 4, 4],
         "segmentation": [[5, 2, 9, 2, 9, 6, 5, 6]]},
    ],
    "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "crate"}],
}


@pytest.fixture()
def gref_root(tmp_path: Path) -> Path:
    ds = tmp_path / "refer_seg/grefcoco"
    ds.mkdir(parents=True)
    (ds / "grefs(unc).json").write_text(GREFS)
    (ds / "instances.json").write_text(json.dumps(GREF_INSTANCES))
    _image(tmp_path / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000005.jpg", 10, 8)
    return tmp_path


def test_grefcoco_multi_no_and_single_target(gref_root):
    multi, none = load_grefcoco(gref_root, "val")
    (single,) = load_benchmark("grefcoco_testA", gref_root)
    left = np.zeros((8, 10), np.uint8)
    left[1:4, 1:4] = 1  # annotation 51: rows 1-3, cols 1-3
    right = np.zeros((8, 10), np.uint8)
    right[2:6, 5:9] = 1  # annotation 52: rows 2-5, cols 5-8

    assert multi.ref_id == "grefcoco/100" and multi.expressions == ["both boxes", "the two things"]
    assert multi.meta["target_count"] == 2 and multi.meta["no_target"] is False
    assert multi.meta["ann_ids"] == [51, 52] and multi.meta["categories"] == ["box", "crate"]
    np.testing.assert_array_equal(multi.load_mask(), left | right)  # union, values 0/1
    assert multi.box == (1.0, 1.0, 9.0, 6.0)  # encloses both COCO boxes

    assert none.meta["no_target"] is True and none.meta["target_count"] == 0 and none.meta["ann_ids"] == []
    assert none.box is None and none.target_box() is None
    mask = none.load_mask()
    assert mask.shape == (8, 10) and mask.dtype == np.uint8 and not mask.any()

    assert single.meta["target_count"] == 1 and single.meta["no_target"] is False
    np.testing.assert_array_equal(single.load_mask(), right)
    assert single.box == (5.0, 2.0, 9.0, 6.0)
    (train,) = load_grefcoco(gref_root, "train")  # a bare int ann_id reads as one target
    np.testing.assert_array_equal(train.load_mask(), left)
    assert len(load_grefcoco(gref_root, None)) == 4 and load_grefcoco(gref_root, "testB") == []


def test_grefcoco_no_target_in_a_dataset_item(gref_root):
    from lens.data.dataset import GroundingDataset
    from lens.training.data import load_source

    assert [r.ref_id for r in load_source("grefcoco:val", gref_root)] == ["grefcoco/100", "grefcoco/101"]
    assert [r.ref_id for r in load_source("grefcoco", gref_root)] == ["grefcoco/103"]  # default split: train

    none = load_grefcoco(gref_root, "val")[1]
    item = GroundingDataset([none], sam_size=32)[0]
    assert item["has_box"] is False and item["box_llm"] == [0, 0, 0, 0] and not item["mask"].any()


def test_grefcoco_broken_refs_name_file_ref_and_field(gref_root):
    path = gref_root / "refer_seg/grefcoco/grefs(unc).json"
    cases = [
        ('"ann_id": [-1], "category_id": [-1], "no_target": true', '"ann_id": [51], "category_id": [-1], "no_target": true',
         r"grefs\(unc\)\.json: ref #1 \(ref_id=101\): field 'no_target' is True but field 'ann_id' is \[51\]"),
        ('"ann_id": [-1], "category_id": [-1], "no_target": true', '"ann_id": [-1, 51], "category_id": [-1], "no_target": true',
         r"ref #1 \(ref_id=101\): field 'ann_id' \[-1, 51\]: use \[-1\] alone"),
        ('"ann_id": [51, 52]', '"ann_id": [51, 99]',
         r"instances\.json: annotation id 99 \(ref_id=100 in grefs\(unc\)\.json\) not found"),
        ('"ann_id": [51, 52]', '"ann_id": ["51"]', r"ref #0 \(ref_id=100\): field 'ann_id' must be an integer id or a list"),
        ('"no_target": false', '"no_target": "no"', r"ref #0 \(ref_id=100\): field 'no_target' must be true or false"),
    ]
    for old, new, pattern in cases:
        assert old in GREFS
        path.write_text(GREFS.replace(old, new, 1))
        with pytest.raises(ValueError, match=pattern):
            load_grefcoco(gref_root, "val")
    path.write_text(GREFS[:-3])
    with pytest.raises(ValueError, match=r"grefs\(unc\)\.json: invalid JSON in gRefCOCO refs: .* line \d+ column"):
        load_grefcoco(gref_root, "val")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)missing gRefCOCO refs file: .*grefs\(unc\)\.json.*expected layout"):
        load_grefcoco(gref_root, "val")
    with pytest.raises(ValueError, match="unknown gRefCOCO split"):
        load_grefcoco(gref_root, "test")
