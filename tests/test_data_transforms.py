"""Transforms and mask codecs (lens.data.transforms, lens.data.masks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens.data.masks import (
    decode_segmentation,
    encode_rle,
    polygon_mask,
    validate_segmentation,
)
from lens.data.transforms import (
    ImageReadError,
    box_from_llm_pixels,
    box_to_llm_pixels,
    image_size,
    llm_image_size,
    load_rgb,
    mask_box,
    resize_for_llm,
    sam_image,
)


def test_llm_image_size_matches_upstream_example():
    assert llm_image_size(480, 640) == (476, 644)  # the original: 640x480 -> 644x476 (multiples of 28)
    assert llm_image_size(224, 224) == (224, 224)


def test_llm_image_size_caps_pixels_and_longest_side():
    rh, rw = llm_image_size(2000, 3000)
    assert rh % 28 == 0 and rw % 28 == 0 and rh * rw <= 1_000_000
    # longest side 640 first: 1280x960 -> 640x480 -> smart_resize -> 644x476 (h, w swapped here)
    assert llm_image_size(1280, 960, longest_side=640) == (644, 476)
    assert llm_image_size(300, 200, longest_side=640) == llm_image_size(300, 200)  # never enlarges


def test_resize_for_llm_gives_llm_size():
    img = Image.new("RGB", (640, 480), (10, 20, 30))
    assert resize_for_llm(img).size == (644, 476)
    big = Image.new("RGB", (1500, 1000))
    rh, rw = llm_image_size(1000, 1500, longest_side=640)
    assert resize_for_llm(big, longest_side=640).size == (rw, rh)


def test_box_llm_round_trip():
    box = [10.0, 20.0, 330.5, 479.0]
    llm = box_to_llm_pixels(box, (480, 640), (476, 644))
    assert llm == [round(10 / 640 * 644), round(20 / 480 * 476), round(330.5 / 640 * 644), round(479 / 480 * 476)]
    assert all(isinstance(v, int) for v in llm)
    back = box_from_llm_pixels(llm, (476, 644), (480, 640))
    assert np.allclose(back, box, atol=1.0)


def test_sam_image_is_uint8_square_and_keeps_colour():
    img = Image.new("RGB", (120, 80), (200, 100, 50))
    out = sam_image(img, 64)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 64, 64)
    assert out[:, 10, 10].tolist() == [200, 100, 50]


def test_mask_box_pixel_edges_and_empty():
    m = np.zeros((20, 30), np.uint8)
    m[5:9, 10:21] = 1
    assert mask_box(m) == (10.0, 5.0, 21.0, 9.0)
    assert mask_box(np.zeros((4, 4), np.uint8)) is None


def test_load_rgb_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_rgb(missing)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        load_rgb(bad)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="truncated.jpg"):
        load_rgb(truncated)
    img = load_rgb(good)
    assert img.mode == "RGB" and img.size == (64, 48) and image_size(good) == (48, 64)


def test_polygon_parts_are_summed_or_unioned():
    outer, inner = [10, 10, 30, 10, 30, 30, 10, 30], [15, 15, 25, 15, 25, 25, 15, 25]
    summed = decode_segmentation([outer, inner], 40, 50)
    assert summed.dtype == np.uint8 and summed.shape == (40, 50)
    assert (summed == 1).sum() == 400 - 100 and (summed == 2).sum() == 100
    union = decode_segmentation([outer, inner], 40, 50, combine="union")
    assert union.max() == 1 and union.sum() == 400


def test_rle_round_trips_str_and_uncompressed_counts():
    m = polygon_mask([3, 4, 40, 4, 22, 30], 36, 48)
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [36, 48]
    assert np.array_equal(decode_segmentation(rle, 36, 48), m)
    flat = m.flatten(order="F")  # uncompressed RLE: run lengths in column-major order, starting with 0s
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    runs = ([0] if flat[0] else []) + runs
    assert np.array_equal(decode_segmentation({"size": [36, 48], "counts": runs}, 36, 48), m)


@pytest.mark.parametrize(
    "seg, msg",
    [([], "non-empty"), ([[1, 2, 3, 4]], "no polygon part has >= 3 points"), ([[1, 2, 3, 4, 5]], "even number"),
     ([[1, 2, "x", 4, 5, 6]], "numbers"), ([[1, 2, float("nan"), 4, 5, 6]], "non-finite"),
     ({"size": [3], "counts": "abc"}, "size"), ({"size": [2, 2], "counts": [1, 1]}, "sum to"),
     ({"size": [2, 2], "counts": "b'4'"}, "holds \"'\" at position 1")],
)
def test_malformed_segmentations_rejected(seg, msg):
    with pytest.raises(ValueError, match=msg):
        validate_segmentation(seg, "ann 42")


def test_degenerate_polygon_parts_dropped_and_rle_strings_checked():
    square = [1, 1, 5, 1, 5, 5, 1, 5]
    ref = decode_segmentation([square], 8, 8)
    # a 2-point part first would make pycocotools read every part as a box: it is dropped instead
    assert np.array_equal(decode_segmentation([[6, 6, 7, 7], square], 8, 8), ref)
    rle = encode_rle(ref)
    with pytest.raises(ValueError, match="ann 1: cannot decode.*end inside a value"):
        decode_segmentation({"size": [8, 8], "counts": rle["counts"] + "o"}, 8, 8, what="ann 1")  # 'o': "more" bit
    with pytest.raises(ValueError, match="cover"):
        decode_segmentation({"size": [8, 8], "counts": rle["counts"] + "1"}, 8, 8)


def test_rle_size_mismatch_rejected():
    rle = encode_rle(np.ones((5, 6), np.uint8))
    with pytest.raises(ValueError, match="differs"):
        decode_segmentation(rle, 6, 5)
