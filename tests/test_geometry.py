"""Box parsing and IoU helpers."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens import geometry
from lens.geometry import (
    as_box,
    box_iou,
    box_iou_pairs,
    extract_answer,
    mask_iou_pairs,
    parse_answer_box,
    parse_box,
)


@pytest.mark.parametrize(
    "text, box",
    [
        ("[1, 2, 3, 4]", [1, 2, 3, 4]),
        ('{"bbox_2d": [12, 5, 300, 200]}', [12, 5, 300, 200]),
        ("box: (1.5, -2, 3, 4.25)", [1.5, -2, 3, 4.25]),
        ("<|box_start|>(10,20),(30,40)<|box_end|>", [10, 20, 30, 40]),
        ("[ 1,2,  3,\n4 ]", [1, 2, 3, 4]),  # whitespace after commas and at the ends
        ("( 7, 8),( 9, 10)", [7, 8, 9, 10]),
    ],
)
def test_parse_box_patterns(text, box):
    assert parse_box(text) == pytest.approx(box)


def test_bracket_pattern_wins_over_earlier_parentheses():
    assert parse_box("(1, 2, 3, 4) then [5, 6, 7, 8]") == [5, 6, 7, 8]
    assert parse_box("(1,2),(3,4) then (5, 6, 7, 8)") == [5, 6, 7, 8]
    assert parse_box("[1, 2, 3, 4] and [5, 6, 7, 8]") == [1, 2, 3, 4]  # first match of a pattern


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no numbers here",
        "[1, 2, 3]",
        "[1 ,2,3,4]",  # no whitespace before commas, as the original patterns
        "[1, 2, 3, 4, 5]",
        "[a, b, c, d]",
        "[1e3, 2, 3, 4]",
        "[" + "9" * 400 + ", 1, 2, 3]",  # overflows to inf: treated as malformed
    ],
)
def test_parse_box_none(text):
    assert parse_box(text) is None


@pytest.mark.parametrize("value", [None, 5, b"[1, 2, 3, 4]", ["[1, 2, 3, 4]"]])
def test_parse_box_non_string(value):
    assert parse_box(value) is None


_BOXY_PIECES = ["<answer>", "</answer>", "[1, 2, 3, 4]", "(5, 6),(7, 8)", "(1.5, 2, 3, 4)", "[9, 9, 9]", "9" * 400]
_BOXY = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(_BOXY_PIECES)), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _BOXY))
def test_parse_box_fuzz(text):
    box = parse_box(text)
    assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))
    answer = extract_answer(text)
    from_answer = parse_box(answer) if answer is not None else None
    # the answer block's box when it has one, else the whole text's
    assert parse_answer_box(text) == (from_answer if from_answer is not None else box)
    assert parse_answer_box(text, fallback=False) == (from_answer if answer is not None else box)


class _CountingPattern:
    """A compiled pattern that counts its searches and the characters each search is given."""

    def __init__(self, pattern, log):
        self.pattern, self.log = pattern, log

    def search(self, text, *args):
        self.log.append((self.pattern.pattern, len(text)))
        return self.pattern.search(text, *args)


@pytest.mark.parametrize("text, box", [("[" + "1" * 50_000, None), ("[1, " * 20_000, None),
                                       ("(1, 2)," * 20_000, [1, 2, 1, 2]), ("( " * 30_000 + "1", None)])
def test_parse_box_adversarial_input_is_one_pass_per_pattern(text, box, monkeypatch):
    # Work counted instead of timed: each of the three patterns searches the text once (no retries, no splitting
    # into pieces), the last pattern only once the others found nothing. The patterns have no nested quantifiers, so one search
    # is linear in the text.
    originals = geometry._BOX_PATTERNS
    log = []
    monkeypatch.setattr(geometry, "_BOX_PATTERNS", tuple(_CountingPattern(p, log) for p in originals))
    assert parse_box(text) == box
    assert log == [(p.pattern, len(text)) for p in originals]
    for p in originals:
        assert not re.search(r"\)[*+{]", p.pattern), p.pattern  # no quantified group that could backtrack


def test_answer_block_first_then_fallback():
    text = "<think>maybe [1, 2, 3, 4]</think><answer>{\"bbox_2d\": [5, 6, 7, 8]}</answer>"
    assert parse_answer_box(text) == [5, 6, 7, 8]
    assert parse_box(text) == [1, 2, 3, 4]  # the whole-text parse takes the first match
    no_box = "<think>[1, 2, 3, 4]</think><answer>none</answer>"
    assert parse_answer_box(no_box) == [1, 2, 3, 4]
    assert parse_answer_box(no_box, fallback=False) is None
    assert parse_answer_box("<answer>[1, 2, 3, 4]") == [1, 2, 3, 4]  # unclosed: whole text
    assert extract_answer("<answer>a</answer><answer>b</answer>") == "b"


def test_box_iou_hand_values():
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 20]) == pytest.approx(0.5)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching, no +1
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


@pytest.mark.parametrize(
    "a, b",
    [
        ([5, 5, 5, 5], [5, 5, 5, 5]),  # zero union (upstream divided by zero)
        (None, [0, 0, 1, 1]),
        ([0, 0, 1], [0, 0, 1, 1]),
        ([0, 0, float("nan"), 1], [0, 0, 1, 1]),
        ([0, 0, float("inf"), 1], [0, 0, 1, 1]),
        ([0, 0, 1e308, 1e308], [-1e308, -1e308, 1e308, 1e308]),
        ("0011", [0, 0, 1, 1]),
    ],
)
def test_box_iou_degenerate_is_zero(a, b):
    assert box_iou(a, b) == 0.0


def test_as_box():
    assert as_box(torch.tensor([1, 2, 3, 4])) == (1.0, 2.0, 3.0, 4.0)
    assert as_box("1234") is None
    assert as_box([[1, 2, 3, 4]]) is None


def test_box_iou_pairs_matches_scalar():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=gen) * 50
    wh = torch.rand(64, 2, generator=gen) * 30
    a = torch.cat([xy, xy + wh], 1)
    b = a + torch.randn(64, 4, generator=gen) * 8
    b[0] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    a[0] = b[0]  # zero union row
    out = box_iou_pairs(a, b)
    assert out.shape == (64,)
    expected = [box_iou(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    assert out.tolist() == pytest.approx(expected, abs=1e-9)
    assert out[0] == 0


def test_mask_iou_pairs_hand():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    target = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    out = mask_iou_pairs(pred, target)
    assert out.tolist() == pytest.approx([1 / (3 + 1e-6), 0.0])
