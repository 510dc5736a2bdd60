"""vLLM colocate mode without vLLM: the stock Qwen2.5-VL view, the filtered weight sync, the positions check.

A fake engine stands in for `vllm.LLM`: it loads the view folder as a stock transformers Qwen2.5-VL (as vLLM loads a
stock checkpoint), its `load_weights` records every (name, tensor) TRL sends and rejects names the stock model lacks
(as vLLM's weight loader does), and `generate` samples with that model and returns vLLM-shaped outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

import lens.training.grpo as grpo_module
from lens.modeling import build_preset
from lens.training.grpo import LensGRPOTrainer
from lens.training.recipe import build_trainer, load_recipe
from lens.training.vllm import VIEW_DIR, VLLMViewMixin, save_stock_view, stock_name

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "tiny"
LENS_ONLY = ("learnable_query", "connector.", "conv_1d.", "proj_to_sam.", "sam.")


# ---------------------------------------------------------------------- the view
def image_inputs(processor, text="the red square"):
    image = Image.new("RGB", (80, 64), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("shard_bytes", [2 * 1024**3, 200_000])
def test_view_loads_as_stock_qwen_with_the_policys_text_logits(tmp_path, shard_bytes):
    model, processor = build_preset("tiny", seed=3)
    model.eval()
    view = save_stock_view(model, processor, tmp_path / "view", shard_bytes=shard_bytes)
    assert (view / "model.safetensors.index.json").is_file() == (shard_bytes < 1e6)
    stock, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(view, output_loading_info=True)
    assert type(stock) is Qwen2_5_VLForConditionalGeneration
    assert stock.config.model_type == "qwen2_5_vl"
    assert stock.config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert GenerationConfig.from_pretrained(view).eos_token_id == model.generation_config.eos_token_id
    assert not hasattr(stock.config, "num_of_query")

    reloaded = AutoProcessor.from_pretrained(view)
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    enc = image_inputs(processor)
    assert enc["mm_token_type_ids"].any()  # the stock forward then uses M-RoPE grid positions, as vLLM does
    assert torch.equal(image_inputs(reloaded)["input_ids"], enc["input_ids"])
    with torch.no_grad():
        ours = model(**enc).logits  # the policy's stock forward (M-RoPE), as generation runs it
        theirs = stock.eval()(**enc).logits
    torch.testing.assert_close(theirs, ours, atol=0, rtol=0)


def test_stock_names_are_the_language_and_vision_weights():
    model, _ = build_preset("tiny")
    names = [n for n, _ in model.named_parameters()]
    kept = [n for n in names if stock_name(n) is not None]
    assert kept and all(n.startswith(("model.language_model.", "model.visual.", "lm_head.")) for n in kept)
    assert all(n.startswith(LENS_ONLY) for n in set(names) - set(kept))
    assert any(n.startswith("sam.") for n in names) and any(n == "learnable_query" for n in names)


# ---------------------------------------------------------------------- a fake vLLM
class FakeLLM:
    """`vllm.LLM` as TRL's colocate mode uses it: built from a folder, `load_weights`, `generate`, cache reset."""

    instances: ClassVar[list] = []

    def __init__(self, model: str, **kwargs) -> None:
        self.path, self.kwargs = model, kwargs
        self.hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.calls: list[list[tuple[str, torch.Tensor]]] = []
        self.resets = 0
        self.sampled: list[tuple[list[int], list[int], list[float]]] = []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))
        FakeLLM.instances.append(self)

    def load_weights(self, weights):
        weights = list(weights)
        params = dict(self.hf.named_parameters())
        for name, tensor in weights:
            if name not in params:  # vLLM's AutoWeightsLoader raises on a name it has no module for
                raise ValueError(f"There is no module or parameter named {name!r} in Qwen2_5_VLForConditionalGeneration")
            with torch.no_grad():
                params[name].copy_(tensor)
        self.calls.append([(n, t.detach().clone()) for n, t in weights])

    def reset_prefix_cache(self):
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=False):
        sp = sampling_params
        assert sp["n"] == 1 and not sp["top_k"] and sp["top_p"] == 1.0 and sp["repetition_penalty"] == 1.0
        eos = set(self.hf.generation_config.eos_token_id if isinstance(self.hf.generation_config.eos_token_id, list)
                  else [self.hf.generation_config.eos_token_id])
        outs = []
        for row in prompts:
            ids = torch.tensor([row["prompt_token_ids"]])
            pix = self.processor.image_processor(images=[row["multi_modal_data"]["image"]], return_tensors="pt")
            # vLLM's Qwen2.5-VL computes M-RoPE grid positions from the tokens; transformers 5 does so only when
            # given mm_token_type_ids (1 = image token), and falls back to 1-D positions otherwise
            mm_types = (ids == self.hf.config.image_token_id).int()
            gen = self.hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                pixel_values=pix["pixel_values"],
                image_grid_thw=pix["image_grid_thw"], do_sample=True, temperature=sp["temperature"], top_k=0,
                top_p=1.0, max_new_tokens=sp["max_tokens"], output_logits=True, return_dict_in_generate=True,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                sequence_bias={(t,): b for t, b in sp["logit_bias"].items()},
            )
            tokens = gen.sequences[0, ids.shape[1]:].tolist()
            for i, t in enumerate(tokens):
                if t in eos:
                    tokens = tokens[: i + 1]
                    break
            # logprobs_mode="processed_logprobs": after the logit bias and the temperature (gen.logits are raw)
            bias = torch.zeros(gen.logits[0].shape[-1])
            for t, b in sp["logit_bias"].items():
                bias[t] = b
            raw = [torch.log_softmax(gen.logits[i][0].float() / sp["temperature"], -1)[t].item()
                   for i, t in enumerate(tokens)]
            logps = [torch.log_softmax((gen.logits[i][0].float() + bias) / sp["temperature"], -1)[t].item()
                     for i, t in enumerate(tokens)]
            assert self.hf.config.image_token_id not in tokens
            self.sampled.append((row["prompt_token_ids"], tokens, raw))
            outs.append(SimpleNamespace(
                prompt_token_ids=row["prompt_token_ids"],
                outputs=[SimpleNamespace(token_ids=tokens,
                                         logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(tokens, logps)])],
            ))
        return outs


# LensGRPOTrainer with the mixin first among its bases (once grpo.py lists it, the class itself)
ViewTrainer = (LensGRPOTrainer if issubclass(LensGRPOTrainer, VLLMViewMixin)
               else type("ViewTrainer", (VLLMViewMixin, LensGRPOTrainer), {}))


@pytest.fixture()
def fake_vllm(monkeypatch):
    import trl.generation.vllm_generation as trl_vllm

    FakeLLM.instances.clear()
    monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(trl_vllm, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(trl_vllm, "SamplingParams", lambda **kw: dict(kw), raising=False)
    monkeypatch.setattr(grpo_module, "LensGRPOTrainer", ViewTrainer)  # what build_trainer instantiates
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(key, value)  # TRL's colocate init writes these; restored afterwards
    return FakeLLM


def make_trainer(synthetic_root, init, out, recipe="stage2", *extra):
    recipe = load_recipe(RECIPES / f"{recipe}.yaml", [
        f"data.root={synthetic_root}", f"model.init={init}", f"train.output_dir={out}", "train.report_to=none",
        "train.max_steps=1", "train.disable_tqdm=true", "grpo.max_completion_length=8", *extra,
    ])
    trainer = build_trainer(recipe)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


VLLM = ("grpo.use_vllm=true", "grpo.vllm_mode=colocate")


def lens_policy(trainer):
    model = trainer.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------- colocate wiring + sync
def test_colocate_builds_vllm_from_the_view_and_syncs_stock_names_only(
        fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "s2", "stage2", *VLLM,
                           "model.query_position_mode=mrope")
    assert type(trainer.vllm_generation).__name__ == "LensVLLMGeneration"
    (llm,) = fake_vllm.instances
    view = tmp_path / "s2" / VIEW_DIR
    assert Path(llm.path) == view and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert trainer.model.name_or_path == str(tiny_checkpoint)  # restored after vLLM was built
    policy = lens_policy(trainer)

    # what TRL sends for a stock Qwen2.5-VL: its named_parameters (tied weights once), names unchanged
    stock_names = [n for n, _ in llm.hf.named_parameters()]
    trainer.vllm_generation.sync_weights()
    sent = [pair for call in llm.calls for pair in call]
    assert all(len(call) == 1 for call in llm.calls)  # one parameter per load_weights call, as TRL does
    assert [n for n, _ in sent] == stock_names
    assert not any(n.startswith(LENS_ONLY) for n, _ in sent)
    for name, tensor in sent:
        torch.testing.assert_close(tensor, policy.get_parameter(name).detach(), atol=0, rtol=0)
    assert llm.resets == 1

    # after an update, the engine holds the new weights; the LENS-only ones never reach it
    with torch.no_grad():
        policy.get_parameter("model.language_model.layers.0.mlp.up_proj.weight").add_(1.0)
        policy.learnable_query.add_(1.0)
    trainer.vllm_generation.sync_weights()
    torch.testing.assert_close(llm.hf.get_parameter("model.language_model.layers.0.mlp.up_proj.weight"),
                               policy.get_parameter("model.language_model.layers.0.mlp.up_proj.weight"))


def test_lora_policy_sends_merged_weights_under_stock_names(fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "lora", "lora", *VLLM)
    (llm,) = fake_vllm.instances
    peft_model = trainer.model
    assert hasattr(peft_model, "peft_config")
    assert Path(llm.path) == tmp_path / "lora" / VIEW_DIR and "name_or_path" not in vars(peft_model)
    q = peft_model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B["default"].weight.normal_()  # a non-zero adapter, so merging changes the weight
    base = q.base_layer.weight.detach().clone()
    merged = base + q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight

    trainer.vllm_generation.sync_weights()
    sent = dict(pair for call in llm.calls for pair in call)
    assert list(sent) == [n for n, _ in llm.hf.named_parameters()]
    assert not any("lora_" in n or "base_layer" in n or "modules_to_save" in n or "original_module" in n
                   for n in sent)
    assert not any(n.startswith(LENS_ONLY) for n in sent)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(sent[name], merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.base_layer.weight.detach(), base, atol=1e-6, rtol=0)  # unmerged again (float round-off)


def test_without_vllm_nothing_changes(fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "plain")
    assert not trainer.use_vllm and not hasattr(trainer, "vllm_generation")
    assert not (tmp_path / "plain" / VIEW_DIR).exists() and not fake_vllm.instances


# ---------------------------------------------------------------------- positions
def test_upstream_positions_refuse_the_importance_sampling_correction(
        fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=false"):
        make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "up", "stage2", *VLLM)
    assert not fake_vllm.instances  # refused before anything was built
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "up2", "stage2", *VLLM,
                           "grpo.vllm_importance_sampling_correction=false")
    assert trainer.use_vllm and len(fake_vllm.instances) == 1


def rollout_rows(trainer):
    g = trainer.args.num_generations
    return [dict(trainer.train_dataset[i // g]) for i in range(2 * g)]  # 2 prompts x G rollouts


def test_mrope_sampler_and_trainer_logprobs_agree(fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    """With M-RoPE query positions the trainer scores vLLM's rollouts as vLLM sampled them: IS ratio 1."""
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "mrope", "stage2", *VLLM,
                           "model.query_position_mode=mrope")
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rollout_rows(trainer))
    (llm,) = fake_vllm.instances
    assert llm.calls  # synced before the first generation
    mask = inputs["completion_mask"].bool()
    assert mask.sum() > 0 and "target_masks" in inputs and "sam_image_index" in inputs
    sampled = torch.zeros_like(inputs["old_per_token_logps"])
    for i, (_, _tokens, logps) in enumerate(llm.sampled):
        sampled[i, : len(logps)] = torch.tensor(logps)
    torch.testing.assert_close(inputs["old_per_token_logps"][mask], sampled[mask], atol=1e-4, rtol=1e-4)
    # the ratio TRL applies: 1 up to the image token's share, which the sampler's processed log-probs leave out
    ratio = inputs["importance_sampling_ratio"]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=0.05, rtol=0)


def test_vllm_never_samples_the_image_token(fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    user = {"logit_bias": {5: 1.0}, "seed": 3}
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "bias", "stage2", *VLLM,
                           "model.query_position_mode=mrope", f"grpo.generation_kwargs={user}")
    image_token = lens_policy(trainer).config.image_token_id
    assert trainer.vllm_generation.generation_kwargs == {"logit_bias": {5: 1.0, image_token: -100.0}, "seed": 3}
    assert trainer.args.generation_kwargs == user  # the recipe's dict is left alone


def test_upstream_trainer_logprobs_differ_from_the_sampler(fake_vllm, synthetic_root, tiny_checkpoint, tmp_path):
    """The gap the correction would measure in upstream mode: same weights, other positions."""
    trainer = make_trainer(synthetic_root, tiny_checkpoint, tmp_path / "gap", "stage2", *VLLM,
                           "grpo.vllm_importance_sampling_correction=false")
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rollout_rows(trainer))
    (llm,) = fake_vllm.instances
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    k = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        lp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, att, k, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    mask = inputs["completion_mask"].bool()
    sampled = torch.zeros_like(lp)
    for i, (_, _, logps) in enumerate(llm.sampled):
        sampled[i, : len(logps)] = torch.tensor(logps)
    gap = (lp - sampled)[mask].abs().max().item()
    assert math.isfinite(gap) and gap > 1e-3


def test_cli_writes_the_view_of_a_checkpoint_for_server_mode(tiny_checkpoint, tmp_path):
    from lens.training.vllm import main

    assert main([str(tiny_checkpoint), str(tmp_path / "served"), "--dtype", "float32"]) == 0
    stock, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "served", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert AutoProcessor.from_pretrained(tmp_path / "served").tokenizer is not None
