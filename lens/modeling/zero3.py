"""DeepSpeed ZeRO-3 support: parameters LENS reads without calling their owner, and gathering for loading.

Under ZeRO-3 every parameter is partitioned (an empty tensor) except while a forward of the module that owns
it runs. LENS reads a few parameters directly, outside their owner's forward: `sam.no_mem_embed`, the prompt
encoder's `no_mask_embed`, the LM head (its log-probs are computed in chunks) and, inside the SAM2 mask
decoder's forward, the weights of its token embeddings. `register_external_parameters` tells DeepSpeed to
gather them with the module whose forward uses them. Without ZeRO-3 it only records bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Number of elements of a parameter, also when ZeRO-3 has partitioned it (numel() is then 0)."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Full parameters inside the block under ZeRO-3 (`modify`: rank 0's changes are re-partitioned to all);
    a plain block otherwise."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def external_parameters(model) -> dict[str, list[nn.Parameter]]:
    """{owner: parameters its forward reads without calling their module}, as names of `model`'s modules."""
    sam = model.sam
    decoder = sam.sam_mask_decoder
    tokens = [m.weight for m in (decoder.iou_token, decoder.mask_tokens, getattr(decoder, "obj_score_token", None))
              if m is not None]
    return {
        "": [sam.no_mem_embed, sam.sam_prompt_encoder.no_mask_embed.weight, model.lm_head.weight],
        "sam.sam_mask_decoder": tokens,
    }


def register_external_parameters(model) -> None:
    """Register `external_parameters(model)` with DeepSpeed (call once the weights are final, before training)."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    modules = dict(model.named_modules())
    for owner, params in external_parameters(model).items():
        for param in params:
            register_external_parameter(modules[owner], param)


def partition_whole_parameters(model: nn.Module) -> list[str]:
    """ZeRO-3: partition the parameters a load left whole, with rank 0's values; returns their names.

    transformers' ZeRO-3 `from_pretrained` partitions every module's parameters, but LENS's root-level
    `learnable_query` has come back whole from a base-folder load (one full copy per rank, each initialised by its
    own rank). Broadcasting rank 0's copy first makes every rank partition the same tensor."""
    if not zero3_enabled():
        return []
    whole = [(n, p) for n, p in model.named_parameters() if not is_partitioned(p)]
    if not whole:
        return []
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    if torch.distributed.is_initialized():
        for _, p in whole:
            torch.distributed.broadcast(p.data, src=0)
    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())
    return [n for n, _ in whole]
