"""Typed, validated, frozen parameters, loaded once from the params file that DVC tracks.

Every key is required: params.yaml (composed from conf/) is the one place values live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class ConfigError(ValueError):
    """Raised with every problem of a params file at once, each with its key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# The split that prepare stores beside the synthetic new part's: the base part's test split, on which the model
# that was adapted and the one adapted from are scored again, to measure what adapting forgot
BASE_TEST = "base_test"


class SyntheticData(_Section):
    items: Annotated[int, Field(ge=20)]
    render_size: Annotated[int, Field(ge=32, le=1024)]
    # base: the catalogue the offline profile trains on; new: the next season's designs (synthetic.NEW_DESIGNS),
    # prepared with the base part's test split beside it (BASE_TEST) to measure forgetting
    part: Literal["base", "new"]


# data.replay `auto` for an init from the registry: the share of the new training set drawn from the init's own
# training data (replay.py); measured with the adaptation profile (docs/adapters.md)
AUTO_REPLAY = 0.25


class DataParams(_Section):
    source: Literal["hub", "imagefolder", "synthetic"]
    hub_id: str | None
    revision: str
    hub_split: str
    path: Annotated[str, Field(min_length=1)]
    image_column: str
    text_column: str
    category_column: str | None
    max_items: PositiveInt | None
    val_fraction: Fraction
    test_fraction: Fraction
    split_salt: str
    image_format: Literal["png", "jpeg"]
    min_image_side: Annotated[int, Field(ge=1)]
    max_pixels: Annotated[int, Field(ge=64)]
    max_caption_words: PositiveInt
    max_rejected_fraction: Annotated[float, Field(ge=0.0, le=1.0)]
    num_workers: NonNegInt
    synthetic: SyntheticData
    # a fraction of the new training set drawn from model.init's own training data (an init from the registry);
    # auto: AUTO_REPLAY for an init from the registry, 0 otherwise
    replay: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"]

    @model_validator(mode="after")
    def _source_fields(self) -> "DataParams":
        if self.source == "hub" and not self.hub_id:
            raise ValueError("data.source 'hub' needs data.hub_id")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("data.val_fraction + data.test_fraction must leave at least 10% for training")
        return self


class ScratchModel(_Section):
    patch_size: PositiveInt
    vision_hidden: PositiveInt
    vision_layers: PositiveInt
    vision_heads: PositiveInt
    vision_intermediate: PositiveInt
    text_hidden: PositiveInt
    text_layers: PositiveInt
    text_heads: PositiveInt
    text_intermediate: PositiveInt

    @model_validator(mode="after")
    def _heads_divide(self) -> "ScratchModel":
        for part in ("vision", "text"):
            hidden, heads = getattr(self, f"{part}_hidden"), getattr(self, f"{part}_heads")
            if hidden % heads:
                raise ValueError(f"model.scratch.{part}_hidden ({hidden}) must be a multiple of {part}_heads ({heads})")
        if self.vision_hidden % 4:  # a quarter of it each for the rows' and the columns' sines and cosines
            raise ValueError(f"model.scratch.vision_hidden ({self.vision_hidden}) must be a multiple of 4")
        return self


class ModelParams(_Section):
    init: str
    image_size: Annotated[int, Field(ge=16, le=1024)]
    max_caption_tokens: Annotated[int, Field(ge=4, le=512)]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    # BLIP's attention: through scaled_dot_product_attention (fused kernels; the checkpoint is unchanged), or
    # transformers' own eager implementation
    attention: Literal["sdpa", "eager"]
    scratch: ScratchModel

    @property
    def from_scratch(self) -> bool:
        return self.init == "scratch"

    @model_validator(mode="after")
    def _patch_fits(self) -> "ModelParams":
        if self.from_scratch and self.image_size % self.scratch.patch_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be a multiple of model.scratch.patch_size "
                f"({self.scratch.patch_size})"
            )
        return self


class LoraParams(_Section):
    r: PositiveInt  # the adapters' rank
    alpha: Annotated[float, Field(gt=0.0)]  # their scale is alpha / r
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    # names of the linear layers that get adapters: BLIP's text decoder has query/key/value (self- and
    # cross-attention), its vision encoder qkv
    targets: Annotated[list[Annotated[str, Field(pattern=r"^\w+$")]], Field(min_length=1)]


class TrainParams(_Section):
    batch_size: PositiveInt  # the effective (global) batch of one optimizer step: the recipe, whatever the device
    # the batch computed at once: `auto` probes the largest that divides batch_size and fits the device; the
    # gradients of batch_size / micro_batch micro-batches accumulate
    micro_batch: PositiveInt | Literal["auto"]
    lr: Annotated[float, Field(gt=0.0, le=1.0)]
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)]
    warmup_steps: NonNegInt
    schedule: Literal["linear", "cosine", "constant"]
    max_steps: PositiveInt
    eval_every: PositiveInt
    checkpoint_every: PositiveInt
    eval_samples: PositiveInt
    patience: PositiveInt
    metric: Literal["val_cider_d", "val_loss"]
    clip_grad_norm: Annotated[float, Field(gt=0.0)]
    mixed_precision: Literal["auto", "no", "bf16", "fp16"]
    num_workers: NonNegInt
    log_every: PositiveInt
    launcher: Annotated[str, Field(min_length=1)]
    gradient_checkpointing: bool
    freeze_vision: bool
    compile: bool  # torch.compile of the training step's forward (captions padded to a multiple of 8 tokens)
    sample_images: NonNegInt
    allow_cpu: bool  # fine-tune a pretrained model without a GPU (slow: the stage prints the ETA)
    method: Literal["full", "lora"]  # lora: only adapters train, and only they are saved (adapters.py)
    lora: LoraParams

    @model_validator(mode="after")
    def _steps_fit(self) -> "TrainParams":
        if self.eval_every > self.max_steps:
            raise ValueError(f"train.eval_every ({self.eval_every}) exceeds train.max_steps ({self.max_steps})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.max_steps ({self.max_steps})")
        if self.micro_batch != "auto" and self.batch_size % self.micro_batch:
            raise ValueError(f"train.micro_batch ({self.micro_batch}) must divide train.batch_size ({self.batch_size})")
        return self


class GenerateParams(_Section):
    num_beams: PositiveInt
    max_new_tokens: Annotated[int, Field(ge=1, le=512)]
    min_length: NonNegInt
    repetition_penalty: Annotated[float, Field(ge=1.0)]
    no_repeat_ngram_size: NonNegInt
    batch_size: PositiveInt

    @model_validator(mode="after")
    def _lengths(self) -> "GenerateParams":
        if self.min_length > self.max_new_tokens:
            raise ValueError(
                f"generate.min_length ({self.min_length}) exceeds generate.max_new_tokens ({self.max_new_tokens})"
            )
        return self


class EvaluateParams(_Section):
    max_items: PositiveInt | None
    table_images: NonNegInt  # test images (thumbnails) in the MLflow predictions table
    meteor: bool  # METEOR 1.5 beside BLEU/CIDEr-D/ROUGE-L; needs Java


class NumericsParams(_Section):
    # kernels the CPU computes with: native (the best this CPU has) or a family pinned so that every x86
    # CPU that supports it gives the same bits (fingerprint.FAMILIES)
    cpu_kernels: Literal["native", "avx2", "avx512"]
    threads: Annotated[int, Field(ge=1, le=1024)] | None  # null: torch's default, one per core
    # a GPU's training with deterministic algorithms (slower; results then repeat on the same GPU and
    # software). The CPU is always deterministic.
    deterministic: bool


class ReportParams(_Section):
    gallery_items: Annotated[int, Field(ge=2, le=1000)]


class TrackingParams(_Section):
    experiment: str


# what a gate compares: a caption score (metrics.caption_scores) or an attribute type's F1 (conf/attributes.yaml)
GateMetric = Annotated[str, Field(pattern=r"^(cider_d|bleu_[1-4]|rouge_l|meteor|[a-z]+_f1)$")]


class GateParams(_Section):
    # the candidate's own test split, or the champion's (the products it describes today)
    test_set: Literal["candidate", "champion"]
    metric: GateMetric
    # null: must beat the champion's score there; a fraction: may fall at most that much below it (relative)
    max_drop: Annotated[float, Field(ge=0.0, lt=1.0)] | None


class RegistryParams(_Section):
    name: Annotated[str, Field(min_length=1)]
    max_images: Annotated[int, Field(ge=1, le=1024)]
    max_request_bytes: Annotated[int, Field(ge=1024)]
    max_pixels: Annotated[int, Field(ge=64)]
    request_timeout: Annotated[int, Field(ge=1, le=86_400)]  # seconds the scoring server gives a request
    batch_images: Annotated[int, Field(ge=1, le=1024)]  # concurrent requests' images captioned in one generate()
    batch_wait_ms: Annotated[float, Field(ge=0, le=10_000)]  # how long a request waits for others to join it
    gates: Annotated[list[GateParams], Field(min_length=1)]  # what `fashioncap promote` requires (gates.py)


class Params(_Section):
    profile: str
    seed: NonNegInt
    data: DataParams
    model: ModelParams
    train: TrainParams
    generate: GenerateParams
    evaluate: EvaluateParams
    numerics: NumericsParams
    report: ReportParams
    tracking: TrackingParams
    registry: RegistryParams

    @model_validator(mode="after")
    def _lora_has_a_base(self) -> "Params":
        if self.train.method == "lora" and self.model.from_scratch:
            raise ValueError("train.method lora adapts a pretrained model: model.init 'scratch' has nothing to adapt "
                             "(set model.init to a registry version, a Hub id or a saved model)")
        return self

    @model_validator(mode="after")
    def _replay_has_a_source(self) -> "Params":
        if self.data.replay != "auto" and self.data.replay > 0 and not self.model.init.startswith("models:/"):
            raise ValueError(f"data.replay {self.data.replay} replays the training data of model.init's registry "
                             f"version, and model.init '{self.model.init}' is none: set data.replay to 0 (or auto)")
        return self

    @model_validator(mode="after")
    def _gates_are_scored(self) -> "Params":
        if not self.evaluate.meteor and any(g.metric == "meteor" for g in self.registry.gates):
            raise ValueError("registry.gates compares meteor, which evaluate.meteor false leaves out: set it true "
                             "or gate on another metric")
        return self

    @model_validator(mode="after")
    def _captions_fit(self) -> "Params":
        if self.generate.max_new_tokens < self.model.max_caption_tokens:
            raise ValueError(
                f"generate.max_new_tokens ({self.generate.max_new_tokens}) is below model.max_caption_tokens "
                f"({self.model.max_caption_tokens}): the model could not write the captions it is trained on")
        return self

    @model_validator(mode="after")
    def _batch_fits_data(self) -> "Params":
        items = self.data.synthetic.items if self.data.source == "synthetic" else None
        if self.data.max_items is not None:
            items = min(items or self.data.max_items, self.data.max_items)
        if items is not None:
            train_items = int(items * (1 - self.data.val_fraction - self.data.test_fraction))
            effective = self.train.batch_size
            if effective > train_items:
                raise ValueError(
                    f"train.batch_size ({effective}) exceeds the about {train_items} "
                    f"training items that data.{'max_items' if self.data.max_items else 'synthetic.items'} leaves")
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where}: {msg}{got}")
    return "\n".join(lines)


def parse_params(raw: dict) -> Params:
    """Validates a params mapping, reporting every problem at once."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid parameters ({error.error_count()} problem(s)):\n{_describe(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates the params file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of parameters")
    return parse_params(raw)


def flatten(params: Params) -> dict[str, object]:
    """Flattens params to dotted keys, as MLflow logs them."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", params.model_dump())
    return out
