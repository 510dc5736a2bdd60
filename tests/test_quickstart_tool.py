"""tools/quickstart.py's bookkeeping: scores written whole, reused instead of recomputed, dropped when their stage
retrains (the scoring itself is evaluation's and the research probes', tested in their own files)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quickstart_tool", ROOT / "tools" / "quickstart.py")
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)


def test_scores_are_written_whole_and_then_reused_without_a_side_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qs, "OUT", tmp_path)
    qs.write_scores("stage1", {"giou": 0.5}, {"eval_stage1": 1.0})
    saved = tmp_path / "scores" / "stage1.json"
    assert json.loads(saved.read_text()) == {"metrics": {"giou": 0.5}, "seconds": {"eval_stage1": 1.0}}
    assert list((tmp_path / "scores").iterdir()) == [saved]  # no temporary file left behind
    started = []
    monkeypatch.setattr(qs.subprocess, "Popen", lambda *a, **k: started.append(a))
    assert qs.score_in_side_process("stage1") is None
    assert started == [] and f"reusing {saved}" in capsys.readouterr().out


def test_a_side_process_scores_with_one_thread_into_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(qs, "OUT", tmp_path)
    calls = []
    monkeypatch.setattr(qs.subprocess, "Popen", lambda cmd, **k: calls.append((cmd, k)) or "proc")
    assert qs.score_in_side_process("warmup") == "proc"
    (cmd, kwargs), = calls
    assert cmd[-2:] == ["--score", "warmup"] and cmd[1].endswith("quickstart.py")
    assert kwargs["env"]["OMP_NUM_THREADS"] == "1"
    assert (tmp_path / "scores" / "warmup.log").is_file()


def test_retraining_a_stage_drops_its_old_scores(tmp_path, monkeypatch):
    import lens.training.recipe as recipe

    monkeypatch.setattr(qs, "OUT", tmp_path)
    qs.write_scores("stage1", {"giou": 0.5}, {})
    trained = []
    monkeypatch.setattr(recipe, "load_recipe", lambda path, overrides: {"recipe": Path(path).name})
    monkeypatch.setattr(recipe, "run", lambda r, callbacks=(): trained.append(r))
    assert qs.train("stage1", []) == tmp_path / "stage1" / "final"
    assert trained == [{"recipe": "stage1.yaml"}]
    assert not qs.score_file("stage1").exists()
    (tmp_path / "stage1" / "final").mkdir(parents=True)
    (tmp_path / "stage1" / "final" / "config.json").write_text("{}")
    qs.write_scores("stage1", {"giou": 0.5}, {})
    qs.train("stage1", [])  # a finished stage is reused, and so are its scores
    assert len(trained) == 1 and qs.score_file("stage1").exists()


class FakeProcess:
    def __init__(self) -> None:
        self.done = False

    def poll(self):
        return 0 if self.done else None


def test_training_takes_one_thread_while_scoring_runs_and_its_threads_back_after(one_thread):
    import torch

    torch.set_num_threads(2)
    scoring = FakeProcess()
    cores = qs.SharedCores([scoring, None])  # None: a stage whose scores were reused starts no process
    cores.on_train_begin(None, None, None)
    assert torch.get_num_threads() == 1
    cores.on_step_begin(None, None, None)
    assert torch.get_num_threads() == 1  # still scoring
    scoring.done = True
    cores.on_step_begin(None, None, None)
    assert torch.get_num_threads() == 2
    cores.on_train_end(None, None, None)
    assert torch.get_num_threads() == 2


def test_training_keeps_its_threads_without_a_running_scorer(one_thread):
    import torch

    torch.set_num_threads(2)
    finished = FakeProcess()
    finished.done = True
    for processes in ([], [finished]):
        cores = qs.SharedCores(processes)
        cores.on_train_begin(None, None, None)
        cores.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 2
    scoring = FakeProcess()
    cores = qs.SharedCores([scoring])
    cores.on_train_begin(None, None, None)
    cores.on_train_end(None, None, None)  # training ended before the scoring: threads back all the same
    assert torch.get_num_threads() == 2
