"""The teacher-forced collator (warm-up, stage 1): labels on the answer tokens only, prompts memoised exactly."""

from __future__ import annotations

import pytest
import torch

from lens.data.dataset import GroundingDataset
from lens.data.refer import load_refer
from lens.prompts import build_messages
from lens.training.data import SupervisedCollator, target_answer


@pytest.fixture(scope="module")
def processor():
    from lens.modeling.tiny_processor import build_tiny_processor

    return build_tiny_processor()


@pytest.fixture(scope="module")
def items(synthetic_root):
    refs = load_refer(synthetic_root, "refcoco", "train")
    ds = GroundingDataset(refs, max_pixels=12544, min_pixels=3136, sam_size=256, seed=0)
    return [ds[i] for i in range(5)]


@pytest.mark.parametrize("style", ["phrase", "json"])
def test_labels_are_the_answer_tokens_and_nothing_else(processor, items, style):
    batch = SupervisedCollator(processor, style)(items)
    tok = processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == len(items)
    for row, item in enumerate(items):
        answer = tok(target_answer(item, style) + tok.eos_token, add_special_tokens=False)["input_ids"]
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == answer  # the answer's own tokens, in order
        n = len(answer)
        assert ids[row, -n:].tolist() == answer  # ... at the end of the left-padded row
        assert (labels[row, :-n] == -100).all()
    assert (mask[:, -1] == 1).all() and (mask == 0).any()  # left padding: rows of different lengths


def test_prompt_memo_returns_the_chat_template_text_and_stays_bounded(processor, items):
    collator = SupervisedCollator(processor, "phrase", max_prompts=2)
    for item in items[:3]:
        expected = processor.apply_chat_template(build_messages(item["expression"], item["question_template"]),
                                                 add_generation_prompt=True, tokenize=False)
        assert collator.prompt(item["expression"], item["question_template"]) == expected
        assert collator.prompt(item["expression"], item["question_template"]) == expected  # from the memo
    assert len(collator._prompts) == 2
    assert list(collator._prompts)[-1] == (items[2]["expression"], items[2]["question_template"])
    # a batch through the memo equals a batch of a collator without one (memo of size 0 re-renders each prompt)
    memo = collator(items)
    fresh = SupervisedCollator(processor, "phrase", max_prompts=0)(items)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(memo[key], fresh[key]), key
