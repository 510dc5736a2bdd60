"""Synthetic generator: determinism, unambiguous expressions, swaps, scene sanity, CLI."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lens.data import (
    load_custom,
    load_grefcoco,
    load_groundingsuite,
    load_reasonseg,
    load_refer,
)
from lens.data.masks import polygon_mask
from lens.data.synthetic import (
    COLOURS,
    Predicate,
    Scene,
    SceneObject,
    attach_swaps,
    generate_synthetic,
    load_grefcoco_meta,
    load_swaps,
    load_synthetic_meta,
    parse_expression,
    render,
    resolve,
    shape_polygon,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meta(synthetic_root):
    return load_synthetic_meta(synthetic_root)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    kw = dict(n_train=3, n_val=2, n_test=2, image_size=96)
    generate_synthetic(tmp_path / "a", seed=11, **kw)
    generate_synthetic(tmp_path / "b", seed=11, **kw)
    generate_synthetic(tmp_path / "c", seed=12, **kw)
    a, b, c = (_tree_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) > 20
    assert a != c


def test_layout_is_upstream(synthetic_root):
    for rel in ("refer_seg/refcoco/refs(unc).p", "refer_seg/refcoco+/refs(unc).p", "refer_seg/refcocog/refs(umd).p",
                "refer_seg/refcoco/instances.json", "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg",
                "reason_seg/ReasonSeg/val/synth_val_0000.jpg", "reason_seg/ReasonSeg/val/synth_val_0000.json",
                "GroundingSuite-Eval.jsonl", "custom/train.jsonl", "custom/val.jsonl", "custom/test.jsonl",
                "swap.json", "synthetic_meta.json", "refer_seg/grefcoco/grefs(unc).json",
                "refer_seg/grefcoco/instances.json", "grefcoco_meta.json"):
        assert (synthetic_root / rel).is_file(), rel
    assert any((synthetic_root / "coco/unlabeled2017").glob("*.jpg"))


def test_scenes_have_two_plus_disjoint_distinct_objects(synthetic_root, meta):
    from PIL import Image

    for key, scene in meta["scenes"].items():
        assert 2 <= len(scene.objects) <= 4
        masks = np.stack([polygon_mask(o.polygon, scene.height, scene.width) for o in scene.objects])
        assert masks.sum(0).max() == 1, key  # disjoint
        assert [int(m.sum()) for m in masks] == [o.area for o in scene.objects]
    scene = meta["scenes"]["val/0000"]
    img = np.asarray(Image.open(synthetic_root / "custom/images/val_0000.jpg").convert("RGB")).astype(int)
    for o in scene.objects:
        inner = polygon_mask(shape_polygon(o.shape, o.cx, o.cy, 0.5 * o.r), scene.height, scene.width) > 0
        assert np.abs(img[inner].mean(0) - COLOURS[o.colour]).max() < 12  # JPEG only perturbs pixels slightly


GREFCOCO_FILES = ("grefcoco_meta.json", "refer_seg/grefcoco/grefs(unc).json", "refer_seg/grefcoco/instances.json")
# sha256 over (path, sha256(bytes)) of every non-JPEG file written for seed 11, 3/2/2 images of 96 px,
# by the generator before gRefCOCO was added (commit c786a65): the other datasets must stay the same draws.
PRE_GREFCOCO_DIGEST = "40385e66ff179707a90a1a36fe12e68b535628a8ae8b6b9d949f70dc4aa02e4b"


def test_grefcoco_leaves_other_datasets_byte_identical(tmp_path):
    generate_synthetic(tmp_path, seed=11, n_train=3, n_val=2, n_test=2, image_size=96)
    h = hashlib.sha256()
    for p in sorted(tmp_path.rglob("*")):
        rel = str(p.relative_to(tmp_path))
        if p.is_file() and p.suffix != ".jpg" and rel not in GREFCOCO_FILES:
            h.update(rel.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    assert h.hexdigest() == PRE_GREFCOCO_DIGEST


def test_grefcoco_single_multi_and_no_target(synthetic_root, meta):
    gmeta = load_grefcoco_meta(synthetic_root)["refs"]
    for split in ("train", "val", "testA", "testB"):
        refs = load_grefcoco(synthetic_root, split)
        assert sorted(r.ref_id for r in refs) == sorted(k for k, v in gmeta.items() if v["split"] == split)
        kinds = set()
        for ref in refs:
            info = gmeta[ref.ref_id]
            scene = meta["scenes"][info["scene"]]
            kinds.add(info["kind"])
            assert ref.expressions == info["texts"]
            for text in info["texts"]:
                assert resolve(text, scene) == info["targets"], (ref.ref_id, text)
            expected = np.zeros((scene.height, scene.width), np.uint8)
            for j in info["targets"]:
                expected |= polygon_mask(scene.objects[j].polygon, scene.height, scene.width)
            assert np.array_equal(ref.load_mask(), expected)
            assert ref.meta["target_count"] == len(info["targets"])
            assert ref.meta["no_target"] is (info["kind"] == "none") and (ref.box is None) == ref.meta["no_target"]
            if info["kind"] == "multi":
                boxes = np.array([scene.objects[j].bbox for j in info["targets"]])
                assert np.allclose(ref.box, [*boxes[:, :2].min(0), *boxes[:, 2:].max(0)], atol=0.02)
        assert kinds == {"single", "multi", "none"}, split


def test_every_expression_and_swap_is_unambiguous(meta):
    kinds = set()
    for ref_id, info in meta["refs"].items():
        scene = meta["scenes"][info["scene"]]
        for text in info["texts"]:
            assert resolve(text, scene) == [info["target"]], (ref_id, text)
            kinds.add(parse_expression(text).kind)
        assert len(info["swap_expressions"]) == len(scene.objects) - 1
        for text, other in zip(info["swap_expressions"], info["swap_targets"]):
            assert other != info["target"] and resolve(text, scene) == [other], (ref_id, text)
    assert kinds == {"attr", "position", "size", "relation", "reasoning"}


def test_loaded_expressions_are_the_checked_ones(synthetic_root, meta):
    swaps = load_swaps(synthetic_root)
    refs = (load_refer(synthetic_root, "refcoco+", None) + load_refer(synthetic_root, "refcocog", None)
            + load_reasonseg(synthetic_root, "test") + load_custom(synthetic_root / "custom/train.jsonl"))
    refs = attach_swaps(refs, swaps)
    for ref in refs:
        info = meta["refs"][ref.ref_id]
        assert ref.expressions == info["texts"]
        assert ref.meta["swap_expressions"] == swaps[ref.ref_id] == info["swap_expressions"]
    rplus = [parse_expression(t) for r in refs if r.source == "refcoco+" for t in r.expressions]
    assert rplus and all(p.kind in ("attr", "size", "reasoning") for p in rplus)  # no location words
    gs = load_groundingsuite(synthetic_root / "GroundingSuite-Eval.jsonl")
    assert all(r.ref_id in swaps for r in gs)


def _scene(*objs: tuple[str, str, float, float, float]) -> Scene:
    objects = []
    for shape, colour, cx, cy, r in objs:
        poly = shape_polygon(shape, cx, cy, r)
        objects.append(SceneObject(shape, colour, cx, cy, r, poly, int(polygon_mask(poly, 200, 200).sum())))
    return Scene("t", "val", 200, 200, objects)


def test_grammar_by_hand():
    scene = _scene(("circle", "red", 30, 100, 20), ("circle", "red", 150, 100, 12), ("square", "blue", 90, 30, 15))
    assert resolve("the red circle", scene) == [0, 1]  # ambiguous
    assert resolve("the red circle on the left", scene) == [0]
    assert resolve("The largest red object.", scene) == [0]
    assert resolve("the small circle", scene) == [1]
    assert resolve("the blue square", scene) == [2] == resolve("the shape with four right angles", scene)
    assert resolve("the shape at the top", scene) == [2]
    assert resolve("the circle right of the blue square", scene) == [1]
    assert resolve("Can you find something with a round outline that is the colour of a ripe tomato?", scene) == [0, 1]
    assert resolve("the object that is the colour of a clear summer sky", scene) == [2]
    assert resolve("the green star", scene) == []
    assert resolve("all the red circles", scene) == [0, 1] == resolve("every red circle", scene)
    assert resolve("the shapes", scene) == [0, 1, 2] and resolve("all the green objects", scene) == []
    near = _scene(("circle", "red", 30, 100, 10), ("circle", "red", 35, 160, 10))
    assert resolve("the circle on the left", near) == [0, 1]  # within the margin: ambiguous
    with pytest.raises(ValueError, match="not a synthetic expression"):
        parse_expression("the thing over there")


def test_render_parse_round_trip():
    rng = np.random.default_rng(0)
    preds = [Predicate("attr", "red", None), Predicate("position", None, "star", "at the bottom"),
             Predicate("size", "green", None, "smallest"), Predicate("relation", None, None, "below", ("blue", None)),
             Predicate("reasoning", "yellow", "triangle"), Predicate("reasoning", None, "diamond"),
             Predicate("group", "red", "star"), Predicate("group", None, None), Predicate("group", "blue", None)]
    for p in preds:
        for _ in range(6):  # group phrases come in three forms
            assert parse_expression(render(p, rng)) == p


def test_cli_writes_and_prints_summary(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic_data", REPO / "tools/make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "d"), "--seed", "1", "--n-train", "2", "--n-val", "1",
                        "--n-test", "1", "--image-size", "96"]) == 0
    out = capsys.readouterr().out
    assert "images: 4" in out and "refcoco" in out and "reasonseg" in out
    assert len(load_reasonseg(tmp_path / "d", "train")) == 2


def test_training_sources_and_benchmarks_share_one_registry(synthetic_root, monkeypatch):
    from lens.data.registry import load_benchmark, load_source
    from lens.training.data import load_source as training_source

    def ids(refs):
        return [r.ref_id for r in refs]

    for source, benchmark in (("refcoco:train", "refcoco_train"), ("refcoco", "refcoco_train"),
                              ("grefcoco:val", "grefcoco_val"), ("reasonseg:train", "reasonseg_train"),
                              ("refcocog:val", "refcocog_val")):
        assert ids(training_source(source, synthetic_root)) == ids(load_benchmark(benchmark, synthetic_root)), source
    # custom: resolves a relative path the same way for both (as given, else under data_root)
    monkeypatch.chdir(synthetic_root.parent)
    under_root = ids(load_benchmark("custom:custom/train.jsonl", synthetic_root))
    assert under_root and ids(training_source("custom:custom/train.jsonl", synthetic_root)) == under_root
    as_given = f"custom:{synthetic_root.name}/custom/train.jsonl"
    assert ids(load_source(as_given, "elsewhere")) == ids(load_benchmark(as_given, "elsewhere")) == under_root
    with pytest.raises(ValueError, match="unknown training source 'refcoco:bogus'"):
        load_source("refcoco:bogus", synthetic_root)
    with pytest.raises(ValueError, match="unknown training source 'coco:train'"):
        load_source("coco:train", synthetic_root)
