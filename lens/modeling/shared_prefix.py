"""Shared-prefix forwards: the rows of one GRPO group run their common prompt (text + image) once.

Every rollout of a group repeats the same prompt (system text, question, ~390 image tokens of ~450); only the
completion (and the appended queries) differ. A packed row holds one group:

    [prompt[:P-1], suffix_1, ..., suffix_m]      suffix_i = [prompt[P-1], completion_i, (queries)]

with an explicit 4-D attention mask (the prefix is causal; suffix_i sees the prefix's valid tokens and itself,
causally, never another suffix) and explicit (3, n, L) position ids in which every token keeps the position it
has in its own unshared row. Each valid token thus attends to exactly the keys it attends to unshared, with the
same rotary phases, so outputs and gradients are those of the unshared forward (Prefix Grouper, arXiv
2506.05433); the prefix's gradient is the sum over its suffixes, as for shared weights. The prompt's last token is
repeated at the head of each suffix so that a suffix is a contiguous causal-LM sequence: position j still scores
token j + 1, and the usual shifted labels (and TRL's fused LM head) work unchanged on the packed row.

It is ONE call of the language model per forward (ZeRO-3 and DDP hooks, gradient checkpointing all work).
flash_attention_2 cannot take a 4-D mask: the packed call runs on SDPA instead (`attention_for_packed`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lens.distinct import distinct_index


def prefix_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
    """(B,) group id of every row: rows with the same (left-padded) prompt tokens and the same image share one id
    (order of first appearance). prompt_ids/prompt_mask: (B, P); image_index: (B,) the row's image (None: text)."""
    ids = prompt_ids.masked_fill(prompt_mask == 0, -1).tolist()
    images = image_index.tolist() if image_index is not None else [None] * len(ids)
    _, inverse = distinct_index([(img, tuple(row)) for img, row in zip(images, ids)])
    return inverse.to(prompt_ids.device)


@dataclass
class PackedLayout:
    """Where each row's suffix lies in the packed rows. group: (B,) packed row; slot: (B,) rank within the group;
    first: (n,) one row of each group (its prefix is the group's); head: P - 1 prefix tokens; width: S suffix tokens."""

    group: torch.Tensor
    slot: torch.Tensor
    first: torch.Tensor
    head: int
    width: int
    slots: int

    @property
    def length(self) -> int:
        return self.head + self.slots * self.width

    def suffix_positions(self) -> torch.Tensor:
        """(B, S) index of each row's suffix tokens in its packed row."""
        ar = torch.arange(self.width, device=self.group.device)
        return self.head + self.slot[:, None] * self.width + ar

    def pack(self, prefix: torch.Tensor, suffix: torch.Tensor, fill=0) -> torch.Tensor:
        """Groups' prefix (n, P - 1, ...) and rows' suffix (B, S, ...) -> packed (n, L, ...); unused slots hold
        `fill`. Differentiable in both."""
        n = self.first.shape[0]
        body = suffix.new_full((n, self.slots * self.width, *suffix.shape[2:]), fill)
        body = body.index_put((self.group[:, None], self.suffix_positions() - self.head), suffix)
        return torch.cat([prefix, body], dim=1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed (n, L, ...) -> each row's suffix (B, S, ...)."""
        return packed[self.group[:, None], self.suffix_positions()]

    def allowed(self, prefix_valid: torch.Tensor, suffix_valid: torch.Tensor) -> torch.Tensor:
        """(n, 1, L, L) bool: query t may attend key k. prefix_valid (B, P - 1), suffix_valid (B, S): real tokens.
        No real token attends to padding or unused slots; every query sees at least itself (a row without keys
        would give NaN in SDPA)."""
        valid = self.pack(prefix_valid[self.first].bool(), suffix_valid.bool(), fill=False)  # (n, L)
        seg = torch.full((self.length,), -1, device=valid.device)
        seg[self.head:] = torch.arange(self.slots, device=valid.device).repeat_interleave(self.width)
        pos = torch.arange(self.length, device=valid.device)
        causal = pos[None, :] <= pos[:, None]
        same = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])  # keys of the prefix or of one's own suffix
        allowed = (causal & same)[None] & valid[:, None, :]
        allowed = allowed | torch.eye(self.length, dtype=torch.bool, device=valid.device)
        return allowed[:, None]


def packed_layout(groups: torch.Tensor, prefix_length: int, suffix_width: int) -> PackedLayout:
    """The layout of rows in `groups` (B,) whose first `prefix_length` tokens are shared and whose suffix (from the
    prompt's last token on) has `suffix_width` tokens."""
    if prefix_length < 1:
        raise ValueError(f"prefix_length must be at least 1 (the prompt's length), got {prefix_length}")
    b = groups.shape[0]
    groups = distinct_index(groups.tolist())[1].to(groups.device)  # ids 0..n-1 in order of first appearance
    before = torch.arange(b, device=groups.device)
    same = groups[:, None] == groups[None, :]
    slot = (same & (before[None, :] < before[:, None])).sum(1)  # rank of the row within its group
    n = int(groups.max()) + 1 if b else 0
    first = torch.full((n,), b, device=groups.device).scatter_reduce(0, groups, before, reduce="amin")
    slots = int(slot.max()) + 1 if b else 0
    return PackedLayout(groups, slot, first, prefix_length - 1, suffix_width, slots)


def check_shared(layout: PackedLayout, ids: torch.Tensor, mask: torch.Tensor, prefix_length: int) -> None:
    """Raise unless every row's first `prefix_length` tokens equal those of its group's first row."""
    p = prefix_length
    rep = layout.first[layout.group]
    if not (bool((ids[:, :p] == ids[rep, :p]).all()) and bool((mask[:, :p] == mask[rep, :p]).all())):
        raise ValueError("prefix_groups: rows of one group must share the same first prefix_length tokens and mask")


def mask_for(config, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask in the form the attention implementation takes: bool for SDPA (and flash, run as SDPA),
    additive (0 / dtype min) for eager."""
    if config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


@contextlib.contextmanager
def attention_for_packed(config):
    """Run a packed call with SDPA when the model uses flash attention (which takes no 4-D mask)."""
    previous = config._attn_implementation
    swap = isinstance(previous, str) and previous.startswith("flash")
    if swap:
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        if swap:
            config._attn_implementation = previous


def pack_positions(layout: PackedLayout, positions: torch.Tensor) -> torch.Tensor:
    """Rows' (3, B, P + T) positions -> packed (3, n, L): every token keeps its unshared position."""
    h = layout.head
    per_row = positions.permute(1, 2, 0)  # (B, P + T, 3)
    return layout.pack(per_row[layout.first, :h], per_row[:, h:], fill=1).permute(2, 0, 1)


def shared_query_hidden(model, input_ids, attention_mask, pixel_values, image_grid_thw, groups, prefix_length):
    """LENS query forward hidden states with each group's prefix run once.

    input_ids/attention_mask: (B, P + C) prompt (left padded, equal within a group) + completion (right padded).
    Returns states (B, 1 + C, H) of positions P - 1 .. P + C - 1 (position j scores token j + 1) and the query
    states (B, Q, H)."""
    q = model.config.num_of_query
    b, total = input_ids.shape
    layout = packed_layout(groups, prefix_length, total - prefix_length + 1 + q)
    check_shared(layout, input_ids, attention_mask, prefix_length)
    h = layout.head
    if bool((input_ids[:, h] == model.config.image_token_id).any()):
        raise ValueError("the prompt's last token must not be an image token")
    pv, grid = pixel_values, image_grid_thw
    if pixel_values is not None:
        from .lens import distinct_images

        pv, grid, _ = distinct_images(pixel_values, image_grid_thw, layout.group)
    prefix_embeds, extras = model.embed_multimodal(input_ids[layout.first, :h], pv, grid)  # (n, P - 1, H)
    embed = model.model.get_input_embeddings()
    suffix = embed(input_ids[:, h:])
    suffix = torch.cat([suffix, model.learnable_query.to(suffix.dtype).expand(b, -1, -1)], dim=1)
    embeds = layout.pack(prefix_embeds, suffix.to(prefix_embeds.dtype))
    valid = torch.cat([attention_mask, attention_mask.new_ones(b, q)], dim=1)
    allowed = layout.allowed(valid[:, :h], valid[:, h:])
    positions = model.query_position_ids(input_ids, attention_mask, image_grid_thw)  # (3, B, P + C + Q)
    if "visual_pos_masks" in extras:  # Qwen3-VL's deepstack: image tokens lie in the prefix only
        no_image = torch.zeros(valid[:, h:].shape, dtype=torch.bool, device=valid.device)  # (B, S) suffixes
        extras["visual_pos_masks"] = layout.pack(extras["visual_pos_masks"], no_image, fill=False)
    lm = model.model.language_model
    with attention_for_packed(lm.config):
        hidden = lm(inputs_embeds=embeds, attention_mask=mask_for(lm.config, allowed, embeds.dtype),
                    position_ids=pack_positions(layout, positions), use_cache=False, **extras).last_hidden_state
    states = layout.unpack(hidden)  # (B, S, H)
    width = total - prefix_length + 1
    return states[:, :width], states[:, width:]


def shared_reference_log_probs(ref_call, ref_model, input_ids, attention_mask, logits_to_keep, groups,
                               pixel_values=None, image_grid_thw=None, mm_token_type_ids=None):
    """Per-token log-probs (B, C) of the completions from a stock Qwen2.5-VL (TRL's fused LM head) with each
    group's prompt run once: one call of `ref_call` (the wrapped reference; `ref_model` the unwrapped one gives
    the positions the stock forward would use)."""
    b, total = input_ids.shape
    p = total - logits_to_keep
    layout = packed_layout(groups, p, logits_to_keep + 1)
    check_shared(layout, input_ids, attention_mask, p)
    inner = ref_model.model
    positions = None
    if mm_token_type_ids is not None and image_grid_thw is not None:
        positions = inner.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None, inputs_embeds=None,
            attention_mask=attention_mask, past_key_values=None, mm_token_type_ids=mm_token_type_ids,
        )
    if positions is None:  # what the stock forward falls back to without mm_token_type_ids
        positions = torch.arange(total, device=input_ids.device)[None, None].expand(3, b, -1)
    h = layout.head
    first = layout.first
    ids = layout.pack(input_ids[first, :h], input_ids[:, h:], fill=0)
    labels = layout.pack(torch.full_like(input_ids[first, :h], -100),
                         input_ids[:, h:].masked_fill(attention_mask[:, h:] == 0, -100), fill=-100)
    labels[:, h::layout.width] = -100  # a suffix's head token is not predicted by the previous suffix
    allowed = layout.allowed(attention_mask[:, :h], attention_mask[:, h:])
    kwargs = {}
    if pixel_values is not None:
        from .lens import distinct_images

        kwargs["pixel_values"], kwargs["image_grid_thw"], _ = distinct_images(pixel_values, image_grid_thw, layout.group)
    config = ref_model.config.get_text_config()
    dtype = next(ref_model.parameters()).dtype
    with attention_for_packed(config):
        out = ref_call(input_ids=ids, attention_mask=mask_for(config, allowed, dtype),
                       position_ids=pack_positions(layout, positions), labels=labels, fused_lm_head=True, **kwargs)
    logps = torch.nn.functional.pad(out.log_probs, (0, 1))  # (n, L): position j scores token j + 1
    return layout.unpack(logps)[:, :logits_to_keep]
