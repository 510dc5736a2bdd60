"""The private TRL API that LENS relies on, pinned, so that a TRL upgrade fails here, loudly and by name.

`LensGRPOTrainer` (lens/training/grpo.py) overrides private `GRPOTrainer` methods and `LensVLLMGeneration`
(lens/training/vllm.py) private `VLLMGeneration` methods; TRL calls them with its own arguments and LENS calls
`super()` with them. The tables below are TRL 1.16's parameter names. When a test here fails after a TRL upgrade,
read the new TRL method, adapt the override, then update the table.
"""

from __future__ import annotations

import inspect
import sys

import pytest

trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402

from lens.training.grpo import LensGRPOTrainer  # noqa: E402
from lens.training.vllm import LensVLLMGeneration  # noqa: E402

# (LENS class, TRL base) -> private method -> TRL 1.16's parameter names
OVERRIDES: dict[tuple[type, type], dict[str, tuple[str, ...]]] = {
    (LensGRPOTrainer, GRPOTrainer): {
        "_generate_and_score_completions": ("self", "inputs"),
        "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
        "_get_per_token_logps_and_entropies": (
            "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
            "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
        ),
        "_compute_loss": ("self", "model", "inputs"),
        "_prepare_inputs": ("self", "generation_batch"),  # lens/training/shared_grpo.py: whole-group micro-batches
        "_generate_single_turn": (  # lens/training/shared_grpo.py: each group's prompt prefilled once
            "self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images",
        ),
    },
    (LensVLLMGeneration, VLLMGeneration): {
        "_init_vllm": ("self",),
        "_iter_named_params": ("self",),
    },
}

# private TRL methods and attributes that LENS calls or reads without overriding them
CALLED = {VLLMGeneration: {"_fix_param_name_to_vllm": ("self", "name", "extra_prefixes")}}
ATTRIBUTES = {GRPOTrainer: ("_metrics", "_step", "_buffered_inputs"), VLLMGeneration: ("_dist",)}  # set in __init__


def lens_private_members(cls: type) -> dict[str, object]:
    """Private (single-underscore) members that LENS classes in `cls`'s MRO define."""
    found: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] != "lens":
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and not name.startswith("__"):
                found[name] = value
    return found


def trl_definer(cls: type, name: str) -> type | None:
    """The first non-LENS class in `cls`'s MRO that defines `name`."""
    return next((k for k in cls.__mro__ if k.__module__.split(".")[0] != "lens" and name in vars(k)), None)


def params(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


@pytest.mark.parametrize("lens_cls, trl_cls", list(OVERRIDES), ids=lambda c: c.__name__)
def test_every_private_override_is_in_the_table(lens_cls, trl_cls):
    """A LENS method that shadows a TRL (or transformers) private method must be listed, so it is checked."""
    shadowing = {name for name in lens_private_members(lens_cls) if trl_definer(lens_cls, name) is not None}
    unlisted = shadowing - set(OVERRIDES[lens_cls, trl_cls])
    assert not unlisted, (
        f"{lens_cls.__name__} overrides private {sorted(unlisted)} of {trl_cls.__name__} (or its bases): "
        f"add them with their TRL parameter names to OVERRIDES in {__file__}"
    )


@pytest.mark.parametrize(
    "lens_cls, trl_cls, name",
    [(lc, tc, name) for (lc, tc), methods in OVERRIDES.items() for name in methods],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_trl_still_has_each_overridden_method_with_the_same_parameters(lens_cls, trl_cls, name):
    assert name in lens_private_members(lens_cls), (
        f"{lens_cls.__name__} no longer overrides {name}: remove it from OVERRIDES in {__file__}"
    )
    definer = trl_definer(lens_cls, name)
    assert definer is not None, (
        f"TRL {trl.__version__} has no {trl_cls.__name__}.{name} any more, so {lens_cls.__name__}.{name} is never "
        f"called: find what replaced it and move the override there"
    )
    pinned = OVERRIDES[lens_cls, trl_cls][name]
    assert params(getattr(definer, name)) == pinned, (
        f"TRL {trl.__version__} changed {definer.__name__}.{name}: parameters {params(getattr(definer, name))}, "
        f"LENS was written for {pinned}"
    )


@pytest.mark.parametrize(
    "lens_cls, name",
    [(lc, name) for (lc, _), methods in OVERRIDES.items() for name in methods],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_each_override_accepts_every_call_trl_can_make(lens_cls, name):
    """TRL's positional parameters come first and in TRL's order; every other TRL parameter is accepted by name
    (or through **kwargs); a parameter only LENS has must have a default, since TRL never passes it."""
    definer = trl_definer(lens_cls, name)
    if definer is None:
        pytest.fail(f"TRL {trl.__version__} has no {name} any more (see the test above)")
    ours = inspect.signature(vars(next(k for k in lens_cls.__mro__ if name in vars(k)))[name]).parameters
    theirs = inspect.signature(getattr(definer, name)).parameters
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ours_pos = [n for n, p in ours.items() if p.kind in positional]
    theirs_pos = [n for n, p in theirs.items() if p.kind in positional]
    assert ours_pos == theirs_pos[: len(ours_pos)], f"{name}: positional {ours_pos} vs TRL's {theirs_pos}"
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    missing = [n for n, p in theirs.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ours]
    assert var_kw or not missing, f"{name}: TRL passes {missing}, which the LENS override does not accept"
    extra = [n for n, p in ours.items()
             if n not in theirs and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty]
    assert not extra, f"{name}: LENS requires {extra}, which TRL never passes"


@pytest.mark.parametrize("trl_cls, name", [(c, n) for c, m in CALLED.items() for n in m], ids=str)
def test_private_trl_methods_lens_calls_are_unchanged(trl_cls, name):
    assert hasattr(trl_cls, name), f"TRL {trl.__version__} removed {trl_cls.__name__}.{name}, which LENS calls"
    assert params(getattr(trl_cls, name)) == CALLED[trl_cls][name]


@pytest.mark.parametrize("trl_cls", list(ATTRIBUTES), ids=lambda c: c.__name__)
def test_private_trl_attributes_lens_reads_are_still_set(trl_cls):
    source = inspect.getsource(trl_cls.__init__)
    for attr in ATTRIBUTES[trl_cls]:
        assert f"self.{attr} =" in source, f"TRL {trl.__version__}: {trl_cls.__name__}.__init__ no longer sets {attr}"


def test_grpo_trainer_builds_vllm_generation_from_its_module():
    """lens/training/vllm.py swaps the module-level `VLLMGeneration` name of TRL's GRPO trainer module."""
    module = sys.modules[GRPOTrainer.__module__]
    assert getattr(module, "VLLMGeneration", None) is VLLMGeneration
    assert "VLLMGeneration(" in inspect.getsource(GRPOTrainer.__init__)
