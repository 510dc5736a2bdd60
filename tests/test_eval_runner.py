"""Evaluation runner on synthetic data with the tiny preset: files, --limit, resume, 2 ranks, batching."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pycocotools import mask as coco_mask

from lens.evaluation.__main__ import resolve_config
from lens.evaluation.report import results_markdown
from lens.evaluation.runner import EvalConfig, build_expressions, parse_benchmarks, run_evaluation
from lens.inference import Segmenter

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 4
RESULT_KEYS = {"name", "benchmark", "dataset", "split", "protocol", "model", "n", "ciou", "giou", "box_acc",
               "box_miou", "n_box", "time_s", "expressions_per_s", "cot", "template", "signature"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lens.data.synthetic import generate_synthetic  # the library function behind tools/make_synthetic_data.py

    root = tmp_path_factory.mktemp("eval_synthetic")
    generate_synthetic(root, seed=3, n_train=1, n_val=3, n_test=3, image_size=112)
    return root


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained("tiny", max_new_tokens=MAX_NEW)


def config(data_root: Path, out: Path, **kw) -> EvalConfig:
    base = dict(model="tiny", data_root=str(data_root), out=str(out), max_new_tokens=MAX_NEW, batch_size=8)
    return EvalConfig(**{**base, **kw})


def read_records(out: Path, stem: str) -> dict[str, dict]:
    recs = {}
    for path in sorted(out.glob(f"{stem}.partial*.jsonl")):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            if "header" not in obj:
                recs[obj["id"]] = obj
    return recs


def metric_view(result: dict) -> tuple:
    return result["n"], result["ciou"], result["giou"], result["box_acc"], result["box_miou"]


class CountingRuns:
    """Wraps Segmenter.run_batch to count rows (model calls) and record batch sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows, self.batches = 0, []
        original = Segmenter.run_batch

        def counted(seg, images, prompts, *a, **kw):
            self.rows += len(prompts)
            self.batches.append(len(prompts))
            return original(seg, images, prompts, *a, **kw)

        monkeypatch.setattr(Segmenter, "run_batch", counted)


def test_end_to_end_files_and_tables(data_root, segmenter, tmp_path):
    benchmarks = ["refcoco_val", "reasonseg_val", "reasonseg_test:cot", "groundingsuite", "custom:custom/val.jsonl"]
    cfg = config(data_root, tmp_path, benchmarks=benchmarks, save_predictions=True, save_overlays=1)
    results = run_evaluation(cfg, segmenter)
    assert list(results) == ["refcoco_val", "reasonseg_val", "reasonseg_test_cot", "groundingsuite", "custom_val"]
    for name, res in results.items():
        on_disk = json.loads((tmp_path / f"{name}.json").read_text())
        assert on_disk == res and RESULT_KEYS <= set(res)
        assert res["protocol"] == "lens" and res["model"] == "tiny" and res["n"] > 0
        assert 0.0 <= res["ciou"] <= 1.0 and 0.0 <= res["giou"] <= 1.0 and res["expressions_per_s"] > 0
        preds = [json.loads(x) for x in (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()]
        assert len(preds) == res["n"] and {"id", "text", "box", "mask", "iou"} <= set(preds[0])
        assert all(p["benchmark"] == cfg.benchmarks[list(results).index(name)] for p in preds)
        check_recorded_figures(preds, res, data_root)
        assert len(list((tmp_path / "overlays" / name).glob("*.png"))) == 2
    refcoco = results["refcoco_val"]
    assert refcoco["n_box"] == refcoco["n"] and "gres" not in refcoco  # RefCOCO has no no-target expressions
    assert results["reasonseg_test_cot"]["template"] == "samr1_v4" and results["reasonseg_val"]["llm_longest_side"] == 640
    n_images = len(list((data_root / "reason_seg/ReasonSeg/val").glob("*.jpg")))
    assert results["reasonseg_val"]["n"] == n_images  # lens protocol: text[0] per image
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["protocol"] == "lens" and set(summary["splits"]) == set(results)
    md = (tmp_path / "results.md").read_text()
    assert "Protocol: **lens**" in md and "| RefCOCO |" in md and "| ReasonSeg-Val |" in md and "| GS-Eval |" in md
    assert "| custom_val |" in md and "ReasonSeg-Test (CoT)" in md
    cfg_file = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg_file["benchmarks"] == benchmarks and cfg_file["resolved_device"] == "cpu"


def check_recorded_figures(preds: list[dict], res: dict, data_root: Path) -> None:
    """Every figure of ``res`` recomputed from its predictions lines, and each line's I, U, area and box
    recomputed from its mask, box and the ground truth."""
    from lens.data.registry import load_benchmark
    from lens.data.transforms import box_from_llm_pixels, box_to_llm_pixels
    from lens.evaluation.analysis import box_mask_analysis
    from lens.evaluation.metrics import expression_iou, intersection_union
    from lens.geometry import box_iou

    kw = {"upstream_caption_cleanup": True} if res["dataset"] == "groundingsuite" else {}
    refs = {r.ref_id: r for r in load_benchmark(res["benchmark"], data_root, **kw)}
    for p in preds:
        ref = refs[p["ref_id"]]
        target = ref.load_mask()
        mask = coco_mask.decode({**p["mask"], "counts": p["mask"]["counts"].encode()})
        assert list(mask.shape) == p["mask"]["size"] == list(target.shape) == p["orig_hw"]
        i, u = intersection_union(mask.astype(bool), target, res["protocol"])
        assert (p["I"], p["U"], p["pred_area"]) == (int(i), int(u), int(mask.sum()))
        assert p["iou"] == expression_iou(p["I"], p["U"]) and p["expression"] in ref.expressions
        gt_llm = box_to_llm_pixels(ref.target_box(target), p["orig_hw"], p["llm_hw"])
        assert p["box_iou"] == box_iou(p["box_llm"], gt_llm)
        assert p["box"] == (box_from_llm_pixels(p["box_llm"], p["llm_hw"], p["orig_hw"]) if p["box_llm"] else None)
        assert p["time_s"] > 0 and p["no_target"] is False and p["no_target_answer"] is False
    n = len(preds)
    assert res["n"] == n and res["ciou"] == sum(p["I"] for p in preds) / (sum(p["U"] for p in preds) + 1e-8)
    assert res["giou"] == pytest.approx(sum(p["iou"] for p in preds) / (n + 1e-5), rel=1e-12)
    assert res["n_box"] == n and res["box_acc"] == pytest.approx(sum(p["box_iou"] >= 0.5 for p in preds) / n)
    assert res["box_miou"] == pytest.approx(sum(p["box_iou"] for p in preds) / n)
    assert res["box_vs_mask"] == box_mask_analysis(preds)


def test_limit_and_standard_protocol(data_root, segmenter, tmp_path):
    res = run_evaluation(config(data_root, tmp_path, benchmarks=["refcocog_val"], limit=5), segmenter)
    assert res["refcocog_val"]["n"] == 5 and (tmp_path / "refcocog_val.limit5.json").is_file()
    assert not (tmp_path / "refcocog_val.json").exists() and (tmp_path / "results.limit5.md").is_file()
    std = run_evaluation(config(data_root, tmp_path, benchmarks=["reasonseg_val"], protocol="standard", limit=50), segmenter)
    refs = __import__("lens.data.registry", fromlist=["x"]).load_benchmark("reasonseg_val", data_root)
    assert std["reasonseg_val"]["n"] == min(50, sum(len(r.expressions) for r in refs))  # every text
    assert (tmp_path / "reasonseg_val.standard.limit50.json").is_file()


def test_resume_recomputes_only_missing(data_root, segmenter, tmp_path, monkeypatch):
    cfg = config(data_root, tmp_path, benchmarks=["refcoco_val", "groundingsuite"], batch_size=4)
    first = run_evaluation(cfg, segmenter)
    counter = CountingRuns(monkeypatch)
    partial = tmp_path / "refcoco_val.partial.jsonl"
    lines = partial.read_text().splitlines()
    n = first["refcoco_val"]["n"]
    dropped = 4 if n % 4 == 0 else n % 4  # the last batch
    partial.write_text("\n".join(lines[:-dropped]) + "\n" + lines[-dropped][:20])  # plus a torn line
    (tmp_path / "refcoco_val.json").unlink()
    again = run_evaluation(cfg, segmenter)
    assert counter.rows == dropped  # groundingsuite finished: skipped; refcoco_val: only the lost batch
    assert metric_view(again["refcoco_val"]) == metric_view(first["refcoco_val"])
    assert again["groundingsuite"] == first["groundingsuite"]
    counter.rows = 0
    assert metric_view(run_evaluation(cfg, segmenter)["refcoco_val"]) == metric_view(first["refcoco_val"])
    assert counter.rows == 0
    with pytest.raises(ValueError, match="different settings"):
        run_evaluation(config(data_root, tmp_path, benchmarks=["refcoco_val"], batch_size=4, max_new_tokens=3), segmenter)
    run_evaluation(config(data_root, tmp_path, benchmarks=["refcoco_val"], batch_size=4, overwrite=True), segmenter)
    assert counter.rows == n


def test_batched_equals_batch_size_one(data_root, segmenter, tmp_path, monkeypatch):
    counter = CountingRuns(monkeypatch)
    a = run_evaluation(config(data_root, tmp_path / "b8", benchmarks=["refcoco_val"], batch_size=8, limit=12), segmenter)
    assert counter.batches == [8, 4]
    b = run_evaluation(config(data_root, tmp_path / "b1", benchmarks=["refcoco_val"], batch_size=1, limit=12), segmenter)
    assert a["refcoco_val"]["n"] == b["refcoco_val"]["n"] == 12
    ra, rb = read_records(tmp_path / "b8", "refcoco_val.limit12"), read_records(tmp_path / "b1", "refcoco_val.limit12")
    assert set(ra) == set(rb)
    for key, x in ra.items():
        y = rb[key]
        assert x["text"] == y["text"] and x["box_llm"] == y["box_llm"]
        ma = coco_mask.decode({**x["rle"], "counts": x["rle"]["counts"].encode()})
        mb = coco_mask.decode({**y["rle"], "counts": y["rle"]["counts"].encode()})
        assert np.mean(ma != mb) <= 1e-3 and abs(x["score"] - y["score"]) < 1e-4
    assert abs(a["refcoco_val"]["ciou"] - b["refcoco_val"]["ciou"]) < 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two evaluation processes through the CLI
def test_two_process_gather_equals_single_process(data_root, segmenter, tmp_path):
    args = ["--model", "tiny", "--data-root", str(data_root), "--benchmarks", "refcoco_val",
            "--batch-size", "4", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    single = run_evaluation(resolve_config(args + ["--out", str(tmp_path / "one")]), segmenter)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lens.evaluation", *args, "--out", str(tmp_path / "two")]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    for name in ("refcoco_val",):
        two = json.loads((tmp_path / "two" / f"{name}.json").read_text())
        assert two["world_size"] == 2 and metric_view(two) == metric_view(single[name])
        assert (tmp_path / "two" / f"{name}.partial.rank1.jsonl").is_file()
        r1, r2 = read_records(tmp_path / "one", name), read_records(tmp_path / "two", name)
        assert set(r1) == set(r2)  # nothing duplicated or lost
        assert all((r1[k]["I"], r1[k]["U"], r1[k]["box_iou"]) == (r2[k]["I"], r2[k]["U"], r2[k]["box_iou"]) for k in r1)


def test_bad_input_errors(data_root, tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'refcoco_vall'.*refcoco_val"):
        parse_benchmarks(["refcoco_vall"])
    with pytest.raises(ValueError, match="no model"):
        run_evaluation(EvalConfig(benchmarks=["refcoco_val"]))
    seg = None  # never loaded: the data error comes first
    with pytest.raises(FileNotFoundError, match="refs\\(unc\\).p"):
        run_evaluation(config(tmp_path / "nowhere", tmp_path / "out", benchmarks=["refcoco_val"]), seg)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_evaluation(config(data_root, tmp_path / "out", benchmarks=["custom:missing.jsonl"]), seg)


def test_cli_yaml_override_and_cot_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "batch_size": 4, "benchmarks": ["reasonseg_val"], "protocol": "standard"}))
    cfg = resolve_config(["--config", str(path), "--batch-size", "2", "--benchmarks", "refcoco_val,reasonseg_val:cot"])
    assert (cfg.batch_size, cfg.protocol, cfg.benchmarks) == (2, "standard", ["refcoco_val,reasonseg_val:cot"])
    specs = parse_benchmarks(cfg.benchmarks)
    assert [(s.name, s.cot) for s in specs] == [("refcoco_val", False), ("reasonseg_val_cot", True)]
    assert [s.name for s in parse_benchmarks(["reasonseg_val", "reasonseg_val:cot"], cot=True)] == ["reasonseg_val_cot"]
    for name in ("paper", "synthetic"):
        cfg = resolve_config(["--config", str(REPO / "configs/eval" / f"{name}.yaml"), "--model", "tiny"])
        parse_benchmarks(cfg.benchmarks)
    assert len(parse_benchmarks(resolve_config(["--config", str(REPO / "configs/eval/paper.yaml")]).benchmarks)) == 13
    with pytest.raises(ValueError, match="unknown evaluation option"):
        EvalConfig.from_dict({"modle": "tiny"})
    cfg = resolve_config(["--predictions", "p.jsonl", "--allow-missing", "--overlays-filter", "mask_rescues_box"])
    assert (cfg.predictions, cfg.allow_missing, cfg.overlays_filter, cfg.model) == ("p.jsonl", True, "mask_rescues_box", None)
    cfg.validate()  # no model needed to score predictions
    assert cfg.label == "predictions:p.jsonl" and str(cfg.out_dir()) == "outputs/eval/predictions-p.jsonl"
    with pytest.raises(ValueError, match="allow_missing only applies to --predictions"):
        EvalConfig(model="tiny", allow_missing=True).validate()
    with pytest.raises(ValueError, match="unknown overlays_filter"):
        EvalConfig(model="tiny", overlays_filter="worst").validate()


def test_expressions_ordered_by_image(data_root):
    from lens.data.registry import load_benchmark

    refs = load_benchmark("refcoco_val", data_root)
    exprs = build_expressions(refs, parse_benchmarks(["refcoco_val"])[0], "lens", None)
    keys = [e.image_key for e in exprs]
    assert len(exprs) == sum(len(r.expressions) for r in refs)
    assert all(keys.index(k) == i or keys[i - 1] == k for i, k in enumerate(keys))  # contiguous runs


def test_markdown_layout():
    res = {"refcoco_val": {"n": 3, "ciou": 0.842, "giou": 0.8, "box_acc": 0.9, "box_miou": 0.8, "time_s": 1.0,
                           "expressions_per_s": 3.0},
           "reasonseg_test": {"n": 2, "ciou": 0.58, "giou": 0.572, "box_acc": None, "box_miou": None, "time_s": 1.0,
                              "expressions_per_s": None}}
    md = results_markdown(res, "weights/LENS", "lens")
    assert "| RefCOCO | 84.2 | - | - | - |" in md and "| ReasonSeg-Test | 57.2 | 58.0 |" in md
    assert "Average over" not in md
