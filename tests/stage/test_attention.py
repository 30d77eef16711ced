"""BLIP's attention through SDPA computes what transformers' eager attention computes, and saves the same
plain Hugging Face checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from fashioncap.attention import SdpaBlipAttention, SdpaBlipTextSelfAttention, use_eager, use_sdpa, uses_sdpa


@pytest.fixture(scope="module")
def eager_model():
    torch.manual_seed(0)
    text = dict(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                encoder_hidden_size=48, bos_token_id=1, sep_token_id=2, pad_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                  patch_size=8)
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=64))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:], mask[1, 9:] = 0, 0  # padded captions: the padding mask and the causal mask together
    ids = ids.masked_fill(mask == 0, 0)
    return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def loss_and_grads(model, batch, precision=None):
    model.train().zero_grad()
    with torch.autocast("cpu", dtype=precision, enabled=precision is not None):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_attention_module_is_swapped_and_back(eager_model):
    model = use_sdpa(copy.deepcopy(eager_model))
    swapped = [m for m in model.modules() if isinstance(m, (SdpaBlipAttention, SdpaBlipTextSelfAttention))]
    assert len(swapped) == 2 + 2 * 2  # vision layers; text layers x (self, cross)
    assert not uses_sdpa(use_eager(model))


def test_sdpa_equals_eager_forward_and_gradients_in_fp32(eager_model, batch):
    eager_loss, eager_grads = loss_and_grads(copy.deepcopy(eager_model), batch)
    sdpa_loss, sdpa_grads = loss_and_grads(use_sdpa(copy.deepcopy(eager_model)), batch)
    assert eager_grads.keys() == sdpa_grads.keys()
    torch.testing.assert_close(sdpa_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(sdpa_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_is_within_bf16_rounding_of_eager_under_autocast(eager_model, batch):
    eager_loss, _ = loss_and_grads(copy.deepcopy(eager_model), batch, torch.bfloat16)
    sdpa_loss, _ = loss_and_grads(use_sdpa(copy.deepcopy(eager_model)), batch, torch.bfloat16)
    torch.testing.assert_close(sdpa_loss, eager_loss, rtol=2e-2, atol=1e-2)


def test_sdpa_on_the_cpu_is_bit_identical_run_to_run(eager_model, batch):
    model = use_sdpa(copy.deepcopy(eager_model))
    first, second = loss_and_grads(model, batch), loss_and_grads(model, batch)
    assert torch.equal(first[0], second[0]) and all(torch.equal(first[1][k], second[1][k]) for k in first[1])


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_with_the_kv_cache_gives_the_same_captions(eager_model, batch, beams):
    sdpa = use_sdpa(copy.deepcopy(eager_model)).eval()
    with torch.no_grad():
        expected = copy.deepcopy(eager_model).eval().generate(pixel_values=batch["pixel_values"], num_beams=beams,
                                                              max_new_tokens=9, min_length=9)
        assert torch.equal(sdpa.generate(pixel_values=batch["pixel_values"], num_beams=beams, max_new_tokens=9,
                                         min_length=9), expected)


def test_the_saved_checkpoint_is_a_plain_blip_checkpoint(eager_model, tmp_path):
    sdpa = use_sdpa(copy.deepcopy(eager_model))
    sdpa.save_pretrained(tmp_path)
    loaded = BlipForConditionalGeneration.from_pretrained(tmp_path)  # anyone's transformers, no fashioncap
    assert not uses_sdpa(loaded)
    reference = eager_model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(loaded.state_dict()[k], reference[k]) for k in reference)
