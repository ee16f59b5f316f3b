"""Batched generation for chats: the one place that renders, left-pads, generates and decodes.

Used by the engine (evaluations over the server or CLI), by training-time evaluation and by the tiny
model's build check, so all three decode the same way.
"""

from __future__ import annotations

import torch

from loraforge.data import render


def decoding_kwargs(tokenizer, *, temperature: float, top_p: float, max_tokens: int, seed: int | None) -> dict:
    """`generate` arguments: greedy at temperature 0, else sampling (seeded when a seed is given)."""
    kwargs = {"max_new_tokens": max_tokens, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if temperature and temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.no_grad()
def batch_generate(model, tokenizer, chats: list[list[dict]], *, n: int = 1, temperature: float = 0.0,
                   top_p: float = 1.0, max_tokens: int = 96, seed: int | None = None, device: str = "cpu",
                   adapter_name: str | None = None) -> list[list[str]]:
    """`n` answers per chat (n > 1 needs temperature > 0), as one left-padded batch."""
    rows = [chat for chat in chats for _ in range(n)]
    texts = [render(tokenizer, chat, add_generation_prompt=True) for chat in rows]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = decoding_kwargs(tokenizer, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    if adapter_name is not None:
        kwargs["adapter_names"] = [adapter_name] * len(rows)
    out = model.generate(**enc, **kwargs)
    width = enc["input_ids"].shape[1]
    answers = [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return [answers[i * n:(i + 1) * n] for i in range(len(chats))]
