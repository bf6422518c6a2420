"""`DPOConfig`: every setting of `align dpo`, typed and documented.

Load with `align.config.load_config(DPOConfig, yaml_path, ["beta=0.2", ...])`. The data section is
the reward stage's (`reward.config.DataSection`): the same sources and the same prompt-level
held-out split, so a DPO run and a reward model trained on one file hold out the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from align.config import LoraOptions, option
from align.run import OVERWRITE_HELP
from align.tracking import REPORT_TO_HELP, WANDB_PROJECT_HELP, ReportTo
from reward.config import DataSection

# Settings a resumed run may change (`align dpo --resume RUN key=value`): none changes what is trained
# (memory, threads, checkpoints, progress and metric sinks, the held-out sampling after training): the
# resumed run ends as the uninterrupted one up to float rounding (another split of the same sums).
RESUME_OVERRIDABLE = {"progress", "report_to", "wandb_project", "save_every", "keep_checkpoints",
                      "gradient_accumulation_steps",
                      "gradient_checkpointing", "logprob_chunk_tokens", "num_threads", "eval_prompts",
                      "num_eval_prompts", "temperature", "response_length", "max_prompt_length", "eval_batch_size"}


@dataclass
class DPOConfig:
    """`align dpo`: align an SFT checkpoint on a new LoRA adapter directly on the rankings."""

    # --- models ------------------------------------------------------------------------------
    policy_model: str = option(
        "demo",
        help="SFT checkpoint: 'demo', 'demo:tiny', 'demo:small' (the embedded demo model) or a local directory. "
        "A directory holding a LoRA adapter is merged into its base first. The reference is the same base "
        "with the adapter disabled, as in `align ppo`.",
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        help="Storage dtype of the policy's weights; the LoRA adapter and its AdamW state stay fp32.",
    )
    max_length: int = option(
        256, help="Tokens per prompt + response: a ranking with a response that does not fit after its whole prompt "
        "is left out (one line counts them, for the training and the held-out rankings). A policy with learned "
        "absolute positions (GPT-2, OPT) is read up to its own limit.", ge=8)
    lora: LoraOptions = option(default_factory=LoraOptions, help="The policy's LoRA adapter.")

    # --- data --------------------------------------------------------------------------------
    data: DataSection = option(default_factory=DataSection, help="Where the rankings come from and the split.")

    # --- loss --------------------------------------------------------------------------------
    loss: Literal["kwise", "pairwise"] = option(
        "kwise",
        help="kwise: each ranking is one observation under the Plackett-Luce model (Rafailov et al. 2023, "
        "appendix A.3), ties by Efron's approximation, each response forwarded once per step; for K = 2 this is "
        "DPO's loss. pairwise: every ordered pair the rankings imply becomes its own shuffled K = 2 example, as "
        "TRL and OpenRLHF train (for comparison; each response is in K-1 of the C(K,2) pairs, so it is forwarded "
        "K-1 times per epoch instead of once).",
    )
    beta: float = option(
        0.1,
        help="beta of the implicit reward beta * (log pi - log pi_ref): the strength of the KL regularisation "
        "towards the reference. Smaller beta lets the policy move further from the SFT model.",
        gt=0,
    )

    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = option(1e-3, help="Peak learning rate (AdamW) of the adapter.", gt=0)
    weight_decay: float = option(0.0, help="AdamW weight decay.", ge=0)
    epochs: int = option(1, help="Passes over the training rankings.", ge=1)
    max_steps: int | None = option(None, help="Stop after this many optimizer steps (overrides epochs).", ge=1)
    batch_size: int = option(16, help="Rankings (pairs with loss=pairwise) per optimizer step, over all processes.",
                             ge=1)
    gradient_accumulation_steps: int = option(
        1, help="Micro-batches per optimizer step (memory only): each process forwards and backpropagates its "
        "share of the batch in this many parts and adds up their gradients, which equal one pass over the whole "
        "batch (the loss is a mean over its rankings). The no-grad forwards (reference, held-out) take "
        "batch_size / gradient_accumulation_steps rankings at a time.", ge=1)
    warmup_ratio: float = option(0.1, help="Fraction of steps with linear warm-up, then linear decay to 0.", ge=0, lt=1)
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.", gt=0)
    length_buckets: int = option(
        4, help="Run each batch's responses in this many length-sorted slices (less padding; still one pass each).", ge=1
    )
    logprob_chunk_tokens: int = option(
        4096, help="Log-probs are computed from the hidden states this many tokens at a time (no whole "
        "(tokens, vocabulary) fp32 logits tensor). 0: all at once.", ge=0)
    gradient_checkpointing: bool = option(
        False,
        help="Recompute each layer's activations in the backward instead of keeping them (about a third more "
        "compute, activation memory of one layer). Continuing a prompt's cache needs its keys, which "
        "checkpointing drops, so each response is then forwarded whole with its prompt.",
    )
    log_every: int = option(10, help="Write a metrics.jsonl line every this many steps.", ge=1)
    save_every: int = option(
        50, help="Checkpoint every N optimizer steps into RUN/checkpoints (the adapter, the optimiser and the "
        "data position; `align dpo --resume RUN` continues from the latest); 0: only the final policy.", ge=0)
    keep_checkpoints: int = option(2, help="Most recent checkpoints kept on disk.", ge=1)

    # --- evaluation --------------------------------------------------------------------------
    eval_prompts: str = option(
        "synthetic", help="Held-out prompts the SFT model and the policy answer at the end: 'synthetic' (the "
        "synthetic task's held-out split, scored by its gold judge too) or a .jsonl/.txt file, as in `align ppo` (one that "
        "shares prompts with the training rankings is refused).")
    num_eval_prompts: int = option(128, help="Held-out prompts sampled at the end (0 skips the sampling).", ge=0)
    temperature: float = option(0.7, help="Sampling temperature of the held-out samples (and of their KL); at least "
                                "0.01, as PPO's.", ge=0.01)
    response_length: int = option(48, help="Maximum new tokens of a held-out sample.", ge=1)
    max_prompt_length: int = option(128, help="Held-out prompts longer than this (in tokens) lose their start.", ge=1)
    eval_batch_size: int = option(64, help="Held-out prompts sampled per batch at the end.", ge=1)

    # --- run ---------------------------------------------------------------------------------
    output_dir: str = option("runs/dpo", help="Run directory (config, metrics, summary, samples, policy); one run at a time.")
    overwrite: bool = option(
        False, help=OVERWRITE_HELP)
    seed: int = option(0, help="Seed of the shuffle, the adapter's initialisation and the held-out samples.", ge=0, le=2**31 - 1)
    num_threads: int | None = option(None, help="torch CPU threads (default: torch's choice).", ge=1)
    progress: bool = option(True, help="Show a progress bar with the loss.")
    report_to: ReportTo = option("none", help=REPORT_TO_HELP)
    wandb_project: str = option("align", help=WANDB_PROJECT_HELP)

    # other names of keys: former ones (an earlier run's config.yaml resumes with them), HF generate's
    key_aliases: ClassVar[dict[str, str]] = {"data.annotators": "data.annotators_per_prompt",
                                             "max_new_tokens": "response_length"}

    def __post_init__(self) -> None:

        from align.config import check, check_input_file

        check(self.lora.dropout == 0.0, f"lora.dropout={self.lora.dropout}: DPO runs without dropout (the policy's "
              "log-probs are compared with the reference's, computed once without it); set lora.dropout=0")
        if self.eval_prompts != "synthetic" and self.num_eval_prompts:  # 0: nothing is read from it
            check_input_file(self.eval_prompts, "eval_prompts")
        check(self.gradient_accumulation_steps <= self.batch_size,
              f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) is more micro-batches than a step "
              f"has rankings (batch_size {self.batch_size})")
