"""Auto-tuning LoRA hyperparameters per domain (started: the task domains)."""
