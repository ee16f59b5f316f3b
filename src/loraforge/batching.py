"""Shared training math: batches, packing, loss normalisation over gradient accumulation, token counts.

Both the tiny model's pre-training and the LoRA recipe use these, so they cannot disagree.

Packing: the examples of one accumulation window go through the model as one row (or a few, at most
`max_tokens` each) instead of one padded micro-batch at a time. Position ids restart at 0 for each
example, and transformers turns restarting position ids into a block-diagonal causal mask, so no token
attends across an example boundary; the first token of each example gets no label, since the token
before it belongs to another example. The loss is a sum over labelled tokens divided by the window's
labelled tokens either way, so the gradient is the same — only faster (a few large matrix products
instead of many small ones, and no padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IGNORE = -100


def collate(examples: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` and `labels` of tokenized examples to the longest in the batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(examples: Sequence, max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Examples in order, packed greedily into rows of at most `max_tokens` tokens (an example longer than
    that gets a row of its own). Each row is a batch of one: `input_ids`, `labels`, `position_ids`, and
    `cu_seq_lens_q`, where each example starts and the last ends (for per-example attention)."""
    rows: list[list] = []
    for e in examples:
        if rows and sum(len(x.input_ids) for x in rows[-1]) + len(e.input_ids) <= max_tokens:
            rows[-1].append(e)
        else:
            rows.append([e])
    packed = []
    for row in rows:
        ids, labels, positions, bounds = [], [], [], [0]
        for e in row:
            ids += e.input_ids
            labels += [IGNORE] + list(e.labels[1:])  # nothing is predicted across an example boundary
            positions += range(len(e.input_ids))
            bounds.append(len(ids))
        packed.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                       "position_ids": torch.tensor([positions]), "cu_seq_lens_q": torch.tensor(bounds,
                                                                                                 dtype=torch.int32)})
    return packed


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (of a batch of one) whose next token is labelled: the only logits the loss needs."""
    return (labels[0, 1:] != IGNORE).nonzero().flatten()


def summed_loss_at(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`summed_token_loss` for logits computed only at `positions` (`labelled_positions`): with a vocabulary
    of 50k the output layer over every position costs a fifth of a small model's step, and most
    positions are prompt."""
    targets = labels[0, positions + 1]
    return torch.nn.functional.cross_entropy(logits[0].float(), targets, reduction="sum")


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss (labels shifted by one, as the model predicts the next)."""
    return int((labels[:, 1:] != IGNORE).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labelled positions (not the mean).

    Dividing the sum by the labelled tokens of the whole accumulation window gives every token the
    same weight, whatever the batch split (the gradient-accumulation bug fixed in transformers 4.46).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(num_batches / grad_accum))
