"""Reward model training recipe: `train_reward_model(cfg) -> summary`.

The loop follows InstructGPT's reward model training (Ouyang et al. 2022, section 3.5 and
appendix C.2), with the numbered steps in `RewardTrainer.step` and the loop over batches
(align.training.StepLoop, shared with `align dpo`):

    1. each batch element is one ranking (an annotator's order of K responses to a prompt);
    2. all responses of the batch go through the model once each, their prompts once per batch;
    3. the loss averages -log sigmoid(r_w - r_l) over the C(K,2) ordered pairs of each
       ranking, then over rankings (+ optional margin and reward-centering term);
       2-3 run once per micro-batch (`train.gradient_accumulation_steps` of them) and their
       gradients add up to the whole batch's;
    4. one epoch by default (more overfits, as InstructGPT reports);
    5. afterwards the reward is normalised on the SFT model's own samples (mean 0, std 1),
       evaluated on held-out PROMPTS, and saved with the data and config that made it.

Every `train.save_every` steps a checkpoint (align.checkpoint) holds what a resumed run
(`align reward train --resume RUN`) needs to continue as if never stopped.

Multi-process: run under `accelerate launch --multi_gpu --num_processes 2 -m align reward train ...`
(two CPU ranks with gloo). `train.batch_size` counts rankings per optimizer step over all
processes; each rank takes its slice of the same global batch, so the gradient matches
single-process training.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from align.chat import special_text_line
from align.checkpoint import check_checkpoint_layout, check_run_dir, latest_checkpoint
from align.config import config_to_dict
from align.distributed import (
    fsdp_plugin,
    global_sums,
    keep_until_exit,
    make_accelerator,
    micro_batch_sync,
    processes_text,
    rank_micro_batches,
    set_cpu_threads,
    shard,
)
from align.errors import UserError
from align.precision import (
    autocast,
    enable_gradient_checkpointing,
    torch_dtype,
    upcast_trainable,
)
from align.run import SUMMARY_FILE, peak_memory_metrics
from align.schedule import lr_schedule
from align.training import CHECKPOINT_PREFIX, StepLoop
from reward.config import RESUME_OVERRIDABLE, RewardConfig
from reward.data import (
    RankingBatch,
    RankingCollator,
    RankingDataset,
    RewardData,
    expand_to_pairs,
    load_reward_data,
    pair_origins,
    repeats_note,
)
from reward.evaluate import format_table, ranking_metrics, reward_table
from reward.losses import (
    kwise_ranking_loss,
    pair_accuracy,
    pairwise_loss,
    reward_centering_loss,
)
from reward.model import (
    build_reward_model,
    forward_rewards,
    forward_rewards_shared_prompts,
    normalization_on_samples,
    normalization_prompts,
    prepare_tokenizer,
    save_reward_model,
)
from reward.run_dir import MODEL_DIR, OUTPUTS


def check_sampling_policy(path: Path, key: str) -> None:
    """One line before training where the checkpoint the normalisation samples from (`key`) is a
    reward model (sequence classification): loading it as a causal LM fails only after the training."""
    from align.modeling import adapter_chain, check_not_a_reward_model

    chain = adapter_chain(path, find_only=True)  # (its own refusals, a loop of adapters, said as they are)
    try:
        check_not_a_reward_model(chain)
    except UserError:
        fix = ("set eval.normalize_policy to the SFT checkpoint PPO starts from, or eval.normalize=false"
               if key == "model.name_or_path" else "give the SFT checkpoint PPO starts from")
        raise UserError(f"{key} {path} is a reward model (sequence classification), not a causal LM, and the "
                        f"reward normalisation samples from it as a policy: {fix}") from None


class RewardTrainer(StepLoop):
    stage = "reward"
    resume_overridable = RESUME_OVERRIDABLE
    batch_items = "rankings"

    def __init__(self, cfg: RewardConfig, *, echo: Any = print, resume: bool = False):
        self.cfg = cfg
        self.echo = echo
        self.resume = resume
        self.step_count = 0

    # ----------------------------------------------------------------------- setup

    def setup(self) -> None:
        from align.modeling import checkpoint_is_encoder, fit_max_length, load_tokenizer, resolve_model_path
        from align.tracking import check_tracker_available

        cfg = self.cfg
        self.t0 = time.perf_counter()
        set_cpu_threads(cfg.train.num_threads)
        check_tracker_available(cfg.train.report_to)  # before minutes of loading, not after
        self.accelerator = make_accelerator("align reward train")
        self.fsdp = fsdp_plugin()  # sharded (FSDP2) when the accelerate config says so (align.distributed)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.run_dir = Path(cfg.output_dir)
        check_run_dir(self.run_dir, resume=self.resume, overwrite=cfg.overwrite, prefix=CHECKPOINT_PREFIX,
                      command="align reward train", config_class=type(cfg), outputs=OUTPUTS,
                      inputs={"model.name_or_path": cfg.model.name_or_path, "data.path": cfg.data.path,
                              "data.eval_path": cfg.data.eval_path, "eval.normalize_policy": cfg.eval.normalize_policy})
        if not self.resume:
            cfg.data.check_sources_read()
        if cfg.train.batch_size < self.world:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is smaller than the {self.world} processes")
        if self.resume:  # said before the models load
            check_checkpoint_layout(latest_checkpoint(self.run_dir, CHECKPOINT_PREFIX), processes=self.world,
                                    sharded=bool(self.fsdp))

        self.base_path = resolve_model_path(cfg.model.name_or_path).resolve()
        self.model_paths = {"model.name_or_path": self.base_path}
        self.encoder = checkpoint_is_encoder(self.base_path)  # BERT-like: its own tokens, no shared prompt
        if self.encoder and cfg.eval.normalize and cfg.eval.normalize_policy is None:
            raise UserError("an encoder reward model is normalised on a policy's samples: set eval.normalize_policy "
                            "(the SFT checkpoint PPO starts from) or eval.normalize=false")
        if self.encoder and cfg.train.mismatch_coef > 0:  # an encoder reads each text whole: no prompt to swap
            raise UserError("train.mismatch_coef needs a causal-LM reward model (the top response is scored under "
                            "another ranking's prompt, which shares the prompt's encoding); set it to 0 for an encoder")
        # found now, not after the training (the normalisation's policy samples once the model is trained)
        self.normalize_policy = (resolve_model_path(cfg.eval.normalize_policy)
                                 if cfg.eval.normalize and cfg.eval.normalize_policy else None)
        if cfg.eval.normalize and not self.encoder:  # it samples from a causal LM: a reward model there fails late
            check_sampling_policy(self.normalize_policy or self.base_path,
                                  "eval.normalize_policy" if self.normalize_policy else "model.name_or_path")
        self.tokenizer = load_tokenizer(self.base_path, encoder=self.encoder)
        prepare_tokenizer(self.tokenizer)
        # what the model can read: GPT-2, OPT, BERT stop at their table of learned positions (align.modeling)
        self.max_length = fit_max_length(cfg.model.max_length, self.base_path, "model.max_length")
        self.data: RewardData = load_reward_data(cfg.data)
        train_rankings = self.data.train
        if cfg.eval.normalize and len(distinct := normalization_prompts(train_rankings, 2, cfg.train.seed)) < 2:
            # one sample has no spread to scale (as `align reward import` says of its file)
            raise UserError(f"the training rankings hold {len(distinct)} distinct prompt: the normalisation "
                            "(eval.normalize) scales the SFT model's answers to at least 2; add rankings of other "
                            "prompts or set eval.normalize=false")
        if cfg.train.loss == "pairwise":  # comparison mode: every pair its own batch element
            train_rankings = expand_to_pairs(train_rankings, cfg.train.seed)
        self.train_set = RankingDataset(train_rankings, self.tokenizer, self.max_length, encoder=self.encoder)
        self.collate = RankingCollator(self.tokenizer.pad_token_id, mismatch=cfg.train.mismatch_coef > 0,
                                       max_length=self.max_length)

        torch.manual_seed(cfg.train.seed)  # same head / adapter init on every rank
        self.dtype = torch_dtype(cfg.model.dtype)
        model = build_reward_model(self.base_path, self.tokenizer, lora=cfg.lora, seed=cfg.train.seed,
                                   train_layers=cfg.model.train_layers, freeze_embeddings=cfg.model.freeze_embeddings,
                                   attn_implementation=cfg.model.attn_implementation, dtype=self.dtype)
        upcast_trainable(model)  # bf16 storage: what is trained (and its AdamW state) stays fp32
        self.checkpointed = enable_gradient_checkpointing(model) if cfg.train.gradient_checkpointing else []
        model.train()
        if self.fsdp:
            shard(model, self.fsdp)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        self.loop_cfg = cfg.train
        self.global_batches = self.plan_batches()
        self.total_steps = len(self.global_batches)
        self.scheduler = lr_schedule(optimizer, self.total_steps, int(cfg.train.warmup_ratio * self.total_steps))
        self.model = model
        self.wrapped_model, self.optimizer = (model, optimizer) if self.fsdp else self.accelerator.prepare(model, optimizer)
        keep_until_exit(self.wrapped_model)
        self.device = self.accelerator.device
        self.trainable = params
        if self.resume:
            self.load_checkpoint(latest_checkpoint(self.run_dir, CHECKPOINT_PREFIX))
        if self.is_main:
            self.open_logs(OUTPUTS)
            self.echo(
                f"reward: {len(self.data.train)} training rankings ({cfg.train.loss}, {len(self.train_set)} examples), "
                f"{len(self.data.eval)} held-out, {self.total_steps} steps on {processes_text(self.world)}, "
                f"{'LoRA' if cfg.lora.enabled else 'full fine-tuning'}"
                f"{f' of the top {cfg.model.train_layers} layers' if cfg.model.train_layers else ''} on {self.base_path}"
            )
            if self.data.with_repeats:
                self.echo(f"reward: {repeats_note(self.data.with_repeats)}")
            if self.train_set.truncated:
                bound = "model.max_length" if self.max_length == cfg.model.max_length else "the model's positions"
                self.echo(f"reward: {self.truncated_count()} hold a text of {self.max_length} tokens ({bound}; a longer "
                          "one is cut to it, its prompt's start first)")
            if self.data.without_preference or self.data.held_out_without_preference:
                self.echo(f"reward: left out {len(self.data.without_preference)} training and "
                          f"{self.data.held_out_without_preference} held-out rankings that state no preference "
                          "(a single response, or every response tied)")
            examples = [(r.prompt, r.responses) for r in self.data.train]
            if line := special_text_line("reward", self.tokenizer, examples, "training rankings"):
                self.echo(line)

    def truncated_count(self) -> str:
        """How many training rankings hold a text at max_length, "N of M training rankings"; in the
        pairwise mode in rankings too (each of its examples a pair), with the pairs after."""
        if self.cfg.train.loss != "pairwise":
            return f"{self.train_set.truncated} of {len(self.train_set)} training rankings"
        origins = pair_origins(self.data.train, self.cfg.train.seed)  # train_set's pairs in order
        rankings = {origins[i] for i, cut in enumerate(self.train_set.at_max_length) if cut}
        return (f"{len(rankings)} of {len(self.data.train)} training rankings ({self.train_set.truncated} of "
                f"{len(self.train_set)} pairs)")

    def local_batches(self, global_batch: list[int]) -> list[RankingBatch]:
        """This rank's contiguous slice of the global batch (sizes differ by at most one) in
        `gradient_accumulation_steps` micro-batches (`rank_micro_batches`), collated on the CPU and
        moved to the model's device here, the one place a training batch changes device. The
        mismatched-prompt pairs are drawn over the whole global batch, as one process draws them."""
        items = [self.train_set[i] for i in global_batch]
        partners = self.collate.partners(items)
        parts = rank_micro_batches(list(range(len(items))), self.rank, self.world,
                                   self.cfg.train.gradient_accumulation_steps)  # positions in the global batch
        return [self.collate([items[i] for i in part], [partners[i] for i in part]).to(self.device) for part in parts]

    # ----------------------------------------------------------------------- training

    def step(self, batches: list[RankingBatch]) -> dict[str, float]:
        """One optimizer step over this rank's share of a global batch, given as micro-batches
        (`local_batches`). Each term of the loss is the micro-batch's share of the mean over the
        global batch, times the number of ranks, whose gradients DDP and FSDP2 average: the step is
        the one of a single pass over the global batch, however it is split."""
        cfg = self.cfg.train
        local = [sum(b.num_groups for b in batches), sum(b.num_ranked for b in batches),
                 sum(b.mismatch_winners.numel() for b in batches)]
        counts = torch.tensor(local, dtype=torch.float64, device=self.device)
        rankings, responses, mismatched = self.accelerator.reduce(counts, "sum").tolist()  # every rank takes part
        share = self.world  # DDP and FSDP2 divide the summed gradients by the number of ranks
        loss_sum, ranking_sum, mismatch_sum = (torch.zeros((), device=self.device) for _ in range(3))
        seen: list[tuple[RankingBatch, torch.Tensor]] = []
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            with micro_batch_sync(self.accelerator, self.wrapped_model, last=last, sharded=bool(self.fsdp)):
                # 2. one forward pass over every response of every ranking in the batch (each prompt once;
                #    whole sequences under gradient checkpointing, which drops the prompts' cache, and under
                #    FSDP, whose backward re-gathers a layer's weights for the gradients that reach it through
                #    its outputs, not through the keys and values a later forward read from the cache)
                with autocast(self.device, self.dtype):
                    if self.checkpointed or self.fsdp:
                        ids, mask = batch.whole_sequences(self.collate.pad_token_id)
                        rewards = forward_rewards(self.wrapped_model, ids, mask).float()  # (N,)
                    else:
                        rewards = forward_rewards_shared_prompts(self.wrapped_model, batch, cfg.length_buckets).float()  # (N,)
                # 3. mean over each ranking's ordered pairs of -log sigmoid(r_w - r_l - margin), then over
                #    rankings (this micro-batch's share of it)
                loss = kwise_ranking_loss(rewards, batch.winners, batch.losers, batch.pair_group, batch.num_groups,
                                          cfg.margin) * batch.num_groups * share / rankings
                ranking_sum += loss.detach()
                if cfg.center_coef > 0:  # over the rankings' own pairs, not the mismatched copies
                    loss = loss + reward_centering_loss(rewards, batch.winners, batch.losers, batch.pair_group,
                                                        batch.num_groups, cfg.center_coef) \
                        * batch.num_groups * share / rankings
                # 3b. mismatched-prompt pairs: a top response scores higher under its own prompt than under
                #     another ranking's
                mismatch = pairwise_loss(rewards[batch.mismatch_winners], rewards[batch.mismatch_losers]).sum() \
                    * share / max(mismatched, 1)
                loss = loss + cfg.mismatch_coef * mismatch
                self.accelerator.backward(loss)
            self.responses_forwarded += batch.num_responses
            loss_sum += loss.detach()
            mismatch_sum += mismatch.detach()
            seen.append((batch, rewards.detach()))
        grad_norm = self.optimizer_step(cfg.max_grad_norm)
        r = torch.cat([rewards[:batch.num_ranked] for batch, rewards in seen])
        r_w = torch.cat([rewards[batch.winners] for batch, rewards in seen])
        r_l = torch.cat([rewards[batch.losers] for batch, rewards in seen])
        # the global batch's statistics, from sums over the ranks (every rank takes part)
        right, margin, pairs, r_sum, r_squares, n = global_sums(
            self.accelerator, pair_accuracy(r_w, r_l).sum(), (r_w - r_l).sum(), r_w.numel(), r.sum(), r.pow(2).sum(),
            r.numel())
        return {
            "train/loss": loss_sum.item(),
            "train/ranking_loss": ranking_sum.item(),  # the InstructGPT term alone, as eval/loss is
            "train/accuracy": right / pairs,
            "train/reward_margin": margin / pairs,
            "train/reward_mean": r_sum / n,
            "train/reward_std": math.sqrt(max(r_squares - r_sum ** 2 / n, 0.0) / (n - 1)) if n > 1 else 0.0,
            "train/grad_norm": float(grad_norm),
            "train/mismatch_loss": mismatch_sum.item(),
        }

    # ----------------------------------------------------------------------- after training

    def normalization(self, model) -> tuple[float, float, int]:
        """5. gain, bias making the rewards of the SFT model's own samples mean 0, std 1."""
        ecfg = self.cfg.eval
        if not ecfg.normalize:
            return 1.0, 0.0, 0
        from align.generation import generate_responses
        from align.modeling import load_causal_lm, load_tokenizer

        prompts = normalization_prompts(self.data.train, ecfg.normalize_prompts, self.cfg.train.seed)
        policy_path = self.normalize_policy or self.base_path
        policy_tokenizer = load_tokenizer(policy_path) if self.normalize_policy else self.tokenizer
        # (a tokenizer's added <pad> needs its row)
        sft = load_causal_lm(policy_path, dtype=self.dtype, tokenizer=policy_tokenizer).to(self.device)
        if self.fsdp:  # every rank samples the same prompts with the same seed: the same responses
            shard(sft.requires_grad_(False), self.fsdp)
        samples = generate_responses(sft, policy_tokenizer, prompts, max_new_tokens=ecfg.normalize_response_length,
                                     seed=self.cfg.train.seed)
        del sft
        gain, bias, raw = normalization_on_samples(model, self.tokenizer, prompts, [s[0] for s in samples],
                                                   max_length=self.max_length, batch_size=ecfg.batch_size,
                                                   dtype=self.dtype, device=self.device)
        return gain, bias, len(raw)

    def finish(self) -> dict[str, Any]:
        """Normalise, evaluate on the held-out rankings and save (main process; under FSDP every rank
        takes part in the forwards and in gathering the weights)."""
        from align.distributed import full_state
        from align.run import atomic_directory, write_json_atomic

        cfg = self.cfg
        self.accelerator.wait_for_everyone()
        summary: dict[str, Any] = {}
        if not (self.is_main or self.fsdp):
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()
            return summary
        model = self.model
        model.eval()
        t = time.perf_counter()
        gain, bias, n_norm = self.normalization(model)
        normalize_s = time.perf_counter() - t
        t = time.perf_counter()
        annotator_labels = self.data.eval_annotator or []
        # each held-out response forwarded once, whichever label sets it appears in
        with autocast(self.device, self.dtype):
            rewards = reward_table(model, self.tokenizer, self.data.eval + annotator_labels,
                                   max_length=self.max_length, batch_size=cfg.eval.batch_size)
        eval_s = time.perf_counter() - t
        # under FSDP the main rank writes the weights gathered in full (an adapter: the trained ones only)
        state = full_state(model, trained_only=cfg.lora.enabled) if self.fsdp else None
        if self.is_main:
            summary.update(ranking_metrics(self.data.eval, rewards, "eval/", margin_scale=gain))
            summary["eval/label_source"] = self.data.eval_label
            if annotator_labels:
                summary.update(ranking_metrics(annotator_labels, rewards, "eval_annotators/", margin_scale=gain))
            summary.update({
                "train/loss_final": self.last_train["train/loss"],
                "train/steps": self.total_steps,
                "train/rankings": len(self.data.train),
                "train/examples": len(self.train_set),  # rankings, or pairs with loss=pairwise (as in DPO)
                "train/responses_forwarded": self.responses_forwarded_total,
                "train/num_processes": self.world,
                "reward/gain": gain,
                "reward/bias": bias,
                "reward/normalization_samples": n_norm,
                "timing/train_s": self.training["seconds"],
                "timing/train_cpu_s": self.training["cpu_seconds"],
                "timing/normalize_s": normalize_s,
                "timing/eval_s": eval_s,
                **peak_memory_metrics(self.training),
            })
            info = {"config": config_to_dict(cfg), "data": self.data.source, "base_model": str(self.base_path),
                    "summary": summary}
            # (a resumed run may have been stopped after writing it)
            with atomic_directory(self.run_dir / MODEL_DIR, overwrite=cfg.overwrite or self.resume) as tmp:
                save_reward_model(model, self.tokenizer, tmp, gain=gain, bias=bias, info=info, state_dict=state)
            summary["timing/total_s"] = self.total_seconds()
            summary["model_dir"] = str((self.run_dir / MODEL_DIR).resolve())
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            self.run_log.close(summary, self.step_count)
            self.echo(format_table(summary))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return summary


def train_reward_model(cfg: RewardConfig, *, echo: Any = None, resume: bool = False) -> dict[str, Any]:
    """Train, normalise, evaluate and save a reward model; returns the summary (empty on non-main ranks).
    `resume`: continue the run in cfg.output_dir from its latest checkpoint."""
    return RewardTrainer(cfg, echo=echo or (lambda text: print(text, flush=True)), resume=resume).run()
