"""Attention for packed training rows: each example attends only to itself, computed per example.

transformers turns a packed row (position ids restarting at 0) into one block-diagonal mask over the
whole row, so a row of four 60-token examples costs the attention of one 240-token sequence, four
times the work, and the masked kernel is slower still. Here the row's example boundaries
(`cu_seq_lens_q`, passed with the forward) cut the attention into one causal product per example.
On the CPU the products run in fp32 even when the weights are bf16: measured on a CPU with native bf16
(AVX512-BF16), the fp32 kernel was 2.5x faster for 60-token examples (forward and backward).

Without boundaries (evaluation and generation during training) it is transformers' own SDPA attention.
"""

from __future__ import annotations

import torch

NAME = "loraforge_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dtype = query.dtype
    if query.device.type == "cpu" and dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()
    edges = bounds.tolist()
    gqa = query.shape[1] != key.shape[1]
    pieces = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        for start, end in zip(edges[:-1], edges[1:])]
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.to(dtype).transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> bool:
    """Register the packed attention and switch `model` to it; False where the model cannot take it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return model.config._attn_implementation == NAME

