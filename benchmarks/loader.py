"""The input pipeline alone: decoding the stored JPEGs, pixels and caption tokens for a batch, at BLIP-base's
384 px, in samples/s. Ours (`modeling.pixel_values`: one vectorised pass over uint8 pixels) against BLIP's
image processor (PIL and numpy per image), in this process and through a DataLoader with two workers, as
`train` runs it on two cores: the workers hand over uint8 pixels, normalised where the model is."""

from __future__ import annotations

import torch

from .common import Result, median_seconds, offline_params
from .train_step import ProcessorCollator, catalogue_batches, make_processor, stored_rows


class StoredImages(torch.utils.data.Dataset):
    """The rows as the prepared dataset serves them to a DataLoader worker: a stored JPEG, decoded on access."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return stored_rows([self.items[i]])[0]


def samples_per_second(collate, items, batch: int, workers: int, repeats: int, finish=lambda b: b) -> float:
    loader = torch.utils.data.DataLoader(StoredImages(items), batch_size=batch, collate_fn=collate,
                                         num_workers=workers, persistent_workers=workers > 0)
    return len(items) // batch * batch / median_seconds(lambda: [finish(b) for b in loader], repeats)


def run(level: str) -> list[Result]:
    from fashioncap.modeling import Collator, normalise_pixels

    n, batch, repeats = {"full": (256, 32, 3), "quick": (64, 16, 2), "smoke": (16, 8, 1)}[level]
    items = catalogue_batches(n, 384)
    processor = make_processor("base", [r["caption"] for r in items])
    ours = Collator(processor, offline_params().model.max_caption_tokens, processor.tokenizer.bos_token_id)
    before = ProcessorCollator(ours)
    raw = Collator(processor, ours.max_tokens, ours.bos_token_id, normalise=False)  # as train's loader collates
    finish = lambda b: normalise_pixels(b["pixel_values"], processor.image_processor)  # noqa: E731
    results = []
    for workers, label in ((0, "in the training process"), (2, "DataLoader, 2 workers")):
        results.append(Result("input pipeline", f"384 px JPEG -> batch of {batch}, {label}", "samples/s",
                              samples_per_second(raw, items, batch, workers, repeats, finish),
                              samples_per_second(before, items, batch, workers, repeats), "BLIP image processor",
                              target=None if workers == 0 else 1.0,
                              note="" if workers == 0 else "target: >= 500 samples/s on 2 cores"))
    return results
