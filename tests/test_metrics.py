"""Segmentation metrics against hand-computed values in both protocols."""

import pickle

import numpy as np
import pytest
import torch

from lens.evaluation import SegmentationMetrics, expression_iou, foreground_mask, intersection_union

# raw target: 1 target, 2 polygon overlap, 255 ignore
TARGET = torch.tensor(
    [
        [1, 1, 0],
        [2, 1, 255],
        [0, 0, 255],
    ],
    dtype=torch.uint8,
)
PRED = torch.tensor(
    [
        [1, 0, 0],
        [1, 1, 1],
        [0, 0, 0],
    ],
    dtype=torch.bool,
)
# lens: fg = {(0,0),(0,1),(1,1)}; pred = {(0,0),(1,0),(1,1),(1,2)}
#   I = {(0,0),(1,1)} = 2; U = fg | pred = 5   (the 2 at (1,0) and the 255 at (1,2) are background)
# standard: fg = {(0,0),(0,1),(1,0),(1,1)}; (1,2),(2,2) excluded; pred kept = {(0,0),(1,0),(1,1)}
#   I = 3; U = 4
HAND = {"lens": (2, 5), "standard": (3, 4)}


@pytest.mark.parametrize("protocol", ["lens", "standard"])
def test_intersection_union_hand(protocol):
    inter, union = intersection_union(PRED, TARGET, protocol)
    assert inter.dim() == 0 and inter.dtype == torch.int64
    assert (inter.item(), union.item()) == HAND[protocol]


def test_intersection_union_batched_and_numpy():
    empty = torch.zeros(3, 3, dtype=torch.uint8)
    preds = torch.stack([PRED, torch.zeros(3, 3, dtype=torch.bool), PRED])
    targets = torch.stack([TARGET, empty, empty])
    inter, union = intersection_union(preds, targets, "lens")
    assert inter.tolist() == [2, 0, 0] and union.tolist() == [5, 0, 4]
    inter, union = intersection_union(PRED.numpy(), TARGET.numpy(), "standard")
    assert (inter.item(), union.item()) == (3, 4)


def test_foreground_mask_and_errors():
    fg, valid = foreground_mask(TARGET, "lens")
    assert valid is None and fg.sum().item() == 3
    fg, valid = foreground_mask(TARGET, "standard")
    assert fg.sum().item() == 4 and (~valid).sum().item() == 2
    with pytest.raises(ValueError, match="standard"):
        intersection_union(PRED, TARGET, "lisa")
    with pytest.raises(ValueError, match=r"pred \(3, 3\) and target \(2, 3\) must match"):
        intersection_union(PRED, TARGET[:2])
    with pytest.raises(ValueError, match="unknown protocol 'lisa'; valid: lens, standard"):
        SegmentationMetrics("lisa")


def test_expression_iou_empty_rule():
    assert expression_iou(0, 0) == 1.0
    assert expression_iou(0, 7) == 0.0
    assert expression_iou(2, 5) == pytest.approx(2 / (5 + 1e-5))


@pytest.mark.parametrize("protocol", ["lens", "standard"])
def test_accumulator_hand(protocol):
    empty_t = np.zeros((2, 4), dtype=np.uint8)
    empty_p = np.zeros((2, 4), dtype=bool)
    some_p = empty_p.copy()
    some_p[0, :3] = True  # 3 predicted pixels on an empty target
    m = SegmentationMetrics(protocol)
    m.update([PRED, empty_p, some_p], [TARGET, empty_t, empty_t])  # differently sized masks
    i0, u0 = HAND[protocol]
    ious = [i0 / (u0 + 1e-5), 1.0, 0.0]
    out = m.compute()
    assert out["n"] == 3 and out["protocol"] == protocol
    assert out["ciou"] == pytest.approx(i0 / (u0 + 0 + 3 + 1e-8), rel=1e-12)
    assert out["giou"] == pytest.approx(sum(ious) / (3 + 1e-5), rel=1e-12)
    assert out["box_acc"] is None and out["box_miou"] is None
    assert [(r["I"], r["U"]) for r in m.records] == [(i0, u0), (0, 0), (0, 3)]


def test_ignore_only_target_differs_between_protocols():
    target = torch.full((2, 2), 255, dtype=torch.uint8)
    pred = torch.ones(2, 2, dtype=torch.bool)
    lens, std = SegmentationMetrics("lens"), SegmentationMetrics("standard")
    lens.update(pred[None], target[None])
    std.update(pred[None], target[None])
    assert lens.records[0]["U"] == 4 and lens.compute()["giou"] == 0.0  # 255 is background
    assert std.records[0]["U"] == 0 and std.compute()["giou"] == pytest.approx(1 / (1 + 1e-5))  # all excluded


def test_gt_as_prediction():
    gt_box = [0.0, 0.0, 2.0, 2.0]
    fg_std, _ = foreground_mask(TARGET, "standard")
    std = SegmentationMetrics("standard")
    std.update([fg_std], [TARGET], pred_boxes=[gt_box], gt_boxes=[gt_box])
    out = std.compute()
    assert out["ciou"] == pytest.approx(1.0, abs=1e-6)
    assert out["giou"] == pytest.approx(1.0, abs=1e-4)
    assert out["box_acc"] == 1.0 and out["box_miou"] == 1.0
    # the same prediction under the original protocol: overlap pixel (value 2) counts against it
    lens = SegmentationMetrics("lens")
    lens.update([fg_std], [TARGET])
    assert (lens.records[0]["I"], lens.records[0]["U"]) == (3, 4)
    assert lens.compute()["ciou"] == pytest.approx(0.75)


def test_box_metrics_hand():
    m = SegmentationMetrics("lens")
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    targets = torch.zeros(3, 2, 2, dtype=torch.uint8)
    gt = [[0, 0, 10, 10]] * 3
    m.update(masks, targets, pred_boxes=[[0, 0, 10, 10], None, [0, 0, 10, 20]], gt_boxes=gt)
    out = m.compute()
    # box IoUs 1, 0 (unparsed), 0.5 (counts as a hit: >= 0.5)
    assert out["box_acc"] == pytest.approx(2 / 3)
    assert out["box_miou"] == pytest.approx(0.5)
    assert [r["box_iou"] for r in m.records] == pytest.approx([1.0, 0.0, 0.5])


def test_update_validates_lengths():
    m = SegmentationMetrics()
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        m.update([PRED], [TARGET, TARGET])
    with pytest.raises(ValueError, match="pred_boxes has 2 entries, expected 1"):
        m.update([PRED], [TARGET], pred_boxes=[None, None], gt_boxes=[[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"sample 0: pred \(3, 3\) vs target \(2, 3\)"):
        m.update([PRED], [TARGET[:2]])
    assert m.records == []  # a rejected update leaves nothing behind


def _rank_records(protocol):
    """Two 'ranks' over 3 expressions; rank 1 repeats expression 'a' as sampler padding."""
    empty = torch.zeros(3, 3, dtype=torch.uint8)
    r0, r1 = SegmentationMetrics(protocol), SegmentationMetrics(protocol)
    gt = [[0, 0, 1, 1]] * 2
    r0.update([PRED, PRED], [TARGET, empty], ids=["a", "b"], pred_boxes=[[0, 0, 1, 1], None], gt_boxes=gt)
    no_pred = torch.zeros(3, 3, dtype=torch.bool)
    r1.update([no_pred, PRED], [empty, TARGET], ids=["c", "a"], pred_boxes=[[0, 0, 1, 2], [0, 0, 1, 1]], gt_boxes=gt)
    return r0, r1


@pytest.mark.parametrize("protocol", ["lens", "standard"])
def test_merge_deduplicates_by_id(protocol):
    r0, r1 = _rank_records(protocol)
    gathered = pickle.loads(pickle.dumps([r0.state_dict()["records"], r1.state_dict()["records"]]))
    merged = SegmentationMetrics.from_records([r for recs in gathered for r in recs], protocol)
    i0, u0 = HAND[protocol]
    out = merged.compute()
    assert out["n"] == 3
    # a: (i0, u0); b: PRED on empty target -> (0, 4) in both protocols; c: empty on empty -> (0, 0)
    assert out["ciou"] == pytest.approx(i0 / (u0 + 4 + 1e-8))
    assert out["giou"] == pytest.approx((i0 / (u0 + 1e-5) + 0.0 + 1.0) / (3 + 1e-5))
    assert out["box_acc"] == pytest.approx(2 / 3) and out["box_miou"] == pytest.approx(0.5)
    # merging into an existing accumulator skips ids it already holds
    assert r0.merge(r1.state_dict()["records"]) == 1
    assert r0.compute() == out
    state = merged.state_dict()
    assert (state["sum_I"], state["sum_U"], state["n"]) == (i0, u0 + 4, 3)
    assert SegmentationMetrics.from_state_dict(state).compute() == out


def test_records_without_ids_are_all_kept():
    m = SegmentationMetrics()
    m.update([PRED, PRED], [TARGET, TARGET])
    assert SegmentationMetrics.from_records(m.records * 2).compute()["n"] == 4


# ---------------------------------------------------------------------------- box versus mask

from lens.evaluation.analysis import box_mask_analysis, box_mask_case  # noqa: E402

# (I, U, box IoU): mask IoU = I / (U + 1e-5), or 1 for U == 0
BOX_MASK = [
    (8, 10, 0.3),   # mask 0.8 hits, box misses: mask rescues box; bin [0.25, 0.5)
    (1, 10, 0.9),   # box hits, mask 0.1 misses: box rescues mask; bin [0.75, 1]
    (5, 10, 0.5),   # box 0.5 hits (>=); mask 5 / (10 + 1e-5) < 0.5 misses: box rescues mask; bin [0.5, 0.75)
    (0, 0, 1.0),    # both hit (empty on empty: mask IoU 1); box IoU 1 falls in the closed last bin
    (0, 4, 0.0),    # both miss; bin [0, 0.25)
    (3, 4, None),   # no box IoU (e.g. a no-target reference): not counted
]


def test_box_mask_hand_computed():
    recs = [{"I": i, "U": u, "box_iou": b} for i, u, b in BOX_MASK]
    assert [box_mask_case(r) for r in recs] == ["mask_rescues_box", "box_rescues_mask", "box_rescues_mask",
                                                None, None, None]
    out = box_mask_analysis(recs)
    assert out["n_box"] == 5 and (out["n_mask_rescues_box"], out["n_box_rescues_mask"]) == (1, 2)
    assert out["mask_rescues_box"] == pytest.approx(1 / 5) and out["box_rescues_mask"] == pytest.approx(2 / 5)
    assert [(b["lo"], b["hi"], b["n"]) for b in out["bins"]] == [(0.0, 0.25, 1), (0.25, 0.5, 1), (0.5, 0.75, 1),
                                                                  (0.75, 1.0, 2)]
    means = [b["mask_miou"] for b in out["bins"]]
    assert means == pytest.approx([0.0, 8 / (10 + 1e-5), 5 / (10 + 1e-5), (1 / (10 + 1e-5) + 1.0) / 2], rel=1e-12)


def test_box_mask_bins_and_absent_boxes():
    recs = [{"I": 3, "U": 4, "box_iou": 0.2}, {"I": 2, "U": 2, "box_iou": 0.6}]
    out = box_mask_analysis(recs, bins=[0.0, 0.5, 1.0])
    assert [b["n"] for b in out["bins"]] == [1, 1] and out["bins"][0]["mask_miou"] == pytest.approx(3 / (4 + 1e-5))
    assert out["mask_rescues_box"] == 0.5 and out["box_rescues_mask"] == 0.0
    assert box_mask_analysis([{"I": 1, "U": 2, "box_iou": None}]) is None
    with pytest.raises(ValueError, match="increasing"):
        box_mask_analysis(recs, bins=[0.0, 0.5, 0.5, 1.0])


def test_markdown_box_mask_table():
    from lens.evaluation.report import results_markdown

    bvm = box_mask_analysis([{"I": i, "U": u, "box_iou": b} for i, u, b in BOX_MASK])
    res = {"refcoco_val": {"n": 6, "ciou": 0.5, "giou": 0.5, "box_acc": 0.6, "box_miou": 0.54, "time_s": 1.0,
                           "expressions_per_s": 6.0, "box_vs_mask": bvm}}
    md = results_markdown(res, "m", "lens")
    assert "| split | n box | mask rescues box | box rescues mask | box IoU [0.00, 0.25) |" in md
    assert "| refcoco_val | 5 | 20.0 | 40.0 | 0.0 (1) | 80.0 (1) | 50.0 (1) | 55.0 (2) |" in md
