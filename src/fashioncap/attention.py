"""BLIP's attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers' BLIP (v1) computes attention eagerly (it raises for attn_implementation="sdpa"): every layer
materialises its score matrix, softmax and dropout as separate kernels. `use_sdpa` swaps the class of each
attention module for a subclass whose forward is the same computation through SDPA: the vision encoder's
self-attention, and the text decoder's causal self-attention and cross-attention over the image, the KV cache
of generation included. The parameters, the state dict and so the saved checkpoint stay exactly those of a
plain Hugging Face BLIP; `use_eager` swaps back. The attention weights are not returned (BLIP's layers
discard them).

On the CPU each call pins the backend (`cpu_backend`), so a result does not depend on which kernel torch
picks. A decoding step (one query) keeps the eager products, which are faster there (`_one_query`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention, EncoderDecoderCache


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """BLIP's additive float mask (0 or the dtype minimum of fp32) in the query's dtype, clamped so that
    fp16 never sees -inf."""
    if mask is None:
        return None
    return mask.clamp(min=torch.finfo(dtype).min).to(dtype)


class SdpaBlipAttention(BlipAttention):
    """The vision encoder's self-attention (no mask) through SDPA."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        bsz, tgt_len, embed_dim = hidden_states.size()
        qkv = self.qkv(hidden_states).reshape(bsz, tgt_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        with attention_context(hidden_states.device):
            context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale,
                                                     dropout_p=self.dropout.p if self.training else 0.0)
        return self.projection(context.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)), None


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """The text decoder's self- and cross-attention, with its cache, through SDPA."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if is_cross else attention_mask
        layer_cache, reuse = None, False
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                reuse = is_cross and cache.is_updated.get(self.layer_idx)
                layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
            else:
                layer_cache = cache
        if reuse:  # the image's keys and values, computed at the first decoding step
            key, value = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
        else:
            states = encoder_hidden_states if is_cross else hidden_states
            shape = (*states.shape[:-1], -1, self.attention_head_size)
            key = self.key(states).view(shape).transpose(1, 2)
            value = self.value(states).view(shape).transpose(1, 2)
            if layer_cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if is_cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        if query.shape[-2] == 1 and not self.training:
            context = _one_query(query, key, value, mask)
        else:
            with attention_context(query.device):
                context = F.scaled_dot_product_attention(query, key, value, attn_mask=_additive_mask(mask, query.dtype),
                                                         dropout_p=self.dropout.p if self.training else 0.0)
        return context.transpose(1, 2).reshape(*input_shape, self.all_head_size), None


def _one_query(query, key, value, mask):
    """A decoding step's attention (one query per sequence) as BLIP computes it eagerly: two small matrix
    products. SDPA's fused CPU kernel is built for long queries and takes 6x longer on this shape (8 images x
    8 heads x 1 x 577 image tokens, bf16: 3.2 ms against 0.56 ms)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores + mask.to(scores.device)
    return torch.matmul(scores.softmax(dim=-1), value)


SWAPS = {BlipAttention: SdpaBlipAttention, BlipTextSelfAttention: SdpaBlipTextSelfAttention}


def use_sdpa(model: nn.Module) -> nn.Module:
    """Routes every BLIP attention module of `model` through SDPA (in place; returns the model)."""
    for module in model.modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
    return model


def use_eager(model: nn.Module) -> nn.Module:
    """Undoes `use_sdpa`: transformers' own eager attention again."""
    back = {v: k for k, v in SWAPS.items()}
    for module in model.modules():
        if type(module) in back:
            module.__class__ = back[type(module)]
    return model


def uses_sdpa(model: nn.Module) -> bool:
    return any(isinstance(m, tuple(SWAPS.values())) for m in model.modules())


def cpu_backend():
    """The SDPA kernel on the CPU, pinned: the flash-attention kernel (fused, parallel over batch and heads,
    no atomics, so bit-identical run to run at a fixed thread count). Elsewhere torch chooses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def attention_context(device: torch.device | str):
    """The context under which the model computes on `device`: the pinned backend on the CPU."""
    return cpu_backend() if torch.device(device).type == "cpu" else contextlib.nullcontext()
