"""Markdown tables of evaluation results, laid out like the LENS paper.

* RES (cIoU): rows RefCOCO / RefCOCO+ / RefCOCOg, columns val / testA / testB / test.
* Reasoning / grounding (gIoU, cIoU): ReasonSeg-Val, ReasonSeg-Test (plain and CoT), GS-Eval.
* Every split (incl. custom and CoT RefCOCO) in a generic table with n, box metrics and speed.

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


def detail_table(results: Mapping[str, dict]) -> str:
    """Every split: n, gIoU, cIoU, box accuracy / mIoU, time and throughput."""
    rows = []
    for name, r in results.items():
        speed = r.get("expressions_per_s")
        rows.append([
            name, str(r["n"]), pct(r["giou"]), pct(r["ciou"]), pct(r.get("box_acc")), pct(r.get("box_miou")),
            f"{r.get('time_s', 0.0):.1f}", "-" if speed is None else f"{speed:.2f}",
        ])
    header = ["split", "n", "gIoU", "cIoU", "box acc@0.5", "box mIoU", "time (s)", "expr/s"]
    return "### All splits\n\n" + table(header, rows)


def results_markdown(results: Mapping[str, dict], model: str, protocol: str, limit: int | None = None) -> str:
    """The full ``results.md`` text."""
    head = [f"# LENS evaluation: `{model}`", "", f"Protocol: **{protocol}** ({PROTOCOL_NOTES.get(protocol, '')})."]
    if limit:
        head.append(f"Smoke run: only the first {limit} expressions of each split (not comparable to the paper).")
    parts = ["\n".join(head)]
    parts += [t for t in (refer_table(results), reasoning_table(results)) if t]
    parts.append(detail_table(results))
    return "\n\n".join(parts) + "\n"
