"""A tiny, fully offline stand-in for the Qwen2.5-VL tokenizer and processor.

The real Qwen2.5-VL tokenizer (151k tokens) cannot be downloaded here, so tests,
CPU demos and the ``tiny`` model preset use a small byte-level BPE trained in a
few milliseconds on a built-in corpus of referring-expression vocabulary.  It
keeps everything the LENS code relies on:

* Qwen's special tokens (``<|im_start|>``, ``<|image_pad|>``, ``<|box_start|>`` ...),
  each a single id, in Qwen's relative order, placed after the BPE vocabulary;
* Qwen's pre-tokenisation (each digit is its own pre-token, so coordinates are
  spelled digit by digit and stay learnable);
* a chat template that renders conversations like Qwen2.5-VL
  (``<|im_start|>{role}\\n{content}<|im_end|>\\n``, default system prompt,
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image);
* eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding;
* a ``Qwen2VLImageProcessor`` with patch 14, merge 2, temporal patch 2 and the
  CLIP normalisation, with a small pixel budget (a 224x224 image becomes 112x112,
  an 8x8 patch grid, 16 ``<|image_pad|>`` tokens).

Nothing is cached on disk; callers persist the result with
``processor.save_pretrained(path)`` and reload it with ``AutoProcessor``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "REASONING_TOKENS",
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "CLIP_MEAN",
    "CLIP_STD",
    "TINY_MIN_PIXELS",
    "TINY_MAX_PIXELS",
    "build_corpus",
    "build_tiny_tokenizer",
    "build_tiny_processor",
    "special_token_ids",
]

# Qwen2.5-VL special tokens, in the order of their ids in the real vocabulary
# (151643 ... 151656).  In the tiny tokenizer they follow the BPE vocabulary in
# the same order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Reasoning tags used by the CoT prompt.  They are ordinary (non-special) added
# tokens: one id each, and still present after ``decode(skip_special_tokens=True)``
# (which is how TRL decodes completions for reward functions).
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 28 = patch_size * merge_size: the resize grid of Qwen2.5-VL.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112

# ---------------------------------------------------------------------------
# Chat template (written for LENS; mirrors the rendering of Qwen2.5-VL).
#
# * a message is ``<|im_start|>ROLE\n CONTENT <|im_end|>\n``;
# * CONTENT is a string, or a list of parts: image parts (type "image" or
#   "image_url", or a part carrying an "image"/"image_url" key) render as
#   ``<|vision_start|><|image_pad|><|vision_end|>``, video parts likewise with
#   ``<|video_pad|>``, text parts render their text verbatim;
# * if the first message is not a system message, a system message holding
#   DEFAULT_SYSTEM_PROMPT is emitted first;
# * ``add_generation_prompt`` appends ``<|im_start|>assistant\n``;
# * ``add_vision_id`` prefixes every image/video with "Picture k: "/"Video k: ".
# ---------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{%- set counters = namespace(images=0, videos=0) -%}"
    "{%- macro render_part(part) -%}"
    "{%- if part is string -%}"
    "{{- part -}}"
    "{%- elif part.get('type') in ['image', 'image_url'] or 'image' in part or 'image_url' in part -%}"
    "{%- set counters.images = counters.images + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ counters.images ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.get('type') == 'video' or 'video' in part -%}"
    "{%- set counters.videos = counters.videos + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ counters.videos ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}{{- render_part(part) -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# ---------------------------------------------------------------------------
# Built-in training corpus
# ---------------------------------------------------------------------------
_COLOURS = (
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "gold silver beige navy maroon olive teal violet dark light bright pale"
).split()
_SHAPES = (
    "circle square triangle rectangle ellipse oval star hexagon pentagon diamond cross "
    "ring disk dot line arrow heart blob shape polygon box"
).split()
_OBJECTS = (
    "person man woman boy girl child baby player people guy lady dog cat horse cow sheep "
    "bird elephant bear zebra giraffe car bus truck bike bicycle motorcycle train boat "
    "plane chair couch sofa bed table bench tv laptop phone book bottle cup bowl glass "
    "plate pizza cake banana apple orange sandwich donut umbrella bag suitcase kite "
    "skateboard surfboard tennis racket ball clock vase plant tree door window sign "
    "shirt jacket hat head hand face object thing one ones item"
).split()
_SIZES = "big small large tiny huge little tall short long wide thin thick largest smallest biggest".split()
_POSITIONS = (
    "left right top bottom middle center centre upper lower front back corner edge side "
    "leftmost rightmost topmost far near closest farthest first second third last"
).split()
_RELATIONS = (
    "above below under over next to behind in front of near beside between inside "
    "outside on the with without holding wearing sitting standing walking looking at "
    "and or who that which is are of a an its his her their closest to touching"
).split()
_TASK_WORDS = (
    "Output the bounding box of the in image . Locate report bbox coordinates JSON format "
    "Compare difference between objects and find most closely matched one thinking "
    "process final answer tags interested inside here i.e. segment mask region "
    "referring expression question target assistant user system You are a helpful "
    "Please describe what where which Picture Video"
).split()

_GROUNDING_PROMPT = "Output the bounding box of the {question} in the image."
_COT_PROMPT = (
    'Locate "{question}", report the bbox coordinates in JSON format.'
    "Compare the difference between objects and find the most closely matched one."
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "Output the one bbox inside the interested object in JSON format."
    "i.e., <think>thinking process here</think><answer>answer here</answer>"
)


def build_corpus(extra_corpus: Iterable[str] = ()) -> list[str]:
    """The deterministic training corpus of the tiny tokenizer (built-in lines + ``extra_corpus``)."""
    lines: list[str] = []
    vocab_words = _COLOURS + _SHAPES + _OBJECTS + _SIZES + _POSITIONS + _RELATIONS + _TASK_WORDS
    lines.append(" ".join(vocab_words))
    lines.append(" ".join(w.capitalize() for w in vocab_words))

    # Referring expressions: "the big red circle on the left", "red square" ...
    phrases = []
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            size = _SIZES[(i + j) % len(_SIZES)]
            pos = _POSITIONS[(2 * i + j) % len(_POSITIONS)]
            phrases.append(f"the {colour} {shape}")
            phrases.append(f"the {size} {colour} {shape} on the {pos}")
    for i, obj in enumerate(_OBJECTS):
        colour = _COLOURS[i % len(_COLOURS)]
        pos = _POSITIONS[i % len(_POSITIONS)]
        rel = _RELATIONS[i % len(_RELATIONS)]
        other = _OBJECTS[(7 * i + 3) % len(_OBJECTS)]
        phrases.append(f"{colour} {obj} {rel} the {other}")
        phrases.append(f"the {obj} on the {pos} side")
    lines.extend(phrases)

    # LENS prompts and answers in all the formats the code produces or parses.
    for k, question in enumerate(phrases[::7]):
        x1, y1 = (37 * k) % 997, (53 * k) % 991
        x2, y2 = min(x1 + 11 * k % 400 + 5, 1000), min(y1 + 13 * k % 400 + 5, 1000)
        lines.append(_GROUNDING_PROMPT.format(question=question))
        lines.append(_COT_PROMPT.format(question=question))
        lines.append(f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}')
        lines.append(f'[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{question}"}}]')
        lines.append(
            f"<|object_ref_start|>{question}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|><|im_end|>"
        )
        lines.append(
            f"<think>The {question} is near ({x1},{y1}).</think>"
            f'<answer>{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}]}}</answer>'
        )
        lines.append(f"[{x1}, {y1}, {x2}, {y2}] ({x1}, {y1}, {x2}, {y2}) [{x1}.5, {y1}.0]")

    # Numbers 0..1000 (digits are isolated by the pre-tokenizer, so these only
    # teach merges of the punctuation and spaces around them).
    lines.append(" ".join(str(n) for n in range(1001)))
    lines.append(", ".join(str(n) for n in range(0, 1001, 7)))
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 -1 0.5 1e-6")
    lines.append("```json\n" + json.dumps([{"bbox_2d": [1, 2, 3, 4]}], indent=2) + "\n```")
    lines.append("You are a helpful assistant. \nuser\nassistant\nsystem\n")

    lines.extend(str(line) for line in extra_corpus)
    return lines


def _qwen_backend_components():
    """Normaliser, pre-tokenizer and decoder exactly as ``Qwen2Tokenizer`` builds them.

    ``Qwen2Tokenizer.from_pretrained`` rebuilds these from its own ``__init__``
    (only vocab, merges and the post-processor are read from tokenizer.json), so
    the BPE must be trained with the very same pre-tokenisation or the merges
    would not match after a save/load round trip.  Qwen's pre-tokenizer already
    isolates every digit.
    """
    backend = Qwen2Tokenizer().backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer, backend.decoder


def _train_bpe(corpus: Sequence[str], bpe_vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    normalizer, pre_tokenizer, decoder = _qwen_backend_components()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # The added tokens get their own ids later; the trainer does not honour added
    # tokens, so cut them out of the corpus instead of letting BPE learn "<|im".
    splitter = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS + REASONING_TOKENS))
    pieces = [piece for line in corpus for piece in splitter.split(line) if piece]
    tok.train_from_iterator(pieces, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Keep the trainer's order, with ids made contiguous from 0.
    ordered = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, (t, _) in enumerate(ordered)}
    return vocab, merges


def build_tiny_tokenizer(extra_corpus: Iterable[str] = (), vocab_size: int = 1024) -> Qwen2Tokenizer:
    """Train the tiny byte-level BPE and wrap it as a ``Qwen2Tokenizer`` (a fast tokenizer).

    ``vocab_size`` bounds ``len(tokenizer)``: the BPE part gets
    ``vocab_size - 18`` entries at most (fewer if the corpus runs out of pairs),
    followed by the 14 Qwen special tokens and the 4 reasoning tags.
    """
    n_added = len(QWEN_SPECIAL_TOKENS) + len(REASONING_TOKENS)
    min_size = 256 + n_added + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (256 bytes + {n_added} added tokens + 1)")
    vocab, merges = _train_bpe(build_corpus(extra_corpus), vocab_size - n_added)
    for token in QWEN_SPECIAL_TOKENS + REASONING_TOKENS:
        if token in vocab:  # cannot happen: the trainer never sees these strings
            raise RuntimeError(f"{token!r} was learnt by the BPE trainer")
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    for token in QWEN_SPECIAL_TOKENS + REASONING_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"{token!r} did not keep its id {vocab[token]}")
    return tokenizer


def build_tiny_processor(
    extra_corpus: Iterable[str] = (),
    vocab_size: int = 1024,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
    patch_size: int = 14,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
    processor_class: type = Qwen2_5_VLProcessor,
    video_processor_class: type = Qwen2VLVideoProcessor,
):
    """Build a complete offline processor (tokenizer, image and video processors, chat template): a
    ``Qwen2_5_VLProcessor`` by default; a policy family passes its own classes and patch size (Qwen3-VL: 16)."""
    tokenizer = build_tiny_tokenizer(extra_corpus, vocab_size=vocab_size)
    common = dict(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **common)
    video_processor = video_processor_class(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **common
    )
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids to write into a Qwen2.5-VL model config built for ``tokenizer``.

    Accepts a tokenizer or a processor.  Mirrors the real model: bos and pad are
    ``<|endoftext|>``, eos is ``<|im_end|>``.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def tid(token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token in this tokenizer")
        return ids[0]

    return {
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
        "vision_token_id": tid("<|vision_pad|>"),
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
    }
