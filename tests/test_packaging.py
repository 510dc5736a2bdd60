"""Packaging outside this checkout: build the wheel, install it elsewhere, use it from another directory.

The wheel is built from a copy of the package sources (so the checkout gets no build/ or *.egg-info), installed
with --no-deps into a target folder that comes first on PYTHONPATH (the dependencies are this venv's), and run
from a temporary working directory: the model presets must come from the installed package, not the checkout.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

PRESET_FILES = ("lens/configs/models/qwen2.5-vl-3b.yaml", "lens/configs/models/tiny.yaml")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lens", src / "lens", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--disable-pip-version-check", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("lens-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict[str, str]:
    """Environment for a subprocess that imports the installed wheel, from a directory outside the checkout."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**os.environ, "PYTHONPATH": str(target), "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}


def run_outside(env: dict, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    assert ROOT not in cwd.resolve().parents and cwd.resolve() != ROOT
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_ships_the_presets_and_declares_the_dependencies(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
        tiny = yaml.safe_load(zf.read("lens/configs/models/tiny.yaml"))
    assert set(PRESET_FILES) <= set(names)
    assert (ROOT / "lens/configs/models/tiny.yaml").read_text() and tiny["text_config"]
    assert {n.split("/")[0] for n in names} == {"lens", meta_name.split("/")[0]}  # no tests, tools or configs/
    requires = meta.get_all("Requires-Dist")
    for pin in ("torch==2.14.1", "transformers==5.23.0", "trl==1.16.0", "peft==0.21.2"):
        assert pin in requires, requires
    assert not any(r.startswith("sam2") for r in requires)  # installed separately (pyproject.toml, setup_env.sh)
    assert {"cluster", "demo", "dev"} <= set(meta.get_all("Provides-Extra"))
    assert 'deepspeed==0.19.8; extra == "cluster"' in requires
    assert any(r.startswith("gradio==") and 'extra == "demo"' in r for r in requires)
    assert any(r.startswith("ruff==") and 'extra == "dev"' in r for r in requires)
    # the pins agree with requirements.txt, which scripts/setup_env.sh installs
    pinned = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    assert {r for r in requires if "==" in r and "extra" not in r} == {r for r in pinned if "==" in r}


def test_installed_segmenter_tiny_runs_from_another_directory(installed, tmp_path):
    code = """
import json, sys
import lens, lens.modeling.presets as presets
from PIL import Image
from lens import Segmenter
seg = Segmenter.from_pretrained("tiny", max_new_tokens=4)
pred = seg(Image.new("RGB", (80, 60), (200, 30, 30)), "the red square")
print(json.dumps({"lens": lens.__file__, "preset": str(presets.preset_path("tiny")), "shape": list(pred.mask.shape)}))
"""
    proc = run_outside(installed, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    site = Path(installed["PYTHONPATH"])
    assert Path(info["lens"]).is_relative_to(site), info  # the wheel's package, not the editable checkout
    assert Path(info["preset"]) == site / "lens/configs/models/tiny.yaml"
    assert info["shape"] == [60, 80]


def test_installed_evaluation_cli_runs_a_synthetic_config_from_another_directory(installed, tmp_path):
    data = tmp_path / "synthetic"
    make = f"from lens.data.synthetic import generate_synthetic; generate_synthetic({str(data)!r}, 0, 1, 2, 1, 64)"
    proc = run_outside(installed, tmp_path, "-c", make)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump({
        "model": "tiny", "data_root": "synthetic", "out": "eval", "benchmarks": ["refcoco_val"],
        "limit": 2, "batch_size": 2, "max_new_tokens": 4, "device": "cpu",
    }))
    proc = run_outside(installed, tmp_path, "-m", "lens.evaluation", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "refcoco_val.limit2.json").read_text())  # relative to the cwd
    assert (result["benchmark"], result["n"], result["model"]) == ("refcoco_val", 2, "tiny"), result
    assert 0.0 <= result["giou"] <= 1.0
