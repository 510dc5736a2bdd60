"""GRPO reward functions with TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``.

Completions may be strings or conversational lists (``[{"role": "assistant", "content": ...}]``,
content a string or a list of text parts). Dataset columns arrive as kwargs lists with one entry per
completion. Every function returns finite floats in ``[0, 1]`` whatever the completion text; a
missing ground-truth column (or one of the wrong length) is a configuration error and raises.

Registry names (also the names TRL logs, since they are the functions' ``__name__``):
``answer_format``, ``think_format``, ``box_iou``, ``mask_iou``, ``mask_iou_linear``.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from lens import geometry

__all__ = [
    "REWARDS",
    "get_reward_funcs",
    "completion_text",
    "answer_format",
    "think_format",
    "box_iou",
    "mask_iou",
    "mask_iou_linear",
    "mask_iou_reward",
]

RewardFunc = Callable[..., list[float]]

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_NUM = r"-?\d+(?:\.\d+)?"
_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
# Optional referring phrase: wrapped in object-ref tokens, or (tokens stripped by decoding) plain text
# with no brackets; then the pair of corners, optionally wrapped in a matching box_start/box_end pair.
_SPECIAL_ANSWER = re.compile(
    r"(?:<\|object_ref_start\|>[^<>]{0,256}?<\|object_ref_end\|>|[^<>\[\](){}]{0,256}?)\s*"
    rf"(?P<open><\|box_start\|>)?\s*{_PAIR}\s*(?(open)<\|box_end\|>|)",
    re.DOTALL,
)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_MAX_JSON_CHARS = 10_000
_MAX_LITERAL_CHARS = 1_000


# ---------------------------------------------------------------------------- helpers
def completion_text(completion: Any) -> str:
    """Text of a completion: a string, a message dict, or a list of messages (last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            return "".join(t for t in texts if isinstance(t, str))
    return ""


def _strip_end_tokens(text: str) -> str:
    """Drop end-of-turn/pad tokens (kept when decoding with ``skip_special_tokens=False``) and whitespace."""
    for token in _END_TOKENS:
        text = text.replace(token, "")
    return text.strip()


def _finite_unit(value: Any) -> float:
    """``float(value)`` clamped to [0, 1]; 0.0 for anything non-numeric or non-finite."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return 0.0
    return min(1.0, max(0.0, x)) if math.isfinite(x) else 0.0


def _score_all(completions: Sequence[Any], score: Callable[[int, str], float]) -> list[float]:
    """Apply ``score(index, text)`` to each completion; any failure scores 0.0."""
    out = []
    for i, completion in enumerate(completions):
        try:
            value = _finite_unit(score(i, completion_text(completion)))
        except Exception:  # a reward must never crash training; malformed input scores 0
            value = 0.0
        out.append(value)
    return out


def _column(name: str, values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    """Check a kwargs column exists and has one entry per completion."""
    if values is None:
        raise ValueError(f"reward needs the dataset column {name!r}")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} entries for {n} completions")
    return values


def _valid_corners(values: Sequence[Any]) -> bool:
    """Four finite numbers with x1 < x2 and y1 < y2."""
    box = geometry.as_box(values)
    return box is not None and box[0] < box[2] and box[1] < box[3]


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite JSON constant {token}")


def _is_json_box(text: str) -> bool:
    """One ``{"bbox_2d": [x1, y1, x2, y2]}`` object (or 1-element list of it), optionally fenced."""
    fenced = _FENCE.fullmatch(text)
    if fenced is not None:
        text = fenced.group(1)
    if len(text) > _MAX_JSON_CHARS:
        return False
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict) or not isinstance(obj.get("bbox_2d"), list):
        return False
    if any(key != "bbox_2d" and not isinstance(value, str) for key, value in obj.items()):
        return False  # extra keys may only carry text such as "label"
    box = obj["bbox_2d"]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    return len(box) == 4 and numeric and _valid_corners(box)


def _is_special_box(text: str) -> bool:
    """Special-token form ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` with an optional phrase before it."""
    match = _SPECIAL_ANSWER.fullmatch(text)
    if match is None:
        return False
    return _valid_corners([float(g) for g in match.groups()[1:]])


def _think_answer(text: str) -> str | None:
    """Answer content if ``text`` starts with exactly one think block followed by one answer block."""
    match = _THINK.match(text)
    if match is None:
        return None
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return None
    return match.group(1)


def _gt_box(value: Any) -> tuple[float, float, float, float] | None:
    """Ground-truth box from a list/tuple/tensor, or a string like ``"[1, 2, 3, 4]"`` (never ``eval``)."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_LITERAL_CHARS:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return geometry.as_box(value)


# ---------------------------------------------------------------------------- rewards
def answer_format(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for a well-formed single-box answer (JSON ``bbox_2d`` or special-token corners), else 0.0.

    End tokens and surrounding whitespace are ignored. For a CoT completion that is exactly
    ``<think>...</think><answer>...</answer>``, the answer block's content is checked.
    """

    def score(_: int, text: str) -> float:
        text = _strip_end_tokens(text)
        answer = _think_answer(text)
        if answer is not None and _THINK.fullmatch(text) is not None:
            text = answer.strip()
        return float(_is_json_box(text) or _is_special_box(text))

    return _score_all(completions, score)


def think_format(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion starts with ``<think>..</think>`` then ``<answer>..</answer>`` (one of each)."""
    return _score_all(completions, lambda _, text: float(_think_answer(text) is not None))


def box_iou(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    box_llm: Sequence[Any] | None = None,
    solution: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """IoU² of the predicted box (``<answer>`` block first, else first box in the text) vs the GT box.

    GT comes from ``box_llm`` (4 numbers, LLM-image pixels) or, failing that, ``solution`` strings.
    """
    if box_llm is not None:
        gts = _column("box_llm", box_llm, len(completions))
    else:
        gts = _column("box_llm (or solution)", solution, len(completions))

    def score(i: int, text: str) -> float:
        return geometry.box_iou(geometry.parse_answer_box(text), _gt_box(gts[i])) ** 2

    return _score_all(completions, score)


def mask_iou_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    mask_iou: Sequence[Any] | None = None,
    square: bool = True,
    **kwargs: Any,
) -> list[float]:
    """Precomputed per-rollout mask IoU (``mask_iou`` kwarg, set by the trainer), squared by default."""
    ious = _column("mask_iou", mask_iou, len(completions))
    return _score_all(completions, lambda i, _: _finite_unit(ious[i]) ** (2 if square else 1))


def mask_iou(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Mask IoU² (the original LENS setting)."""
    return mask_iou_reward(prompts, completions, square=True, **kwargs)


def mask_iou_linear(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Mask IoU, not squared."""
    return mask_iou_reward(prompts, completions, square=False, **kwargs)


REWARDS: dict[str, RewardFunc] = {
    "answer_format": answer_format,
    "think_format": think_format,
    "box_iou": box_iou,
    "mask_iou": mask_iou,
    "mask_iou_linear": mask_iou_linear,
}


def get_reward_funcs(names: Sequence[str]) -> list[RewardFunc]:
    """Reward functions by registry name; ValueError naming any unknown ones."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; valid names: {', '.join(sorted(REWARDS))}")
    return [REWARDS[n] for n in names]
