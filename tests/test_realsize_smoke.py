"""tools/realsize_smoke.py on the `tiny` preset (its logic and its JSON contract, in seconds; CI runs the real
3B preset afterwards from .ci/run) and tools/gpu_acceptance.sh's non-GPU parts (syntax, dry run, summary)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tools" / "realsize_smoke.py"
ACCEPT = ROOT / "tools" / "gpu_acceptance.sh"
PHASE_KEYS = {"seconds", "peak_rss_gb", "rss_gb", "finite", "ok"}


def load_smoke():
    spec = importlib.util.spec_from_file_location("realsize_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke():
    return load_smoke()


@pytest.fixture(scope="module")
def tiny_summary(smoke):
    """All five phases on the tiny preset, once for the module (about 20 s on 2 cores)."""
    lines: list[str] = []
    return smoke.run_phases(smoke.parse_args(["--preset", "tiny"]), log=lines.append), lines


def test_all_phases_run_on_the_tiny_preset_with_finite_outputs(smoke, tiny_summary):
    summary, log = tiny_summary
    assert summary["ok"] is True, json.dumps(summary)[:3000] + "\n".join(log)[-3000:]
    assert list(summary["phases"]) == list(smoke.PHASES) and summary["complete"] and not summary["skipped"]
    for name, fig in summary["phases"].items():
        assert PHASE_KEYS <= set(fig), (name, fig)
        assert fig["ok"] and fig["finite"] and fig["seconds"] >= 0 and fig["peak_rss_gb"] > 0 and fig["rss_gb"] > 0
    ph = summary["phases"]
    assert ph["build"]["dtype"] == "bfloat16"
    assert ph["forward"]["mask_shape"][:2] == [1, 1] and math.isfinite(ph["forward"]["loss"])
    assert ph["segmenter"]["mask_shape"][:2] == [1, 1]
    for name in ("stage1", "lora_grpo"):  # one optimizer step that changed finite weights, with a finite loss
        assert ph[name]["changed_tensors"] > 0 and ph[name]["weights_finite"], ph[name]
        assert ph[name]["losses"] and all(math.isfinite(x) for x in ph[name]["losses"])
    assert ph["lora_grpo"]["peft"] is True
    assert summary["total_seconds"] >= sum(f["seconds"] for f in ph.values()) - 1
    json.dumps(summary)  # the last line's object is plain JSON


def test_stage1_trains_the_context_module_only_and_lora_reuses_the_model(tiny_summary):
    ph = tiny_summary[0]["phases"]
    assert 0 < ph["stage1"]["trainable_m"] < ph["lora_grpo"]["trainable_m"]


def test_a_failing_phase_stops_the_run_and_is_not_ok(smoke, monkeypatch, capsys):
    def broken(state):
        raise RuntimeError("boom")

    monkeypatch.setitem(smoke.PHASE_FUNCS, "forward", broken)  # the smoke's own table, not lens code
    rc = smoke.main(["--preset", "tiny", "--phases", "build", "forward", "segmenter"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert rc == 1 and summary["ok"] is False
    assert list(summary["phases"]) == ["build", "forward"]  # segmenter never ran
    assert summary["phases"]["build"]["ok"] and not summary["phases"]["forward"]["ok"]
    assert "RuntimeError: boom" in summary["phases"]["forward"]["error"]


def test_non_finite_outputs_make_a_phase_fail(smoke, monkeypatch):
    monkeypatch.setitem(smoke.PHASE_FUNCS, "forward", lambda state: {"finite": smoke.finite(torch.tensor([1.0, float("nan")]))})
    summary = smoke.run_phases(smoke.parse_args(["--preset", "tiny", "--phases", "build", "forward"]), log=lambda s: None)
    assert summary["ok"] is False and summary["phases"]["forward"]["ok"] is False
    assert smoke.finite(torch.ones(2), 1.0) and not smoke.finite(None) and not smoke.finite(float("inf"))
    assert not smoke.finite(torch.empty(0))


def test_budget_skips_the_phases_whose_prediction_does_not_fit(smoke):
    """Hand-computed: forward took 10 s; 50 s of a 100 s budget left -> segmenter (18 s) and stage1 (35 s) fit,
    lora_grpo (120 s) does not. Build and forward always run; without a budget nothing is skipped."""
    args = smoke.parse_args(["--preset", "tiny", "--budget-s", "100"])
    done = {"build": {"seconds": 30.0}, "forward": {"seconds": 10.0}}
    assert smoke.budget_skip(args, "segmenter", done, elapsed=50.0) is None
    assert smoke.budget_skip(args, "stage1", done, elapsed=50.0) is None
    reason = smoke.budget_skip(args, "lora_grpo", done, elapsed=50.0)
    assert reason == "predicted 120.0 s = 12.0 x the forward's 10.0 s, more than the 50.0 s left of --budget-s 100"
    assert smoke.budget_skip(args, "stage1", done, elapsed=70.0).startswith("predicted 35.0 s")
    assert smoke.budget_skip(args, "forward", {"build": {"seconds": 999.0}}, elapsed=999.0) is None
    assert smoke.budget_skip(smoke.parse_args(["--preset", "tiny"]), "lora_grpo", done, elapsed=1e9) is None
    with pytest.raises(SystemExit):
        smoke.parse_args(["--budget-s", "0"])


def test_a_spent_budget_runs_build_and_forward_only_and_says_what_it_skipped(smoke):
    lines: list[str] = []
    summary = smoke.run_phases(smoke.parse_args(["--preset", "tiny", "--budget-s", "0.001"]), log=lines.append)
    assert list(summary["phases"]) == ["build", "forward"] and summary["phases"]["forward"]["ok"]
    assert list(summary["skipped"]) == ["segmenter", "stage1", "lora_grpo"]
    assert all(r.startswith("predicted ") for r in summary["skipped"].values())
    assert summary["ok"] is True and summary["complete"] is False and summary["budget_s"] == 0.001
    assert any(line.startswith("[smoke] stage1: skipped (predicted") for line in lines)
    assert set(summary["host"]) == {"cpu_capability", "cores", "native_bf16"}


def test_a_failed_required_phase_is_not_ok_under_a_budget(smoke, monkeypatch):
    monkeypatch.setitem(smoke.PHASE_FUNCS, "forward", lambda state: {"finite": False})
    summary = smoke.run_phases(smoke.parse_args(["--preset", "tiny", "--budget-s", "0.001"]), log=lambda s: None)
    assert summary["ok"] is False and list(summary["phases"]) == ["build", "forward"]
    assert not summary["phases"]["forward"]["ok"]


def test_command_line_prints_one_json_line_last_and_exits_zero(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SMOKE), "--preset", "tiny", "--phases", "build", "forward",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["preset"] == "tiny" and set(summary["phases"]) == {"build", "forward"}
    assert json.loads(out.read_text()) == summary
    assert "[smoke] build:" in proc.stdout and "peak RSS" in proc.stdout


def test_options(smoke):
    args = smoke.parse_args([])
    assert args.preset == "qwen2.5-vl-3b" and args.device == "cpu" and args.phases == list(smoke.PHASES)
    assert args.grad_ckpt is False and args.dtype == "bfloat16" and args.optim == "sgd"  # CPU: no optimizer state
    assert smoke.parse_args(["--optim", "recipe"]).optim == "recipe"
    args = smoke.parse_args(["--attn", "sdpa", "--image-size", "64", "--grad-ckpt"])
    assert args.attn == "sdpa" and args.sizes["max_pixels"] == 64 * 64 and args.grad_ckpt
    with pytest.raises(SystemExit):
        smoke.parse_args(["--phases", "forward"])  # every phase needs the build
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            smoke.parse_args(["--device", "cuda"])


def test_trainer_overrides_follow_the_options(smoke, tmp_path):
    def overrides(*argv):
        args = smoke.parse_args(["--preset", "tiny", *argv])
        return smoke.common_overrides({"args": args, "sizes": smoke.SIZES["cpu"], "data_root": str(tmp_path)}, "o")

    cpu = overrides()
    for item in ("train.use_cpu=true", "train.deepspeed=null", "train.max_steps=1", "train.bf16=true",
                 "train.report_to=none", "train.optim=sgd", "train.warmup_steps=0", f"data.root={tmp_path}"):
        assert item in cpu
    assert not any(o.startswith("train.optim=") for o in overrides("--optim", "recipe"))
    assert "train.gradient_checkpointing=true" in overrides("--grad-ckpt")


# ---------------------------------------------------------------------- tools/gpu_acceptance.sh
def test_gpu_acceptance_script_parses():
    proc = subprocess.run(["bash", "-n", str(ACCEPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_acceptance_dry_run_lists_the_three_steps_and_prints_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ACCEPT), "--dry-run"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tools/realsize_smoke.py --device cuda --attn" in out
    assert "tools/benchmark.py --preset qwen2.5-vl-3b --device cuda --prompts 8 --generations 8" in out
    assert "GPUS_PER_NODE=1" in out and "train_stage2.sh configs/recipes/stage2.yaml model.init=preset:qwen2.5-vl-3b" in out
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["dry_run"] is True and summary["ok"] is False and summary["attn"] == attn
    assert set(summary["steps"]) == {"smoke", "benchmark", "zero3"}


def test_gpu_acceptance_summary_reads_step_results(tmp_path):
    """The summary step alone, on files as the GPU run leaves them (a fake smoke.json etc.)."""
    script = ACCEPT.read_text()
    summarizer = script.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "steps.tsv").write_text("smoke\t0\t61234\nbenchmark\t124\t270000\nzero3\t0\t150500\n")
    (out / "smoke.json").write_text(json.dumps({"ok": True, "phases": {}}) + "\n")
    (out / "zero3_trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 0.5, "step_time": 3.0}, {"loss": 0.4}]}))
    proc = subprocess.run([sys.executable, "-", str(out), "0", "sdpa", "NVIDIA H200", "0"], input=summarizer,
                          capture_output=True, text=True, timeout=60)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and summary["ok"] is False  # the benchmark timed out
    steps = summary["steps"]
    assert steps["smoke"]["ok"] and steps["smoke"]["seconds"] == 61.2
    assert steps["benchmark"]["timed_out"] and not steps["benchmark"]["ok"]
    assert steps["zero3"]["ok"] and steps["zero3"]["losses"] == [0.5, 0.4] and steps["zero3"]["step_times"] == [3.0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash")
def test_ci_runs_the_real_size_smoke_after_the_tests():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    tests = next(i for i, ln in enumerate(lines) if "scripts/test.sh" in ln)
    smoke_line = next(i for i, ln in enumerate(lines) if "tools/realsize_smoke.py" in ln)
    assert smoke_line > tests and "--budget-s" in lines[smoke_line]  # what is left of the 30 minutes
