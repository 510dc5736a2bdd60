"""Reward functions: hand-made completions, registry and fuzzing."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lens.prompts import grounding_answer, json_answer
from lens.rewards import (
    REWARDS,
    answer_format,
    box_iou,
    completion_text,
    get_reward_funcs,
    mask_iou,
    mask_iou_linear,
    mask_iou_reward,
    think_format,
)

GT = [0, 0, 10, 10]


def _one(func, completion, **kwargs):
    out = func(["prompt"], [completion], **{k: [v] for k, v in kwargs.items()})
    assert len(out) == 1 and isinstance(out[0], float)
    return out[0]


# ---------------------------------------------------------------------------- box_iou
@pytest.mark.parametrize(
    "completion, expected",
    [
        ('{"bbox_2d": [5, 5, 15, 15]}', (25 / 175) ** 2),
        ("[0, 0, 10, 20]", 0.25),  # IoU 0.5 -> 0.25
        (grounding_answer("cup", [0, 0, 10, 10]), 1.0),
        ("the answer is (0, 0),(5, 10)", 0.25),
        ("<think>first [5, 5, 15, 15]</think><answer>" + json_answer([0, 0, 10, 10]) + "</answer>", 1.0),
        ("<think>only here [0, 0, 10, 20]</think><answer>no box</answer>", 0.25),  # falls back
        ("no box at all", 0.0),
        ("[20, 20, 30, 30]", 0.0),
        ("[3, 3, 3, 3]", 0.0),
        ("", 0.0),
    ],
)
def test_box_iou_reward_values(completion, expected):
    assert _one(box_iou, completion, box_llm=GT) == pytest.approx(expected)


def test_box_iou_accepts_solution_strings_and_conversations():
    conv = [{"role": "assistant", "content": "[0, 0, 10, 20]"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "[0, 0, 10, 20]"}]}]
    assert _one(box_iou, conv, solution="[0, 0, 10, 10]") == pytest.approx(0.25)
    assert _one(box_iou, parts, solution="(0, 0, 10, 10)") == pytest.approx(0.25)  # literal_eval path
    assert _one(box_iou, conv, box_llm=(0.0, 0.0, 10.0, 10.0)) == pytest.approx(0.25)
    for bad_gt in ["__import__('os')", "[1, 2, 3]", "NaN", "[0, 0, 1e309, 1]", None, "x" * 5000]:
        assert _one(box_iou, conv, solution=bad_gt) == 0.0


def test_box_iou_prefers_box_llm_and_checks_columns():
    completions = ["[0, 0, 10, 10]"] * 2
    out = box_iou([None] * 2, completions, box_llm=[GT, [0, 0, 10, 20]], solution=["[9, 9, 9, 9]"] * 2)
    assert out == pytest.approx([1.0, 0.25])
    with pytest.raises(ValueError, match=r"reward needs the dataset column 'box_llm \(or solution\)'"):
        box_iou([None], ["[0, 0, 1, 1]"])
    with pytest.raises(ValueError, match="column 'box_llm' has 2 entries for 1 completions"):
        box_iou([None], ["[0, 0, 1, 1]"], box_llm=[GT, GT])


# ---------------------------------------------------------------------------- answer_format
@pytest.mark.parametrize(
    "completion",
    [
        '{"bbox_2d": [1, 2, 30, 40]}',
        ' {"bbox_2d": [1.5, 2, 30, 40]}<|im_end|>',
        '```json\n[\n\t{"bbox_2d": [1, 2, 30, 40], "label": "cup"}\n]\n```',
        "```\n{\"bbox_2d\": [1, 2, 30, 40]}\n```",
        grounding_answer("the red cup", [1, 2, 30, 40]) + "<|im_end|>",
        "<|box_start|>(1,2),(30,40)<|box_end|>",
        "the red cup.(1,2),(30,40)",  # special tokens stripped by decoding
        "(1, 2), (30, 40)",
        "<think>looking</think><answer>" + json_answer([1, 2, 30, 40]) + "</answer>",
    ],
)
def test_answer_format_accepts(completion):
    assert _one(answer_format, completion) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "[1, 2, 30, 40]",  # bare list is not the JSON object form
        '{"bbox_2d": [1, 2, 30, 40]} and more text',
        '[{"bbox_2d": [1, 2, 30, 40]}, {"bbox_2d": [5, 6, 70, 80]}]',
        '{"bbox_2d": [30, 2, 1, 40]}',  # x1 > x2
        '{"bbox_2d": [1, 2, 1, 40]}',  # zero width
        '{"bbox_2d": [1, 2, 30]}',
        '{"bbox_2d": [1, 2, 30, NaN]}',
        '{"bbox_2d": [1, 2, 1e309, 40]}',
        '{"bbox_2d": [true, 2, 30, 40]}',
        '{"bbox_2d": ["1", 2, 30, 40]}',
        '{"bbox_2d": [1, 2, 30, 40], "bbox_2d_2": [1, 2, 3, 4]}',
        '{"box": [1, 2, 30, 40]}',
        "(1,2),(30,40),(50,60)",
        "(30,40),(1,2)",
        "<|box_start|>(1,2),(30,40)",  # unpaired box token
        "(1,2),(30,40) trailing words",
        "<think>a</think><think>b</think><answer>" + json_answer([1, 2, 30, 40]) + "</answer>",
    ],
)
def test_answer_format_rejects(completion):
    assert _one(answer_format, completion) == 0.0


# ---------------------------------------------------------------------------- think_format
@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reasoning\nmore</think>\n<answer>[1, 2, 3, 4]</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>a</think><answer>b</answer> trailing text", 1.0),  # re.match semantics, as upstream
        (" <think>a</think><answer>b</answer>", 0.0),  # must start with <think>
        ("<answer>b</answer><think>a</think>", 0.0),
        ("<think>a</think>", 0.0),
        ("<think>a<answer>b</answer>", 0.0),
        ("<think>a</think><answer>b", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
        ("<think><think>a</think></think><answer>b</answer>", 0.0),
        ("<think>a</think> text <answer>b</answer>", 0.0),
    ],
)
def test_think_format(completion, expected):
    assert _one(think_format, completion) == expected


# ---------------------------------------------------------------------------- mask_iou
def test_mask_iou_squared_and_linear():
    ious = [0.5, 0.9, 1.0, 0.0, float("nan"), -0.3, 1.7, "junk", None, float("inf")]
    completions = ["x"] * len(ious)
    assert mask_iou(None, completions, mask_iou=ious) == pytest.approx(
        [0.25, 0.81, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    )
    assert mask_iou_linear(None, completions, mask_iou=ious) == pytest.approx(
        [0.5, 0.9, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    )
    assert mask_iou_reward(None, ["x"], mask_iou=[0.5], square=False) == [0.5]
    with pytest.raises(ValueError, match="reward needs the dataset column 'mask_iou'"):
        mask_iou(None, ["x"])


def test_mask_iou_accepts_tensors():
    torch = pytest.importorskip("torch")
    assert mask_iou(None, ["a", "b"], mask_iou=list(torch.tensor([0.5, 0.1]))) == pytest.approx([0.25, 0.01])


# ---------------------------------------------------------------------------- registry
def test_registry_and_unknown_names():
    assert set(REWARDS) == {"answer_format", "think_format", "box_iou", "mask_iou", "mask_iou_linear"}
    assert get_reward_funcs(["box_iou", "mask_iou"]) == [box_iou, mask_iou]
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['bogus'\]; valid names: ") as err:
        get_reward_funcs(["box_iou", "bogus"])
    valid = str(err.value).split("valid names: ")[1].split(", ")
    assert valid == sorted(REWARDS)


def test_trl_logs_registry_names():
    from trl.trainer.utils import get_callable_name

    assert {name: get_callable_name(f) for name, f in REWARDS.items()} == {n: n for n in REWARDS}


def test_trl_style_kwargs_are_ignored():
    out = box_iou(
        ["p"], ["[0, 0, 10, 10]"], box_llm=[GT], completion_ids=[[1, 2]], trainer_state=object(),
        log_extra=lambda *a: None, log_metric=lambda *a: None, image=[None],
    )
    assert out == [1.0]


def test_completion_text_forms():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "x"}]) == "x"
    parts = {"content": [{"type": "text", "text": "a"}, {"type": "image"}, {"text": "b"}, {"text": 3}]}
    assert completion_text(parts) == "ab"
    assert completion_text(None) == "" and completion_text([]) == "" and completion_text(42) == ""


# ---------------------------------------------------------------------------- fuzzing
_NUMBERS = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e309", "-0", "NaN", "Infinity", "9" * 400, "1.", ".5", "-", ""]),
)
_BOXES = st.lists(_NUMBERS, min_size=0, max_size=6).flatmap(
    lambda nums: st.sampled_from(
        [
            "[" + ", ".join(nums) + "]",
            '{"bbox_2d": [' + ", ".join(nums) + "]}",
            "```json\n[{\"bbox_2d\": [" + ",".join(nums) + "]}]\n```",
            "<|box_start|>(" + ",".join(nums[:2]) + "),(" + ",".join(nums[2:4]) + ")<|box_end|>",
            "(" + ", ".join(nums) + ")",
        ]
    )
)
_PIECES = st.one_of(
    _BOXES,
    st.text(max_size=20),
    st.sampled_from(
        ["<think>", "</think>", "<answer>", "</answer>", "<|im_end|>", "<|endoftext|>"]
        + ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]
        + ["```", "{", "}", "[", "]", "\u202e", "\x00", "🙂"]
    ),
)
_ADVERSARIAL = st.lists(_PIECES, max_size=8).map("".join)
_COMPLETIONS = st.one_of(
    st.text(),
    _ADVERSARIAL,
    _ADVERSARIAL.map(lambda t: [{"role": "assistant", "content": t}]),
    _ADVERSARIAL.map(lambda t: [{"role": "assistant", "content": [{"type": "text", "text": t}]}]),
    st.sampled_from([None, 3, [], [{}], {"content": None}, [[["deep"]]]]),
)
_GTS = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=5),
    st.text(max_size=30),
    _BOXES,
    st.just([0, 0, 10, 10]),
)


def _check(values, n):
    assert isinstance(values, list) and len(values) == n
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0


@settings(max_examples=250, deadline=None)
@given(st.lists(_COMPLETIONS, min_size=1, max_size=3), _GTS, st.one_of(st.floats(), st.text(max_size=5)))
def test_all_rewards_fuzz(completions, gt, iou):
    n = len(completions)
    kwargs = {"box_llm": [gt] * n, "solution": [str(gt)] * n, "mask_iou": [iou] * n}
    for func in REWARDS.values():
        _check(func([None] * n, completions, **kwargs), n)
    _check(box_iou([None] * n, completions, solution=[str(gt)] * n), n)
