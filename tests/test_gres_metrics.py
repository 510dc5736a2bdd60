"""GRES metrics (gRefCOCO) and the no-target answer, against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lens.data.base import Reference
from lens.evaluation.analysis import gres_metrics, is_empty_prediction
from lens.evaluation.batches import score_batch
from lens.evaluation.config import Expression
from lens.evaluation.metrics import SegmentationMetrics
from lens.evaluation.report import results_markdown
from lens.inference import BatchOutput
from lens.prompts import NO_TARGET_ANSWER, is_no_target_answer, no_target_answer


def rec(i: int, u: int, area: int, no_target: bool = False, **kw) -> dict:
    return {"I": i, "U": u, "pred_area": area, "no_target": no_target, "box_iou": None, **kw}


# 1 target hit, 2 target answered empty, 3 no-target answered empty, 4 no-target with 4 predicted pixels,
# 5 two-target expression against the union mask
CASES = [rec(6, 10, 8), rec(0, 5, 0), rec(0, 0, 0, True), rec(0, 4, 4, True), rec(9, 12, 10, target_count=2)]


def test_gres_hand_computed():
    g = gres_metrics(CASES)
    assert (g["TP"], g["FN"], g["TN"], g["FP"]) == (2, 1, 1, 1)
    assert (g["n"], g["n_target"], g["n_no_target"]) == (5, 3, 2)
    assert g["ciou"] == pytest.approx((6 + 0 + 9) / (10 + 5 + 4 + 12), rel=1e-15)  # 15 / 31
    assert g["giou"] == pytest.approx((0.6 + 0.0 + 1.0 + 0.0 + 0.75) / 5, rel=1e-15)  # 0.47
    assert g["n_acc"] == 0.5 and g["t_acc"] == pytest.approx(2 / 3)
    assert (g["sum_I"], g["sum_U"]) == (15, 31) and "predicted area == 0" in g["empty_rule"]


def test_gres_beside_ours_differs_only_by_rules():
    ours = SegmentationMetrics.from_records(CASES).compute()
    # same sums here (a no-target expression's U is its predicted area), ours with the 1e-8 epsilon
    assert ours["ciou"] == pytest.approx(15 / (31 + 1e-8), rel=1e-15)
    # gIoU: ours divides by U + 1e-5 and N + 1e-5; GRES uses exact ratios
    expected = (6 / (10 + 1e-5) + 0 + 1 + 0 + 9 / (12 + 1e-5)) / (5 + 1e-5)
    assert ours["giou"] == pytest.approx(expected, rel=1e-12) and ours["giou"] != gres_metrics(CASES)["giou"]


def test_gres_target_with_empty_union_scores_zero():
    # lens protocol: a target whose pixels are all overlap (value 2) has no foreground; empty prediction
    case = [rec(0, 0, 0)]
    assert gres_metrics(case)["giou"] == 0.0 and gres_metrics(case)["FN"] == 1
    assert SegmentationMetrics.from_records(case).compute()["giou"] == pytest.approx(1 / (1 + 1e-5))
    assert gres_metrics(case)["ciou"] is None  # no union at all


def test_gres_groups_absent():
    g = gres_metrics([rec(3, 4, 4)])
    assert g["n_acc"] is None and g["t_acc"] == 1.0 and g["giou"] == 0.75
    g = gres_metrics([rec(0, 0, 0, True), rec(0, 7, 7, True)])
    assert g["t_acc"] is None and g["n_acc"] == 0.5 and g["ciou"] == 0.0 and g["giou"] == 0.5
    assert gres_metrics([])["giou"] is None


def test_empty_rule_is_area_zero():
    assert is_empty_prediction({"pred_area": 0}) and not is_empty_prediction({"pred_area": 1})


@pytest.mark.parametrize("text, expected", [
    ("no target", True), ("There is no such object in the image.", True), ("No matching targets.", True),
    ("The object is not present.", True), ("it does not exist", True),
    ("<think>a dog? no dog here</think><answer>no target</answer>", True),
    ('<think>no target?</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', False),  # the answer block decides
    ("no target [1, 2, 3, 4]", False), ("(1,2),(3,4) no object", False),  # a box wins
    ("the man on the left", False), ("another object", False), ("", False), (None, False),
])
def test_is_no_target_answer(text, expected):
    assert is_no_target_answer(text) is expected


def test_no_target_answer_text():
    assert no_target_answer() == NO_TARGET_ANSWER == "no target"
    assert no_target_answer(cot=True) == "<answer>no target</answer>"
    assert is_no_target_answer(no_target_answer()) and is_no_target_answer(no_target_answer(cot=True))


def _exprs_and_targets():
    target = np.zeros((6, 8), np.uint8)
    target[1:3, 2:6] = 1  # 8 pixels
    empty = np.zeros((6, 8), np.uint8)
    refs = [Reference("a", Path("a.jpg"), ["cup"], None, "custom"),
            Reference("b", Path("a.jpg"), ["giraffe"], None, "custom", meta={"no_target": True})]
    return [Expression("a#0", refs[0], 0), Expression("b#0", refs[1], 0)], [target, empty]


@pytest.mark.parametrize("no_target_ok", [True, False])
def test_no_target_answer_empties_the_mask(no_target_ok):
    exprs, targets = _exprs_and_targets()
    out = BatchOutput(texts=["no target", "no target"], boxes_llm=[None, None],
                      mask_logits=torch.full((2, 1, 4, 4), 5.0), scores=torch.zeros(2),
                      orig_sizes=[(6, 8), (6, 8)], llm_sizes=[(12, 16), (12, 16)])
    recs = score_batch(out, exprs, targets, "lens", no_target_ok=no_target_ok, elapsed=0.5)
    if no_target_ok:  # both answers say "no target": empty masks
        assert [(r["I"], r["U"], r["pred_area"]) for r in recs] == [(0, 8, 0), (0, 0, 0)]
        assert all(r["no_target_answer"] for r in recs)
    else:  # positive logits everywhere: the full image
        assert [(r["I"], r["U"], r["pred_area"]) for r in recs] == [(8, 48, 48), (0, 48, 48)]
        assert not any(r["no_target_answer"] for r in recs)
    assert recs[0]["box_iou"] == 0.0 and recs[1]["box_iou"] is None  # no gt box for a no-target reference
    assert all(r["time_s"] == 0.25 for r in recs)


def test_markdown_gres_table():
    g = gres_metrics(CASES)
    res = {"grefcoco_val": {"n": 5, "ciou": 0.4, "giou": 0.5, "box_acc": None, "box_miou": None, "time_s": 1.0,
                            "expressions_per_s": None, "gres": g}}
    md = results_markdown(res, "m", "lens")
    assert "### Generalized referring segmentation (GRES metrics)" in md
    assert "| gRefCOCO val | 48.4 | 47.0 | 50.0 | 66.7 | 2 / 5 |" in md


# ---------------------------------------------------------------------------- gRefCOCO through the runner


@pytest.fixture(scope="module")
def gref_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lens.data.registry import BENCHMARKS
    from lens.data.synthetic import generate_synthetic

    if "grefcoco_val" not in BENCHMARKS:
        pytest.skip("the gRefCOCO loader is not registered")
    root = tmp_path_factory.mktemp("gref")
    generate_synthetic(root, seed=1, n_train=1, n_val=4, n_test=1, image_size=64)
    if not (root / "refer_seg/grefcoco").is_dir():
        pytest.skip("the synthetic generator writes no gRefCOCO files")
    return root


def test_grefcoco_benchmark_reports_gres(gref_root, tmp_path):
    """Synthetic gRefCOCO scored from predictions files: the ground truth itself, and the whole image."""
    import json

    from lens.data.masks import encode_rle
    from lens.data.registry import load_benchmark
    from lens.evaluation.config import build_expressions, parse_benchmarks
    from lens.evaluation.runner import EvalConfig, run_evaluation

    root = gref_root
    spec = parse_benchmarks(["grefcoco_val"])[0]
    exprs = build_expressions(load_benchmark("grefcoco_val", root), spec, "lens", None)
    masks = {e.id: e.ref.load_mask() for e in exprs}
    nt = [bool(e.ref.meta["no_target"]) for e in exprs]
    assert any(nt) and not all(nt)
    assert all((masks[e.id] == 0).all() == e.ref.meta["no_target"] for e in exprs)  # the loader's contract

    def scored(name, make):
        lines = [{"benchmark": "grefcoco_val", "id": e.id, "mask": encode_rle(make(masks[e.id]))} for e in exprs]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        cfg = EvalConfig(predictions=str(tmp_path / f"{name}.jsonl"), data_root=str(root), out=str(tmp_path / name))
        return run_evaluation(cfg)["grefcoco_val"]

    gt = scored("gt", lambda m: m > 0)["gres"]
    assert (gt["ciou"], gt["giou"], gt["n_acc"], gt["t_acc"], gt["FP"], gt["FN"]) == (1.0, 1.0, 1.0, 1.0, 0, 0)
    full = scored("full", lambda m: np.ones(m.shape, bool))
    g = full["gres"]
    areas = [m.size for m in masks.values()]
    fg = [int((m > 0).sum()) for m in masks.values()]
    assert (g["n_acc"], g["t_acc"], g["TN"], g["FP"]) == (0.0, 1.0, 0, sum(nt))
    assert g["ciou"] == pytest.approx(sum(fg) / sum(areas), rel=1e-12)  # no-target ones add the whole image to U
    assert g["giou"] == pytest.approx(sum(f / a for f, a, n in zip(fg, areas, nt) if not n) / len(exprs), rel=1e-12)
    md = (tmp_path / "full" / "results.md").read_text()
    assert f"| gRefCOCO val | {100 * g['ciou']:.1f} | {100 * g['giou']:.1f} | 0.0 | 100.0 | {sum(nt)} / {len(exprs)} |" in md


def test_model_run_no_target_answers_on_grefcoco(gref_root, tmp_path, monkeypatch):
    """The tiny model on gRefCOCO with its answers replaced by "no target" for every other row: those rows
    predict empty masks (N-acc counts them), the rest keep the query forward's mask."""
    import json

    from lens.evaluation.runner import EvalConfig, run_evaluation
    from lens.inference import Segmenter

    original = Segmenter.run_batch

    def every_other_says_no_target(seg, images, prompts, *a, **kw):
        out = original(seg, images, prompts, *a, **kw)
        out.texts = [NO_TARGET_ANSWER if k % 2 == 0 else t for k, t in enumerate(out.texts)]
        return out

    monkeypatch.setattr(Segmenter, "run_batch", every_other_says_no_target)
    seg = Segmenter.from_pretrained("tiny", max_new_tokens=3)
    cfg = EvalConfig(model="tiny", data_root=str(gref_root), out=str(tmp_path), benchmarks=["grefcoco_val"],
                     batch_size=4, max_new_tokens=3, save_predictions=True)
    res = run_evaluation(cfg, seg)["grefcoco_val"]
    lines = [json.loads(x) for x in (tmp_path / "grefcoco_val.predictions.jsonl").read_text().splitlines()]
    said = [x for x in lines if x["no_target_answer"]]
    n = len(lines)
    assert len(said) == 2 * (n // 4) + (n % 4 + 1) // 2  # rows 0 and 2 of each batch of 4
    assert all(x["pred_area"] == 0 and x["I"] == 0 and x["text"] == NO_TARGET_ANSWER for x in said)
    assert all(x["pred_area"] > 0 for x in lines if not x["no_target_answer"])  # random logits: never empty here
    g = res["gres"]
    nt = [x for x in lines if x["no_target"]]
    assert g["TN"] == sum(x["no_target_answer"] for x in nt) and g["FP"] == len(nt) - g["TN"]
    assert g["FN"] == sum(x["no_target_answer"] for x in lines if not x["no_target"])
    assert g["n_acc"] == pytest.approx(g["TN"] / len(nt)) and res["n"] == len(lines)
    assert json.loads((tmp_path / "results.json").read_text())["splits"]["grefcoco_val"]["gres"] == g
