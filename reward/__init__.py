"""Reward model: K-wise ranking loss (InstructGPT), LoRA or full fine-tuning, eval, scoring."""
