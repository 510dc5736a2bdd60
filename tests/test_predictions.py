"""Predictions files: a LENS run round-trips exactly (both protocols), hand-made predictions give
hand-computed GRES and box-vs-mask figures, and missing / duplicate / unmatched / bad lines are
counted, listed or named (file, line, field)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens.data.masks import encode_rle
from lens.evaluation.predictions import PredictionError
from lens.evaluation.runner import EvalConfig, run_evaluation
from lens.inference import Segmenter

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 4
METRIC_KEYS = ("n", "ciou", "giou", "box_acc", "box_miou", "n_box", "box_vs_mask", "gres")
H, W = 10, 12


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lens.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("pred_synthetic")
    generate_synthetic(root, seed=5, n_train=1, n_val=3, n_test=3, image_size=112)
    return root


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained("tiny", max_new_tokens=MAX_NEW)


def rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


A, A_HALF = rect(2, 6, 2, 8), rect(2, 6, 2, 5)  # 24 and 12 pixels
C = rect(0, 3, 0, 3) | rect(5, 8, 6, 9)  # two 9-pixel targets, union 18
EMPTY = np.zeros((H, W), np.uint8)


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom JSONL: 'a' (2 expressions, box given), 'b' (no target), 'c' (two targets, union mask)."""
    root = tmp_path_factory.mktemp("hand")
    for name in ("img0.png", "img1.png"):
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / name)
    lines = [
        {"id": "a", "image": "img0.png", "expressions": ["red box", "the red box"], "mask": encode_rle(A),
         "box": [2, 2, 8, 6]},
        {"id": "b", "image": "img0.png", "expressions": ["a giraffe"], "mask": encode_rle(EMPTY),
         "meta": {"no_target": True, "target_count": 0}},
        {"id": "c", "image": "img1.png", "expressions": ["both squares"], "mask": encode_rle(C),
         "meta": {"target_count": 2}},
    ]
    (root / "hand.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def hand_lines(b_mask: np.ndarray = EMPTY) -> list[dict]:
    """a#0 exact (both hit), a#1 half mask (box rescues mask), b#0 empty (TN), c#0 exact mask with a
    wrong box (mask rescues box)."""
    bench = "custom:hand.jsonl"
    return [
        {"benchmark": bench, "id": "a#0", "mask": encode_rle(A), "box": [2, 2, 8, 6], "text": "[2, 2, 8, 6]"},
        {"benchmark": bench, "id": "a#1", "mask": encode_rle(A_HALF), "box": [2, 2, 8, 6]},
        {"benchmark": bench, "id": "b#0", "mask": encode_rle(b_mask), "box": None, "text": "no target"},
        {"benchmark": bench, "id": "c#0", "mask": encode_rle(C), "box": [0, 0, 3, 3]},
    ]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def score(preds: Path, hand: Path, out: Path, **kw) -> dict:
    cfg = EvalConfig(predictions=str(preds), data_root=str(hand), out=str(out), **kw)
    return run_evaluation(cfg)


def metric_view(res: dict) -> dict:
    return {k: res.get(k) for k in METRIC_KEYS}


# ---------------------------------------------------------------------------- round trip


def test_round_trip_both_protocols(data_root, segmenter, tmp_path):
    benchmarks = ["refcoco_val", "reasonseg_val", "reasonseg_test:cot", "groundingsuite", "custom:custom/val.jsonl"]
    model_runs = {}
    for protocol in ("lens", "standard"):
        run = tmp_path / f"run_{protocol}"
        model_runs[protocol] = first = run_evaluation(EvalConfig(
            model="tiny", data_root=str(data_root), out=str(run), max_new_tokens=MAX_NEW, batch_size=8,
            benchmarks=benchmarks, protocol=protocol, save_predictions=True), segmenter)
        again = score(run, data_root, tmp_path / f"scored_{protocol}", protocol=protocol, save_predictions=True)
        assert sorted(again) == sorted(first)  # a folder is read file by file (sorted names)
        for name, res in first.items():
            assert metric_view(again[name]) == metric_view(res), name  # exactly, not approximately
            assert again[name]["predictions"]["coverage"] == 1.0 and again[name]["model"] == f"predictions:run_{protocol}"
            assert res["box_vs_mask"]["n_box"] == res["n_box"] == res["n"]
            stem = name + ("" if protocol == "lens" else ".standard")
            a = [json.loads(x) for x in (run / f"{stem}.predictions.jsonl").read_text().splitlines()]
            b = [json.loads(x) for x in (tmp_path / f"scored_{protocol}" / f"{stem}.predictions.jsonl").read_text().splitlines()]
            keys = ("id", "I", "U", "pred_area", "box_iou", "mask", "box", "box_llm", "text")
            assert [{k: x[k] for k in keys} for x in a] == [{k: x[k] for k in keys} for x in b]
        suffix = "" if protocol == "lens" else ".standard"
        summary = json.loads((tmp_path / f"scored_{protocol}" / f"results{suffix}.json").read_text())
        assert set(summary["splits"]) == set(first) and summary["ignored_lines"] == {}
    # the standard protocol from the lens run's predictions, no model: RefCOCO and custom data give the model
    # run's standard figures (their predictions do not depend on the protocol)
    std = score(tmp_path / "run_lens", data_root, tmp_path / "lens_as_std", protocol="standard",
                benchmarks=["refcoco_val", "custom:custom/val.jsonl"])
    for name in ("refcoco_val", "custom_val"):
        assert metric_view(std[name]) == metric_view(model_runs["standard"][name])


def test_round_trip_limit_and_cli(data_root, segmenter, tmp_path):
    run = tmp_path / "run"
    first = run_evaluation(EvalConfig(model="tiny", data_root=str(data_root), out=str(run), max_new_tokens=MAX_NEW,
                                      benchmarks=["refcocog_val"], limit=5, save_predictions=True), segmenter)
    preds = run / "refcocog_val.limit5.predictions.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["bash", str(REPO / "eval.sh"), "--predictions", str(preds), "--data-root", str(data_root),
            "--benchmarks", "refcocog_val", "--limit", "5", "--out", str(tmp_path / "cli")]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loading" not in proc.stderr  # no model
    cli = json.loads((tmp_path / "cli" / "refcocog_val.limit5.json").read_text())
    assert metric_view(cli) == metric_view(first["refcocog_val"])
    # without --limit the other expressions are missing: an error naming them, unless --allow-missing
    proc = subprocess.run(args[:-4] + ["--out", str(tmp_path / "cli2")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: refcocog_val:") and "have no prediction" in err and "--allow-missing" in err
    partial = score(preds, data_root, tmp_path / "partial", benchmarks=["refcocog_val"], allow_missing=True)
    cov = partial["refcocog_val"]["predictions"]
    assert cov["n_scored"] == 5 and cov["n_missing"] == cov["n_expected"] - 5 > 0
    assert cov["coverage"] == pytest.approx(5 / cov["n_expected"])
    issues = json.loads(Path(cov["issues_file"]).read_text())
    assert len(issues["missing"]) == cov["n_missing"]
    ref = first["refcocog_val"]  # the same 5 expressions (summed in another order: equal up to rounding)
    assert partial["refcocog_val"]["n"] == 5 and partial["refcocog_val"]["ciou"] == pytest.approx(ref["ciou"], rel=1e-12)
    assert partial["refcocog_val"]["giou"] == pytest.approx(ref["giou"], rel=1e-12)
    assert "| refcocog_val |" in (tmp_path / "partial" / "results.md").read_text()
    assert f"(5/{cov['n_expected']})" in (tmp_path / "partial" / "results.md").read_text()


# ---------------------------------------------------------------------------- hand-computed figures


def test_hand_predictions_gres_and_box_vs_mask(hand, tmp_path):
    res = score(write_lines(tmp_path / "p.jsonl", hand_lines()), hand, tmp_path / "out")["custom_hand"]
    assert res["n"] == 4 and res["n_box"] == 3  # b has no ground-truth box
    g = res["gres"]
    assert (g["TP"], g["FN"], g["TN"], g["FP"]) == (3, 0, 1, 0)
    assert g["ciou"] == pytest.approx((24 + 12 + 18) / (24 + 24 + 0 + 18), rel=1e-15)
    assert g["giou"] == pytest.approx((1 + 0.5 + 1 + 1) / 4, rel=1e-15) and g["n_acc"] == 1.0 and g["t_acc"] == 1.0
    assert res["ciou"] == pytest.approx(54 / (66 + 1e-8), rel=1e-15)
    b = res["box_vs_mask"]
    assert (b["n_box"], b["n_mask_rescues_box"], b["n_box_rescues_mask"]) == (3, 1, 1)
    assert [x["n"] for x in b["bins"]] == [1, 0, 0, 2]  # box IoUs 0.125 (c), 1 (a#0), 1 (a#1)
    assert res["box_acc"] == pytest.approx(2 / 3) and res["box_miou"] == pytest.approx((1 + 1 + 9 / 72) / 3)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| custom_hand | 81.8 | 87.5 | 100.0 | 100.0 | 1 / 4 |" in md and "### Box versus mask" in md


def test_hand_no_target_false_positive(hand, tmp_path):
    b_mask = rect(0, 1, 0, 5)  # 5 pixels predicted for the no-target expression
    g = score(write_lines(tmp_path / "p.jsonl", hand_lines(b_mask)), hand, tmp_path / "out")["custom_hand"]["gres"]
    assert (g["TN"], g["FP"], g["n_acc"]) == (0, 1, 0.0)
    assert g["ciou"] == pytest.approx(54 / 71) and g["giou"] == pytest.approx(2.5 / 4)


def test_png_masks_and_other_keys(hand, tmp_path):
    """A LISA/Sa2VA-style folder of PNG masks named by image and expression, converted as in docs/evaluation.md."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    masks = {("img0.png", "red box"): A, ("img0.png", "the red box"): A_HALF, ("img0.png", "a giraffe"): EMPTY,
             ("img1.png", "both squares"): C}
    index = []
    for k, ((image, expr), mask) in enumerate(masks.items()):
        Image.fromarray(mask * 255).save(folder / f"{k:04d}.png")
        index.append({"image": image, "expression": expr, "png": f"{k:04d}.png"})
    out_lines = [{"benchmark": "custom:hand.jsonl", "image": x["image"], "expression": x["expression"],
                  "mask": f"pngs/{x['png']}"} for x in index]
    png = score(write_lines(tmp_path / "png.jsonl", out_lines), hand, tmp_path / "png", save_predictions=True)["custom_hand"]
    again = score(tmp_path / "png" / "custom_hand.predictions.jsonl", hand, tmp_path / "png2")["custom_hand"]
    assert metric_view(again) == metric_view(png)  # re-saved as RLE, still without box figures
    rle = score(write_lines(tmp_path / "rle.jsonl", hand_lines()), hand, tmp_path / "rle")["custom_hand"]
    assert (png["n"], png["ciou"], png["giou"], png["gres"]) == (rle["n"], rle["ciou"], rle["giou"], rle["gres"])
    assert png["n_box"] == 0 and "box_vs_mask" not in png  # no box field: no box figures
    by_ref = [{"benchmark": "custom_hand", "ref_id": x["ref_id"], "expression": x["expression"].upper(),
               "mask": encode_rle(m)} for x, m in zip(
        [{"ref_id": "a", "expression": "red box"}, {"ref_id": "a", "expression": "the  red box"},
         {"ref_id": "b", "expression": "a giraffe"}, {"ref_id": "c", "expression": "both squares"}], masks.values())]
    ref = score(write_lines(tmp_path / "ref.jsonl", by_ref), hand, tmp_path / "ref", benchmarks=["custom:hand.jsonl"])
    assert ref["custom_hand"]["ciou"] == png["ciou"] and ref["custom_hand"]["giou"] == png["giou"]


# ---------------------------------------------------------------------------- missing, duplicate, unmatched


def test_missing_lines_error_or_coverage(hand, tmp_path):
    preds = write_lines(tmp_path / "p.jsonl", hand_lines()[:3])
    with pytest.raises(PredictionError, match=r"custom_hand: 1 of 4 expression\(s\) have no prediction \(e.g. 'c#0'\)"):
        score(preds, hand, tmp_path / "out")
    issues = json.loads((tmp_path / "out" / "custom_hand.prediction_issues.json").read_text())
    assert issues["missing"] == ["c#0"] and issues["n_missing"] == 1
    res = score(preds, hand, tmp_path / "out", allow_missing=True)["custom_hand"]
    assert res["n"] == 3 and res["predictions"]["coverage"] == 0.75 and res["predictions"]["n_missing"] == 1
    assert res["gres"]["ciou"] == pytest.approx(36 / 48)
    assert "| custom_hand | 3 |" in (tmp_path / "out" / "results.md").read_text()
    assert "75.0 (3/4)" in (tmp_path / "out" / "results.md").read_text()


def test_duplicates_identical_counted_conflicting_error(hand, tmp_path):
    lines = hand_lines()
    res = score(write_lines(tmp_path / "p.jsonl", [*lines, lines[0]]), hand, tmp_path / "out")["custom_hand"]
    assert res["n"] == 4 and res["predictions"]["n_duplicate"] == 1 and res["predictions"]["n_duplicate_conflicting"] == 0
    issues = json.loads(Path(res["predictions"]["issues_file"]).read_text())
    assert issues["duplicates"] == [{"id": "a#0", "lines": [f"{tmp_path / 'p.jsonl'}:1", f"{tmp_path / 'p.jsonl'}:5"],
                                     "identical": True}]
    other = {**lines[0], "mask": encode_rle(A_HALF)}
    with pytest.raises(PredictionError, match=r"1 expression\(s\) have conflicting duplicate predictions "
                                              r"\(first: 'a#0' on .*p2.jsonl:1, .*p2.jsonl:5\)"):
        score(write_lines(tmp_path / "p2.jsonl", [*lines, other]), hand, tmp_path / "out2")


def test_unmatched_excluded_and_other_benchmarks(hand, tmp_path):
    lines = hand_lines()
    stray = {"benchmark": "custom:hand.jsonl", "id": "zzz#0", "mask": encode_rle(A)}
    with pytest.raises(PredictionError, match=r"1 line\(s\) match no expression \(first: .*p.jsonl:5: "
                                              r"field 'id': 'zzz#0' is not an expression"):
        score(write_lines(tmp_path / "p.jsonl", [*lines, stray]), hand, tmp_path / "out")
    wrong_image = {"benchmark": "custom:hand.jsonl", "image": "img9.png", "expression": "red box", "mask": encode_rle(A)}
    with pytest.raises(PredictionError, match=r"p3.jsonl:5: field 'image': no image of the benchmark matches 'img9.png'"):
        score(write_lines(tmp_path / "p3.jsonl", [*lines, wrong_image]), hand, tmp_path / "out3")
    # --limit 2: the other lines name real expressions left out of the scored set (listed, not errors);
    # a line for a benchmark not requested is counted in results.json
    other = {"benchmark": "refcoco_val", "id": "refcoco/1#0", "mask": encode_rle(A)}
    res = score(write_lines(tmp_path / "p2.jsonl", [*lines, other]), hand, tmp_path / "out2", limit=2,
                benchmarks=["custom:hand.jsonl"])["custom_hand"]
    assert res["n"] == 2 and res["predictions"]["n_excluded"] == 2 and res["predictions"]["coverage"] == 1.0
    summary = json.loads((tmp_path / "out2" / "results.limit2.json").read_text())
    assert summary["ignored_lines"] == {"refcoco_val": 1}


def test_refuses_to_replace_model_results(hand, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "custom_hand.json").write_text(json.dumps({"signature": {"model": "tiny", "protocol": "lens"}}))
    with pytest.raises(ValueError, match="holds a model run's results"):
        score(write_lines(tmp_path / "p.jsonl", hand_lines()), hand, out)


# ---------------------------------------------------------------------------- bad lines


GOOD = {"benchmark": "custom:hand.jsonl", "id": "a#0", "mask": encode_rle(A)}


@pytest.mark.parametrize("line, message", [
    ("{not json", r"invalid JSON"),
    ('["a"]', r"expected a JSON object, got list"),
    ({**GOOD, "maks": 1}, r"unknown field\(s\) \['maks'\]"),
    ({"id": "a#0", "mask": GOOD["mask"]}, r"field 'benchmark' is missing"),
    ({"benchmark": "custom:hand.jsonl", "mask": GOOD["mask"]}, r"name the expression with field 'id'"),
    ({"benchmark": "custom:hand.jsonl", "id": "a#0"}, r"field 'mask' is missing"),
    ({**GOOD, "mask": {"size": [H], "counts": "x"}}, r"field 'mask': RLE 'size' must be"),
    ({**GOOD, "mask": 3}, r"field 'mask' must be a COCO RLE dict or a PNG path"),
    ({**GOOD, "box": [1, 2, 3]}, r"field 'box' must be \[x1, y1, x2, y2\]"),
    ({**GOOD, "box_llm": [1, 2, 3, 4]}, r"field 'box_llm' needs field 'llm_hw'"),
    ({**GOOD, "llm_hw": [0, 4], "box_llm": [1, 2, 3, 4]}, r"field 'llm_hw' must be"),
    ({**GOOD, "score": "high"}, r"field 'score' must be a finite number"),
    ({**GOOD, "mask": "nowhere.png"}, r"field 'mask': PNG file not found: .*nowhere.png"),
    ({**GOOD, "mask": encode_rle(np.zeros((4, 4), np.uint8))}, r"field 'mask': RLE size \[4, 4\] differs from image"),
    ({**GOOD, "benchmark": "refcoco_vall"}, r"field 'benchmark': unknown benchmark 'refcoco_vall'"),
])
def test_bad_line_names_file_line_field(hand, tmp_path, line, message):
    preds = write_lines(tmp_path / "bad.jsonl", [*hand_lines()[1:], line])
    with pytest.raises(PredictionError, match=rf"^{tmp_path / 'bad.jsonl'}:4: {message}"):
        score(preds, hand, tmp_path / "out", allow_missing=True)


def test_cli_bad_line_is_one_error_line(hand, tmp_path):
    preds = write_lines(tmp_path / "bad.jsonl", [*hand_lines()[:1], {**GOOD, "box": [1, 2]}])
    proc = subprocess.run([sys.executable, "-m", "lens.evaluation", "--predictions", str(preds), "--data-root",
                           str(hand), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {preds}:2: field 'box' must be [x1, y1, x2, y2] "
                                                f"(4 finite numbers) or null, got [1, 2]"]


# ---------------------------------------------------------------------------- overlays filter


@pytest.mark.parametrize("mode, expected", [("mask_rescues_box", ["c_0"]), ("box_rescues_mask", ["a_1"]),
                                            ("extremes", None)])
def test_overlays_filter(hand, tmp_path, mode, expected):
    score(write_lines(tmp_path / "p.jsonl", hand_lines()), hand, tmp_path / "out", save_overlays=3,
          overlays_filter=mode)
    names = sorted(p.name for p in (tmp_path / "out" / "overlays" / "custom_hand").glob("*.png"))
    if expected is None:
        assert len(names) == 6 and sum(n.startswith("best") for n in names) == 3
    else:
        assert [n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1][:-4] for n in names] == expected
        assert all(n.startswith(mode) for n in names)
