"""The running batch of one base model: every sequence's key/value cache in one tensor per layer.

Sequences have different lengths, so the cache is left-padded to a common length and a mask marks the
real positions; each row carries its own position ids, so padding changes nothing a row computes. A
new sequence is prefilled alone (exactly as it would be served alone), then joins: the shorter side is
padded on the left. A finished sequence leaves by row selection, and padding every row shares is
trimmed. One decode step is one forward for every row, whatever adapter each row uses (peft's
per-row `adapter_names`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BASE_ADAPTER = "__base__"


@dataclass
class Row:
    """One sequence in the batch: what it feeds next and where."""

    key: object  # the request it belongs to
    adapter: str  # peft adapter name, or BASE_ADAPTER
    next_token: int
    position: int  # the position id of next_token


def _layers(cache):
    return cache.layers


def _pad_left(tensor: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    if count <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [count, 0]
    return F.pad(tensor, pad)


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache = None  # a transformers DynamicCache holding every row, left-padded
        self.mask: torch.Tensor | None = None  # [rows, length], 1 where the cache holds a real token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, row: Row, cache, length: int) -> None:
        """Add a prefilled sequence (its own batch-of-one cache of `length` tokens)."""
        mask = torch.ones(1, length, dtype=torch.long, device=_device(cache))
        if not self.rows:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        total = max(self.length, length)
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, total - self.length, 2),
                                   _pad_left(theirs.keys, total - length, 2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, total - self.length, 2),
                                     _pad_left(theirs.values, total - length, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, total - self.length, 1), _pad_left(mask, total - length, 1)])
        self.rows.append(row)

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows (by index), then drop the left padding every remaining row has."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            for layer in _layers(self.cache):
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            self.mask = self.mask.index_select(0, index)
            self.rows = [self.rows[i] for i in keep]
        shared = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading columns padded in every row
        if shared:
            for layer in _layers(self.cache):
                layer.keys = layer.keys[:, :, shared:].contiguous()
                layer.values = layer.values[:, :, shared:].contiguous()
            self.mask = self.mask[:, shared:]

    def step_inputs(self, device: str) -> dict:
        """One forward's inputs: each row's next token at its own position, over its cache."""
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return {"input_ids": torch.tensor([[r.next_token] for r in self.rows], device=device),
                "position_ids": torch.tensor([[r.position] for r in self.rows], device=device),
                "attention_mask": self.mask, "past_key_values": self.cache, "use_cache": True}


def _device(cache) -> torch.device:
    return _layers(cache)[0].keys.device
