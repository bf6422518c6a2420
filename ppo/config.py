"""PPOConfig: every knob of `align ppo`, documented, with its valid range.

`method` picks the online road: PPO with a value model (the default), or one of the critic-free
methods that replace the value model by a baseline computed from several samples of each prompt,
RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024). The three share the rollout engine, the
reward model, the reference and the clipped surrogate; only the advantages (and GRPO's KL in the
loss) differ.

Defaults follow InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences") and Huang et al. 2024 ("The N+ implementation details of
RLHF with PPO"): clipped policy and value losses (0.2), value loss weight 0.1, gamma 1,
GAE lambda 0.95, whitened advantages, a per-token KL penalty whose coefficient is either
fixed or driven towards a target KL by the adaptive controller of Ziegler et al.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from align.config import LoraOptions, check, check_input_file, option
from align.run import OVERWRITE_HELP
from align.tracking import REPORT_TO_HELP, WANDB_PROJECT_HELP, ReportTo


@dataclass(frozen=True)
class BatchShape:
    """One process's share of an iteration's batch_size episodes (PPOConfig.batch_shape)."""

    episodes: int  # responses this process samples per iteration: batch_size / processes
    prompts: int  # prompts it draws: episodes / samples_per_prompt
    mini_batch: int  # its rows in each optimiser step (and in each no-grad forward): episodes / num_mini_batches
    micro_batch: int  # its rows in each forward and backward: mini_batch / gradient_accumulation_steps


@dataclass
class KLOptions:
    """The KL penalty -beta * KL(pi || pi_ref) added to every token's reward (Ziegler et al. 2019, eq. 2)."""

    coef: float = option(0.05, help="beta: the KL coefficient (the initial value when adaptive).", ge=0.0)
    estimator: Literal["k1", "k3"] = option(
        "k1",
        help="Per-token KL estimator: k1 = log pi - log pi_ref (unbiased), k3 = (r - 1) - log r with "
        "r = pi_ref / pi (unbiased, never negative; Schulman 2020, 'Approximating KL divergence').",
    )
    adaptive: bool = option(
        True, help="Adapt beta towards `target` (Ziegler et al. 2019, section 2.2); false keeps beta fixed."
    )
    target: float = option(
        6.0, help="Target per-sequence KL (nats) for the adaptive controller; also the KL budget reported.", gt=0.0
    )
    horizon: int = option(10000, help="Adaptive controller horizon in episodes (K_beta = batch / horizon).", ge=1)
    in_loss: bool | None = option(
        None,
        help="Where the KL term goes. false: into the reward, -beta * KL at every token (PPO, Ziegler et al. "
        "2019) or summed over the sequence (RLOO, Ahmadian et al. 2024); true: beta * KL(pi || pi_ref) averaged "
        "over the tokens is added to the loss, estimated with k3 from the current policy (GRPO, Shao et al. 2024, "
        "eq. 3-4), and the reward is the score alone. Averaged over tokens in the loss, summed over the sequence in the reward: "
        "the same coef holds the policy less tightly in the loss. null: true for method=grpo, false otherwise.",
    )


# Settings a resumed run may change (`align ppo --resume RUN key=value`): none changes the training math.
# what only method=ppo reads: the value model's loss, clip and learning rate, GAE and the whitening around it
VALUE_MODEL_KEYS = ("vf_coef", "vf_clip_coef", "value_lr_scale", "gamma", "gae_lambda", "whiten_advantages",
                    "whiten_rewards")
RESUME_OVERRIDABLE = {"progress", "report_to", "wandb_project", "eval_batch_size", "keep_checkpoints", "save_every",
                      "num_threads", "gradient_accumulation_steps", "gradient_checkpointing", "logprob_chunk_tokens",
                      "eval_prompts", "num_eval_prompts",
                      "cuda_graphs",  # a replayed decoding step runs the eager step's kernels (tests/cuda)
                      "sample_gathered"}  # FSDP2: when the same weights are gathered (the fix when a rollout runs out)


@dataclass
class PPOConfig:
    """`align ppo`: align an SFT checkpoint on a new LoRA adapter against a reward model."""

    method: Literal["ppo", "rloo", "grpo"] = option(
        "ppo",
        help="ppo: GAE advantages from a value model (value_model). rloo: REINFORCE Leave-One-Out, each sample's "
        "baseline the mean sequence reward of the other samples of its prompt (Ahmadian et al. 2024). grpo: the "
        "group's rewards standardised, (r - mean) / std, and the KL in the loss (Shao et al. 2024). rloo and grpo "
        "need samples_per_prompt >= 2 and train no value model: less memory and compute per iteration. Every method's "
        "loss is a mean over the minibatch's response tokens (Shao et al.'s eq. 3 averages each response first; "
        "the token mean, as DAPO and TRL's default, keeps long responses from weighing less per token).",
    )
    samples_per_prompt: int = option(
        1,
        help="Responses sampled for each prompt (the k of RLOO, the group size G of GRPO); batch_size counts "
        "responses, so each iteration draws batch_size / samples_per_prompt prompts. 1 for PPO as in InstructGPT.",
        ge=1,
    )

    # --- models ------------------------------------------------------------------------------
    policy_model: str = option(
        "demo",
        help="SFT checkpoint: 'demo', 'demo:tiny', 'demo:small' (the embedded demo model) or a local directory. "
        "A directory holding a LoRA adapter is merged into its base first.",
    )
    reward_model: str = option(
        "runs/reward",
        help="Run directory (or its model/ subdirectory) written by `align reward train`.",
    )
    ref_model: str | None = option(
        None,
        help="Separate reference checkpoint. Default (null): the policy's own base with the adapter disabled "
        "(no second copy in memory).",
    )
    value_model: Literal["policy_trunk", "reward_model"] = option(
        "policy_trunk",
        help="policy_trunk: a zero-initialised linear value head on the policy's last hidden state (shares "
        "the LoRA trunk); reward_model: a separate critic initialised from the reward model (InstructGPT). "
        "method=ppo only: rloo and grpo have no value model.",
    )
    dtype: Literal["float32", "bfloat16"] = option(
        "float32",
        help="Storage dtype of the policy's (and reference's) weights. In bfloat16 the LoRA adapter and the value "
        "head stay fp32 (peft's autocast_adapter_dtype; a bf16 weight rounds away updates below 1/256 of it), "
        "and so does their AdamW state.",
    )
    reward_dtype: Literal["float32", "bfloat16"] | None = option(
        None,
        help="dtype of the reward model for scoring, and the compute dtype of a value_model=reward_model critic "
        "(bf16 autocast; its weights and AdamW state stay fp32 since all of it trains). null: same as `dtype`.",
    )
    gradient_checkpointing: bool = option(
        False,
        help="Recompute each transformer layer's activations in the backward of the PPO epochs instead of keeping "
        "them (about a third more compute, a layer's activations of memory); for long responses or large models.",
    )
    sample_merged: bool | None = option(
        None,
        help="Sample rollouts with the LoRA update merged into the base weights (one matmul per adapted layer "
        "instead of three plus the adapter's small kernels; decoding on a GPU is bound by kernel launches). "
        "null: in float32 only, where the merged weights give the policy's log-probs to rounding. In bfloat16 "
        "the merged weights round W + BA to bf16, so the samples come from the policy up to that rounding (a "
        "young adapter's update partly rounds away); pi_old is recomputed by the training forward either way, "
        "as with vLLM-sampled rollouts, so PPO's first ratio is 1 up to the training forward's own rounding (in "
        "float32 about 1e-6 in log; in bfloat16 about 1e-3, where minibatches padded to other widths round "
        "otherwise). The base is restored bit for bit.",
    )
    cuda_graphs: bool | None = option(
        None,
        help="On a GPU, capture the rollout's decoding step as a CUDA graph and replay it (a decoding step is "
        "hundreds of small kernels whose launches cost more than their work: on one H200 at the Qwen2.5-0.5B shape, "
        "sampling 64 x 128 tokens took 1.20 s instead of 6.35 s). The step runs on align's own KV cache, written at "
        "explicit positions (ppo.kv_cache); a graph is captured once per batch size, cache length (rounded up to 64) "
        "and weights (adapter, merged, SFT) and replayed in every later rollout. null: on with one CUDA device per "
        "process, off under FSDP sharding (which gathers weights inside the step). No effect on the CPU.",
    )
    torch_compile: bool | None = option(
        None,
        help="Compile each decoder layer (torch.compile, inductor; align.compilation) for the training forward "
        "and backward and the pi_old forward that PPO's first ratio is taken against: fewer, fused kernels where "
        "a GPU is launch-bound. One layer's graphs are compiled once for all layers, at the first iteration; "
        "decoding and the reference forward stay eager (on one H200 at the Qwen2.5-0.5B shape: the optimisation "
        "phase 2.98 -> 1.93 s, peak memory 9.3 -> 7.5 GiB). null: on with one CUDA device per process, off on the "
        "CPU (compiling took ~35 s on 2 cores for a tiny model; no CPU speed-up is measured), under FSDP and with "
        "gradient_checkpointing (transformers checkpoints inside the layer's forward, which the compiled graph "
        "would have to hold).",
    )
    sample_gathered: bool = option(
        True,
        help="Under FSDP sharding: gather every layer's full weights once per rollout and keep them while it "
        "samples, instead of gathering each layer again for every generated token, when every rank must also decode "
        "all response_length steps (on two CPU ranks the demo's rollout took 0.55 s instead of 1.09 s; "
        "bench/scaling.py). Each process then holds the whole policy while "
        "it samples: set false where that does not fit (70B on 80 GB cards). No effect without FSDP.",
    )
    logprob_chunk_tokens: int = option(
        4096,
        help="Log-probs and entropy are computed from the last hidden states this many response tokens at a time, "
        "so only a (chunk, vocabulary) block of fp32 logits exists at once (recomputed in the backward). At a 152k "
        "vocabulary and 16 x 1,024 tokens the whole tensor would be 10 GB. 0: all tokens at once.",
        ge=0,
    )

    # --- prompts -----------------------------------------------------------------------------
    prompts: str = option(
        "synthetic",
        help="Training prompts: 'synthetic' (align.synthetic task) or a .jsonl file with a 'prompt' field "
        "per line (a kwise export works) or a .txt file with one prompt per line.",
    )
    num_prompts: int = option(1024, help="Number of synthetic training prompts (prompts='synthetic'; the task's "
                              "pool is cycled through, so past the pool they repeat).", ge=1, le=1_000_000)
    eval_prompts: str = option(
        "synthetic", help="Held-out prompts for the final evaluation: 'synthetic' (held-out split) or a file "
        "(one that shares prompts with `prompts` is refused).")
    num_eval_prompts: int = option(128, help="Held-out prompts evaluated at the end (0 skips evaluation).", ge=0)

    # --- rollout -----------------------------------------------------------------------------
    num_iterations: int = option(40, help="PPO iterations (rollout + optimisation rounds).", ge=1)
    batch_size: int = option(
        64, help="Episodes (sampled responses) per iteration over all processes: batch_size / samples_per_prompt "
        "prompts, each answered samples_per_prompt times; each of N processes samples batch_size / N of them "
        "(as the reward and DPO stages' batch_size counts a step's rankings over all processes).", ge=1)
    response_length: int = option(24, help="Maximum new tokens per response.", ge=1)
    temperature: float = option(
        0.7, help="Sampling temperature; training log-probs use the same temperature. At least 0.01: below it the "
        "log-probs, logits / temperature, overflow or dwarf everything else (vLLM raises lower ones to 0.01 too).",
        ge=0.01)
    missing_eos_penalty: float | None = option(
        1.0, help="Subtracted from the score of a response that never emits eos (null: no penalty).", ge=0.0
    )
    max_prompt_length: int = option(128, help="Prompts longer than this (in tokens) are cut from the left, the bos kept; the run says how many.", ge=1)

    # --- PPO optimisation --------------------------------------------------------------------
    num_ppo_epochs: int = option(4, help="Passes over each rollout batch.", ge=1)
    num_mini_batches: int = option(4, help="Minibatches per epoch; one optimiser step each. The no-grad "
                                  "forwards (pi_old, pi_ref, the reward model's scores) read a minibatch at a time.", ge=1)
    gradient_accumulation_steps: int = option(1, help="Micro-batches per minibatch (memory only).", ge=1)
    learning_rate: float = option(3e-4, help="AdamW learning rate for adapter and value head.", gt=0.0)
    value_lr_scale: float = option(
        10.0,
        help="The value head (or critic) learns at value_lr_scale * learning_rate. A zero-initialised head needs "
        "about a hundred Adam steps at the adapter's rate to reach the scale of the returns, and until then the "
        "advantages are little more than whitened returns. OpenRLHF's PPO scripts likewise train the critic "
        "~18x faster than the actor (9e-6 vs 5e-7). 1 = one rate for both. method=ppo.",
        gt=0.0,
    )
    lr_scheduler: Literal["linear", "constant", "cosine"] = option(
        "linear", help="Learning-rate schedule after the warm-up: linear and cosine decay towards 0 over the "
        "remaining optimiser steps, constant stays at learning_rate."
    )
    warmup_steps: int = option(
        0, help="Optimiser steps of linear warm-up: step s (from 0) runs at (s + 1) / warmup_steps of learning_rate, "
        "so the first already learns (transformers' and TRL's warm-ups start at 0).", ge=0)
    weight_decay: float = option(0.0, help="AdamW weight decay.", ge=0.0)
    adam_eps: float = option(1e-5, help="AdamW epsilon (1e-5 as in cleanrl / OpenAI baselines).", gt=0.0)
    max_grad_norm: float = option(1.0, help="Global gradient-norm clip.", gt=0.0)
    clip_coef: float = option(0.2, help="PPO policy ratio clip epsilon.", gt=0.0)
    vf_clip_coef: float = option(0.2, help="Value clip around the rollout values (method=ppo).", gt=0.0)
    vf_coef: float = option(0.1, help="Weight of the value loss (method=ppo).", ge=0.0)
    ent_coef: float = option(0.0, help="Entropy bonus weight (0 as in InstructGPT).", ge=0.0)
    gamma: float = option(1.0, help="Discount (method=ppo).", ge=0.0, le=1.0)
    gae_lambda: float = option(0.95, help="GAE lambda (method=ppo).", ge=0.0, le=1.0)
    whiten_advantages: bool = option(
        True, help="Whiten advantages over the global batch (masked mean/std over every process's responses); method=ppo (rloo and grpo have their own "
        "baselines, and GRPO its own normalisation).")
    whiten_rewards: bool = option(False, help="Whiten the per-token rewards before GAE (method=ppo).")

    kl: KLOptions = option(default_factory=KLOptions, help="KL penalty and controller.")
    lora: LoraOptions = option(default_factory=LoraOptions, help="The policy's LoRA adapter.")

    # --- run ---------------------------------------------------------------------------------
    output_dir: str = option("runs/ppo", help="Run directory (config, metrics, checkpoints, plots, policy); one run at a time.")
    overwrite: bool = option(
        False, help=OVERWRITE_HELP)
    save_every: int = option(10, help="Checkpoint every N iterations (0: only the final policy).", ge=0)
    keep_checkpoints: int = option(2, help="Most recent checkpoints kept on disk.", ge=1)
    seed: int = option(0, help="Seed (process r uses seed + r for sampling).", ge=0, le=2**31 - 1)
    report_to: ReportTo = option("none", help=REPORT_TO_HELP)
    wandb_project: str = option("align", help=WANDB_PROJECT_HELP)
    progress: bool = option(True, help="Show a progress bar with reward and KL.")
    eval_batch_size: int = option(64, help="Prompts per generation batch during evaluation.", ge=1)
    num_threads: int | None = option(
        None,
        help="torch intra-op threads per process (null: torch's default, one per core). Small models run "
        "fastest on 1 thread per process; use several processes (accelerate launch) to use more cores.",
        ge=1,
    )

    # other names of keys: TRL's PPOConfig's, HF generate's
    key_aliases: ClassVar[dict[str, str]] = {"cliprange": "clip_coef", "cliprange_value": "vf_clip_coef",
                                             "max_new_tokens": "response_length"}

    def __post_init__(self) -> None:
        if self.method != "ppo":
            check(self.samples_per_prompt >= 2, f"method={self.method} needs samples_per_prompt >= 2 (its baseline "
                  f"comes from the other samples of the same prompt), got {self.samples_per_prompt}")
            check(self.value_model == "policy_trunk", f"method={self.method} trains no value model, so "
                  f"value_model={self.value_model} (from the config file or an override) does not apply: set "
                  f"value_model=policy_trunk, start from configs/real/{self.method}.yaml or configs/demo/"
                  f"{self.method}.yaml, or use method=ppo")
        check(self.lora.dropout == 0.0, f"lora.dropout={self.lora.dropout}: PPO runs without dropout (the rollout's "
              "and the update's log-probs must be those of the same policy); set lora.dropout=0")
        check(not (self.torch_compile and self.gradient_checkpointing), "torch_compile=true does not run with "
              "gradient_checkpointing=true yet (the checkpoint sits inside the compiled layer); set one of them false")
        self.batch_shape(1)  # one process: said when the config is read
        check(not (self.kl.adaptive and self.kl.coef == 0), "kl.coef=0 with kl.adaptive=true: the controller "
              "multiplies beta, which would stay 0 (no KL penalty); set kl.coef > 0, its starting value, or "
              "kl.adaptive=false for a run without a KL penalty")
        check(self.warmup_steps < max(1, self.total_optimizer_steps),
              f"warmup_steps ({self.warmup_steps}) must be below the run's optimiser steps, num_iterations x "
              f"num_ppo_epochs x num_mini_batches = {self.total_optimizer_steps}, or the learning rate never "
              "reaches its peak")
        for key in ("prompts", "eval_prompts"):
            value = getattr(self, key)
            if value != "synthetic" and (key == "prompts" or self.num_eval_prompts):  # 0: nothing is read from it
                check_input_file(value, key)
            check(
                value == "synthetic" or value.endswith((".jsonl", ".jsonl.gz", ".txt")),
                f"{key}: expected 'synthetic', a .jsonl (.jsonl.gz) or a .txt file, got {value}",
            )

    @property
    def has_value_model(self) -> bool:
        """Whether this run trains a value head or critic (PPO) or none (the critic-free methods)."""
        return self.method == "ppo"

    def unused_settings(self) -> list[str]:
        """The value model's and GAE's settings (VALUE_MODEL_KEYS) given values other than their defaults
        under a critic-free method, which reads none of them: `key=value` each, said when the run starts."""
        if self.has_value_model:
            return []
        defaults = PPOConfig()
        return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key in VALUE_MODEL_KEYS
                if (value := getattr(self, key)) != getattr(defaults, key)]

    @property
    def kl_in_loss(self) -> bool:
        """kl.in_loss resolved: GRPO puts the KL in the loss, PPO and RLOO in the reward."""
        return self.method == "grpo" if self.kl.in_loss is None else self.kl.in_loss

    def batch_shape(self, num_processes: int) -> BatchShape:
        """One process's share of an iteration when `num_processes` share batch_size; a share the
        cuts do not divide is a UserError naming it. Each prompt's samples stay on one process, where
        the critic-free baselines read them together."""
        where = "" if num_processes == 1 else f" on each of the {num_processes} processes"
        check(self.batch_size % num_processes == 0,
              f"batch_size ({self.batch_size}) must be divisible by the number of processes ({num_processes})")
        episodes = self.batch_size // num_processes
        name = "batch_size" if num_processes == 1 else f"batch_size / {num_processes} processes"
        check(episodes % self.samples_per_prompt == 0,
              f"{name} ({episodes}) must be divisible by samples_per_prompt ({self.samples_per_prompt})")
        check(episodes % self.num_mini_batches == 0,
              f"{name} ({episodes}) must be divisible by num_mini_batches ({self.num_mini_batches})")
        mini = episodes // self.num_mini_batches
        check(mini % self.gradient_accumulation_steps == 0,
              f"the minibatch size{where}, {name} / num_mini_batches ({mini}), must be divisible by "
              f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        return BatchShape(episodes, episodes // self.samples_per_prompt, mini, mini // self.gradient_accumulation_steps)

    @property
    def total_optimizer_steps(self) -> int:
        return self.num_iterations * self.num_ppo_epochs * self.num_mini_batches
