"""Tokenizer, label construction, collation and generation of the from-config BLIP."""

import pytest
import torch

from fashioncap.modeling import (IGNORE_INDEX, PAD_MULTIPLE, Collator, build_processor, build_tokenizer, caption_batch,
                                 caption_labels, initial_model)
from fashioncap.captions import display_caption
from fashioncap.synthetic import catalogue


def test_tokenizer_covers_every_caption_word_and_decodes_back():
    captions = [p.caption for p in catalogue(0, 50, 32)]
    tok = build_tokenizer(captions)
    assert tok.bos_token == "[DEC]" and tok.pad_token_id == 0
    for c in captions:
        ids = tok(c)["input_ids"]
        assert tok.unk_token_id not in ids
        assert display_caption(tok.decode(ids, skip_special_tokens=True)).lower() == c


def test_labels_put_bos_first_and_ignore_padding():
    input_ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 7, 8, 9, 10, 102]])
    mask = (input_ids != 0).long()
    ids, labels = caption_labels(input_ids, mask, bos_token_id=30522)
    assert ids[:, 0].tolist() == [30522, 30522]
    assert labels[0].tolist() == [30522, 7, 8, 102, IGNORE_INDEX, IGNORE_INDEX]
    assert labels[1].tolist() == [30522, 7, 8, 9, 10, 102]
    assert input_ids[0, 0] == 101  # the caller's tensor is left alone


def test_prompt_tokens_are_ignored_by_the_loss():
    input_ids = torch.tensor([[101, 5, 6, 7, 8, 102]])
    _, labels = caption_labels(input_ids, torch.ones_like(input_ids), bos_token_id=1, prompt_tokens=2)
    assert labels[0].tolist() == [1, IGNORE_INDEX, IGNORE_INDEX, 7, 8, 102]


def test_collator_pads_to_the_longest_caption_rounded_up_not_a_fixed_length(tiny_params):
    products = list(catalogue(1, 6, 32))
    processor = build_processor(tiny_params.model, [p.caption for p in products])
    collate = Collator(processor, max_tokens=tiny_params.model.max_caption_tokens,
                       bos_token_id=processor.tokenizer.bos_token_id)
    rows = [{"image": p.image, "caption": p.caption} for p in products]
    batch = collate(rows)
    longest = max(len(processor.tokenizer(p.caption)["input_ids"]) for p in products)
    assert batch["input_ids"].shape == (6, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)  # few shapes, never 512
    assert batch["attention_mask"].sum(1).max() == longest
    assert batch["pixel_values"].shape == (6, 3, tiny_params.model.image_size, tiny_params.model.image_size)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()


def test_scratch_model_is_seeded_and_generates_with_its_own_special_tokens(tiny_params):
    products = list(catalogue(2, 4, 32))
    processor = build_processor(tiny_params.model, [p.caption for p in products])
    a = initial_model(tiny_params.model, processor, seed=7)
    b = initial_model(tiny_params.model, processor, seed=7)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    cfg = a.config.text_config
    assert (cfg.bos_token_id, cfg.sep_token_id, cfg.pad_token_id) == (
        processor.tokenizer.bos_token_id, processor.tokenizer.sep_token_id, processor.tokenizer.pad_token_id)
    captions = caption_batch(a, processor, [p.image for p in products], tiny_params.generate)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_a_scratch_vision_encoder_starts_with_its_patches_on_a_grid_not_as_a_bag_of_patches(tiny_params):
    """BLIP's own init leaves the position table at ~1e-10: every patch would start in the same place."""
    processor = build_processor(tiny_params.model, ["a red watch"])
    table = initial_model(tiny_params.model, processor, seed=7).vision_model.embeddings.position_embedding[0]
    width, grid = table.shape[1], tiny_params.model.image_size // tiny_params.model.scratch.patch_size
    patches = table[1:].reshape(grid, grid, width)
    assert table.shape[0] == grid * grid + 1 and torch.equal(table[0], torch.zeros(width))  # the class token's
    # a sine and a cosine per frequency and axis: every patch's position has the same, full length
    assert torch.allclose(table[1:].norm(dim=1), torch.full((grid * grid,), (width / 2) ** 0.5))
    # the row's half says the row and the column's half the column; nearer patches are nearer in the table
    assert torch.equal(patches[1, 0, : width // 2], patches[1, grid - 1, : width // 2])
    assert torch.equal(patches[0, 1, width // 2:], patches[grid - 1, 1, width // 2:])
    assert (patches[0, 0] - patches[0, 1]).norm() < (patches[0, 0] - patches[0, grid - 1]).norm()
    assert (patches[0, 0] - patches[1, 1]).norm() < (patches[0, 0] - patches[grid - 1, grid - 1]).norm()
    assert torch.cdist(table[1:], table[1:]).add(torch.eye(grid * grid)).min() > 0.1  # no two patches alike


@pytest.mark.slow
def test_unloadable_pretrained_model_is_a_clear_error_not_a_traceback(tiny_raw, tiny_model, write_params, tmp_path):
    import subprocess

    _, data_dir = tiny_model
    raw = dict(tiny_raw, model={**tiny_raw["model"], "init": str(tmp_path / "no-such-blip")},
               train={**tiny_raw["train"], "allow_cpu": True})
    from tests.conftest import train_command

    proc = subprocess.run(train_command(tmp_path, write_params(raw), data_dir),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "cannot load the processor of model.init" in proc.stderr and "Traceback" not in proc.stderr


def test_a_pretrained_model_at_another_image_size_is_refused(tiny_model, tiny_params):
    """model.image_size must be the checkpoint's input size: prepare would store images at one size and
    the processor silently resize them to another."""

    from fashioncap.modeling import ModelSourceError, build_processor

    model_dir, _ = tiny_model
    cfg = tiny_params.model.model_copy(update={"init": str(model_dir), "image_size": 64})
    with pytest.raises(ModelSourceError, match=r"model.image_size \(64\) differs .*\(32x32\): set -S model.image_size=32"):
        build_processor(cfg, [])
    assert build_processor(cfg.model_copy(update={"image_size": 32}), []).image_processor.size["height"] == 32


@pytest.mark.parametrize("mode, size", [("RGB", (48, 48)), ("RGB", (70, 33)), ("L", (48, 48)), ("RGBA", (48, 48)),
                                        ("P", (20, 60)), ("LA", (48, 48))])
def test_pixel_values_equal_the_image_processors(mode, size):
    import numpy as np
    from PIL import Image
    from transformers import BlipImageProcessor

    from fashioncap.modeling import normalise_pixels, pixel_values

    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode) for _ in range(3)]
    processor = BlipImageProcessor(size={"height": 48, "width": 48})
    expected = processor(images, return_tensors="pt")["pixel_values"]
    ours = pixel_values(images, processor)
    assert ours.shape == expected.shape == (3, 3, 48, 48) and ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    raw = pixel_values(images, processor, normalise=False)  # what a DataLoader worker hands over
    assert raw.dtype == torch.uint8 and torch.equal(normalise_pixels(raw, processor), ours)
