"""The reference: LoRA training the way the transformers and PEFT docs show it (Trainer + get_peft_model).

    .venv/bin/python bench/reference_peft_trainer.py MODEL_FOLDER DATA.jsonl --steps 22 [--bf16] [--cuda [--qlora]]

Written as a user would from the docs, with the settings loraforge's bench uses: completion-only labels
(the prompt masked with -100, the chat template's answer and end-of-turn marker trained), padding per
batch (DataCollatorForSeq2Seq), batch 1, gradient accumulation 4, cosine schedule. Prints one JSON line
with what `bench/train_throughput.py` compares. Not part of the product.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj")
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.qlora:
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map={"": 0}, quantization_config=(
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=args.targets.split(",")))

    def tokenize(record: dict) -> dict:
        user = [{"role": "user", "content": record["instruction"]}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["output"]}],
                                             tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt_ids) + ids[len(prompt_ids):]}

    with open(args.data, encoding="utf-8") as handle:
        dataset = [tokenize(json.loads(line)) for line in handle if line.strip()]

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=4,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=2, max_steps=args.steps,
            weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], bf16=args.bf16 or args.qlora,
            use_cpu=not args.cuda,
            seed=42, dataloader_num_workers=0, include_num_input_tokens_seen=True, remove_unused_columns=False,
            disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
        result = trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(json.dumps({"seconds": result.metrics["train_runtime"], "tokens": int(trainer.state.num_input_tokens_seen),
                      "losses": losses, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if args.cuda else None}))


if __name__ == "__main__":
    main()
