"""tools/benchmark: FLOP arithmetic by hand on a tiny configuration, the phase timer on a fake clock, the summaries
and the worker command line (the measurements themselves run in `python tools/benchmark.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.benchmark import cli, flops, grpo_step, timing  # noqa: E402
from tools.benchmark.evaluation import summarize_eval  # noqa: E402

# A made-up configuration small enough to count by hand.
FM = {"lm_params": 100, "lm_head_params": 20, "lm_layers": 2, "lm_attn_width": 4, "vit_params": 10,
      "merger_params": 8, "vit_attn_width": 2, "vit_full_layers": 1, "vit_window_layers": 3,
      "vit_window_patches": 4, "merge": 4, "queries": 2}


def test_sequence_flops_by_hand():
    # S = 5 tokens, C = 2 completion tokens: 6*100*5 + 6*20*2 + 6*2*4*5^2 = 3000 + 240 + 1200
    assert flops.sequence_flops(FM, 5, 2) == 4440


def test_image_flops_by_hand_windowed_and_not():
    # P = 1*2*4 = 8 patches > W = 4: 6*10*8 + 6*8*8/4 + 12*2*8*(1*8 + 3*4) = 480 + 96 + 3840
    assert flops.image_flops(FM, (1, 2, 4)) == 4416
    # P = 2 < W: windows hold the whole image: 6*10*2 + 6*8*2/4 + 12*2*2*(1*2 + 3*2) = 120 + 24 + 384
    assert flops.image_flops(FM, (1, 1, 2)) == 528


def test_training_flops_sums_sequences_and_images():
    total = flops.training_flops(FM, [5, 5], [2, 2], [[1, 2, 4], [1, 1, 2]])
    assert total == 2 * 4440 + 4416 + 528
    assert flops.training_flops(FM, [], [], []) == 0


def test_group_lm_flops_by_hand_shared_and_not():
    # prefix 3, suffixes 2 and 1, 3 scored, fwd + bwd; L x d = 2 x 4 = 8
    # shared: 6 tokens, attention 3^2 + (2*3*2 + 2^2) + (2*3*1 + 1^2) = 32: 3 * (2*100*6 + 2*20*3 + 2*8*32)
    assert flops.group_lm_flops(FM, 3, [2, 1], 3, 3, shared=True) == 5496
    # unshared: 5 + 4 tokens, attention 5^2 + 4^2 = 41: 3 * (2*100*9 + 2*20*3 + 2*8*41)
    assert flops.group_lm_flops(FM, 3, [2, 1], 3, 3, shared=False) == 7728
    assert flops.group_lm_flops(FM, 3, [2], 2, 3, shared=False) == flops.sequence_flops(FM, 5, 2)


def test_phase_flops_per_flow_by_hand():
    group = [{"prompt": 3, "comp": [2, 1], "grid": [1, 1, 2]}]  # image: 528 fwd + bwd (above), queries 2
    shared = flops.phase_flops(FM, "shared", group, beta=0.04, single_pass=True)
    fast = flops.phase_flops(FM, "fast", group, beta=0.04)
    ref = flops.phase_flops(FM, "reference", group, beta=0.0)
    # train, shared: 10 tokens, attention 9 + (24 + 16) + (18 + 9) = 76 -> 3 * (2000 + 120 + 1216), + 1 image
    assert shared["train_fwd_bwd"] == 10008 + 528
    # fast: 7 + 6 tokens, attention 49 + 36 -> 3 * (2600 + 120 + 1360), + 1 image (once per distinct image)
    assert fast["train_fwd_bwd"] == 12240 + 528
    assert ref["train_fwd_bwd"] == 2 * (12240 + 2 * 528)  # two query forwards with gradients, an image per row
    assert shared["score_forward"] == 0 and ref["ref_forward"] == 0  # single pass; beta 0
    # reference forward, fast: unshared, no queries, 3 scored, one image encoding per row (forward only: 528 / 3)
    assert fast["ref_forward"] == flops.group_lm_flops(FM, 3, [2, 1], 3, 1, shared=False) + 2 * 176
    assert shared["ref_forward"] == flops.group_lm_flops(FM, 3, [2, 1], 3, 1, shared=True) + 176
    shared_gen = flops.phase_flops(FM, "shared", group, shared_generation=True)["generate"]
    assert shared_gen == flops.group_lm_flops(FM, 3, [2, 1], 3, 1, shared=True) + 176 < fast["generate"]


def test_mfu_by_hand():
    assert flops.mfu(2e12, 4.0, 1.0) == pytest.approx(0.5)  # 2 TFLOP in 4 s on a 1 TFLOP/s peak


def test_flop_model_of_the_tiny_preset():
    from lens.modeling import build_preset

    model, _ = build_preset("tiny", seed=0)
    fm = flops.flop_model(model)
    assert fm == {"lm_params": 296064, "lm_head_params": 131072, "lm_layers": 2, "lm_attn_width": 128,
                  "vit_params": 158592, "merger_params": 98752, "vit_attn_width": 64, "vit_full_layers": 1,
                  "vit_window_layers": 1, "vit_window_patches": 64, "merge": 4, "queries": 8}
    lm = model.model.language_model
    assert fm["lm_params"] == flops.count_params(lm) - lm.embed_tokens.weight.numel()


class FakeClock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_phase_timer_nests_accumulates_and_resets():
    timer = timing.PhaseTimer("cpu", clock=FakeClock(0.0, 1.0, 3.0, 4.0, 10.0, 10.5))
    with timer.phase("outer"):  # 0 .. 4
        with timer.phase("inner"):  # 1 .. 3
            assert timer.inside("outer") and timer.inside("inner")
        with timer.phase(None):  # untimed: reads no clock
            pass
    assert not timer.stack
    with timer.phase("inner"):  # 10 .. 10.5, added to the first
        pass
    assert timer.take() == {"outer": 4.0, "inner": 2.5}
    assert timer.take() == {}


def test_phase_timer_wrap_names_each_call():
    timer = timing.PhaseTimer("cpu", clock=FakeClock(0.0, 2.0))
    fn = timer.wrap(lambda x: x * 2, lambda x: "big" if x > 1 else None)
    assert fn(1) == 2  # untimed
    assert fn(5) == 10
    assert timer.take() == {"big": 2.0}


def test_derived_phases():
    p = timing.derived_phases({"gen_and_score": 5.0, "generate": 2.0, "sam_encode": 1.0, "score_masks": 0.5,
                               "ref_logps": 0.5, "loss_forward": 1.0, "backward": 2.0}, step_time=10.0)
    assert p["gen_other"] == 1.0
    assert p["train_fwd_bwd"] == 3.0
    assert p["optimizer_and_other"] == 2.0


def test_summarize_grpo_and_the_upstream_estimate():
    args = SimpleNamespace(prompts=2, generations=4, device="cuda", peak_tflops=1.0)

    def step(t, phases, fl):
        return {"time": t, "phases": phases, "flops": fl, "lm_tokens": 100, "completion_tokens": 40, "vit_patches": 8}

    phases = {"gen_and_score": 2.0, "score_masks": 0.5, "loss_forward": 1.0, "backward": 1.0}
    rnd = {"steps": [step(4.0, phases, 2e12), step(6.0, phases, 4e12)], "warmup_step_s": 9.0, "losses": [1.0],
           "flop_model": FM, "attn_implementation": "sdpa", "gradient_checkpointing": False,
           "memory": {"cuda_max_allocated_mib": 10.0}}
    fast = grpo_step.summarize_grpo([rnd], args)
    assert fast["step_s_median"] == 5.0
    assert fast["train_flops_per_step"] == 3e12
    assert fast["phases_s_median"]["optimizer_and_other"] == 1.0  # median of 4 - 4 and 6 - 4
    assert fast["mfu_train_fwd_bwd"] == pytest.approx(1.5)  # median of 2e12/2s and 4e12/2s on a 1 TFLOP/s peak
    assert fast["mfu_step"] == pytest.approx(0.5833333)  # median of 0.5 and 0.6667
    ref = {"step_s_median": 10.0, "phases_s_median": {"score_masks": 1.0, "mask_forward": 1.5, "mask_decode": 0.5},
           "memory": {"cuda_max_allocated_mib": 20.0}}
    assert grpo_step.upstream_estimate({"reference": ref}) == 10.0 - 1.0 - 3 * 1.0
    args.micro_batch, args.new_tokens, args.rounds = 8, 64, 1
    g = grpo_step.grpo_summary({"fast": fast, "reference": ref}, args)
    assert g["speedup"] == 2.0 and g["speedup_vs_upstream_estimate"] == pytest.approx(6.0 / 5.0)
    assert g["memory_ratio"] == 2.0
    shared = {"step_s_median": 2.5, "memory": {"cuda_max_allocated_mib": 5.0}, "train_flops_per_step": 1e12}
    ref["train_flops_per_step"] = 10e12
    g = grpo_step.grpo_summary({"shared": shared, "fast": fast, "reference": ref}, args)
    assert g["speedup_vs_upstream_estimate"] == pytest.approx(6.0 / 2.5)  # against this flow (shared)
    assert g["speedup_fast_vs_upstream_estimate"] == pytest.approx(6.0 / 5.0) and g["speedup"] == 4.0
    assert g["train_flops_vs_reference"] == pytest.approx(0.1) and g["train_flops_vs_reference_fast"] == pytest.approx(0.3)


def test_summarize_eval_pools_rounds():
    rounds = [{"mode": "batched", "batch_size": 16, "expr_per_s": [1.0, 3.0], "memory": {"ru_maxrss_mib": 5.0}},
              {"mode": "batched", "batch_size": 16, "expr_per_s": [2.0], "memory": {"ru_maxrss_mib": 7.0}}]
    out = summarize_eval(rounds)
    assert out["expr_per_s"] == [1.0, 3.0, 2.0] and out["expr_per_s_median"] == 2.0
    assert out["memory"] == {"ru_maxrss_mib": 7.0} and out["batch_size"] == 16


def test_options_defaults_and_the_worker_command(tmp_path):
    args = cli.parse_args(["--preset", "tiny", "--rounds", "2", "--override", "train.max_grad_norm=0"])
    assert (args.device, args.prompts, args.generations, args.steps, args.parts) == ("cpu", 2, 4, 3, ["grpo", "eval"])
    assert args.recipe == REPO / "configs" / "recipes" / "tiny" / "stage2.yaml"
    args.ckpt, args.data = tmp_path / "ckpt", tmp_path / "data"
    cmd = cli.worker_command(args, "grpo:reference", tmp_path / "r.json")
    assert cmd[1] == str(REPO / "tools" / "benchmark.py") and cmd[2:4] == ["--worker", "grpo:reference"]
    assert cmd[cmd.index("--steps") + 1] == "3" and cmd[-2:] == ["--override", "train.max_grad_norm=0"]
    worker = cli.parse_args(cmd[2:])  # the worker reads back the same settings
    assert (worker.worker, worker.ckpt, worker.steps, worker.override) == (
        "grpo:reference", args.ckpt, 3, ["train.max_grad_norm=0"])


def test_options_are_checked():
    with pytest.raises(SystemExit):
        cli.parse_args(["--prompts", "3", "--generations", "3"])  # 9 rollouts, micro-batch 8


def test_token_split_options(tmp_path):
    args = cli.parse_args(["--image-tokens", "400", "--new-tokens", "60", "--generations", "8"])
    assert (args.image_tokens, args.new_tokens, args.generations, args.queries) == (400, 60, 8, 64)
    args.ckpt, args.data = tmp_path / "ckpt", tmp_path / "data"
    s = grpo_step.grpo_settings(args, tmp_path / "out")
    assert s["data.min_pixels"] == s["data.max_pixels"] == 400 * 28 * 28
    cmd = cli.worker_command(args, "grpo:shared", tmp_path / "r.json")
    worker = cli.parse_args(cmd[2:])
    assert (worker.image_tokens, worker.queries) == (400, 64)
    recipe = grpo_step.grpo_recipe(args, tmp_path / "out", "shared")
    assert recipe["grpo_shared_prefix"] is True and recipe["single_pass_rewards"] is True
    recipe = grpo_step.grpo_recipe(args, tmp_path / "out", "fast")
    assert recipe["grpo_shared_prefix"] is False and recipe["single_pass_rewards"] is False
    with pytest.raises(SystemExit):
        cli.parse_args(["--image-tokens", "0"])


def test_grpo_settings_fix_the_completion_length(tmp_path):
    args = cli.parse_args(["--new-tokens", "16"])
    args.ckpt, args.data = tmp_path / "ckpt", tmp_path / "data"
    s = grpo_step.grpo_settings(args, tmp_path / "out")
    assert s["grpo.max_completion_length"] == 16 and s["grpo.generation_kwargs"] == {"min_new_tokens": 16}
    assert s["train.gradient_accumulation_steps"] == 1 and s["train.max_steps"] == 4  # 2 x 4 / 8; 1 warm-up + 3
    assert "flow" not in s  # the reference flow is a trainer subclass, not a recipe key


def test_reference_flow_adopts_only_a_single_process_lens_trainer():
    from tools.benchmark.reference_flow import ReferenceFlowTrainer

    with pytest.raises(TypeError, match="expected a LensGRPOTrainer"):
        ReferenceFlowTrainer.adopt(SimpleNamespace(args=SimpleNamespace(world_size=1)))
    trainer = object.__new__(ReferenceFlowTrainer.__mro__[1])  # a bare LensGRPOTrainer, nothing built
    trainer.args = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="one process only"):
        ReferenceFlowTrainer.adopt(trainer)
    trainer.args.world_size = 1
    assert type(ReferenceFlowTrainer.adopt(trainer)) is ReferenceFlowTrainer


def test_recipe_ab_times_both_variants_interleaved(synthetic_root, capsys):
    """tools/benchmark/recipe_ab.py: each round trains A then B (the timed steps after the skipped ones), and the
    summary is the ratio of the two means."""
    from tools.benchmark import recipe_ab

    recipe = str(Path(__file__).resolve().parents[1] / "configs/recipes/tiny/lens2b_stage1.yaml")
    common = [f"data.root={synthetic_root}", "train.per_device_train_batch_size=2"]
    assert recipe_ab.main([recipe, "--a", *common, "cache_sam_features=false", "--b", *common,
                           "--steps", "1", "--skip", "1", "--rounds", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[recipe_ab]")]
    assert [line.split(":")[0].split()[2:4] for line in lines[:4]] == [["1", "A"], ["1", "B"], ["2", "A"], ["2", "B"]]
    spt = [float(line.rsplit(": ", 1)[1].split()[0]) for line in lines[:4]]
    a, b = (spt[0] + spt[2]) / 2, (spt[1] + spt[3]) / 2
    assert lines[4].endswith("(2 interleaved rounds of 1 steps after 1)")
    ratio = float(lines[4].split("A/B = ")[1].split()[0])
    assert ratio == pytest.approx(a / b, rel=0.01)  # the per-round figures are printed to 4 digits
