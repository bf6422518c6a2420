"""The PPO recipe: `run_ppo(cfg) -> summary`.

`PPOTrainer.setup()` builds everything (models in one base, optimiser, data, KL controller)
or restores it from a checkpoint; `train()` runs the iterations, checkpoints, evaluates and
writes the run directory; `step()` is one PPO iteration and reads like the algorithm box of
Ziegler et al. 2019 / InstructGPT:

    1) rollout   2) score   3) KL-penalised rewards   4) GAE + whitening   5) PPO epochs

The critic-free methods (`method=rloo|grpo`) run it with k samples per prompt: steps 3-4 give one
reward per sequence and a baseline from the prompt's other samples (`core.rloo_advantages`,
`core.grpo_advantages`); step 5 has no value loss (GRPO adds its KL term there instead).

Step 5 is ppo.optimise. The run directory's layout is ppo.run_dir; checkpoints are ppo.checkpoint
and the final held-out evaluation is ppo.evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from align.checkpoint import check_run_dir, latest_checkpoint, release_run_dir, start_run_dir
from align.compilation import LayerCompiler, decoder_layers
from align.distributed import fsdp_plugin, full_trainable_state, gathered, keep_until_exit, make_accelerator, shard
from align.errors import TrainingDiverged
from align.precision import enable_gradient_checkpointing, torch_dtype
from align.run import (
    METRICS_FILE,
    SUMMARY_FILE,
    TrainingClock,
    peak_memory_metrics,
    read_metrics,
    write_json_atomic,
    write_jsonl_atomic,
)
from align.schedule import lr_schedule
from ppo import core
from ppo.checkpoint import (
    CHECKPOINT_PREFIX,
    check_distributed_setup,
    load_checkpoint,
    save_checkpoint,
    save_final_policy,
)
from ppo.config import PPOConfig
from ppo.data import PromptSampler, gold_judge, load_eval_prompts, load_prompts
from ppo.evaluation import Judge, evaluate
from ppo.experience import Experience, Samples, decode_responses, encode_prompts, prompt_notes
from ppo.model import ActorCritic, Reference, build_critic, build_policy
from ppo.optimise import length_grouped_micro_batches, micro_step, optimise
from ppo.run_dir import OUTPUTS, SAMPLES_FILE
from ppo.sampling import NON_FINITE_LOGITS, DecodeBufferPool, check_decodable, sample_responses, samples_exactly

if TYPE_CHECKING:
    from align.tracking import RunLog

log = logging.getLogger("align")


class Scorer(Protocol):
    """What PPO needs from a reward model (reward.model.RewardModel satisfies it)."""

    def score(self, prompts: list, responses: list[str], batch_size: int = 64) -> torch.Tensor: ...


def run_ppo(cfg: PPOConfig, *, reward_model: Scorer | None = None, resume: bool = False,
            judge: Judge | None = None) -> dict[str, Any]:
    """Align cfg.policy_model against the reward model; returns the summary (also RUN/summary.json).

    `resume=True` continues the run in cfg.output_dir from its latest checkpoint.
    `reward_model` replaces loading cfg.reward_model (any object with `.score`).
    `judge` scores the held-out samples for eval/gold_* (default: the synthetic task's gold judge
    when eval_prompts is synthetic, `ppo.data.gold_judge`).
    """
    trainer = PPOTrainer(cfg, reward_model=reward_model, resume=resume,
                         judge=judge if judge is not None else gold_judge(cfg.eval_prompts))
    try:
        trainer.setup()
        return trainer.train()
    except BaseException:
        if trainer.run_log is not None:
            trainer.run_log.close(failed=True)
        raise
    finally:
        release_run_dir(trainer.run_dir)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, *, reward_model: Scorer | None = None, resume: bool = False,
                 judge: Judge | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.reward_model = reward_model
        self.resume = resume
        self.judge = judge  # an optional independent score of the held-out samples (ppo.evaluation)
        self.iteration = 0  # iterations completed
        self.sample_seconds = 0.0  # the last rollout's sampling time (timing/sample_s)
        self.said_zero_spread = False  # the warning that every prompt's samples scored alike, once per run
        self.clock = TrainingClock()  # the run's training time and peak memory, carried through checkpoints
        self.run_log: RunLog | None = None  # the main process's metrics rows (align.tracking), once set up

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from align.distributed import set_cpu_threads
        from align.modeling import fit_prompt_length, load_causal_lm, load_tokenizer, resolve_model_path
        from align.tracking import RunLog, check_tracker_available

        cfg = self.cfg
        check_run_dir(self.run_dir, resume=self.resume, overwrite=cfg.overwrite, prefix=CHECKPOINT_PREFIX,
                      command="align ppo", config_class=type(cfg), outputs=OUTPUTS,
                      inputs={"policy_model": cfg.policy_model, "reward_model": cfg.reward_model,
                              "ref_model": cfg.ref_model, "prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts})
        set_cpu_threads(cfg.num_threads)
        check_tracker_available(cfg.report_to)  # before minutes of loading, not after
        self.accelerator = make_accelerator("align ppo")
        self.device = self.accelerator.device
        self.fsdp = fsdp_plugin()  # sharded (FSDP2) when the accelerate config says so (align.distributed)
        check_distributed_setup(self.accelerator, cfg, self.resume, self.fsdp)
        self.batch = cfg.batch_shape(self.accelerator.num_processes)  # this process's share of batch_size
        self.is_main = self.accelerator.is_main_process
        if self.is_main and (unused := cfg.unused_settings()):
            log.warning("%s: method=ppo's settings, which method=%s (no value model, no GAE) does not read",
                        ", ".join(unused), cfg.method)
        dtype, reward_dtype = torch_dtype(cfg.dtype), torch_dtype(cfg.reward_dtype or cfg.dtype)

        # Identical initialisation on every process (DDP also broadcasts rank 0's weights).
        set_seed(cfg.seed)
        self.sft_path = resolve_model_path(cfg.policy_model).resolve()
        self.tokenizer = load_tokenizer(self.sft_path)
        self.tokenizer.padding_side = "left"
        # the prompt files before any model: a bad line is said before minutes of loading
        train_prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed, "train")
        self.eval_prompts = load_eval_prompts(cfg.eval_prompts, cfg.num_eval_prompts, cfg.seed + 1, train_prompts,
                                              "prompts")
        if self.reward_model is None:  # then the reward model: a wrong path fails before the policy loads
            from reward.model import load_reward_model
            from reward.run_dir import normalised_elsewhere

            self.reward_model = load_reward_model(cfg.reward_model, device=self.device, dtype=reward_dtype)
            if self.is_main and (note := normalised_elsewhere(cfg.reward_model, self.sft_path)):
                log.warning("%s", note)
        base = load_causal_lm(self.sft_path, dtype=dtype, tokenizer=self.tokenizer)
        check_decodable(base.config, self.sft_path)
        # a policy with learned absolute positions (GPT-2, OPT) holds prompt and response in its table
        self.max_prompt_length = fit_prompt_length(cfg.max_prompt_length, cfg.response_length, base, "response_length")
        if self.is_main:  # prompts the policy reads cut, or holding a special token's text
            for note in prompt_notes(self.tokenizer, train_prompts, self.eval_prompts, self.max_prompt_length):
                log.warning("%s", note)
        critic = (build_critic(self.reward_model, self.tokenizer, base.get_input_embeddings().num_embeddings,
                               reward_dtype) if cfg.value_model == "reward_model" else None)
        # peft keeps the adapter in fp32 on a bf16 base (autocast_adapter_dtype), the value head is fp32
        self.model = ActorCritic(build_policy(base, cfg.lora), critic, value_head=cfg.has_value_model).to(self.device)
        self.model.eval()  # dropout off throughout: rollout and training log-probs must agree
        self.checkpointed = []  # the layers that recompute their activations in the backward
        if cfg.gradient_checkpointing:
            self.checkpointed = enable_gradient_checkpointing(base)
            if critic is not None:
                self.checkpointed += enable_gradient_checkpointing(critic.trunk)
        separate_ref = None
        if cfg.ref_model is not None:
            separate_ref = load_causal_lm(resolve_model_path(cfg.ref_model), dtype=dtype, tokenizer=self.tokenizer)
            separate_ref.to(self.device).eval().requires_grad_(False)
        self.reference = Reference(self.model, separate_ref)
        # One CUDA device per process: the decoding step replayed as a CUDA graph, the layers compiled
        # for the training forward (both launch-bound there; neither applies to sharded weights).
        one_gpu = self.device.type == "cuda" and not self.fsdp
        self.decode_pool = DecodeBufferPool(cuda_graph=one_gpu if cfg.cuda_graphs is None else cfg.cuda_graphs)
        compiled = (one_gpu and not cfg.gradient_checkpointing) if cfg.torch_compile is None else cfg.torch_compile
        self.compiler = LayerCompiler(decoder_layers(self.model) if compiled else ())
        if self.fsdp:
            shard(self.model, self.fsdp, forward_methods=("policy_logprobs", "decode_step", "critic_values"))
            if isinstance(getattr(self.reward_model, "model", None), torch.nn.Module):  # a reward.model.RewardModel
                shard(self.reward_model.model, self.fsdp)  # every rank scores as many batches: one collective each

        self.trainable = trainable = [p for p in self.model.parameters() if p.requires_grad]
        value_params = {id(p) for p in self.model.value_parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in value_params], "lr": cfg.learning_rate},
                  {"params": [p for p in trainable if id(p) in value_params], "lr": cfg.learning_rate * cfg.value_lr_scale}]
        # fused: one kernel per step instead of ~8 per parameter tensor (CPU and CUDA, torch >= 2.4)
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                      fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = lr_schedule(optimizer, cfg.total_optimizer_steps, cfg.warmup_steps, cfg.lr_scheduler)
        self.wrapped_model, self.optimizer = ((self.model, optimizer) if self.fsdp
                                              else self.accelerator.prepare(self.model, optimizer))
        keep_until_exit(self.wrapped_model)

        self.kl_ctl = (core.AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
                       else core.FixedKLController(cfg.kl.coef))
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.sampler = PromptSampler(train_prompts, self.batch.prompts, cfg.seed, rank, world)

        # Each process samples different responses (per-rank seeds).
        set_seed(cfg.seed + rank)
        if self.resume:
            load_checkpoint(self, latest_checkpoint(self.run_dir, CHECKPOINT_PREFIX))
        if self.is_main:  # the run directory started or continued, its metrics rows opened
            start_run_dir(self.run_dir, cfg, CHECKPOINT_PREFIX, OUTPUTS, resume=self.resume)
            self.run_log = RunLog(self.run_dir, cfg, step_key="iteration", report_to=cfg.report_to, wandb_project=cfg.wandb_project,
                                  resumed_at=self.iteration if self.resume else None)

    # ------------------------------------------------------------------------------------ train

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.clock.start()
        bar = tqdm(total=cfg.num_iterations, initial=self.iteration, desc="ppo", unit="it",
                   disable=not (self.is_main and cfg.progress))
        last: dict[str, float] = {}
        while self.iteration < cfg.num_iterations:
            last = self.step()
            self.iteration += 1
            if self.is_main:
                self.run_log.log(last, self.iteration)
            bar.set_postfix(reward=f"{last['objective/scores']:.3f}", kl=f"{last['objective/kl']:.3f}")
            bar.update(1)
            if cfg.save_every and self.iteration % cfg.save_every == 0:
                save_checkpoint(self)
        bar.close()
        summary = self.finish(last, self.clock.state_dict())
        self.accelerator.end_training()
        return summary

    def step(self) -> dict[str, float]:
        """One iteration (PPO, RLOO or GRPO) on this process's batch of prompts."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # each prompt samples_per_prompt times, side by side: the critic-free baselines read groups of rows
        prompts = [p for p in self.sampler.next_batch() for _ in range(cfg.samples_per_prompt)]

        # 1) Rollout: sample responses from pi_old (left-padded prompts, KV cache) and record
        #    log pi_old, log pi_ref and V_old for every response token, dropout off.
        try:
            exp, texts = self.rollout(prompts)
        except TrainingDiverged as err:  # the last update overflowed the policy: say when
            if self.iteration == 0:  # no update yet: the checkpoint itself
                hint = "its weights hold NaN or inf?" if self.cfg.dtype == "float32" else "try dtype=float32"
                raise TrainingDiverged(f"iteration 1: {NON_FINITE_LOGITS} before any update: the SFT checkpoint itself "
                                       f"gives them in dtype={self.cfg.dtype} ({hint})") from None
            raise TrainingDiverged(f"iteration {self.iteration + 1}: {err}") from None
        t1 = time.perf_counter()

        # 2) Score: the reward model's normalised score of (prompt, response); a response that never
        #    emits eos loses `missing_eos_penalty` (Huang et al. 2024): objective/scores is after it, as TRL's.
        #    (a minibatch of rows a forward, as the policy's no-grad forwards: the memory plan's "forwards")
        scores = self.reward_model.score(prompts, texts, self.batch.mini_batch).to(self.device, torch.float32)
        has_eos = (exp.response_ids == self.tokenizer.eos_token_id).any(-1)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        exp.scores = scores
        t2 = time.perf_counter()

        # 3) Per-token rewards: -beta * KL(pi_old || pi_ref) estimate at every token, plus the score
        #    at the last real token (Ziegler et al. 2019 eq. 2); GRPO's KL goes in the loss instead.
        beta = self.kl_ctl.value
        exp.kl = core.kl_penalty(exp.logprobs, exp.ref_logprobs, cfg.kl.estimator, exp.response_mask)
        kl_in_reward = 0.0 if cfg.kl_in_loss else beta
        exp.rewards, _ = core.compute_rewards(exp.kl, exp.scores, kl_in_reward, exp.response_mask)

        # 4) Advantages: GAE (gamma, lambda) over the response tokens, then whitened (PPO); or
        #    each sequence's total reward against its prompt's other samples (RLOO, GRPO).
        if cfg.has_value_model:
            self.gae_advantages(exp)
        else:
            sequence_rewards = exp.rewards.sum(-1)
            advantages = (core.rloo_advantages if cfg.method == "rloo" else core.grpo_advantages)(
                sequence_rewards, cfg.samples_per_prompt)
            exp.advantages = core.broadcast_to_tokens(advantages, exp.response_mask)

        # 5) Optimise: num_ppo_epochs passes of the clipped surrogate (+ the clipped value loss, or
        #    GRPO's KL term) over shuffled minibatches (one optimiser step each, gradients
        #    accumulated over micro-batches).
        lr = self.scheduler.get_last_lr()[0]  # the rate of this iteration's first optimiser step
        train_stats = self.optimise(exp)
        t3 = time.perf_counter()

        # The KL the controller sees (and the one logged) is the penalised quantity, summed
        # per sequence and averaged over the global batch. objective/rlhf_reward is the KL-regularised
        # objective, score - beta * KL (Ziegler et al. 2019, eq. 2): the yardstick every method is read
        # by. PPO and RLOO pay exactly that in their reward; GRPO's loss pays beta times the token mean
        # of k3 instead (policy/kl_loss), a per-token average rather than a per-sequence sum.
        seq_kl = exp.kl.sum(-1)
        non_score_reward = -beta * seq_kl
        stats = {
            "objective/kl": seq_kl.mean(),
            "objective/scores": exp.scores.mean(),
            "objective/reward_model_score": (exp.scores + (cfg.missing_eos_penalty or 0.0) * (~has_eos).float()).mean(),
            "objective/non_score_reward": non_score_reward.mean(),
            "objective/rlhf_reward": (exp.scores + non_score_reward).mean(),
            "objective/entropy": (-exp.logprobs * exp.response_mask).sum(-1).mean(),
            "response/length": exp.response_mask.sum(-1).float().mean(),
            "response/eos_rate": has_eos.float().mean(),
            **train_stats,
        }
        if not cfg.has_value_model:
            stats["objective/frac_reward_zero_std"] = core.frac_zero_spread(sequence_rewards, cfg.samples_per_prompt)
        names = list(stats)
        reduced = self.accelerator.reduce(torch.stack([torch.as_tensor(stats[k], dtype=torch.float32,
                                                                       device=self.device) for k in names]), "mean")
        metrics = {"iteration": self.iteration + 1, "episodes": (self.iteration + 1) * cfg.batch_size}
        metrics.update({k: float(v) for k, v in zip(names, reduced.tolist())})
        metrics.update({"objective/kl_coef": beta, "train/lr": lr})
        self.kl_ctl.update(metrics["objective/kl"], cfg.batch_size)
        if metrics.get("objective/frac_reward_zero_std") == 1.0 and self.is_main and not self.said_zero_spread:
            self.said_zero_spread = True
            log.warning("iteration %d: each prompt's %d samples got one reward, so every advantage is 0 and the policy "
                        "learns nothing (samples alike at this temperature, or a reward blind to their differences?); "
                        "said once, objective/frac_reward_zero_std counts them", self.iteration + 1, cfg.samples_per_prompt)
        metrics.update({"timing/rollout_s": t1 - t0, "timing/sample_s": self.sample_seconds, "timing/score_s": t2 - t1,
                        "timing/optimise_s": t3 - t2, "timing/iteration_s": time.perf_counter() - t0})
        return metrics

    def gae_advantages(self, exp: Experience) -> None:
        """PPO's step 4: advantages and value targets by GAE from the per-token rewards and V_old."""
        cfg = self.cfg
        # whitened over the global batch, every process's responses together
        all_sum = (lambda t: self.accelerator.reduce(t, "sum")) if self.accelerator.num_processes > 1 else None
        if cfg.whiten_rewards:
            exp.rewards = core.masked_whiten(exp.rewards, exp.response_mask, shift_mean=False, all_sum=all_sum)
        exp.advantages, exp.returns = core.gae(exp.rewards, exp.values, exp.response_mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            exp.advantages = core.masked_whiten(exp.advantages, exp.response_mask, all_sum=all_sum)

    # ------------------------------------------------------------------------------------ phases

    @torch.no_grad()
    def generate(self, prompts: list, adapter: bool = True) -> Samples:
        """Sample one response per prompt from the policy (or, `adapter=False`, the SFT model),
        with the sampler's log pi(a_t|s_t) and V(s_t) for every response token."""
        tok = self.tokenizer
        query_ids, query_mask = encode_prompts(tok, prompts, self.max_prompt_length, self.device)
        weights, weights_context = self.sampling_weights(adapter)
        gather = self.fsdp is not None and self.cfg.sample_gathered  # the whole policy on each rank while it samples
        # gathering layer by layer, every step is a collective: no rank may stop before the others
        lockstep = self.fsdp is not None and not gather
        with weights_context, gathered(self.model, self.fsdp.reshard_after_forward) if gather else contextlib.nullcontext():
            response, logprobs, values = sample_responses(
                self.model, query_ids, query_mask, max_new_tokens=self.cfg.response_length,
                temperature=self.cfg.temperature, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                pool=self.decode_pool, weights=weights, sync_every=self.cfg.response_length if lockstep else None)
        response_ids, response_mask = core.truncate_after_eos(response, tok.eos_token_id, tok.pad_token_id)
        return Samples(query_ids, query_mask, response_ids, response_mask, logprobs, values)

    def sampling_weights(self, adapter: bool) -> tuple[str, contextlib.AbstractContextManager]:
        """The SFT model (adapter off) or the policy, with its name in the decode buffer pool (a
        captured decoding step replays the kernels of the weights it was captured with). In fp32 the
        policy's LoRA update is merged into the base for sampling (one matmul per layer instead of
        three); in bf16 a young adapter's small update would round away in the merged weights, so it
        stays separate unless `sample_merged` asks for it (see PPOConfig.sample_merged)."""
        if not adapter:
            return "sft", self.model.adapter_disabled()
        # (sharded weights are not merged: each rank holds a slice of the base and of the adapter)
        merge = self.sampler_is_exact and not self.fsdp if self.cfg.sample_merged is None else self.cfg.sample_merged
        return ("merged", self.model.adapter_merged()) if merge else ("adapter", contextlib.nullcontext())

    @functools.cached_property
    def sampler_is_exact(self) -> bool:
        """Whether the sampler's log-probs and values equal the training forward's (`samples_exactly`)."""
        return samples_exactly(self.model)

    @torch.no_grad()
    def sampled_logprobs(self, samples: Samples) -> torch.Tensor:
        """log pi of the sampled tokens as the reference's are computed (ppo.evaluation): the sampler's
        own where exact, else a full forward run as reference_logprobs runs it (eager, no value model),
        so that their difference is the adapter's alone."""
        return samples.logprobs if self.sampler_is_exact else self.grouped_logprobs(samples, self.model.policy_logprobs)

    @torch.no_grad()
    def behaviour_logprobs_and_values(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log pi_old(a_t|s_t) and V_old(s_t) (None without a value model): the sampler's own
        where they are exact, else recomputed by the training forward; a separate critic always
        reads the whole sequences."""
        if not self.sampler_is_exact:
            return self.policy_logprobs_and_values(samples)
        if self.model.critic is not None:
            return samples.logprobs, self.model.critic_values(samples.input_ids, samples.attention_mask,
                                                              samples.context_length)
        return samples.logprobs, samples.values

    def length_groups(self, seqs: Samples | Experience) -> Iterator[tuple[torch.Tensor, Samples | Experience,
                                                                            tuple[torch.Tensor, ...]]]:
        """`seqs`' rows in groups of a minibatch's size (self.batch.mini_batch) and similar length
        (ppo.optimise): each group's row index, its rows trimmed to their longest response, and their
        right-padded sequences."""
        prompt_lengths, lengths = torch.stack([seqs.query_mask.sum(-1), seqs.response_mask.sum(-1)]).tolist()
        for plan in length_grouped_micro_batches(list(range(len(lengths))), prompt_lengths, lengths,
                                                 self.batch.mini_batch):
            rows = torch.tensor(plan.rows).to(self.device)
            group = seqs.select(rows).trim_padding((0, plan.response_width))
            yield rows, group, group.right_padded(plan.width)

    @torch.no_grad()
    def policy_logprobs_and_values(self, seqs: Samples | Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log pi(a_t|s_t) and V(s_t) (None without a value model) of the current policy by
        full forwards, a minibatch of similar lengths at a time; 0 after each response's end."""
        cfg = self.cfg
        logprobs = torch.zeros(seqs.response_ids.shape, device=self.device)
        values = None if self.model.value_module is None else torch.zeros_like(logprobs)
        for rows, group, (input_ids, attention_mask, start) in self.length_groups(seqs):
            with self.compiler.active():  # the layers the training forward runs: the first ratio is 1 to rounding
                logp, _, value = self.model(input_ids, attention_mask, start, group.response_ids, cfg.temperature,
                                            cfg.logprob_chunk_tokens)
            logprobs[rows, : logp.shape[1]] = core.zero_masked(logp, group.response_mask)
            if values is not None:
                values[rows, : value.shape[1]] = value.float() * group.response_mask
        return logprobs, values

    @torch.no_grad()
    def reference_logprobs(self, seqs: Samples | Experience) -> torch.Tensor:
        """(B, T) log pi_ref(a_t|s_t) at the sampling temperature, a minibatch of similar lengths at a
        time; 0 after each response's end."""
        return self.grouped_logprobs(seqs, self.reference.logprobs)

    def grouped_logprobs(self, seqs: Samples | Experience, logprobs_of: Callable[..., torch.Tensor]) -> torch.Tensor:
        """(B, T) `logprobs_of`(input_ids, attention_mask, response_start, tokens, temperature,
        chunk_tokens) of the response tokens, a minibatch of similar lengths at a time; 0 after each
        response's end."""
        cfg = self.cfg
        out = torch.zeros(seqs.response_ids.shape, device=self.device)
        for rows, group, (input_ids, attention_mask, start) in self.length_groups(seqs):
            logp = logprobs_of(input_ids, attention_mask, start, group.response_ids, cfg.temperature,
                               cfg.logprob_chunk_tokens)
            out[rows, : logp.shape[1]] = core.zero_masked(logp, group.response_mask)
        return out

    def rollout(self, prompts: list) -> tuple[Experience, list[str]]:
        start = time.perf_counter()
        samples = self.generate(prompts)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the sampling's queued kernels belong to its time
        self.sample_seconds = time.perf_counter() - start
        logprobs, values = self.behaviour_logprobs_and_values(samples)
        ref_logprobs = self.reference_logprobs(samples)
        mask = samples.response_mask
        exp = Experience(query_ids=samples.query_ids, query_mask=samples.query_mask, response_ids=samples.response_ids,
                         response_mask=mask, logprobs=core.zero_masked(logprobs, mask),
                         ref_logprobs=core.zero_masked(ref_logprobs, mask), scores=torch.zeros(len(prompts), device=self.device),
                         values=None if values is None else core.zero_masked(values, mask))
        return exp, self.decode(samples.response_ids, samples.response_mask)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        return decode_responses(self.tokenizer, response_ids, response_mask)

    def optimise(self, exp: Experience) -> dict[str, float]:
        """Step 5: num_ppo_epochs passes over shuffled minibatches, one optimiser step each (ppo.optimise)."""
        return optimise(self, exp)

    def micro_step(self, micro: Experience, weight: torch.Tensor, width: int | None = None,
                   rank_scale: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (ppo.optimise.micro_step)."""
        return micro_step(self, micro, weight, width, rank_scale)

    # ------------------------------------------------------------------------------------ outputs

    def finish(self, last: dict[str, float], training: dict[str, float]) -> dict[str, Any]:
        """Final policy, value head, evaluation, plots and summary (main process; under FSDP every
        rank takes part in gathering the weights and in the evaluation's forwards). `training`: the
        run's training time and peak memory (TrainingClock), a resumed run's whole."""
        self.accelerator.wait_for_everyone()
        trained = full_trainable_state(self.model) if self.fsdp else None
        summary: dict[str, Any] = {}
        if self.is_main:
            save_final_policy(self, trained)
            rows = read_metrics(self.run_dir / METRICS_FILE)
            final = rows[-1] if rows else last
            summary = {k: v for k, v in final.items() if not k.startswith("timing/")}
            summary["timing/train_s"] = training["seconds"]
            summary["train/num_processes"] = self.accelerator.num_processes
            # of training: the evaluation below samples only
            summary.update(peak_memory_metrics(training))
        if self.eval_prompts and (self.is_main or self.fsdp):
            t = time.perf_counter()
            eval_metrics, samples = evaluate(self, self.eval_prompts, self.judge, batch_size=self.cfg.eval_batch_size,
                                             seed=self.cfg.seed, kl_estimator=self.cfg.kl.estimator,
                                             reward_model=self.reward_model)
            summary.update(eval_metrics)
            summary["eval/kl_target"] = self.cfg.kl.target
            summary["timing/eval_s"] = time.perf_counter() - t
            if self.is_main:
                write_jsonl_atomic(self.run_dir / SAMPLES_FILE, samples)
        if self.is_main:
            from ppo.plots import plot_curves

            plot_curves(rows, self.run_dir, self.cfg.kl.target)
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            self.run_log.close(summary, self.iteration)
        self.accelerator.wait_for_everyone()
        return summary if self.is_main else {}
