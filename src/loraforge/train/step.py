"""One forward and backward of the training loop: the loss of a packed row or a padded micro-batch.

Three ways to the same summed next-token loss and the same gradients (tested against each other):

- a padded micro-batch (`packing: false`): logits at every position, as transformers computes them;
- a packed row, output layer in chunks (`head_chunk`): the decoder's hidden states first, then the
  output layer and the loss over at most `head_chunk` labelled positions at a time, each chunk
  backpropagated to the hidden states at once, then the decoder backward. With a vocabulary of 50k
  the logits of a whole window in fp32 are the largest tensor of a small model's step (1,400 answer
  tokens x 49,152 x 4 bytes = 275 MB, three times over with the softmax and its gradient); in chunks
  they never exceed one chunk. Used for architectures whose logits are exactly the output layer
  applied to the decoder's last hidden state (`PLAIN_HEAD`);
- a packed row, other architectures: logits only at labelled positions (`logits_to_keep`).

`objective="kl"` (retention anchors, packed rows only) replaces the cross-entropy by the KL divergence
from the base's next-token distribution, computed by the same model with the adapter switched off, to
the adapted model's, summed over the labelled positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from loraforge.batching import labelled_positions, summed_loss_at, summed_token_loss

# Model types whose causal-LM head is `lm_head(decoder(x).last_hidden_state)` with nothing after it
# (no logit soft-capping or scaling): the chunked head is exact for them.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "starcoder2", "olmo2"})


def head_mode(model) -> str:
    """How `forward_backward` computes a packed row's loss for this (peft-wrapped) model."""
    core = model.get_base_model()
    if getattr(core.config, "model_type", None) in PLAIN_HEAD and core.get_decoder() is not None:
        return "chunked"
    if "logits_to_keep" in inspect.signature(core.forward).parameters:
        return "labelled"
    return "full"


def forward_backward(model, batch: dict, *, scale: float, mode: str, head_chunk: int = 256,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                     autocast: AbstractContextManager | None = None, objective: str = "ce") -> float:
    """Forward `batch`, backpropagate its summed loss times `scale`, return the summed loss.

    `backward(t)` runs t's backward (the recipe passes the GradScaler's scaling); `autocast` wraps the
    forwards only.
    """
    autocast = autocast or _no_autocast()
    labels = batch["labels"]
    if objective == "kl":
        return _kl_forward_backward(model, batch, scale=scale, mode=mode, head_chunk=head_chunk,
                                    backward=backward, autocast=autocast)
    if "position_ids" not in batch:
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            loss = summed_token_loss(logits, labels)
        backward(loss * scale)
        return loss.item()
    row = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q") if k in batch}
    if mode == "full":
        with autocast:
            loss = summed_token_loss(model(**row, use_cache=False).logits, labels)
        backward(loss * scale)
        return loss.item()
    positions = labelled_positions(labels)
    if mode == "labelled":
        with autocast:
            logits = model(**row, logits_to_keep=positions, use_cache=False).logits
            loss = summed_loss_at(logits, labels, positions)
        backward(loss * scale)
        return loss.item()
    core = model.get_base_model()
    with autocast:
        hidden = core.get_decoder()(**row, use_cache=False).last_hidden_state
    detached = hidden.detach().requires_grad_(True)
    head = core.get_output_embeddings()
    total = 0.0
    for chunk in positions.split(head_chunk):
        with autocast:
            logits = head(detached[:, chunk])
            loss = summed_loss_at(logits, labels, chunk)
        backward(loss * scale)  # accumulates the hidden states' gradient (and the head's, if adapted)
        total += loss.item()
    if detached.grad is not None:
        hidden.backward(detached.grad)  # already scaled by `backward`
    return total


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(base || adapted) of the next-token distributions."""
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - torch.log_softmax(logits.float(), dim=-1))).sum()


def _kl_forward_backward(model, batch: dict, *, scale: float, mode: str, head_chunk: int, backward,
                         autocast) -> float:
    row = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q") if k in batch}
    positions = labelled_positions(batch["labels"])
    if mode != "chunked":
        keep = {"logits_to_keep": positions} if mode == "labelled" else {}
        pick = (lambda x: x[0]) if mode == "labelled" else (lambda x: x[0, positions])
        with torch.no_grad(), model.disable_adapter(), autocast:
            base = pick(model(**row, **keep, use_cache=False).logits)
        with autocast:
            loss = _kl(base, pick(model(**row, **keep, use_cache=False).logits))
        backward(loss * scale)
        return loss.item()
    core = model.get_base_model()
    decoder, head = core.get_decoder(), core.get_output_embeddings()
    with torch.no_grad(), model.disable_adapter(), autocast:
        base_hidden = decoder(**row, use_cache=False).last_hidden_state
    with autocast:
        hidden = decoder(**row, use_cache=False).last_hidden_state
    detached = hidden.detach().requires_grad_(True)
    total = 0.0
    for chunk in positions.split(head_chunk):
        with torch.no_grad(), model.disable_adapter(), autocast:
            base = head(base_hidden[0, chunk])
        with autocast:
            loss = _kl(base, head(detached[0, chunk]))
        backward(loss * scale)
        total += loss.item()
    if detached.grad is not None:
        hidden.backward(detached.grad)
    return total


class _no_autocast(AbstractContextManager):
    def __exit__(self, *exc) -> None:
        return None
