"""Predictions files: one JSON line per expression, written by ``--save-predictions`` and scored by
``--predictions`` (LENS's own or another system's masks, no model loaded). Format: docs/evaluation.md.

A line names its ``benchmark`` (``refcoco_val``, ``reasonseg_val:cot``, ``custom:<path>`` or the
split name ``custom_val``) and its expression by ``id`` (``<ref_id>#<index>``), or ``ref_id`` +
``expression``, or ``image`` + ``expression``; ``mask`` is a COCO RLE (``{"size": [h, w], "counts":
...}``) or a PNG path (relative to the file's folder; foreground = nonzero). Optional: ``box``
(original pixels), ``box_llm`` + ``llm_hw`` (LLM-image pixels, as LENS scores boxes), ``text``,
``score``, ``time_s``, ``meta``. Fields LENS writes for reading only (``I``, ``U``, ``iou``, ...) are
recomputed, never trusted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lens.evaluation.config import Expression, SplitSpec

KEY_FIELDS = ("benchmark", "id", "ref_id", "image", "expression")
VALUE_FIELDS = ("mask", "box", "box_llm", "llm_hw", "text", "score", "time_s", "meta")
INFO_FIELDS = ("I", "U", "iou", "box_iou", "pred_area", "orig_hw", "no_target", "target_count", "no_target_answer",
               "gt_box_llm")
FIELDS = KEY_FIELDS + VALUE_FIELDS + INFO_FIELDS


class PredictionError(ValueError):
    """A bad predictions file or line; the message names the file, the line and the field."""


@dataclass(frozen=True)
class PredLine:
    file: Path
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ---------------------------------------------------------------------------- reading and validation


def prediction_files(path: str | Path) -> list[Path]:
    """A file as given; a folder: its ``*.predictions.jsonl`` files, else all its ``*.jsonl`` files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"predictions file or folder not found: {path}")
    files = sorted(path.glob("*.predictions.jsonl")) or sorted(p for p in path.glob("*.jsonl") if ".partial" not in p.name)
    if not files:
        raise FileNotFoundError(f"no *.predictions.jsonl or *.jsonl file in {path}")
    return files


def read_predictions(path: str | Path) -> list[PredLine]:
    """Every line of every predictions file, validated (errors: ``file:line: field 'x': ...``)."""
    lines = []
    for file in prediction_files(path):
        with open(file, encoding="utf-8") as fh:
            for no, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                where = f"{file}:{no}"
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise PredictionError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                validate_line(obj, where)
                lines.append(PredLine(file, no, obj))
    return lines


def _nonempty_str(obj: dict, key: str, where: str) -> None:
    if key in obj and not (isinstance(obj[key], str) and obj[key].strip()):
        raise PredictionError(f"{where}: field {key!r} must be a non-empty string, got {obj[key]!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _box(obj: dict, key: str, where: str) -> None:
    v = obj.get(key)
    if v is not None and not (isinstance(v, list) and len(v) == 4 and all(_number(x) for x in v)):
        raise PredictionError(f"{where}: field {key!r} must be [x1, y1, x2, y2] (4 finite numbers) or null, got {v!r}")


def validate_line(obj: Any, where: str) -> None:
    """Structure of one line (mask contents and sizes are checked when it is scored)."""
    if not isinstance(obj, dict):
        raise PredictionError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise PredictionError(f"{where}: unknown field(s) {unknown}; allowed: {list(KEY_FIELDS + VALUE_FIELDS)}")
    if "benchmark" not in obj:
        raise PredictionError(f"{where}: field 'benchmark' is missing (e.g. \"refcoco_val\")")
    for key in ("benchmark", "id", "ref_id", "image", "expression"):
        _nonempty_str(obj, key, where)
    if "id" not in obj and not ("expression" in obj and ("ref_id" in obj or "image" in obj)):
        raise PredictionError(f"{where}: name the expression with field 'id', or 'ref_id' + 'expression', "
                              "or 'image' + 'expression'")
    mask = obj.get("mask")
    if mask is None:
        raise PredictionError(f"{where}: field 'mask' is missing (COCO RLE {{'size': [h, w], 'counts': ...}} "
                              "or a PNG path)")
    if isinstance(mask, dict):
        from lens.data.masks import validate_segmentation

        try:
            validate_segmentation(mask, f"{where}: field 'mask'")
        except ValueError as exc:
            raise PredictionError(str(exc)) from None
    elif not (isinstance(mask, str) and mask.strip()):
        raise PredictionError(f"{where}: field 'mask' must be a COCO RLE dict or a PNG path string, got {mask!r}")
    _box(obj, "box", where)
    _box(obj, "box_llm", where)
    hw = obj.get("llm_hw")
    if hw is not None and not (isinstance(hw, list) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)):
        raise PredictionError(f"{where}: field 'llm_hw' must be [height, width] positive ints, got {hw!r}")
    if obj.get("box_llm") is not None and hw is None:
        raise PredictionError(f"{where}: field 'box_llm' needs field 'llm_hw' (the LLM image's [height, width])")
    if obj.get("text") is not None and not isinstance(obj["text"], str):
        raise PredictionError(f"{where}: field 'text' must be a string or null, got {obj['text']!r}")
    for key in ("score", "time_s"):
        if obj.get(key) is not None and not _number(obj[key]):
            raise PredictionError(f"{where}: field {key!r} must be a finite number or null, got {obj[key]!r}")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        raise PredictionError(f"{where}: field 'meta' must be a JSON object, got {obj['meta']!r}")


def benchmarks_in(lines: list[PredLine]) -> list[str]:
    """The ``benchmark`` values in first-seen order."""
    return list(dict.fromkeys(pl.data["benchmark"] for pl in lines))


def lines_for(spec: SplitSpec, lines: list[PredLine]) -> list[PredLine]:
    """Lines whose benchmark is this split's token (``reasonseg_val:cot``) or file name (``reasonseg_val_cot``)."""
    keys = {spec.token, spec.name}
    return [pl for pl in lines if pl.data["benchmark"] in keys]


# ---------------------------------------------------------------------------- matching lines to expressions


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class Matching:
    """Lines matched to the scored expressions, and every problem found (counted and listed)."""

    matched: dict[str, PredLine] = field(default_factory=dict)  # expression id -> line
    missing: list[str] = field(default_factory=list)  # scored ids with no line
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # {"id", "lines", "identical"}
    unmatched: list[dict[str, str]] = field(default_factory=list)  # {"line", "reason"}
    excluded: list[dict[str, str]] = field(default_factory=list)  # in the data, not scored (protocol / limit)
    ambiguous: list[dict[str, str]] = field(default_factory=list)  # key fits several expressions: first free taken

    def counts(self) -> dict[str, int]:
        conflicting = sum(not d["identical"] for d in self.duplicates)
        return {"n_matched": len(self.matched), "n_missing": len(self.missing), "n_duplicate": len(self.duplicates),
                "n_duplicate_conflicting": conflicting, "n_unmatched": len(self.unmatched),
                "n_excluded": len(self.excluded), "n_ambiguous": len(self.ambiguous)}

    def issues(self) -> dict[str, Any]:
        return {**self.counts(), "missing": self.missing, "duplicates": self.duplicates, "unmatched": self.unmatched,
                "excluded": self.excluded, "ambiguous": self.ambiguous}


class _Index:
    """Lookups from every expression of the data (all texts, no limit) by id, ref + text, image + text."""

    def __init__(self, every: list[Expression], extra_text: Any = None) -> None:
        self.by_id = {e.id: e for e in every}
        self.by_ref: dict[tuple[str, str], list[str]] = {}
        self.by_image: dict[tuple[str, str], list[str]] = {}
        self.by_name: dict[str, set[str]] = {}
        self.extra_text = extra_text
        for e in every:
            self.by_ref.setdefault((str(e.ref.ref_id), _norm(e.text)), []).append(e.id)
            self.by_image.setdefault((e.image_key, _norm(e.text)), []).append(e.id)
            self.by_name.setdefault(Path(e.image_key).name, set()).add(e.image_key)

    def texts(self, expression: str) -> list[str]:
        out = [_norm(expression)]
        if self.extra_text is not None:
            out.append(_norm(self.extra_text(expression)))
        return list(dict.fromkeys(out))

    def image(self, given: str) -> tuple[str | None, str]:
        """The data's image key for a path given in a line, by resolved path or trailing path parts."""
        path = Path(given)
        found = sorted(self.by_name.get(path.name, set()))
        if path.is_absolute():
            target = path.resolve()
            found = [k for k in found if Path(k).resolve() == target]
        else:
            tail = tuple(p for p in path.parts if p != ".")
            found = [k for k in found if Path(k).resolve().parts[-len(tail):] == tail or Path(k).parts[-len(tail):] == tail]
        if len(found) == 1:
            return found[0], ""
        if not found:
            return None, f"field 'image': no image of the benchmark matches {given!r}"
        return None, f"field 'image': {given!r} matches {len(found)} images ({found[0]}, ...); give a longer path"

    def candidates(self, d: dict[str, Any]) -> tuple[list[str], str]:
        if "id" in d:
            eid = d["id"]
            return ([eid], "") if eid in self.by_id else ([], f"field 'id': {eid!r} is not an expression of the benchmark")
        if "ref_id" in d:
            for t in self.texts(d["expression"]):
                if (d["ref_id"], t) in self.by_ref:
                    return self.by_ref[(d["ref_id"], t)], ""
            return [], f"fields 'ref_id' + 'expression': no reference {d['ref_id']!r} with expression {d['expression']!r}"
        key, why = self.image(d["image"])
        if key is None:
            return [], why
        for t in self.texts(d["expression"]):
            if (key, t) in self.by_image:
                return self.by_image[(key, t)], ""
        return [], f"fields 'image' + 'expression': image {d['image']!r} has no expression {d['expression']!r}"


def _content(d: dict[str, Any]) -> str:
    return json.dumps({k: d.get(k) for k in ("mask", "box", "box_llm", "llm_hw", "text")}, sort_keys=True)


def match_predictions(lines: list[PredLine], scored: list[Expression], every: list[Expression],
                      extra_text: Any = None) -> Matching:
    """Match lines to ``scored`` expressions; ``every`` (all of the data) tells excluded from unmatched."""
    index = _Index(every, extra_text)
    scored_ids = {e.id for e in scored}
    m = Matching()
    claimed: dict[str, PredLine] = {}
    dups: dict[str, dict[str, Any]] = {}
    for pl in lines:
        cands, why = index.candidates(pl.data)
        if not cands:
            m.unmatched.append({"line": pl.where, "reason": why})
            continue
        free = [c for c in cands if c not in claimed]
        if len(cands) > 1:
            m.ambiguous.append({"line": pl.where, "ids": cands, "taken": free[0] if free else None})
        if not free:
            same = [c for c in cands if _content(claimed[c].data) == _content(pl.data)]
            eid = same[0] if same else cands[0]
            entry = dups.setdefault(eid, {"id": eid, "lines": [claimed[eid].where], "identical": True})
            entry["lines"].append(pl.where)
            entry["identical"] = entry["identical"] and bool(same)
            continue
        claimed[free[0]] = pl
    m.duplicates = list(dups.values())
    for eid, pl in claimed.items():
        if eid in scored_ids:
            m.matched[eid] = pl
        else:
            m.excluded.append({"line": pl.where, "id": eid})
    m.missing = [e.id for e in scored if e.id not in m.matched]
    return m


def check_matching(m: Matching, split: str, n_scored: int, allow_missing: bool, issues_path: Path) -> None:
    """Raise for unmatched lines, conflicting duplicates and (unless ``allow_missing``) missing expressions."""
    problems = []
    if m.unmatched:
        u = m.unmatched[0]
        problems.append(f"{len(m.unmatched)} line(s) match no expression (first: {u['line']}: {u['reason']})")
    conflicting = [d for d in m.duplicates if not d["identical"]]
    if conflicting:
        d = conflicting[0]
        problems.append(f"{len(conflicting)} expression(s) have conflicting duplicate predictions "
                        f"(first: {d['id']!r} on {', '.join(d['lines'])})")
    if m.missing and not allow_missing:
        shown = ", ".join(repr(i) for i in m.missing[:3])
        problems.append(f"{len(m.missing)} of {n_scored} expression(s) have no prediction (e.g. {shown}); "
                        "pass --allow-missing to score the others and report coverage")
    if problems:
        raise PredictionError(f"{split}: " + "; ".join(problems) + f"; every issue is listed in {issues_path}")


# ---------------------------------------------------------------------------- masks and records


def load_mask(pl: PredLine, hw: tuple[int, int]) -> np.ndarray:
    """The predicted bool mask at the image size ``hw``; errors name the line and the field."""
    mask, where = pl.data["mask"], pl.where
    if isinstance(mask, dict):
        from lens.data.masks import decode_segmentation

        try:
            return decode_segmentation(mask, hw[0], hw[1], combine="union", what=f"{where}: field 'mask'") > 0
        except ValueError as exc:
            raise PredictionError(str(exc)) from None
    from PIL import Image

    path = Path(mask) if Path(mask).is_absolute() else pl.file.parent / mask
    if not path.is_file():
        raise PredictionError(f"{where}: field 'mask': PNG file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode in ("P", "RGBA", "LA") else im)
    except OSError as exc:
        raise PredictionError(f"{where}: field 'mask': cannot read image {path} ({exc})") from None
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    if tuple(arr.shape) != tuple(hw):
        raise PredictionError(f"{where}: field 'mask': {path} is {list(arr.shape)} (h, w) but the image is {list(hw)}")
    return arr > 0


def prediction_line(spec: SplitSpec, e: Expression, r: dict[str, Any]) -> dict[str, Any]:
    """One ``--save-predictions`` line from a record: the input fields, then the recomputable figures."""
    from lens.evaluation.metrics import expression_iou

    line = {"benchmark": spec.token, "id": e.id, "ref_id": str(e.ref.ref_id), "image": str(e.ref.image_path),
            "expression": e.text, "mask": r["rle"]}
    if "box" in r:  # a scored file without boxes stays without boxes
        line["box"] = r["box"]
    if r.get("llm_hw") is not None:
        line.update(box_llm=r.get("box_llm"), llm_hw=r["llm_hw"])
    line.update(text=r.get("text"), score=r.get("score"), time_s=r.get("time_s"))
    line.update(orig_hw=r.get("orig_hw"), I=r["I"], U=r["U"], iou=expression_iou(r["I"], r["U"]),
                box_iou=r.get("box_iou"), pred_area=r.get("pred_area"), no_target=r.get("no_target", False),
                target_count=r.get("target_count"), no_target_answer=r.get("no_target_answer", False))
    return line


def encode_rles(masks: np.ndarray) -> list[dict[str, Any]]:
    """``(G, H, W)`` bool -> compressed COCO RLEs with str counts (one pycocotools call)."""
    from pycocotools import mask as coco_mask

    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def score_line(pl: PredLine, e: Expression, target: np.ndarray, protocol: str) -> dict[str, Any]:
    """The record of one matched line: I, U, predicted area, box IoU as a model run computes them.

    Box IoU: with ``llm_hw``, in LLM-image pixels against the ground-truth box rounded there (as a LENS
    run, so its own predictions give the same figure); else with ``box`` in original pixels; without
    either field the expression has no box IoU (a ``null`` box scores 0).
    """
    import torch

    from lens.data.transforms import box_from_llm_pixels, box_to_llm_pixels
    from lens.evaluation.metrics import intersection_union
    from lens.geometry import box_iou

    hw = tuple(int(v) for v in target.shape)
    pred = load_mask(pl, hw)
    inter, union = intersection_union(torch.from_numpy(pred), torch.from_numpy(target), protocol)
    d = pl.data
    gt = e.ref.target_box(target)
    rec: dict[str, Any] = {"id": e.id, "I": int(inter), "U": int(union), "pred_area": int(pred.sum()),
                           "box_iou": None, "text": d.get("text"), "score": d.get("score"), "time_s": d.get("time_s"),
                           "orig_hw": list(hw), "rle": encode_rles(pred[None])[0], "line": pl.where}
    if d.get("llm_hw") is not None:
        llm_hw, box_llm = tuple(d["llm_hw"]), d.get("box_llm")
        gt_llm = box_to_llm_pixels(gt, hw, llm_hw) if gt is not None else None
        rec.update(llm_hw=list(llm_hw), box_llm=box_llm, gt_box_llm=gt_llm,
                   box=d["box"] if "box" in d else (box_from_llm_pixels(box_llm, llm_hw, hw) if box_llm else None))
        rec["box_iou"] = box_iou(box_llm, gt_llm) if gt_llm is not None else None
    elif "box" in d:
        rec["box"] = d["box"]
        rec["box_iou"] = box_iou(d["box"], gt) if gt is not None else None
    return rec
