"""Generation with each GRPO group's prompt prefilled once.

The G rollouts of a group sample from the same prompt. `shared_prefill_generate` runs the prompt (all but its last
token, with the image) once per group, copies the KV cache rows to the group's G rows (and Qwen2.5-VL's
`rope_deltas`, the M-RoPE offset `generate` adds to the text positions of later tokens), then lets `generate`
continue from the last prompt token. Every row's logits are those of plain generation (to float noise) and the
sampler draws the same random numbers in the same order, so the sampling distribution is unchanged.
"""

from __future__ import annotations

import torch

from lens.distinct import distinct_index


def shared_prefill_generate(model, generate, groups: torch.Tensor, input_ids: torch.LongTensor,
                            attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                            image_grid_thw: torch.LongTensor | None = None, **kwargs):
    """`generate(input_ids=..., ...)` for (B, P) left-padded prompts of which rows with equal `groups` (B,) ids are
    identical (tokens and image). `model` is the module `generate` belongs to (its forward does the prefill)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    first, index = distinct_index(groups.tolist())
    index = index.to(input_ids.device)
    mm = kwargs.get("mm_token_type_ids")
    if len(first) == len(index) or input_ids.shape[1] < 2 or (pixel_values is not None and mm is None):
        # nothing to share (or 1-D positions that the prefill would not reproduce under left padding)
        return generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        image_grid_thw=image_grid_thw, **kwargs)
    rep = torch.tensor(first, device=input_ids.device)[index]
    if not (bool((input_ids == input_ids[rep]).all()) and bool((attention_mask == attention_mask[rep]).all())):
        raise ValueError("shared_prefill_generate: rows of one group must have the same prompt")
    image_token = model.config.image_token_id
    if bool((input_ids[:, -1] == image_token).any()):
        raise ValueError("shared_prefill_generate: a prompt must not end with an image token")
    prefill = {}
    if pixel_values is not None:
        from .lens import distinct_images

        prefill["pixel_values"], prefill["image_grid_thw"], _ = distinct_images(pixel_values, image_grid_thw, index)
        prefill["mm_token_type_ids"] = mm[first, :-1]  # M-RoPE grid positions, as generate computes them
    kwargs.pop("mm_token_type_ids", None)  # the uncached last token is text
    with torch.no_grad():
        out = model(input_ids=input_ids[first, :-1], attention_mask=attention_mask[first, :-1], use_cache=True,
                    logits_to_keep=1, **prefill)
    cache = out.past_key_values
    cache.reorder_cache(index)  # (n, ...) -> (B, ...): row b gets its group's prefix
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the LENS model inside
    inner = getattr(base, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = inner.rope_deltas[index]
    return generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **kwargs)
