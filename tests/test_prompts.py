"""Prompt strings and chat-message builders."""

import json

import pytest

from lens.geometry import parse_answer_box, parse_box
from lens.prompts import (
    QUESTION_TEMPLATES,
    SYSTEM_PROMPT,
    build_messages,
    format_question,
    grounding_answer,
    json_answer,
    phrase_answer,
)

SAMR1_V4 = (
    'Locate "{question}", report the bbox coordinates in JSON format.Compare the difference between '
    "objects and find the most closely matched one.Output the thinking process in <think> </think> and "
    "final answer in <answer> </answer> tags.Output the one bbox inside the interested object in JSON "
    "format.i.e., <think>thinking process here</think><answer>answer here</answer>"
)


def test_system_prompt_keeps_trailing_space():
    assert SYSTEM_PROMPT == "You are a helpful assistant. "


def test_templates_exact_text():
    assert QUESTION_TEMPLATES["pr1_grounding"] == "Output the bounding box of the {question} in the image."
    assert QUESTION_TEMPLATES["default"] == "{question}"
    assert QUESTION_TEMPLATES["samr1_v4"] == SAMR1_V4


def test_format_question_fills_and_tolerates_braces():
    assert format_question("red cup") == "Output the bounding box of the red cup in the image."
    assert format_question("a {weird} one", "default") == "a {weird} one"
    assert format_question("dog", "samr1_v4").startswith('Locate "dog", report')


def test_build_messages_structure():
    msgs = build_messages("red cup")
    assert msgs == [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant. "}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Output the bounding box of the red cup in the image."},
            ],
        },
    ]


def test_build_messages_without_system_and_other_template():
    msgs = build_messages("dog", template="default", system=None)
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"][1]["text"] == "dog"


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match="unknown question template 'nope'; valid names: ") as err:
        build_messages("x", template="nope")
    for name in ("pr1_grounding", "samr1_v4", "default"):
        assert name in str(err.value).split("valid names: ")[1]


def test_grounding_answer_exact_and_rounded():
    assert grounding_answer("red cup", [10, 20, 30, 40]) == (
        "<|object_ref_start|>red cup.<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
    )
    assert "(10,20),(31,40)" in grounding_answer("x", [10.2, 19.6, 30.5001, 40.0])
    assert parse_box(grounding_answer("x", [1, 2, 3, 4])) == [1.0, 2.0, 3.0, 4.0]


def test_phrase_answer_is_the_grounding_answer_without_its_box():
    assert phrase_answer("red cup") == "<|object_ref_start|>red cup.<|object_ref_end|>"
    assert grounding_answer("red cup", [1, 2, 3, 4]).startswith(phrase_answer("red cup"))
    assert parse_answer_box(phrase_answer("the red cup on the left")) is None  # no box: box reward 0


def test_json_answer():
    text = json_answer([1, 2.4, 3, 4])
    assert text == '{"bbox_2d": [1, 2, 3, 4]}'
    assert json.loads(text) == {"bbox_2d": [1, 2, 3, 4]}


@pytest.mark.parametrize("bad", [[1, 2, 3], [1, 2, 3, float("nan")], [0, 0, float("inf"), 1]])
def test_answers_reject_bad_boxes(bad):
    with pytest.raises(ValueError, match="expected 4 finite numbers, got "):
        json_answer(bad)
    with pytest.raises(ValueError, match="expected 4 finite numbers, got "):
        grounding_answer("x", bad)
