"""The stage-2 reward of a policy on fixed prompts (lens/evaluation/policy_reward.py)."""

from __future__ import annotations


import numpy as np
import pytest

from lens.data.refer import load_refer
from lens.evaluation.policy_reward import policy_reward
from lens.inference import Segmenter


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


def test_sampled_reward_is_reproducible_from_the_seed(refs, segmenter):
    sampling = {"do_sample": True, "temperature": 1.5, "top_p": 1.0, "top_k": 0}
    first = policy_reward(segmenter, refs, ["mask_iou"], 2, sampling, batch_size=4, seed=3)
    second = policy_reward(segmenter, refs, ["mask_iou"], 2, sampling, batch_size=4, seed=3)
    assert first == second and 0.0 <= first["reward"] <= 1.0


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
