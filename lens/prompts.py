"""Prompt text and chat-message builders.

The strings are the data LENS was trained with (system prompt, question templates); the builders
emit the ``transformers`` multimodal chat format that ``processor.apply_chat_template`` accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "SYSTEM_PROMPT",
    "QUESTION_TEMPLATES",
    "format_question",
    "build_messages",
    "grounding_answer",
    "phrase_answer",
    "json_answer",
    "NO_TARGET_ANSWER",
    "no_target_answer",
    "is_no_target_answer",
]

# The trailing space is part of the original prompt; keep it so tokenisation matches released weights.
SYSTEM_PROMPT = "You are a helpful assistant. "

_SAMR1_V4 = "".join(
    [
        'Locate "{question}", report the bbox coordinates in JSON format.',
        "Compare the difference between objects and find the most closely matched one.",
        "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
        "Output the one bbox inside the interested object in JSON format.",
        "i.e., <think>thinking process here</think><answer>answer here</answer>",
    ]
)

QUESTION_TEMPLATES: dict[str, str] = {
    "pr1_grounding": "Output the bounding box of the {question} in the image.",
    "samr1_v4": _SAMR1_V4,
    "default": "{question}",
}


def format_question(question: str, template: str = "pr1_grounding") -> str:
    """Fill ``question`` into the named template (plain substitution, braces in the question are safe)."""
    if template not in QUESTION_TEMPLATES:
        valid = ", ".join(sorted(QUESTION_TEMPLATES))
        raise ValueError(f"unknown question template {template!r}; valid names: {valid}")
    return QUESTION_TEMPLATES[template].replace("{question}", question)


def build_messages(
    question: str, template: str = "pr1_grounding", system: str | None = SYSTEM_PROMPT
) -> list[dict]:
    """Chat messages for one image + question: optional system turn, then a user turn (image, text).

    ``system=None`` (or ``""``) omits the system message.
    """
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    user_content = [{"type": "image"}, {"type": "text", "text": format_question(question, template)}]
    messages.append({"role": "user", "content": user_content})
    return messages


def _int_box(box: Sequence[float]) -> list[int]:
    """Round a 4-number box to integers; ValueError on wrong length or non-finite values."""
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected 4 finite numbers, got {box!r}")
    return [int(round(v)) for v in values]


def grounding_answer(sentence: str, box_llm: Sequence[float]) -> str:
    """Stage-1 teacher-forced answer in Qwen's special-token grounding format (integer LLM pixels)."""
    x1, y1, x2, y2 = _int_box(box_llm)
    return (
        f"<|object_ref_start|>{sentence}.<|object_ref_end|>"
        f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    )


def phrase_answer(sentence: str) -> str:
    """The referring phrase in Qwen's object-ref tokens, no box (the tiny preset's LM cannot ground in text)."""
    return f"<|object_ref_start|>{sentence}.<|object_ref_end|>"


def json_answer(box: Sequence[float]) -> str:
    """Qwen2.5-VL JSON grounding answer, e.g. ``{"bbox_2d": [1, 2, 3, 4]}`` (used inside ``<answer>``)."""
    x1, y1, x2, y2 = _int_box(box)
    return f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}'


# ---------------------------------------------------------------------------- no-target answers (GRES)
#: What a LENS answer says when the expression names nothing in the image (generalized RES, gRefCOCO).
NO_TARGET_ANSWER = "no target"
_NO_TARGET = re.compile(
    r"\bno[\s_-]+(?:such\s+|matching\s+)?(?:target|object|region)s?\b"
    r"|\bnot\s+(?:present|visible|in\s+the\s+image)\b"
    r"|\b(?:does|do)\s*(?:not|n't)\s+exist\b",
    re.IGNORECASE,
)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def no_target_answer(cot: bool = False) -> str:
    """The answer text for "nothing matches": ``no target`` (inside ``<answer>`` for CoT completions)."""
    return f"<answer>{NO_TARGET_ANSWER}</answer>" if cot else NO_TARGET_ANSWER


def is_no_target_answer(text: str) -> bool:
    """True when an answer says that nothing matches: a no-target phrase and no box.

    The last ``<answer>`` block is read when there is one (so think text may discuss absent objects),
    else the whole text. Phrases: "no target", "no object", "no such/matching target/object/region"
    (plural too), "not present", "not visible", "not in the image", "does not exist". A box that
    :func:`lens.geometry.parse_box` finds in the same text makes it a box answer instead.
    """
    from lens.geometry import parse_box  # lazy: geometry pulls in torch
    if not isinstance(text, str):
        return False
    blocks = _ANSWER_BLOCK.findall(text)
    body = blocks[-1] if blocks else text
    return _NO_TARGET.search(body) is not None and parse_box(body) is None
