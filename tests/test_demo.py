"""demo.py and the Segmenter API end to end on the tiny preset."""

from __future__ import annotations

import importlib.util
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


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *args], capture_output=True, text=True, timeout=300)


def test_demo_names_a_missing_or_unreadable_image_in_one_line(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    for path, why in ((tmp_path / "missing.jpg", "image not found"), (bad, "cannot read image")):
        proc = run_demo("--image", str(path), "--prompt", "x")
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"demo.py: error: --image: {why}") and str(path) in line, line


def test_demo_names_a_bad_model_in_one_line(jpg, tmp_path, monkeypatch, capsys):
    demo = import_demo(monkeypatch)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    cases = {
        str(tmp_path / "nowhere"): "no such folder, and not a preset (qwen2.5-vl-3b, qwen2.5-vl-7b, qwen2-vl-2b, "
                                   "qwen3-vl-4b, tiny, tiny-qwen2-vl, tiny-qwen3-vl)",
        str(tmp_path / "empty"): "no config.json in this folder",
        str(jpg): "not a folder",
        str(tmp_path / "weightless"): "cannot load it:",
    }
    for model, why in cases.items():
        assert demo.main(["--image", str(jpg), "--prompt", "x", "--model", model, "--out", str(tmp_path / "o.png")]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"demo.py: error: --model {model}: {why}"), line
    assert not (tmp_path / "o.png").exists()


def load_tool(monkeypatch, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_make_synthetic_data_names_bad_arguments_in_one_line(tmp_path, monkeypatch, capsys):
    tool = load_tool(monkeypatch, "make_synthetic_data")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        ("--out", str(a_file)): f"--out {a_file}: exists and is not a folder",
        ("--out", str(a_file / "sub")): f"--out {a_file / 'sub'}: cannot write there: Not a directory",
        ("--out", str(tmp_path / "d"), "--n-val", "0"): "--n-val 0: every split needs at least 1 image",
        ("--out", str(tmp_path / "d"), "--image-size", "8"): "--image-size 8: at least 32 pixels",
    }
    for args, message in cases.items():
        try:
            rc = tool.main(list(args))
        except SystemExit as exc:  # argparse's error(): usage + one error line, status 2
            rc = exc.code
        assert rc == 2, args
        err = capsys.readouterr().err.splitlines()
        assert f": error: {message}" in err[-1], err  # argparse names the program as it was started
        assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "d").exists()


def import_demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("demo", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo", module)  # gradio inspects the source of the app's classes
    spec.loader.exec_module(module)
    return module


def test_web_ui_binds_localhost_unless_told(monkeypatch):
    demo = import_demo(monkeypatch)
    args = demo.build_parser().parse_args(["--gradio"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    args = demo.build_parser().parse_args(["--gradio", "--host", "0.0.0.0", "--port", "8080"])
    assert (args.host, args.port) == ("0.0.0.0", 8080)
    gr = pytest.importorskip("gradio")  # the `demo` extra (a dev requirement)
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    monkeypatch.setattr(demo, "load_segmenter", lambda *a: object())
    assert demo.main(["--gradio"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860
    assert demo.main(["--gradio", "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert launched["server_name"] == "0.0.0.0" and launched["server_port"] == 8123
    proc = run_demo("--gradio", "--port", "70000")
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == "demo.py: error: --port 70000: expected 1..65535"


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
