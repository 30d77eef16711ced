"""`fashioncap review`: the captions a registered version is least sure of, for reviewers to check first.

A caption's confidence is the mean log-probability of its tokens (the stop token included) under the model
that wrote it: the model's own captions are scored again in one teacher-forced pass, the generation unchanged.
The worklist is JSONL, one product a line (its key, photo and caption), plus a page in the report's style; a
reviewer corrects the `caption` of a line and hands the file to `fashioncap feedback`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from .feedback import suffix
from .report import STYLE, data_uri

WORKLIST, PAGE, PHOTOS = "worklist.jsonl", "worklist.html", "photos"
CHUNK = 256  # products captioned per chunk: their decoded photos are what the review holds in memory


def least_sure(rows: list[dict], count: int) -> list[dict]:
    """The `count` rows of lowest confidence, least sure first (ties by key, so the order is stable)."""
    return sorted(rows, key=lambda r: (r["confidence"], r["key"]))[:count]


def confidences(model, sequences, pixels, pad_token_id: int):
    """The mean log-probability of each generated sequence's tokens after the first (bos), pads left out."""
    import torch

    logits = model(pixel_values=pixels, input_ids=sequences, attention_mask=(sequences != pad_token_id).long()).logits
    targets = sequences[:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = (targets != pad_token_id).float()
    return ((logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()


def caption_with_confidence(captioner, images: list) -> list[tuple[str, float]]:
    """A served version's captions of `images` (its registered generation settings and precision), each with
    its confidence."""
    import torch

    from .captions import display_caption
    from .modeling import autocast, generation_kwargs, pixel_values

    model, processor, cfg = captioner.model, captioner.processor, captioner.generate
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), cfg.batch_size):
            pixels = pixel_values(images[start:start + cfg.batch_size], processor.image_processor).to(device)
            with autocast(captioner.precision, device):
                sequences = model.generate(pixel_values=pixels, **generation_kwargs(cfg))
                scores = confidences(model, sequences, pixels, model.config.text_config.pad_token_id)
            texts = processor.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            out.extend((display_caption(t), s) for t, s in zip(texts, scores))
    return out


def page(rows: list[dict], photos: dict[str, bytes], title: str) -> str:
    """The worklist as a self-contained page: each product's photo, the model's caption, the catalogue's."""
    cards = "".join(
        f'<div class="card worse"><img src="{data_uri(photos[r["key"]])}" alt="{html.escape(r["key"])}">'
        f'<p><span class="tag">key</span>{html.escape(r["key"])} <span class="score">{r["confidence"]:.3f}</span></p>'
        f'<p><span class="tag">model</span>{html.escape(r["caption"])}</p>'
        f'<p><span class="tag">catalogue</span>{html.escape(r["catalogue_caption"])}</p></div>' for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><p class='meta'>{len(rows)} captions, least sure first "
            "(the mean log-probability of the caption's tokens). Correct a line's <code>caption</code> in "
            f"{WORKLIST} and apply the file with <code>fashioncap feedback</code>.</p><div class='grid'>{cards}</div>"
            "</body></html>")


def review(model_uri: str, prepared: Path, count: int, out: Path, splits: list[str]) -> list[dict]:
    """Captions the prepared catalogue's products with the version, writes the `count` it is least sure of to
    `out` (worklist, photos, page) and returns them."""
    import datasets
    import mlflow

    from .runtime import FashioncapError

    if not (prepared / "dataset_dict.json").is_file():
        raise FashioncapError(f"{prepared} holds no prepared catalogue: run the pipeline (`dvc repro`) first")
    catalogue = datasets.load_from_disk(str(prepared))
    unknown = [s for s in splits if s not in catalogue]
    if unknown:
        raise FashioncapError(f"the prepared catalogue has no split {unknown}: it has {sorted(catalogue)}")
    captioner = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    rows, where = [], {}
    for split in splits:
        part = catalogue[split]
        for start in range(0, len(part), CHUNK):  # a chunk's photos decoded at a time, not the catalogue's
            chunk = part.select(range(start, min(start + CHUNK, len(part))))
            scored = caption_with_confidence(captioner, list(chunk["image"]))
            for i, (key, reference, (caption, confidence)) in enumerate(zip(chunk["key"], chunk["caption"], scored)):
                rows.append({"key": key, "caption": caption, "confidence": round(confidence, 6), "split": split,
                             "catalogue_caption": reference})
                where[key] = (split, start + i)
    chosen = least_sure(rows, count)
    encoded = {split: catalogue[split].cast_column("image", datasets.Image(decode=False)) for split in splits}
    photos = {}
    for r in chosen:
        split, index = where[r["key"]]
        photos[r["key"]] = encoded[split][index]["image"]["bytes"]  # the stored bytes, not decoded again
        r["photo"] = f"{PHOTOS}/{r['key']}{suffix(photos[r['key']])}"
    (out / PHOTOS).mkdir(parents=True, exist_ok=True)
    for r in chosen:
        (out / r["photo"]).write_bytes(photos[r["key"]])
    (out / WORKLIST).write_text("".join(json.dumps(r) + "\n" for r in chosen))
    (out / PAGE).write_text(page(chosen, photos, f"Review: {model_uri}"))
    return chosen
