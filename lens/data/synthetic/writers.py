"""Writers of every on-disk format (REFER pickles, gRefCOCO, ReasonSeg, GroundingSuite, custom JSONL) and the
side files (swap.json, synthetic_meta.json, grefcoco_meta.json), fed scene by scene."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lens.data.masks import encode_rle, polygon_mask
from lens.data.synthetic.grammar import (
    ALL_KINDS,
    CATEGORY_IDS,
    COLOURS,
    FORMAT_KINDS,
    GREFCOCO_SINGLE_KINDS,
    SENTENCE_WRAPPERS,
    Predicate,
    _group_text,
    _matches,
    _swap_texts,
    choose_texts,
    render,
    valid_predicates,
)
from lens.data.synthetic.scenes import Scene, SceneObject

# ----------------------------------------------------------------------------- writers


class _Writer:
    """Collects refs of all formats plus the side files while scenes are generated."""

    def __init__(self, out: Path, rng: np.random.Generator, grng: np.random.Generator) -> None:
        self.out, self.rng, self.grng = out, rng, grng  # grng: the gRefCOCO stream only
        self.refs_meta: dict[str, dict[str, Any]] = {}
        self.swaps: dict[str, list[str]] = {}
        self.scenes: dict[str, dict[str, Any]] = {}
        self.refer_refs: dict[str, list[dict]] = {"refcoco": [], "refcoco+": [], "refcocog": []}
        self.coco_images: list[dict] = []
        self.coco_anns: list[dict] = []
        self.gs_lines: list[dict] = []
        self.grefs: list[dict] = []
        self.sentences = dict.fromkeys([*self.refer_refs, "grefcoco"], 0)  # sentences written so far: the next sent_id
        self.grefs_meta: dict[str, dict[str, Any]] = {}
        self.custom: dict[str, list[dict]] = {}
        self.counts: dict[str, int] = {}

    def add(self, scene: Scene, image_id: int, index_in_split: int, jpeg: bytes) -> None:
        preds = [valid_predicates(scene, i) for i in range(len(scene.objects))]
        self.scenes[scene.key] = asdict(scene)
        self._refer(scene, image_id, index_in_split, preds, jpeg)
        self._reasonseg(scene, index_in_split, preds, jpeg)
        if scene.split in ("val", "test"):
            self._groundingsuite(scene, image_id, preds, jpeg)
        self._custom(scene, index_in_split, preds, jpeg)
        self._grefcoco(scene, image_id, index_in_split, preds)

    def _record(self, ref_id: str, scene: Scene, target: int, texts: list[str], swap: tuple[list[str], list[int]],
                **extra: Any) -> None:
        self.refs_meta[ref_id] = {"scene": scene.key, "target": target, "texts": texts,
                                  "swap_expressions": swap[0], "swap_targets": swap[1], **extra}
        self.swaps[ref_id] = swap[0]
        fmt = ref_id.split("/")[0]
        self.counts[fmt] = self.counts.get(fmt, 0) + 1

    def _write(self, rel: str, data: bytes) -> None:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # REFER ------------------------------------------------------------------
    def _refer(self, scene: Scene, image_id: int, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        self._write(f"refer_seg/images/mscoco/images/train2014/COCO_train2014_{image_id:012d}.jpg", jpeg)
        self.coco_images.append({"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg",
                                 "height": scene.height, "width": scene.width})
        overlaps = set()
        for j, o in enumerate(scene.objects):
            ann_id = image_id * 100 + j
            overlap = (idx == 0 and j == 0) or self.rng.random() < 0.08  # a few two-part annotations
            seg = [o.polygon, _inner_square(o)] if overlap else [o.polygon]
            if overlap:
                overlaps.add(j)
            x1, y1, x2, y2 = o.bbox
            self.coco_anns.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o.shape],
                                   "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": o.area,
                                   "iscrowd": 0, "segmentation": seg})
        for ds, refs in self.refer_refs.items():
            split = _refer_split(scene.split, idx, ds)
            for j, o in enumerate(scene.objects):
                texts = choose_texts(preds[j], FORMAT_KINDS[ds], int(self.rng.integers(1, 4)), self.rng)
                if not texts:
                    continue
                ref_id, ann_id = len(refs), image_id * 100 + j
                sent0 = self.sentences[ds]
                self.sentences[ds] += len(texts)
                sents = [{"sent": t, "raw": t, "sent_id": sent0 + k, "tokens": t.split()} for k, t in enumerate(texts)]
                refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                             "category_id": CATEGORY_IDS[o.shape], "sent_ids": [s["sent_id"] for s in sents],
                             "sentences": sents, "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"})
                swap = _swap_texts(scene, preds, j, FORMAT_KINDS[ds], self.rng)
                self._record(f"{ds}/{ref_id}", scene, j, texts, swap, split=split, overlap=j in overlaps)

    # ReasonSeg --------------------------------------------------------------
    def _reasonseg(self, scene: Scene, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        rng = self.rng
        reasoned = [j for j, p in enumerate(preds) if any(q.kind == "reasoning" for q in p)]
        target = int(rng.choice(reasoned or list(range(len(scene.objects)))))
        kinds = FORMAT_KINDS["reasonseg"] if reasoned else ALL_KINDS
        texts = [_wrap(t, rng) for t in choose_texts(preds[target], kinds, int(rng.integers(1, 4)), rng)]
        o = scene.objects[target]
        shapes = [{"label": "target", "points": p} for p in _maybe_split(o, idx % 4 == 1)]
        if idx % 3 == 0:  # an ignore patch over the target's right edge (painted after: smaller)
            shapes.append({"label": "ignore", "points": _pairs(_square(o.cx + 0.9 * o.r, o.cy, 0.3 * o.r))})
        if idx % 5 == 2:  # a deprecated "flag" shape that must be skipped
            shapes.append({"label": "flag", "points": _pairs(_square(scene.width / 2, scene.height / 2,
                                                                       0.45 * min(scene.width, scene.height)))})
        name = f"synth_{scene.split}_{idx:04d}"
        ann: dict[str, Any] = {"shapes": shapes, "text": texts, "is_sentence": any(t[-1] in "?." for t in texts)}
        if idx % 3 != 2:  # some files omit the size so loaders read the image header
            ann.update(imageHeight=scene.height, imageWidth=scene.width)
        base = f"reason_seg/ReasonSeg/{scene.split}/{name}"
        self._write(base + ".jpg", jpeg)
        self._write(base + ".json", json.dumps(ann).encode())
        swap = _swap_texts(scene, preds, target, kinds, rng)
        self._record(f"reasonseg/{scene.split}/{name}", scene, target, texts, swap,
                     ignore=idx % 3 == 0, multipart=len(shapes) > 1 and shapes[1]["label"] == "target",
                     flag=idx % 5 == 2)

    # GroundingSuite ---------------------------------------------------------
    def _groundingsuite(self, scene: Scene, image_id: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        self._write(f"coco/unlabeled2017/{image_id:012d}.jpg", jpeg)
        for j, o in enumerate(scene.objects):
            text = choose_texts(preds[j], ALL_KINDS, 1, self.rng)[0]
            caption = text[0].upper() + text[1:] + "."
            overlap = len(self.gs_lines) % 7 == 3
            seg = ([o.polygon, _inner_square(o)] if overlap
                   else encode_rle(polygon_mask(o.polygon, scene.height, scene.width)))
            ref_id = f"groundingsuite/{len(self.gs_lines)}"
            self.gs_lines.append({"image_path": f"{image_id:012d}.jpg", "box": o.bbox, "segmentation": seg,
                                  "caption": caption})
            self._record(ref_id, scene, j, [caption], _swap_texts(scene, preds, j, ALL_KINDS, self.rng),
                         overlap=overlap)

    # custom -----------------------------------------------------------------
    def _custom(self, scene: Scene, idx: int, preds: list[list[Predicate]], jpeg: bytes) -> None:
        image = f"images/{scene.split}_{idx:04d}.jpg"
        self._write(f"custom/{image}", jpeg)
        for j, o in enumerate(scene.objects):
            texts = choose_texts(preds[j], ALL_KINDS, int(self.rng.integers(1, 4)), self.rng)
            swap = _swap_texts(scene, preds, j, ALL_KINDS, self.rng)
            ref_id = f"custom/{scene.split}/{idx:04d}-{j}"
            rec: dict[str, Any] = {"id": ref_id, "image": image, "expressions": texts}
            if (idx + j) % 2:
                rec["mask"] = encode_rle(polygon_mask(o.polygon, scene.height, scene.width))
            else:
                rec["polygons"] = [o.polygon]
                rec["box"] = o.bbox
            rec.update(swap_expressions=swap[0], meta={"scene": scene.key, "target": j, "swap_targets": swap[1]})
            self.custom.setdefault(scene.split, []).append(rec)
            self._record(ref_id, scene, j, texts, swap)

    # gRefCOCO ---------------------------------------------------------------
    def _grefcoco(self, scene: Scene, image_id: int, idx: int, preds: list[list[Predicate]]) -> None:
        """Single-, multi- and no-target refs on the REFER images and annotations (draws: grng only)."""
        rng = self.grng
        split = _refer_split(scene.split, idx, "grefcoco")
        for j in range(len(scene.objects)):
            texts = choose_texts(preds[j], GREFCOCO_SINGLE_KINDS, int(rng.integers(1, 3)), rng)
            if texts:
                self._gref(scene, image_id, split, [j], texts, "single")
        groups = _groups(scene)
        for k in rng.permutation(len(groups))[: int(rng.integers(1, 3))]:
            colour, shape = groups[int(k)]
            texts = _distinct(lambda c=colour, s=shape: _group_text(c, s, rng), int(rng.integers(1, 3)))
            self._gref(scene, image_id, split, _matches(scene, colour, shape), texts, "multi")
        absent = _absent(scene)
        colour, shape = absent[int(rng.integers(len(absent)))]
        n = int(rng.integers(1, 3))
        texts = _distinct(lambda: (render(Predicate("attr", colour, shape), rng) if rng.random() < 0.5
                                   else _group_text(colour, shape, rng)), n)
        self._gref(scene, image_id, split, [], texts, "none")

    def _gref(self, scene: Scene, image_id: int, split: str, targets: list[int], texts: list[str], kind: str) -> None:
        ref_id = len(self.grefs)
        sent0 = self.sentences["grefcoco"]
        self.sentences["grefcoco"] += len(texts)
        sents = [{"sent": t, "raw": t, "sent_id": sent0 + k, "tokens": t.split()} for k, t in enumerate(texts)]
        objs = scene.objects
        self.grefs.append({
            "ref_id": ref_id, "image_id": image_id, "split": split, "sentences": sents,
            "sent_ids": [x["sent_id"] for x in sents],
            "ann_id": [image_id * 100 + j for j in targets] or [-1],
            "category_id": [CATEGORY_IDS[objs[j].shape] for j in targets] or [-1],
            "no_target": not targets,
        })
        self.grefs_meta[f"grefcoco/{ref_id}"] = {"scene": scene.key, "split": split, "targets": targets,
                                                 "texts": texts, "kind": kind}
        self.counts["grefcoco"] = self.counts.get("grefcoco", 0) + 1

    # finish -----------------------------------------------------------------
    def finish(self, seed: int, image_size: int) -> None:
        cats = [{"id": i, "name": n, "supercategory": "shape"} for n, i in CATEGORY_IDS.items()]
        instances = {"images": self.coco_images, "annotations": self.coco_anns, "categories": cats}
        for ds, refs in self.refer_refs.items():
            split_by = "umd" if ds == "refcocog" else "unc"
            self._write(f"refer_seg/{ds}/refs({split_by}).p", pickle.dumps(refs, protocol=2))
            self._write(f"refer_seg/{ds}/instances.json", json.dumps(instances).encode())
        self._write("refer_seg/grefcoco/grefs(unc).json", json.dumps(self.grefs).encode())
        self._write("refer_seg/grefcoco/instances.json", json.dumps(instances).encode())
        self._write("grefcoco_meta.json", json.dumps({"seed": seed, "refs": self.grefs_meta}, sort_keys=True).encode())
        self._write("GroundingSuite-Eval.jsonl", "".join(json.dumps(x) + "\n" for x in self.gs_lines).encode())
        for split, recs in self.custom.items():
            self._write(f"custom/{split}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
        self._write("swap.json", json.dumps(self.swaps, indent=1, sort_keys=True).encode())
        meta = {"seed": seed, "image_size": image_size, "scenes": self.scenes, "refs": self.refs_meta}
        self._write("synthetic_meta.json", json.dumps(meta, sort_keys=True).encode())


def _groups(scene: Scene) -> list[tuple[str | None, str | None]]:
    """``(colour, shape)`` cores matching >= 2 objects (``(None, None)``: all of them), sorted."""
    cores = {(o.colour, o.shape) for o in scene.objects} | {(o.colour, None) for o in scene.objects}
    cores |= {(None, o.shape) for o in scene.objects} | {(None, None)}
    return sorted((c for c in cores if len(_matches(scene, *c)) >= 2), key=lambda c: (c[0] or "", c[1] or ""))


def _absent(scene: Scene) -> list[tuple[str, str | None]]:
    """Descriptions matching no object: a present colour with a present shape that never go together
    (the deceptive kind), else colours absent from the image."""
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    near = [(c, s) for c in colours for s in shapes if not _matches(scene, c, s)]
    return near or [(c, None) for c in COLOURS if c not in colours]


def _distinct(make, n: int) -> list[str]:
    """Up to ``n`` distinct strings from ``make()`` (a few tries)."""
    texts: list[str] = []
    for _ in range(4 * n):
        if len(texts) >= n:
            break
        text = make()
        if text not in texts:
            texts.append(text)
    return texts


def _refer_split(split: str, idx: int, dataset: str) -> str:
    if split != "test":
        return split
    return "test" if dataset == "refcocog" else ("testA" if idx % 2 == 0 else "testB")


def _square(cx: float, cy: float, half: float) -> list[float]:
    x1, y1, x2, y2 = cx - half, cy - half, cx + half, cy + half
    return [round(v, 2) for v in (x1, y1, x2, y1, x2, y2, x1, y2)]


def _inner_square(o: SceneObject) -> list[float]:
    """A second polygon part fully inside the object, so the summed mask holds 2 there."""
    return _square(o.cx, o.cy, 0.25 * o.r)


def _pairs(flat: Sequence[float]) -> list[list[float]]:
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]


def _maybe_split(o: SceneObject, split: bool) -> list[list[list[float]]]:
    """The object's polygon as point pairs, cut into two convex halves when ``split`` (convex shapes only)."""
    pts = _pairs(o.polygon)
    if not split or o.shape not in ("circle", "square", "diamond"):
        return [pts]
    half = len(pts) // 2
    return [pts[: half + 1], pts[half:] + pts[:1]]


def _wrap(text: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return text
    prefix, suffix = SENTENCE_WRAPPERS[int(rng.integers(len(SENTENCE_WRAPPERS)))]
    sentence = prefix + text + suffix
    return sentence[0].upper() + sentence[1:]
