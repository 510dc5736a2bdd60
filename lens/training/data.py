"""Training data: sources by name, teacher-forced batches (warm-up, stage 1) and GRPO rows (stage 2)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lens.data import registry
from lens.data.base import Reference
from lens.data.dataset import GroundingDataset
from lens.distinct import distinct_index
from lens.prompts import build_messages, grounding_answer, json_answer, phrase_answer


def load_source(name: str, data_root: str | Path) -> list[Reference]:
    """One training source (`refcoco:train`, `grefcoco:val`, `reasonseg:train`, `custom:path.jsonl`, ...) from the
    one dataset registry, `lens.data.registry.load_source`."""
    return registry.load_source(name, data_root)


def load_sources(names: Sequence[str], data_root: str | Path) -> list[Reference]:
    refs = [ref for name in names for ref in load_source(name, data_root)]
    if not refs:
        raise ValueError(f"training sources {list(names)} under {data_root} hold no references")
    return refs


def target_answer(item: dict[str, Any], style: str) -> str:
    """Teacher-forced answer: `grounding` (Qwen special tokens, upstream stage 1), `json` (bbox_2d) or `phrase`
    (the grounding answer without its box: for an LM that cannot yet ground in text, e.g. the tiny preset)."""
    if style == "grounding":
        return grounding_answer(item["expression"], item["box_llm"])
    if style == "phrase":
        return phrase_answer(item["expression"])
    if style == "json":
        return json_answer(item["box_llm"])
    raise ValueError(f"answer style {style!r}; expected 'grounding', 'json' or 'phrase'")


def unique_images(items: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack each distinct image's SAM input once: (N, 3, S, S), row -> image index (B,), image keys."""
    first, index = distinct_index([it["image_id"] for it in items])
    return torch.stack([items[r]["sam_image"] for r in first]), index, [items[r]["image_id"] for r in first]


class SupervisedCollator:
    """Prompt + ground-truth answer, left padded; labels on the answer tokens only; SAM images once per image.

    Prompt strings are rendered once per (expression, question template) and kept (`max_prompts`, least recently
    used dropped): Jinja rendering cost about 4 ms of a 16-row batch, and expressions repeat every epoch."""

    def __init__(self, processor, answer_style: str = "grounding", max_prompts: int = 65536) -> None:
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.answer_style = answer_style
        self.max_prompts = max_prompts
        self._prompts: OrderedDict[tuple[str, str], str] = OrderedDict()

    def prompt(self, expression: str, question_template: str) -> str:
        """The chat-template text of one question (generation prompt added), from the memo when there."""
        key = (expression, question_template)
        text = self._prompts.get(key)
        if text is None:
            text = self.processor.apply_chat_template(
                build_messages(expression, question_template), add_generation_prompt=True, tokenize=False
            )
            self._prompts[key] = text
            if len(self._prompts) > self.max_prompts:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return text

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.processor.tokenizer
        answers = [target_answer(it, self.answer_style) + tok.eos_token for it in items]
        prompts = [self.prompt(it["expression"], it["question_template"]) for it in items]
        enc = self.processor(
            text=[p + a for p, a in zip(prompts, answers)], images=[it["image"] for it in items],
            padding=True, return_tensors="pt",
        )
        # answer lengths in tokens (B,), one tokenizer call for the batch
        n_answer = torch.tensor([len(ids) for ids in tok(answers, add_special_tokens=False)["input_ids"]])
        positions = torch.arange(enc["input_ids"].shape[1])
        labels = enc["input_ids"].masked_fill(positions[None, :] < enc["input_ids"].shape[1] - n_answer[:, None], -100)
        sam_images, index, keys = unique_images(items)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"],
            "mm_token_type_ids": enc.get("mm_token_type_ids"),
            "labels": labels,
            "sam_images": sam_images,
            "sam_image_index": index,
            "image_keys": keys,
            "target_masks": [torch.from_numpy(it["mask"] == 1) for it in items],
        }


def grpo_row(item: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """One GRPO row for TRL: conversational `prompt`, the LLM `image`, and the columns the rewards and the
    segmentation loss need (`box_llm`, `mask`, `sam_image`, `image_id`)."""
    kwargs = {} if system_prompt is None else {"system": system_prompt}
    return {
        "prompt": build_messages(item["expression"], item["question_template"], **kwargs),
        "image": item["image"],
        "box_llm": item["box_llm"] if item["has_box"] else None,
        "mask": item["mask"],
        "sam_image": item["sam_image"],
        "image_id": item["image_id"],
        "ref_id": item["ref_id"],
    }


def grpo_dataset(dataset: GroundingDataset, system_prompt: str | None = None):
    """A `datasets.Dataset` of indices whose rows are built lazily from `dataset` (TRL needs an HF Dataset;
    nothing is materialised, so RefCOCO-sized sources cost no memory up front)."""
    from datasets import Dataset as HFDataset

    rows = HFDataset.from_dict({"index": list(range(len(dataset)))})

    def transform(batch: dict[str, list]) -> dict[str, list]:
        built = [grpo_row(dataset[i], system_prompt) for i in batch["index"]]
        return {key: [row[key] for row in built] for key in built[0]}

    rows.set_transform(transform)
    return rows
