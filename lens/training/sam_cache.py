"""Frozen SAM2 image features kept across training steps, by image key (warm-up, stage 1 and stage 2)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from lens.modeling.sam import SamFeatures
from lens.modeling.zero3 import zero3_enabled

logger = logging.getLogger(__name__)


class SamFeatureCache:
    """Frozen SAM2 image features by image key, kept on the CPU (LRU, `max_items` images)."""

    def __init__(self, max_items: int = 4096) -> None:
        self.max_items = max_items
        self.store: OrderedDict[str, SamFeatures] = OrderedDict()
        self.hits = self.misses = 0

    def features(self, encode: Callable[[torch.Tensor], SamFeatures], sam_images: torch.Tensor, keys: list[str],
                 device: torch.device) -> SamFeatures:
        """Features of the N images `keys` (their SAM inputs `sam_images`, (N, 3, S, S)) on `device`, calling
        `encode(images) -> SamFeatures` only for those not cached."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                new = encode(sam_images[missing])
            for j, i in enumerate(missing):
                self.store[keys[i]] = new.index([j]).to("cpu")
        for k in keys:
            self.store.move_to_end(k)
        while len(self.store) > self.max_items:
            self.store.popitem(last=False)
        return SamFeatures.cat([self.store[k] for k in keys]).to(device)


def make_sam_cache(enabled: bool) -> SamFeatureCache | None:
    """The cache a trainer uses (None: encode every batch). Off under DeepSpeed ZeRO-3: a cache hit would skip the
    encoding call on one rank only, and ZeRO-3's parameter gathers must run on every rank alike."""
    if enabled and zero3_enabled():
        logger.warning("cache_sam_features is off under DeepSpeed ZeRO-3 (every rank encodes every batch)")
        return None
    return SamFeatureCache() if enabled else None
