"""The training recipe schema: one YAML per run (optionally `base:`-inheriting another) + `key.sub=value` overrides.

Every key a recipe may hold is a field below, with its default; `train` holds `transformers.TrainingArguments`
fields and `grpo` (stage 2) the `trl.GRPOConfig` fields beyond those. An unknown key anywhere fails at load time:

    configs/recipes/tiny/stage1.yaml: unknown key 'loss.seg_wieght'; did you mean 'loss.seg_weight'?

`null` for a key means "not set": the default of its field (or of TrainingArguments / GRPOConfig), also when a
base recipe set it. `load_recipe` returns the resolved recipe as a plain dict (every default filled in);
`load_config` returns the `Recipe` dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lens.config import DTYPE_NAMES, ConfigError, build, closest, field_names, parse_override, phrase, set_dotted
from lens.training.hf_fields import grpo_fields, train_fields

STAGES = ("warmup", "stage1", "stage2")
# = the keys of lens.modeling.sam.SAM2_CONFIGS, written out so that the schema imports no model code (a typo fails
# at once); tests/test_sam21.py checks that the two agree
SAM_VARIANTS = ("sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l",
                "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
ANSWER_STYLES = ("grounding", "phrase", "json")  # lens/training/data.py target_answer
STAGE2_ONLY = ("rewards", "lora", "grpo", "grpo_shared_prefix", "single_pass_rewards")
LORA_TARGETS = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_MODULES_TO_SAVE = ["connector", "conv_1d", "proj_to_sam", "sam_mask_decoder", "sam_prompt_encoder"]
# TrainingArguments values LENS needs unless the recipe says otherwise
TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "remove_unused_columns": False,  # the collators read the raw rows
    "report_to": "tensorboard",
    # every trainable parameter is used inside the one wrapped forward, so DDP needs no search for unused ones
    "ddp_find_unused_parameters": False,
}
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}


# ---------------------------------------------------------------------- the sections
@dataclass
class ModelConfig:
    init: str  # a checkpoint folder (ours, released, or a base Qwen2.5-VL folder + sam_checkpoint) or preset:<name>
    dtype: str = field(default="float32", metadata={"choices": DTYPE_NAMES})  # also the final checkpoint's dtype
    attn_implementation: str | None = None  # None: transformers' choice (sdpa)
    sam_checkpoint: str | bool | None = None  # Meta's SAM2 .pt for a base Qwen folder (False: random SAM2)
    # None: the preset's / checkpoint's. Another variant than a checkpoint's swaps in a fresh SAM from sam_checkpoint
    sam_variant: str | None = field(default=None, metadata={"choices": SAM_VARIANTS})
    query_position_mode: str | None = None  # None: the checkpoint's (upstream | mrope)
    reinit_context: bool = False  # fresh context module (queries, connector, conv_1d, proj_to_sam)


@dataclass
class DataConfig:
    train: list[str]  # training sources, e.g. refcoco:train, reasonseg:train, custom:<path.jsonl>
    root: str = "datasets"
    question_template: str = "pr1_grounding"  # lens/prompts.py
    min_pixels: int = 3136
    max_pixels: int = 1_000_000
    llm_longest_side: int | None = None  # resize images so that their longest side is at most this (ReasonSeg: 640)
    answer_style: str = field(default="grounding", metadata={"choices": ANSWER_STYLES})  # warmup / stage 1 answers
    memo_images: int = 16  # decoded images kept per data-loader process (lens.data.dataset.GroundingDataset)


@dataclass
class LossConfig:
    objective: str | None = None  # warmup / stage 1: seg | lm | lm+seg (None: seg in stage 1, lm in the warm-up)
    seg_weight: float = 1.0  # x (bce_weight x BCE + dice_weight x dice) of the masks
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    lm_weight: float = 1.0  # x the answer's next-token loss (warmup / stage 1)


@dataclass
class TrainableGroups:
    """Which parameter groups train; None (unset): the stage's default (lens/training/trainable.py)."""

    llm: bool | None = None
    vision: bool | None = None
    context: bool | None = None
    sam_image_encoder: bool | None = None
    sam_prompt_encoder: bool | None = None
    sam_mask_decoder: bool | None = None

    def given(self) -> dict[str, bool]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class LrMultipliers:
    """Per-group learning rate, x train.learning_rate; None (unset): 1."""

    llm: float | None = None
    vision: float | None = None
    context: float | None = None
    sam_image_encoder: float | None = None
    sam_prompt_encoder: float | None = None
    sam_mask_decoder: float | None = None

    def given(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class LoraSettings:
    """PEFT LoRA on the language model (stage 2); the context module and SAM2 decoder train fully."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: str | list[str] = LORA_TARGETS
    modules_to_save: list[str] = field(default_factory=lambda: list(LORA_MODULES_TO_SAVE))


@dataclass
class Recipe:
    stage: str  # warmup | stage1 | stage2
    model: ModelConfig
    data: DataConfig
    train: dict[str, Any]  # transformers.TrainingArguments fields (output_dir required)
    loss: LossConfig = field(default_factory=LossConfig)
    trainable: TrainableGroups = field(default_factory=TrainableGroups)
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)
    cache_sam_features: bool = False  # keep each image's SAM2 features (frozen encoder) in memory across steps
    rewards: list[str] = field(default_factory=lambda: ["box_iou", "mask_iou"])  # stage 2, lens/rewards.py names
    lora: LoraSettings | None = None  # stage 2: None = full fine-tuning
    grpo: dict[str, Any] = field(default_factory=dict)  # stage 2: trl.GRPOConfig fields beyond TrainingArguments'
    # stage 2 (lens/training/shared_grpo.py): run each group's prompt once in every forward (same numbers), and
    # take the mask reward and advantages from the loss forward instead of a scoring forward
    grpo_shared_prefix: bool = False
    single_pass_rewards: bool = False

    @property
    def is_grpo(self) -> bool:
        return self.stage == "stage2"

    @property
    def objective(self) -> str:
        return self.loss.objective or ("seg" if self.stage == "stage1" else "lm")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what `load_recipe` returns and the run writes as config.yaml)."""
        out: dict[str, Any] = {"stage": self.stage}
        for name in field_names(Recipe)[1:]:
            if name in STAGE2_ONLY and not self.is_grpo:
                continue
            value = getattr(self, name)
            if name in ("trainable", "lr_multipliers"):
                value = value.given()
            elif name == "lora" and value is None:
                continue
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[name] = copy.deepcopy(value)
        return out

    def training_arguments(self):
        """TrainingArguments (warmup, stage 1) or GRPOConfig (stage 2) of `train` (+ `grpo`)."""
        if self.is_grpo:
            from trl import GRPOConfig

            return GRPOConfig(**self.train, **self.grpo)
        from transformers import TrainingArguments

        return TrainingArguments(**self.train)


# ---------------------------------------------------------------------- valid names
SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "trainable": TrainableGroups,
            "lr_multipliers": LrMultipliers, "lora": LoraSettings}


def valid_keys(section: str | None, stage: str | None) -> list[str]:
    """Dotted names valid in a section (None: the top level) of a recipe of `stage`."""
    if section is None:
        return [n for n in field_names(Recipe) if stage is None or applies(n, stage)]
    if section in SECTIONS:
        return [f"{section}.{n}" for n in field_names(SECTIONS[section])]
    if section == "train":
        return [f"train.{n}" for n in sorted(train_fields())]
    if section == "grpo":
        return [f"grpo.{n}" for n in sorted(grpo_fields())]
    return []


def applies(name: str, stage: str) -> bool:
    return not (name in STAGE2_ONLY and stage != "stage2")


def suggest(key: str, stage: str | None) -> str:
    """'; did you mean ...?' for a dotted key: the same name in another section (train.beta -> grpo.beta), else the
    closest names of its own section, else the closest anywhere ('' when nothing is close)."""
    parts = key.split(".")
    section, leaf = (parts[0], parts[-1]) if len(parts) > 1 else (None, key)
    top = valid_keys(None, None)  # every top-level name (one of another stage is then refused by name)
    if section is not None and section not in field_names(Recipe):  # a misspelled section
        sections = [s for s in top if s in SECTIONS or s in ("train", "grpo")]
        return phrase([f"{c}.{'.'.join(parts[1:])}" for c in closest(section, sections)])
    typed = [k for s in SECTIONS for k in valid_keys(s, stage)] + top
    same = [k for k in typed if k != key and k.split(".")[-1] == leaf]
    if same:
        return phrase(same[:3])
    own = top if section is None else valid_keys(section, stage)
    leaves = {k.split(".")[-1]: k for k in own}
    close = closest(leaf, list(leaves))
    if close:
        return phrase([leaves[c] for c in close])
    if section in SECTIONS:
        return phrase(closest(key, typed))
    # the TrainingArguments / GRPOConfig names only now (importing transformers takes seconds)
    hf = valid_keys("train", stage) + (valid_keys("grpo", stage) if stage in (None, "stage2") else [])
    same = [k for k in hf if k != key and k.split(".")[-1] == leaf]
    return phrase(same[:3] or closest(key, typed + hf))


def unknown(where: str, key: str, stage: str | None) -> ConfigError:
    hint = suggest(key, stage)
    if not hint:
        section = key.split(".")[0] if "." in key else None
        if section == "train":
            hint = "; train takes transformers.TrainingArguments fields"
        elif section == "grpo":
            hint = "; grpo takes trl.GRPOConfig fields"
        else:
            names = [k.split(".")[-1] for k in valid_keys(section, stage)] or valid_keys(None, stage)
            hint = f"; valid keys{f' of {section}' if section else ''}: {', '.join(names)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


# ---------------------------------------------------------------------- checking one layer
def check_layer(tree: dict, stage: str | None, where: str, hf: bool = False) -> None:
    """Every key of one recipe file (or override) is valid for a recipe of `stage`, with a value of its type.
    `hf=False`: the LENS sections (no transformers import, so a typo there fails at once); `hf=True`: the keys of
    `train` and `grpo` against the TrainingArguments / GRPOConfig fields."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections to values, got {tree!r}")
    top = field_names(Recipe)
    for key, value in tree.items():
        if key not in top:
            raise unknown(where, str(key), stage)
        if stage is not None and not applies(key, stage) and value not in (None, {}, []):
            raise ConfigError(f"{where}: {key!r} applies to stage2 recipes only (this recipe is {stage})")
        if value is None:
            continue
        if key in ("train", "grpo") or key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping of keys to values, got {value!r}")
            if key in SECTIONS:
                for k in value:
                    if k not in field_names(SECTIONS[key]):
                        raise unknown(where, f"{key}.{k}", stage)
                build_partial(SECTIONS[key], value, where, f"{key}.")
            elif hf:
                valid = train_fields() if key == "train" else grpo_fields()
                for k in value:
                    if k not in valid:
                        raise unknown(where, f"{key}.{k}", stage)
        else:
            build_partial(Recipe, {key: value}, where, "")


def build_partial(cls, values: dict, where: str, prefix: str) -> None:
    """Type-check the given values of `cls` (required fields may come from another layer)."""
    try:
        build(cls, values, where, prefix)
    except ConfigError as exc:
        if not str(exc).endswith(" is required"):
            raise


# ---------------------------------------------------------------------- loading
def merge(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section; a null in `top` removes the key (its default applies)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def drop_nulls(tree: dict) -> dict:
    return {k: drop_nulls(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}


def display(path: Path) -> str:
    return os.path.normpath(str(path))


def read_layers(path: str | Path, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """[(file name, its keys)] from the root base to `path`."""
    path = Path(path)
    name = display(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {name} not found (recipes live in configs/recipes/)")
    if name in seen:
        raise ConfigError(f"{name}: base recipes form a cycle ({' -> '.join((*seen, name))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{name}: expected a mapping of sections to values, got {tree!r}")
    base = tree.pop("base", None)
    if base is None:
        return [(name, tree)]
    if not isinstance(base, str):
        raise ConfigError(f"{name}: base must be a recipe file name, got {base!r}")
    return [*read_layers(path.parent / base, (*seen, name)), (name, tree)]


def from_dict(tree: dict, where: str = "recipe", layers: list[tuple[str, dict]] | None = None) -> Recipe:
    """A `Recipe` from a resolved (or hand-built) tree; `layers` name the file of each key in errors."""
    stage = tree.get("stage")
    layers = layers or [(where, tree)]
    if stage not in STAGES:
        for name, layer in layers:
            check_layer(layer, None, name)  # a misspelled key first (e.g. `stag: stage1`)
        raise ConfigError(f"{where}: stage={stage!r}; expected one of {STAGES}")
    for hf in (False, True):
        for name, layer in layers:
            check_layer(layer, stage, name, hf)
    tree = drop_nulls(tree)
    for section in ("model", "data", "train"):
        if not isinstance(tree.get(section), dict):
            raise ConfigError(f"{where}: missing section {section!r}")
    if "init" not in tree["model"]:
        raise ConfigError(f"{where}: model.init is required (a checkpoint folder or preset:<name>)")
    if not tree["data"].get("train"):
        raise ConfigError(f"{where}: data.train must list training sources (e.g. refcoco:train)")
    if "output_dir" not in tree["train"]:
        raise ConfigError(f"{where}: train.output_dir is required")
    typed = {k: v for k, v in tree.items() if k not in ("train", "grpo")}
    recipe = build(Recipe, {**typed, "train": {}, "grpo": {}}, where)
    if recipe.loss.objective is not None and recipe.is_grpo:
        raise ConfigError(f"{where}: loss.objective applies to warmup and stage1 (stage 2 optimises the GRPO loss "
                          "plus seg_weight x the mask loss)")
    recipe.loss.objective = None if recipe.is_grpo else recipe.objective
    recipe.train = copy.deepcopy(tree["train"])
    for key, value in TRAIN_DEFAULTS.items():
        recipe.train.setdefault(key, value)
    if recipe.train.get("gradient_checkpointing"):
        recipe.train.setdefault("gradient_checkpointing_kwargs", dict(GRADIENT_CHECKPOINTING_KWARGS))
    recipe.grpo = copy.deepcopy(tree.get("grpo", {})) if recipe.is_grpo else {}
    return recipe


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (optionally `base:`-inheriting another), apply `section.key=value` overrides, validate."""
    layers = read_layers(path)
    top = display(Path(path))
    for text in overrides:
        keys, value = parse_override(text)
        layer: dict = {}
        set_dotted(layer, keys, value, where=f"{top}: override {text!r}")
        layers.append((f"{top}: override {text!r}", layer))
    tree: dict = {}
    for _, layer in layers:
        tree = merge(tree, layer)
    return from_dict(tree, top, layers)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved recipe as a dict (every default filled in); see `load_config` for the dataclass."""
    return load_config(path, overrides).to_dict()


def as_recipe(recipe: Recipe | dict[str, Any]) -> Recipe:
    """A `Recipe` from either form (a dict is validated again: callers may have edited it)."""
    return recipe if isinstance(recipe, Recipe) else from_dict(copy.deepcopy(recipe))
