"""demo.py and the Segmenter API end to end on the tiny preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def jpg(tmp_path) -> Path:
    path = tmp_path / "scene.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
    return path


def test_demo_writes_an_overlay_png(jpg, tmp_path):
    out = tmp_path / "overlay.png"
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--image", str(jpg), "--prompt", "the dog",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "masks are untrained" in proc.stdout and "answer:" in proc.stdout
    png = Image.open(out)
    assert png.format == "PNG" and png.size == (200, 150)


def test_demo_names_a_missing_or_unreadable_image(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    for path in (tmp_path / "missing.jpg", bad):
        proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--image", str(path), "--prompt", "x"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and str(path) in proc.stderr


def test_segmenter_single_and_batched_calls(jpg):
    from lens import Segmenter

    seg = Segmenter.from_pretrained("tiny", max_new_tokens=8)
    pred = seg(jpg, "the red circle")
    assert pred.mask.shape == (150, 200) and pred.mask.dtype == bool and 0.0 <= pred.score <= 1.0
    image = Image.open(jpg)
    preds = seg.predict_batch([jpg, image, jpg], ["a", "b", "c"])
    assert [p.mask.shape for p in preds] == [(150, 200)] * 3
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        seg.predict_batch([jpg, jpg], ["a"])


def test_overlay_draws_mask_and_box():
    from lens.visualize import overlay

    image = Image.new("RGB", (120, 90), (0, 0, 0))
    mask = np.zeros((90, 120), dtype=bool)
    mask[40:60, 10:30] = True
    out = np.asarray(overlay(image, mask, [60, 30, 110, 80], "answer"))
    assert out[50, 20, 0] > 100 and out[50, 20, 1] < 20  # red mask blended at alpha 128
    assert out[30, 80, 1] == 255 and out[55, 60, 1] == 255  # green box outline (top and left edges)
    assert out[85, 5].sum() == 0  # untouched background
    assert out[5, 60].sum() < 60  # text banner darkens the top rows
