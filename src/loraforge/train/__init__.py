"""Training: plan (checks against the model), the LoRA recipe, checkpoints and the size report."""
