"""Tests of the offline tiny Qwen2.5-VL tokenizer/processor (lens.modeling.tiny_processor)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2Tokenizer

from lens.modeling import tiny_processor
from lens.modeling.tiny_processor import (
    CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    REASONING_TOKENS,
    build_tiny_processor,
    build_tiny_tokenizer,
    special_token_ids,
)

# Pinned so that a change of the built-in corpus (which changes every tiny
# model's numbers) is a deliberate decision: update the ids/fingerprint then.
EXPECTED_IDS = {
    "image_token_id": 1018,
    "video_token_id": 1019,
    "vision_start_token_id": 1015,
    "vision_end_token_id": 1016,
    "vision_token_id": 1017,
    "bos_token_id": 1006,
    "eos_token_id": 1008,
    "pad_token_id": 1006,
}
VOCAB_FINGERPRINT = "80cb17caed72f47552513a1b03d78d1062abef7287bd8e6a5ebecc7e68cea521"

GROUNDING = "Output the bounding box of the red circle in the image."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. "},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": GROUNDING}]},
]
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. <|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + GROUNDING + "<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MARKED = (
    "<|object_ref_start|>the red circle.<|object_ref_end|>"
    "<|box_start|>(12,34),(56,78)<|box_end|><|im_end|>"
)


@pytest.fixture(scope="module")
def processor() -> Qwen2_5_VLProcessor:
    return build_tiny_processor()


@pytest.fixture(scope="module")
def reloaded(processor, tmp_path_factory) -> Qwen2_5_VLProcessor:
    path = tmp_path_factory.mktemp("tiny_processor")
    processor.save_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def _image(w: int = 224, h: int = 224, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _fingerprint(tokenizer) -> str:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, model["merges"]]).encode()).hexdigest()


def test_build_trains_one_small_bpe_and_is_sized(monkeypatch):
    # The build's cost is one BPE training over the built-in corpus (no wall-clock limit: counted work instead).
    calls = []
    original = tiny_processor._train_bpe

    def counted(corpus, bpe_vocab_size):
        calls.append((len(corpus), sum(map(len, corpus)), bpe_vocab_size))
        return original(corpus, bpe_vocab_size)

    monkeypatch.setattr(tiny_processor, "_train_bpe", counted)
    processor = build_tiny_processor()
    assert len(calls) == 1
    n_lines, n_chars, bpe_size = calls[0]
    assert n_lines == len(tiny_processor.build_corpus()) and n_chars <= 250_000  # 2,510 lines, 190,853 characters
    assert bpe_size == 1024 - len(QWEN_SPECIAL_TOKENS) - len(REASONING_TOKENS)
    tok = processor.tokenizer
    assert isinstance(tok, Qwen2Tokenizer) and tok.is_fast
    assert len(tok) == 1024
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None and tok.padding_side == "left"
    assert tok.chat_template == CHAT_TEMPLATE and processor.chat_template == CHAT_TEMPLATE


def test_special_token_ids(processor):
    ids = special_token_ids(processor.tokenizer)
    assert ids == EXPECTED_IDS
    assert special_token_ids(processor) == ids  # a processor is accepted too
    assert processor.image_token_id == ids["image_token_id"]
    assert processor.video_token_id == ids["video_token_id"]
    # Qwen's order, contiguous, after the BPE part; then the reasoning tags.
    tok = processor.tokenizer
    all_ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS + REASONING_TOKENS))
    assert all_ids == list(range(1006, 1024))


def test_determinism():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert _fingerprint(a) == _fingerprint(b) == VOCAB_FINGERPRINT


def test_special_tokens_are_single_ids_and_round_trip(processor):
    tok = processor.tokenizer
    for token in QWEN_SPECIAL_TOKENS + REASONING_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tok.decode(ids, skip_special_tokens=False) == token
    ids = tok.encode(MARKED, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == MARKED
    assert tok.decode(ids, skip_special_tokens=True) == "the red circle.(12,34),(56,78)"
    # Reasoning tags are not "special": they survive skip_special_tokens (TRL decodes that way).
    cot = '<think>the man on the left</think><answer>{"bbox_2d": [1, 22, 333, 1000]}</answer><|im_end|>'
    ids = tok.encode(cot, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == cot
    assert tok.decode(ids, skip_special_tokens=True) == cot.replace("<|im_end|>", "")


def test_digits_are_split_individually(processor):
    tok = processor.tokenizer
    tokens = tok.tokenize("(12,34),(567,1000)")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("12345671000")
    for n in (0, 7, 42, 640, 999, 1000):
        assert tok.decode(tok.encode(str(n))) == str(n)
        assert len(tok.encode(str(n))) == len(str(n))
    text = 'Hello wörld ✓ 你好 {"bbox_2d": [0.5, -3]}\n\n  end'
    assert tok.decode(tok.encode(text)) == text  # byte level: any text round trips


def test_chat_template_rendering(processor):
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    assert (
        processor.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        == EXPECTED_PROMPT
    )
    # Without a system message Qwen's default one is inserted; plain-string content works.
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}],
        tokenize=False,
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    )
    # Image given inline (PIL under "image" / "image_url" keys) and video parts.
    parts = [{"type": "image_url", "image_url": "x.jpg"}, {"image": "y.jpg"}, {"type": "video"}, {"text": "?"}]
    rendered = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    assert rendered.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>?<|im_end|>\n"
    )


def test_save_load_round_trip(processor, reloaded):
    assert isinstance(reloaded, Qwen2_5_VLProcessor)
    a, b = processor.tokenizer, reloaded.tokenizer
    assert type(b).__name__ == "Qwen2Tokenizer"
    assert a.get_vocab() == b.get_vocab() and len(a) == len(b)
    assert special_token_ids(b) == EXPECTED_IDS
    assert b.padding_side == "left" and b.eos_token == "<|im_end|>" and b.pad_token == "<|endoftext|>"
    for text in (MARKED, EXPECTED_PROMPT, "<think>a</think><answer>[1, 2, 3, 4]</answer>", "Ünïcode ✓ 12"):
        assert a.encode(text) == b.encode(text)
    for proc in (processor, reloaded):
        assert proc.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT
    img = _image(300, 200)
    x = processor(text=[EXPECTED_PROMPT], images=[img], return_tensors="pt")
    y = reloaded(text=[EXPECTED_PROMPT], images=[img], return_tensors="pt")
    assert x.keys() == y.keys()
    for key in x:
        assert (x[key] == y[key]).all(), key


def test_processor_image_tokens(processor):
    out = processor(text=[EXPECTED_PROMPT], images=[_image()], return_tensors="pt")
    ids = special_token_ids(processor.tokenizer)
    assert int((out["input_ids"] == ids["image_token_id"]).sum()) == 16
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    # 8*8 patches of 3 channels x 2 frames x 14 x 14
    assert tuple(out["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)
    assert int(out["mm_token_type_ids"].sum()) == 16
    assert out["input_ids"][0, 0].item() == processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    # A larger pixel budget gives the 64-token layout.
    big = build_tiny_processor(max_pixels=224 * 224)
    out = big(text=[EXPECTED_PROMPT], images=[_image()], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((out["input_ids"] == ids["image_token_id"]).sum()) == 64


def test_batched_left_padding(processor):
    short = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    out = processor(text=[EXPECTED_PROMPT, short], images=[_image(), _image(seed=1)], padding=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    pad = special_token_ids(processor.tokenizer)["pad_token_id"]
    n_pad = int((mask[1] == 0).sum())
    assert n_pad > 0 and int((mask[0] == 0).sum()) == 0
    assert (ids[1, :n_pad] == pad).all() and (mask[1, :n_pad] == 0).all() and (mask[1, n_pad:] == 1).all()
    assert processor.tokenizer.decode(ids[1, n_pad:]) == short.replace(
        "<|image_pad|>", "<|image_pad|>" * 16
    )
    # Both rows end with the generation prompt (left padding keeps the ends aligned).
    tail = processor.tokenizer.encode("<|im_start|>assistant\n")
    assert ids[0, -len(tail):].tolist() == tail and ids[1, -len(tail):].tolist() == tail


def test_extra_corpus_and_vocab_size():
    tok = build_tiny_tokenizer(extra_corpus=["zyzzyva quokka " * 3] * 5)
    assert tok.tokenize(" zyzzyva quokka") == ["Ġzyzzyva", "Ġquokka"]
    small = build_tiny_tokenizer(vocab_size=512)
    assert len(small) == 512
    assert special_token_ids(small)["image_token_id"] == small.convert_tokens_to_ids("<|image_pad|>")
    big = build_tiny_tokenizer(vocab_size=4096)  # the corpus runs out of merges first (1,028 entries today)
    assert 1024 <= len(big) < 4096
    default = build_tiny_tokenizer()
    bpe = lambda tok: {t for t in tok.get_vocab() if t not in QWEN_SPECIAL_TOKENS + REASONING_TOKENS}
    assert bpe(default) <= bpe(big)  # a larger budget only adds merges
    with pytest.raises(ValueError, match=r"vocab_size must be at least \d+ \(256 bytes \+ \d+ added tokens \+ 1\)"):
        build_tiny_tokenizer(vocab_size=200)
