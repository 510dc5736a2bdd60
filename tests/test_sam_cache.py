"""SAM2 features kept across steps (`cache_sam_features`): the LRU cache, and stage 2 reusing it as stage 1 does."""

from __future__ import annotations

import pytest
import torch

from lens.training.recipe import build_trainer
from lens.training.sam_cache import SamFeatureCache


def test_feature_cache_encodes_each_image_once_and_evicts_the_least_recent():
    calls = []

    def encode(images):
        from lens.modeling.sam import SamFeatures

        calls.append(images.shape[0])
        v = images.float().mean((1, 2, 3))  # (N,): one number per image
        return SamFeatures(v.view(-1, 1, 1, 1), v.view(-1, 1, 1, 1) * 2, v.view(-1, 1, 1, 1) * 3)

    cache = SamFeatureCache(max_items=2)
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2)  # image i is all i
    out = cache.features(encode, images[:2], ["a", "b"], torch.device("cpu"))
    assert calls == [2] and out.image_embed.flatten().tolist() == [0.0, 1.0]
    out = cache.features(encode, images[[1, 0]], ["b", "a"], torch.device("cpu"))  # both cached, in the asked order
    assert calls == [2] and out.fpn_s0.flatten().tolist() == [2.0, 0.0]
    cache.features(encode, images[2:], ["c"], torch.device("cpu"))  # evicts "b", used before "a"
    assert calls == [2, 1] and list(cache.store) == ["a", "c"]
    assert (cache.hits, cache.misses) == (2, 3)


def test_grpo_reuses_cached_features_with_the_same_values(tiny_recipe):
    """Stage 2 with `cache_sam_features`: a second generation batch of the same images calls the model for no SAM2
    encoding, and hands the scoring and loss forwards the features an uncached trainer computes."""
    cached = build_trainer(tiny_recipe("stage2", "train.max_steps=1", "cache_sam_features=true"))
    plain = build_trainer(tiny_recipe("stage2", "train.max_steps=1", "cache_sam_features=false"))
    assert cached.sam_cache is not None and plain.sam_cache is None
    data = cached.train_dataset
    other = next(i for i in range(len(data)) if data[i]["image_id"] != data[0]["image_id"])
    rows = [dict(data[i]) for i in (0, 0, other, other)]  # 2 prompts x G = 2, two distinct images
    encodings = []
    hook = cached.model.register_forward_hook(
        lambda m, args, kwargs, out: encodings.append(kwargs.get("sam_images") is not None), with_kwargs=True)
    first, index = cached._generation_features(rows)
    again, index_again = cached._generation_features(rows)
    hook.remove()
    assert encodings == [True]  # the second batch came from the cache
    assert (cached.sam_cache.misses, cached.sam_cache.hits) == (2, 2)
    assert index.tolist() == index_again.tolist() == [0, 0, 1, 1]
    reference, _ = plain._generation_features(rows)
    for name in ("image_embed", "fpn_s0", "fpn_s1"):
        torch.testing.assert_close(getattr(again, name), getattr(reference, name), rtol=1e-5, atol=1e-6)
        assert getattr(first, name).shape[0] == 2  # one entry per distinct image


@pytest.mark.parametrize("flag", ["true", "false"])
def test_cache_sam_features_is_a_valid_stage2_key(tiny_recipe, flag):
    assert tiny_recipe("stage2", f"cache_sam_features={flag}")["cache_sam_features"] is (flag == "true")
