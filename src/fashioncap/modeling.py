"""BLIP models and processors: built from a config or loaded pretrained, labels, batched captioning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from PIL import Image

from .config import GenerateParams, ModelParams
from .captions import display_caption
from .runtime import FashioncapError

class ModelSourceError(FashioncapError):
    """The configured model cannot be loaded; the message says what to do."""


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
IGNORE_INDEX = -100


def build_tokenizer(captions: Iterable[str]):
    """A BERT tokenizer whose vocabulary is every word of the captions (plus BLIP's [DEC] bos token)."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    pre = BertPreTokenizer()
    words = sorted({w for c in captions for w, _ in pre.pre_tokenize_str(c.lower())})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    # v5 ignores vocab_file= silently; vocab= takes the mapping itself
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, bos_token="[DEC]")


def init_of(cfg: ModelParams, init=None):
    """model.init as resolved by the init stage (an origin.Init), or, without one, as written."""
    from .origin import Init

    return init or Init({"init": cfg.init, "kind": "scratch" if cfg.from_scratch else "hub"}, cfg.init)


def build_processor(cfg: ModelParams, train_captions: Sequence[str], init=None):
    """The processor for model.init (`init`: its origin.Init, the init stage's): pretrained, or a fresh one
    sized to cfg.image_size."""
    from transformers import BlipImageProcessor, BlipProcessor

    init = init_of(cfg, init)
    if not cfg.from_scratch:
        try:
            processor = BlipProcessor.from_pretrained(init.source)
        except (OSError, ValueError) as error:  # not on the Hub, no network, not a BLIP directory, bad id
            raise ModelSourceError(f"cannot load the processor of {init.label}: "
                                   f"{str(error).splitlines()[0][:300]}. To run without the Hub: "
                                   "dvc exp run -S profile=offline") from None
        size = processor.image_processor.size
        if (size.get("height"), size.get("width")) != (cfg.image_size, cfg.image_size):
            # the checkpoint's position embeddings are for its own input size: images of another size
            # would be stored at model.image_size and silently resized again by the processor
            raise ModelSourceError(f"model.image_size ({cfg.image_size}) differs from the input size of "
                                   f"{init.label} ({size.get('height')}x{size.get('width')}): set "
                                   f"-S model.image_size={size.get('height')}")
        return processor
    image_processor = BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=build_tokenizer(train_captions))


def scratch_config(cfg: ModelParams, tokenizer):
    """A small BlipConfig whose special token ids are the tokenizer's (generate() needs them)."""
    from transformers import BlipConfig

    s = cfg.scratch
    text = dict(
        vocab_size=len(tokenizer), hidden_size=s.text_hidden, num_hidden_layers=s.text_layers,
        num_attention_heads=s.text_heads, intermediate_size=s.text_intermediate,
        encoder_hidden_size=s.vision_hidden, max_position_embeddings=cfg.max_caption_tokens + 8,
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        label_smoothing=cfg.label_smoothing,
    )
    vision = dict(
        hidden_size=s.vision_hidden, num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
        intermediate_size=s.vision_intermediate, image_size=cfg.image_size, patch_size=s.patch_size,
    )
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=s.text_hidden)


def apply_memory_options(model, freeze_vision: bool, gradient_checkpointing: bool):
    """Freezes the vision encoder (no gradients, optimizer state or saved activations for it) and/or
    turns on gradient checkpointing (activations recomputed in the backward pass)."""
    if freeze_vision:
        model.vision_model.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_attention(model, attention: str):
    """The model with its attention computed as `attention` says ('sdpa' or 'eager'; attention.py)."""
    from .attention import use_eager, use_sdpa

    return use_sdpa(model) if attention == "sdpa" else use_eager(model)


def grid_positions(table: torch.nn.Parameter) -> None:
    """Fills a scratch vision encoder's position table (the class token's row, then the patches' row by row) with
    2-D sine-cosine positions, as MAE's: each patch's row and column, a quarter of the width each for their sines
    and cosines at geometric frequencies; the class token's row is zero.

    Why: BLIP's vision config starts the table at `initializer_range` (1e-10, meant for loading pretrained
    weights), so a scratch encoder starts as a bag of patches; in the offline run its learned positions reached a
    norm of 1.5 per patch against 21 for the patches' own embeddings, and it told products apart by colour
    rather than shape (docs/results.md). Training still updates the table."""
    width, grid = table.shape[-1], round((table.shape[1] - 1) ** 0.5)
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(*(torch.arange(grid, dtype=torch.float64),) * 2, indexing="ij")
    angles = [axis.reshape(-1, 1) * frequencies for axis in (rows, columns)]
    with torch.no_grad():
        table[0, 0].zero_()
        table[0, 1:] = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).to(table.dtype)


def initial_model(cfg: ModelParams, processor, seed: int, init=None):
    """The weights fine-tuning starts from: the pretrained checkpoint (a registry version's as the init stage
    fetched it, `init`), or a seeded random init."""
    from transformers import BlipForConditionalGeneration, set_seed

    if cfg.from_scratch:
        set_seed(seed)
        model = BlipForConditionalGeneration(scratch_config(cfg, processor.tokenizer))
        grid_positions(model.vision_model.embeddings.position_embedding)
        return with_attention(model, cfg.attention)
    init = init_of(cfg, init)
    model = load_model(init.source, cfg.attention, init.label)
    model.config.text_config.label_smoothing = cfg.label_smoothing
    model.text_decoder.label_smoothing = cfg.label_smoothing
    return model


def load_model(directory, attention: str, what: str = "the model", revision: str | None = None, known_base=None):
    """A saved BLIP (a Hub id at `revision`, or a directory; safetensors only) with the given attention. A LoRA
    adapter's directory loads as its base with the adapter merged in (adapters.merged; `known_base`: an
    origin.Init already at hand, used when it is the adapter's base)."""
    from transformers import BlipForConditionalGeneration

    from .adapters import is_adapter, merged

    if is_adapter(directory):
        base = lambda source, label, rev: load_model(source, attention, label, rev)  # noqa: E731 (itself an adapter?)
        return with_attention(merged(directory, base, what, known_base), attention)
    try:
        model = BlipForConditionalGeneration.from_pretrained(directory, use_safetensors=True,
                                                             **({"revision": revision} if revision else {}))
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load safetensors weights of {what}: {str(error).splitlines()[0][:300]}") from None
    return with_attention(model, attention)


def save_model(model, processor, directory, generate: GenerateParams) -> None:
    """save_pretrained of model (safetensors) and processor, with generation defaults that are the
    pipeline's (BLIP stops on [SEP]; the Hub config's eos 2 and max_length 20 mean nothing here) and
    without the loader flags of the machine that saved it."""
    import json
    from pathlib import Path

    text = model.config.text_config
    config = model.generation_config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = text.bos_token_id, text.sep_token_id, text.pad_token_id
    config.max_length = None  # max_new_tokens decides
    for name, value in generation_kwargs(generate).items():
        setattr(config, name, value)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = Path(directory) / name
        if path.is_file():
            saved = json.loads(path.read_text())
            cleaned = _without_loader_flags(saved)
            if cleaned != saved:
                path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


LOADER_FLAGS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "_from_auto")


def _without_loader_flags(value):
    if isinstance(value, dict):
        return {k: _without_loader_flags(v) for k, v in value.items() if k not in LOADER_FLAGS}
    return value


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int,
                   prompt_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and labels as the original BLIP builds them: the first token becomes the
    decoder's bos, and padding (and any prompt) is ignored by the loss. The model shifts labels itself."""
    input_ids = input_ids.clone()
    input_ids[:, 0] = bos_token_id
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_tokens:
        labels[:, 1 : 1 + prompt_tokens] = IGNORE_INDEX
    return input_ids, labels


def pixel_values(images: Sequence[Image.Image], image_processor, normalise: bool = True) -> torch.Tensor:
    """What BLIP's image processor computes (RGB, resized to its size with its resampling, rescaled and
    normalised) as one vectorised pass over the uint8 pixels. Prepared images are stored at the model's size
    and skip PIL entirely: 3-5x less time per image than the processor's PIL path, the same values to fp32
    rounding (tested). normalise=False stops at the uint8 pixels (N, 3, H, W): a quarter of the bytes for a
    DataLoader worker to hand over; `normalise_pixels` finishes them where the model is."""
    import numpy as np
    from transformers.image_transforms import convert_to_rgb

    proc = image_processor
    height, width = proc.size["height"], proc.size["width"]
    arrays = []
    for image in images:
        if proc.do_convert_rgb and image.mode != "RGB":  # transparency composited on white, as the processor does
            image = Image.fromarray(convert_to_rgb(image, return_numpy=True))
        if proc.do_resize and image.size != (width, height):
            image = image.resize((width, height), resample=proc.resample)
        arrays.append(np.asarray(image))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # channels first, still uint8
    return normalise_pixels(pixels, proc) if normalise else pixels


def normalise_pixels(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 pixels (N, 3, H, W) rescaled and normalised as the processor does, in two in-place passes over
    the floats, on the tensor's own device; float pixels pass through."""
    if pixels.is_floating_point():
        return pixels
    proc = image_processor
    pixels = pixels.float()
    scale = proc.rescale_factor if proc.do_rescale else 1.0
    mean = torch.tensor(proc.image_mean if proc.do_normalize else (0.0,) * 3, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std if proc.do_normalize else (1.0,) * 3, device=pixels.device).view(1, 3, 1, 1)
    return pixels.mul_(scale / std).sub_(mean / std)


PAD_MULTIPLE = 8  # caption lengths padded up to a multiple: few distinct shapes (compile, tensor cores)


class Collator:
    """Turns rows {image, caption} into a batch padded to its longest caption, rounded up to PAD_MULTIPLE."""

    def __init__(self, processor, max_tokens: int, bos_token_id: int, normalise: bool = True):
        self.processor = processor
        self.max_tokens = max_tokens
        self.bos_token_id = bos_token_id
        self.normalise = normalise  # False: uint8 pixels, for normalise_pixels on the model's device

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pixels = pixel_values([r["image"] for r in rows], self.processor.image_processor, self.normalise)
        text = self.processor.tokenizer([r["caption"] for r in rows], padding="longest", truncation=True,
                                        max_length=self.max_tokens, pad_to_multiple_of=PAD_MULTIPLE,
                                        return_tensors="pt")
        input_ids, labels = caption_labels(text["input_ids"], text["attention_mask"], self.bos_token_id)
        return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": text["attention_mask"],
                "labels": labels}


def autocast(precision: str, device: torch.device | str):
    """The autocast context for a resolved precision ('no', 'bf16', 'fp16') on a device."""
    kind = torch.device(device).type
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def generation_kwargs(cfg: GenerateParams) -> dict:
    """The generate() arguments a GenerateParams stands for."""
    return dict(num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, min_length=cfg.min_length,
                repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                do_sample=False)


@torch.no_grad()
def caption_batch(model, processor, images: Sequence[Image.Image], cfg: GenerateParams,
                  precision: str = "no") -> list[str]:
    """Captions a batch of images in one generate() call (under autocast for a mixed `precision`); returns
    them tidy for people (display_caption)."""
    device = next(model.parameters()).device
    pixels = pixel_values(images, processor.image_processor).to(device)
    pixels = pixels.to(next(model.parameters()).dtype)
    with autocast(precision, device):
        out = model.generate(pixel_values=pixels, **generation_kwargs(cfg))
    return [display_caption(t) for t in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]


def caption_all(model, processor, images: Sequence[Image.Image], cfg: GenerateParams, desc: str = "caption",
                quiet: bool = False, precision: str = "no"):
    """Captions any number of images in batches of cfg.batch_size, with a progress bar (unless quiet)."""
    from .runtime import progress

    model.eval()
    captions: list[str] = []
    starts = range(0, len(images), cfg.batch_size)
    for start in progress(starts, desc=desc, unit="batch", quiet=quiet):
        captions.extend(caption_batch(model, processor, images[start : start + cfg.batch_size], cfg, precision))
    return captions
