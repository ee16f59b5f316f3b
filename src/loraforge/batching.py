"""Shared training math: batches, loss normalisation over gradient accumulation, token counts.

Both the tiny model's pre-training and the LoRA recipe use these, so they cannot disagree.
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
