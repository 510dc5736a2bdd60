"""The stage-2 reward of a policy on fixed prompts (research/policy_reward.py)."""

from __future__ import annotations

import numpy as np
import pytest

from lens.data.refer import load_refer
from lens.inference import Segmenter
from research.policy_reward import policy_reward


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory):
    from lens.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("reward_synthetic")
    generate_synthetic(root, seed=5, n_train=1, n_val=3, n_test=1, image_size=112)
    return load_refer(root, "refcoco", "val")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained("tiny", max_new_tokens=4)


def test_greedy_reward_is_the_mean_squared_mask_iou(refs, segmenter):
    # hand computation from the user-facing predictor: IoU of each full-size mask with its target, squared
    ious = []
    for ref in refs:
        pred = segmenter(str(ref.image_path), ref.expressions[0]).mask
        target = ref.load_mask() == 1
        ious.append((pred & target).sum() / ((pred | target).sum() + 1e-6))
    result = policy_reward(segmenter, refs, ["box_iou", "mask_iou"], num_generations=1, batch_size=2)
    assert result["reward/mask_iou"] == pytest.approx(float(np.mean(np.square(ious))), abs=1e-5)
    assert result["reward"] == pytest.approx(result["reward/mask_iou"] + result["reward/box_iou"])
    # greedy completions are identical, so G copies per prompt leave the mean unchanged
    again = policy_reward(segmenter, refs, ["box_iou", "mask_iou"], num_generations=4, batch_size=8)
    assert again["reward"] == pytest.approx(result["reward"], abs=1e-6)


def test_sampled_reward_is_reproducible_from_the_seed(refs, segmenter, monkeypatch):
    sampling = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
    texts: list[str] = []
    run_batch = segmenter.run_batch

    def recording(*args, **kwargs):
        out = run_batch(*args, **kwargs)
        texts.extend(out.texts)
        return out

    monkeypatch.setattr(segmenter, "run_batch", recording)

    def sample(seed: int) -> tuple[dict, list[str]]:
        texts.clear()
        result = policy_reward(segmenter, refs, ["mask_iou"], 4, sampling, batch_size=8, seed=seed)
        return result, list(texts)

    first, first_texts = sample(3)
    second, second_texts = sample(3)
    assert first == second and first_texts == second_texts and 0.0 <= first["reward"] <= 1.0
    assert len(first_texts) == 4 * len(refs)
    # the seed is what fixes the draws: another seed samples other completions (a sampler that ignored the
    # seed, or greedy decoding, would repeat them)
    _, other_texts = sample(4)
    assert other_texts != first_texts
    # and the G completions of one prompt are not copies of each other
    assert any(len(set(first_texts[k : k + 4])) > 1 for k in range(0, len(first_texts), 4))


def test_bad_arguments_are_named(refs, segmenter):
    with pytest.raises(ValueError, match="num_generations=4"):
        policy_reward(segmenter, refs, ["mask_iou"], num_generations=4, batch_size=2)
    with pytest.raises(ValueError, match="unknown reward"):
        policy_reward(segmenter, refs, ["no_such_reward"])


def test_generation_never_writes_an_image_pad(refs, segmenter):
    # an image-pad token in the completion has no vision features to fill it; generation must not produce one
    image_token = segmenter.model.config.image_token_id

    def favour_image_pad(module, args, output):
        output[..., image_token] += 1e4
        return output

    hook = segmenter.model.lm_head.register_forward_hook(favour_image_pad)
    try:
        out = segmenter.run_batch([str(refs[0].image_path)], [refs[0].expressions[0]])
    finally:
        hook.remove()
    assert out.mask_logits.shape[0] == 1
