"""GroundingDataset / expand_expressions / collate on the synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens.data import load_reasonseg, load_refer
from lens.data.dataset import GroundingDataset, collate_grounding, expand_expressions
from lens.data.transforms import llm_image_size, mask_box


@pytest.fixture(scope="module")
def refs(synthetic_root):
    return load_refer(synthetic_root, "refcoco", "val")


def test_item_contents(refs):
    ds = GroundingDataset(refs, sam_size=64, min_pixels=3136, max_pixels=200_000, seed=1)
    assert len(ds) == len(refs)
    for i in range(len(ds)):
        item, ref = ds[i], refs[i]
        h, w = item["orig_hw"]
        assert isinstance(item["image"], Image.Image)
        assert item["image"].size == (item["llm_hw"][1], item["llm_hw"][0])
        assert item["llm_hw"] == llm_image_size(h, w, 3136, 200_000)
        assert item["sam_image"].dtype == torch.uint8 and tuple(item["sam_image"].shape) == (3, 64, 64)
        assert item["mask"].dtype == np.uint8 and item["mask"].shape == (h, w)
        assert item["expression"] in ref.expressions and item["ref_id"] == ref.ref_id
        assert item["box"] == ref.box and item["has_box"]
        sx, sy = item["llm_hw"][1] / w, item["llm_hw"][0] / h
        assert item["box_llm"] == [round(ref.box[0] * sx), round(ref.box[1] * sy), round(ref.box[2] * sx), round(ref.box[3] * sy)]
        assert item["image_id"] == item["image_path"] == str(ref.image_path)
        assert item["question_template"] == "pr1_grounding"


def test_random_expression_is_reproducible_and_varies(refs):
    multi = [r for r in refs if len(r.expressions) > 1]
    assert multi
    a = GroundingDataset(multi, seed=3)
    b = GroundingDataset(multi, seed=3)
    picks = lambda ds: [ds.expression_index(i) for i in range(len(ds))]  # noqa: E731
    assert picks(a) == picks(b)
    seen, runs = set(), {3: [], 4: []}
    other = GroundingDataset(multi, seed=4)
    for epoch in range(6):
        for ds, seed in ((a, 3), (other, 4)):
            ds.set_epoch(epoch)
            runs[seed].append(picks(ds))
        seen.update(picks(a))
    assert len(seen) > 1
    assert runs[3] != runs[4]  # the seed is used: another seed picks other expressions over the epochs
    b.set_epoch(5)
    assert picks(b) == runs[3][5]  # an epoch's picks depend on (seed, epoch) only, not on the epochs before
    fixed = GroundingDataset(multi, random_expression=False)
    assert set(picks(fixed)) == {0}


def test_expand_expressions_and_pairs(refs):
    pairs = expand_expressions(refs)
    assert len(pairs) == sum(len(r.expressions) for r in refs)
    ds = GroundingDataset(pairs, sam_size=32)
    for i in (0, len(ds) - 1):
        ref, k = pairs[i]
        assert ds[i]["expression"] == ref.expressions[k] and ds[i]["expr_index"] == k


def test_reasonseg_items_use_longest_side_and_mask_box(synthetic_root):
    refs = load_reasonseg(synthetic_root, "val")[:3]
    ds = GroundingDataset(refs, sam_size=32, llm_longest_side=100)
    batch = collate_grounding([ds[i] for i in range(len(ds))])
    assert tuple(batch["sam_image"].shape) == (3, 3, 32, 32)
    for item_box, mask, (h, w), llm_hw in zip(batch["box"], batch["mask"], batch["orig_hw"], batch["llm_hw"]):
        assert item_box == mask_box(mask == 1)
        assert llm_hw == llm_image_size(h, w, longest_side=100) and max(llm_hw) <= 112


def test_mask_image_size_mismatch_is_reported(tmp_path):
    from lens.data import load_custom, write_custom_jsonl

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    rec = {"image": "a.jpg", "expressions": ["x"], "mask": {"size": [10, 10], "counts": [0, 100]}, "id": "m"}
    ds = GroundingDataset(load_custom(write_custom_jsonl(tmp_path / "d.jsonl", [rec])))
    with pytest.raises(ValueError, match="m: mask size"):
        ds[0]


def test_references_pickle_for_worker_processes(refs):
    import pickle

    clones = pickle.loads(pickle.dumps(refs))
    assert [c.ref_id for c in clones] == [r.ref_id for r in refs]
    assert all(np.array_equal(c.load_mask(), r.load_mask()) for c, r in zip(clones, refs))


def test_image_memo_decodes_each_image_once_and_gives_the_same_items(refs, monkeypatch):
    """Items of one image share its decoded views: the same values as decoding afresh, one decode per image while
    the memo holds it, the least recently used image dropped past `memo_images`, none kept with 0."""
    from lens.data.base import Reference

    decoded: list[str] = []
    load = Reference.load_image
    monkeypatch.setattr(Reference, "load_image", lambda self: decoded.append(str(self.image_path)) or load(self))
    images = sorted({str(r.image_path) for r in refs})
    assert len(images) >= 3 and len(images) < len(refs)  # several references per image: the memo has work
    fresh = GroundingDataset(refs, sam_size=64, max_pixels=200_000, memo_images=0)
    memo = GroundingDataset(refs, sam_size=64, max_pixels=200_000, memo_images=len(images))
    for epoch in range(2):
        fresh.set_epoch(epoch), memo.set_epoch(epoch)
        for i in range(len(refs)):
            a, b = fresh[i], memo[i]
            assert torch.equal(a["sam_image"], b["sam_image"]) and np.array_equal(a["mask"], b["mask"])
            assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
            assert {k: v for k, v in a.items() if k not in ("sam_image", "mask", "image")} == \
                   {k: v for k, v in b.items() if k not in ("sam_image", "mask", "image")}
    assert len(decoded) == 2 * len(refs) + len(images)  # fresh: every access; memo: each image once in 2 epochs
    assert len(fresh._views) == 0

    small = GroundingDataset(refs, sam_size=64, max_pixels=200_000, memo_images=2)
    by_image = {p: next(i for i, r in enumerate(refs) if str(r.image_path) == p) for p in images[:3]}
    decoded.clear()
    for p in (images[0], images[1], images[0], images[2], images[1]):  # images[1] is dropped when images[2] comes
        small[by_image[p]]
    assert decoded == [images[0], images[1], images[2], images[1]]
    assert list(small._views) == [images[2], images[1]]
    with pytest.raises(ValueError, match=r"memo_images=-1: expected a count of images >= 0"):
        GroundingDataset(refs, memo_images=-1)
