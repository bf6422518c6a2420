"""align: an RLHF pipeline (annotation -> K-wise reward model -> PPO on LoRA -> export)."""

__version__ = "0.1.0"
