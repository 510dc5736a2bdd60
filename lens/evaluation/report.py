"""Markdown tables of evaluation results, laid out like the LENS paper.

* RES (cIoU): rows RefCOCO / RefCOCO+ / RefCOCOg, columns val / testA / testB / test.
* Reasoning / grounding (gIoU, cIoU): ReasonSeg-Val, ReasonSeg-Test (plain and CoT), GS-Eval.
* Generalized RES (gRefCOCO and any split with no-target expressions): GRES cIoU, gIoU, N-acc, T-acc.
* Box versus mask (every split with box IoUs): "mask rescues box", the reverse, mask mIoU by box IoU.
* Every split (incl. custom and CoT RefCOCO) in a generic table with n, box metrics and speed (and the
  coverage of a scored predictions file).

Numbers are percentages with one decimal; ``-`` marks a split that was not evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping

REFER_ROWS = (("refcoco", "RefCOCO"), ("refcoco+", "RefCOCO+"), ("refcocog", "RefCOCOg"))
REFER_COLUMNS = ("val", "testA", "testB", "test")
REASON_ROWS = (
    ("reasonseg_val", "ReasonSeg-Val"),
    ("reasonseg_test", "ReasonSeg-Test"),
    ("reasonseg_val_cot", "ReasonSeg-Val (CoT)"),
    ("reasonseg_test_cot", "ReasonSeg-Test (CoT)"),
    ("groundingsuite", "GS-Eval"),
    ("groundingsuite_cot", "GS-Eval (CoT)"),
)
PROTOCOL_NOTES = {
    "lens": "upstream-exact: foreground = value 1 (overlaps and ignore pixels are background), "
    "ReasonSeg scores text[0] only, GroundingSuite captions get the upstream cleanup",
    "standard": "every expression scored, foreground = values 1..254, ignore (255) pixels excluded, raw captions",
}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def refer_table(results: Mapping[str, dict]) -> str | None:
    """RES cIoU table; ``None`` when no RefCOCO split was evaluated. Adds the average when all 8 are there."""
    cells = {(ds, sp): results.get(f"{ds}_{sp}") for ds, _ in REFER_ROWS for sp in REFER_COLUMNS}
    present = [r for r in cells.values() if r is not None]
    if not present:
        return None
    rows = [[label] + [pct(cells[(ds, sp)]["ciou"]) if cells[(ds, sp)] else "-" for sp in REFER_COLUMNS]
            for ds, label in REFER_ROWS]
    text = "### Referring expression segmentation (cIoU)\n\n" + table(["", *REFER_COLUMNS], rows)
    if len(present) == 8:
        text += f"\n\nAverage over the 8 splits: {pct(sum(r['ciou'] for r in present) / 8)}"
    return text


def reasoning_table(results: Mapping[str, dict]) -> str | None:
    """gIoU / cIoU table for ReasonSeg and GroundingSuite; ``None`` when none was evaluated."""
    rows = [[label, pct(results[key]["giou"]), pct(results[key]["ciou"])] for key, label in REASON_ROWS if key in results]
    if not rows:
        return None
    return "### Reasoning segmentation and GroundingSuite (gIoU / cIoU)\n\n" + table(["benchmark", "gIoU", "cIoU"], rows)


GRES_ROWS = (("grefcoco_val", "gRefCOCO val"), ("grefcoco_testA", "gRefCOCO testA"),
             ("grefcoco_testB", "gRefCOCO testB"))


def gres_table(results: Mapping[str, dict]) -> str | None:
    """GRES metrics of gRefCOCO (paper rows first) and of any other split that reports them."""
    known = dict(GRES_ROWS)
    names = [k for k, _ in GRES_ROWS if k in results and results[k].get("gres")]
    names += [k for k, r in results.items() if r.get("gres") and k not in known]
    if not names:
        return None
    rows = []
    for name in names:
        g = results[name]["gres"]
        rows.append([known.get(name, name), pct(g["ciou"]), pct(g["giou"]), pct(g["n_acc"]), pct(g["t_acc"]),
                     f"{g['n_no_target']} / {g['n']}"])
    note = ("GRES rules: a no-target expression scores IoU 1 when the prediction is empty (predicted area 0) "
            "and adds its predicted area to U otherwise; N-acc = TN / (TN + FP) over no-target expressions, "
            "T-acc = TP / (TP + FN) over the others.")
    header = ["benchmark", "cIoU", "gIoU", "N-acc", "T-acc", "no-target / n"]
    return "### Generalized referring segmentation (GRES metrics)\n\n" + table(header, rows) + "\n\n" + note


def box_mask_table(results: Mapping[str, dict]) -> str | None:
    """Per split with box IoUs: mask rescues box, box rescues mask, mask mIoU (n) per box-IoU bin."""
    names = [k for k, r in results.items() if r.get("box_vs_mask")]
    if not names:
        return None
    bins = results[names[0]]["box_vs_mask"]["bins"]
    labels = [f"box IoU [{b['lo']:.2f}, {b['hi']:.2f}{']' if k == len(bins) - 1 else ')'}"
              for k, b in enumerate(bins)]
    rows = []
    for name in names:
        b = results[name]["box_vs_mask"]
        cells = [f"{pct(x['mask_miou'])} ({x['n']})" for x in b["bins"]]
        rows.append([name, str(b["n_box"]), pct(b["mask_rescues_box"]), pct(b["box_rescues_mask"]), *cells])
    header = ["split", "n box", "mask rescues box", "box rescues mask", *labels]
    note = ("Mask rescues box: box IoU < 0.5 but mask IoU >= 0.5 (share of the expressions with a box IoU); "
            "box rescues mask: the reverse. Bin cells: mask mIoU (expressions).")
    return "### Box versus mask\n\n" + table(header, rows) + "\n\n" + note


def detail_table(results: Mapping[str, dict]) -> str:
    """Every split: n, gIoU, cIoU, box accuracy / mIoU, time and throughput (and predictions coverage)."""
    with_cov = any(r.get("predictions") for r in results.values())
    rows = []
    for name, r in results.items():
        speed = r.get("expressions_per_s")
        row = [
            name, str(r["n"]), pct(r["giou"]), pct(r["ciou"]), pct(r.get("box_acc")), pct(r.get("box_miou")),
            f"{r.get('time_s', 0.0):.1f}", "-" if speed is None else f"{speed:.2f}",
        ]
        if with_cov:
            cov = r.get("predictions")
            row.append(f"{pct(cov['coverage'])} ({cov['n_scored']}/{cov['n_expected']})" if cov else "-")
        rows.append(row)
    header = ["split", "n", "gIoU", "cIoU", "box acc@0.5", "box mIoU", "time (s)", "expr/s"]
    return "### All splits\n\n" + table(header + (["coverage"] if with_cov else []), rows)


def results_markdown(results: Mapping[str, dict], model: str, protocol: str, limit: int | None = None) -> str:
    """The full ``results.md`` text."""
    head = [f"# LENS evaluation: `{model}`", "", f"Protocol: **{protocol}** ({PROTOCOL_NOTES.get(protocol, '')})."]
    if limit:
        head.append(f"Smoke run: only the first {limit} expressions of each split (not comparable to the paper).")
    parts = ["\n".join(head)]
    tables = (refer_table(results), reasoning_table(results), gres_table(results), box_mask_table(results))
    parts += [t for t in tables if t]
    parts.append(detail_table(results))
    return "\n\n".join(parts) + "\n"
