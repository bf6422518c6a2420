"""PPO: policy = SFT + LoRA, reference = same base with adapters disabled, value head, KL penalty."""
