"""Build the built-in `tiny` base model: tokenizer, Llama weights and chat template, from the corpus.

Deterministic on one machine: a fixed seed, the corpus in a fixed order, one thread count per build.
Not across machines: vector width and thread count change float sums, and 540 steps amplify the
difference, so two CPUs build two different (equally valid) models. Nothing may depend on which one.
The result is cached under `$LORAFORGE_HOME/models/tiny-<key>` where the key hashes the corpus and this
recipe, so changing either builds a new model; an existing build is reused.

`LORAFORGE_TINY_SEED` replaces the build seed (and so the cache key): the way to run the test suite
against other builds of `tiny`, as a different CPU would produce.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import uuid
from pathlib import Path

import torch

from loraforge import paths
from loraforge.batching import collate, count_loss_tokens, summed_token_loss
from loraforge.data import Example, tokenize_examples
from loraforge.models.tiny import corpus

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# The recipe; any change here gives a new cache key.
RECIPE = {
    "version": 1,
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "epochs": 36,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "seed": 1234,
    # Normalised activations scaled up to the norm a 4096-wide model has (sqrt(4096 / 256) = 4), with the
    # weights that read them scaled down to match: the base computes exactly the same function, but a LoRA
    # step moves it as far as the same step moves a 7B-class model. Adam's update is per coordinate, so
    # its effect grows with the norm of the activations the adapted weights read; without this, the
    # learning rates people use on 7B models (1e-4) barely move a 256-wide model.
    "activation_scale": 4.0,
}


SEED_ENV = "LORAFORGE_TINY_SEED"


def recipe() -> dict:
    """RECIPE, with the seed `LORAFORGE_TINY_SEED` asks for."""
    seed = os.environ.get(SEED_ENV, "").strip()
    if not seed:
        return dict(RECIPE)
    if not seed.isdigit():
        raise ValueError(f"{SEED_ENV} must be a non-negative integer, got {seed!r}")
    return {**RECIPE, "seed": int(seed)}


def cache_key() -> str:
    payload = json.dumps({"recipe": recipe(), "corpus": corpus.corpus_hash()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def model_dir() -> Path:
    return paths.home() / "models" / f"tiny-{cache_key()}"


def is_built() -> bool:
    return (model_dir() / "loraforge-tiny.json").is_file()


def _train_texts() -> list[str]:
    texts = []
    for fact in corpus.facts():
        for q in fact.phrasings:
            texts.append(f"{q}\n{fact.answer}")
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"], special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_train_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = RECIPE["max_position_embeddings"]
    return fast


def training_examples(tokenizer) -> list:
    examples = []
    for fact in corpus.facts():
        for q in fact.phrasings:
            examples.append(Example(len(examples) + 1, [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": fact.answer}]))
    return tokenize_examples(tokenizer, examples, max_seq_length=RECIPE["max_position_embeddings"],
                             train_on_inputs=False, source="tiny corpus")


def build(progress=None) -> Path:
    """Build and cache the tiny model if needed; return its folder. `progress(step, total, loss)` is optional."""
    final = model_dir()
    if is_built():
        return final
    from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

    started = time.perf_counter()
    spec = recipe()
    random.seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    tokenizer = build_tokenizer()
    data = training_examples(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"], num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"], num_key_value_heads=RECIPE["num_key_value_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"], tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.train()
    batch_size = RECIPE["batch_size"]
    per_epoch = math.ceil(len(data) / batch_size)
    total = per_epoch * RECIPE["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"], weight_decay=RECIPE["weight_decay"])
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=RECIPE["warmup_steps"], num_training_steps=total)
    fit(model, data, tokenizer.pad_token_id, optimizer, scheduler, epochs=RECIPE["epochs"], batch_size=batch_size,
        seed=spec["seed"], progress=progress)

    rescale_activations(model, RECIPE["activation_scale"])
    model.eval()
    accuracy = probe_accuracy(model, tokenizer)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    model.generation_config.do_sample = False
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    paths.atomic_write_json(tmp / "loraforge-tiny.json", {
        "cache_key": cache_key(), "recipe": spec, "corpus_sha256": corpus.corpus_hash(),
        "build_seconds": round(time.perf_counter() - started, 1), "probe_accuracy": accuracy,
        "steps": total, "torch_threads": torch.get_num_threads(),
    })
    try:
        paths.publish_dir(tmp, final)
    except OSError:
        paths.remove_tree(tmp)  # another process published the same build first
    return final


def fit(model, data: list, pad_id: int, optimizer, scheduler, *, epochs: int, batch_size: int, seed: int,
        progress=None) -> None:
    """Full-weight training on tokenized examples: a seeded shuffle per epoch, mean loss over answer tokens,
    gradients clipped at 1. `progress(step, total, loss)` is optional."""
    order = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(len(data) / batch_size)
    step = 0
    for _epoch in range(epochs):
        perm = torch.randperm(len(data), generator=order).tolist()
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in perm[start:start + batch_size]], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = summed_token_loss(logits, batch["labels"]) / max(1, count_loss_tokens(batch["labels"]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if progress:
                progress(step, total, loss.item())


@torch.no_grad()
def rescale_activations(model, scale: float) -> None:
    """Multiply each RMSNorm gain by `scale` and divide the projections that read it: same function."""
    for layer in model.model.layers:
        layer.input_layernorm.weight.mul_(scale)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight.div_(scale)
        layer.post_attention_layernorm.weight.mul_(scale)
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight.div_(scale)


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to single-turn prompts, batched with left padding."""
    from loraforge.generation import batch_generate

    chats = [[{"role": "user", "content": p}] for p in prompts]
    return [out[0] for out in batch_generate(model, tokenizer, chats, max_tokens=max_new_tokens)]


def probe_accuracy(model, tokenizer) -> float:
    probes = corpus.probes()
    answers = []
    for start in range(0, len(probes), 64):
        answers += generate_answers(model, tokenizer, [p["prompt"] for p in probes[start:start + 64]])
    hits = sum(a == p["answer"] for a, p in zip(answers, probes))
    return hits / len(probes)
