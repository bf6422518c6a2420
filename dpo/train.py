"""The DPO recipe: `run_dpo(cfg) -> summary`.

`DPOTrainer.setup()` loads the rankings (the reward stage's sources and prompt-level split), the
policy (SFT + a new LoRA adapter) and caches the reference log-probabilities; `train()` runs the
epochs; `step()` is one optimizer step and follows Rafailov et al. 2023 (appendix A.3 for rankings):

    1) log pi(y|x) of every response of the batch's rankings, each prompt encoded once
    2) implicit rewards beta * (log pi - log pi_ref), log pi_ref cached before training
    3) Plackett-Luce negative log-likelihood of each ranking (Efron's ties), mean over rankings
    4) AdamW step on the adapter

1-3 run once per micro-batch (`gradient_accumulation_steps` of them) and their gradients add up to
the whole batch's.

Every `save_every` steps a checkpoint (align.checkpoint) holds what a resumed run needs to continue
as if never stopped: the adapter, the optimiser and scheduler, the step (the batches are a function
of the seed); the reference log-probabilities are computed again on resume.

`finish()` saves the adapter as RUN/policy, reports the implicit reward's held-out ranking accuracy
the way the reward stage reports its model's (`reward.evaluate.ranking_metrics`), and samples the
SFT model and the policy on held-out prompts (`ppo.evaluation.evaluate`: KL, gold judge).

Several processes (`accelerate launch`, DDP or an FSDP2 config, as for the other stages): each
global batch is split over the ranks and their gradients averaged; the log-probabilities of the
reference and of the held-out rankings are computed in parts, one per rank, and gathered; under
FSDP2 each response is read whole after its prompt (`dpo.model.PolicyLogprobs`), as under
`gradient_checkpointing`, which drops the prompts' cached keys and values.
"""

from __future__ import annotations

import contextlib
import json
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
    full_trainable_state,
    gathered,
    global_sums,
    keep_until_exit,
    make_accelerator,
    micro_batch_sync,
    rank_micro_batches,
    set_cpu_threads,
    shard,
)
from align.errors import UserError
from align.lora import save_policy_adapter
from align.precision import checkpointing_active, enable_gradient_checkpointing
from align.run import (
    SUMMARY_FILE,
    peak_memory_metrics,
    write_json_atomic,
    write_jsonl_atomic,
)
from align.schedule import lr_schedule
from align.training import CHECKPOINT_PREFIX, StepLoop
from dpo.config import RESUME_OVERRIDABLE, DPOConfig
from dpo.data import DPOBatch, DPODataset, check_usable, collate, held_out_left_out_line, usable_rankings
from dpo.losses import implicit_rewards, plackett_luce_nll
from dpo.model import PolicyLogprobs
from dpo.run_dir import DATA_FILE, OUTPUTS, POLICY_DIR, SAMPLES_FILE, STAGE_FILE
from reward.losses import pair_accuracy


def run_dpo(cfg: DPOConfig, *, echo: Any = None, resume: bool = False) -> dict[str, Any]:
    """Align cfg.policy_model on the rankings; returns the summary (also RUN/summary.json). `resume`:
    continue the run in cfg.output_dir from its latest checkpoint."""
    return DPOTrainer(cfg, echo=echo or (lambda text: print(text, flush=True)), resume=resume).run()


class DPOTrainer(StepLoop):
    stage = "dpo"
    resume_overridable = RESUME_OVERRIDABLE

    def __init__(self, cfg: DPOConfig, *, echo: Any = print, resume: bool = False):
        self.cfg = cfg
        self.echo = echo
        self.resume = resume
        self.run_dir = Path(cfg.output_dir)
        self.step_count = 0

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from align.modeling import fit_max_length, fit_prompt_length, load_causal_lm, load_tokenizer, resolve_model_path
        from align.precision import torch_dtype
        from align.tracking import check_tracker_available
        from ppo.data import load_eval_prompts
        from ppo.evaluation import PolicySampler
        from ppo.model import build_policy
        from reward.data import expand_to_pairs, load_reward_data, repeats_note
        from reward.model import prepare_tokenizer

        cfg = self.cfg
        self.t0 = time.perf_counter()
        check_run_dir(self.run_dir, resume=self.resume, overwrite=cfg.overwrite, prefix=CHECKPOINT_PREFIX,
                      command="align dpo", config_class=type(cfg), outputs=OUTPUTS,
                      inputs={"policy_model": cfg.policy_model, "data.path": cfg.data.path,
                              "data.eval_path": cfg.data.eval_path, "eval_prompts": cfg.eval_prompts})
        if not self.resume:
            cfg.data.check_sources_read()
        set_cpu_threads(cfg.num_threads)
        check_tracker_available(cfg.report_to)  # before minutes of loading, not after
        self.accelerator = make_accelerator("align dpo")
        self.fsdp = fsdp_plugin()  # sharded (FSDP2) when the accelerate config says so (align.distributed)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if cfg.batch_size < self.world:  # every process needs a ranking of each step; said before anything loads
            raise UserError(f"batch_size={cfg.batch_size} is smaller than the {self.world} processes")
        self.is_main = self.accelerator.is_main_process
        if self.resume:  # said before the models load
            check_checkpoint_layout(latest_checkpoint(self.run_dir, CHECKPOINT_PREFIX), processes=self.world,
                                    sharded=bool(self.fsdp))
        self.device = self.accelerator.device
        torch.manual_seed(cfg.seed)

        self.sft_path = resolve_model_path(cfg.policy_model).resolve()
        self.model_paths = {"policy_model": self.sft_path}
        self.tokenizer = load_tokenizer(self.sft_path)
        prepare_tokenizer(self.tokenizer)  # right padding, left truncation: a long text keeps its response
        # what the policy can read: GPT-2 and OPT stop at their table of learned positions (align.modeling)
        self.max_length = fit_max_length(cfg.max_length, self.sft_path, "max_length")
        data = load_reward_data(cfg.data)  # rankings that state no preference come back set aside
        train, left_out = usable_rankings(data.train + data.without_preference)
        self.eval_rankings = data.eval  # with a preference each (load_reward_data)
        self.data_source = data.source
        # max_length leaves out whole rankings, in the pairwise mode too (all pairs of one with a response
        # that does not fit), so both modes train on the same rankings and count them alike
        fitting = DPODataset(train, self.tokenizer, self.max_length)
        left_out.too_long, left_out.merged_at_boundary = fitting.left_out.too_long, fitting.left_out.merged_at_boundary
        self.num_train_rankings = len(fitting)  # trained on; the ones max_length left out are counted apart
        self.train_rankings_left_out = fitting.left_out.too_long + fitting.left_out.merged_at_boundary
        self.train_set = fitting
        if cfg.loss == "pairwise":  # comparison mode: every ordered pair its own K = 2 example
            self.train_set = DPODataset(expand_to_pairs(fitting.rankings, cfg.seed), self.tokenizer, self.max_length)
        if data.with_repeats and self.is_main:
            self.echo(f"dpo: {repeats_note(data.with_repeats)}")
        if left_out and self.is_main:
            self.echo(f"dpo: left out {left_out} of the training rankings")
        if self.is_main and (line := special_text_line("dpo", self.tokenizer, [(r.prompt, r.responses) for r in train],
                                                        "training rankings")):
            self.echo(line)
        check_usable(self.train_set.rankings, left_out, "the training split")
        self.eval_set = DPODataset(self.eval_rankings, self.tokenizer, self.max_length)  # scored at the end
        if data.held_out_without_preference and self.is_main:
            self.echo(f"dpo: left out {data.held_out_without_preference} held-out rankings that state no preference "
                      "(a single response, or every response tied)")
        if self.eval_set.left_out and self.is_main:
            self.echo(held_out_left_out_line(self.eval_set, len(self.eval_rankings)))
        # read now, not after the training: the held-out prompts sampled at the end
        self.eval_prompts = load_eval_prompts(cfg.eval_prompts, cfg.num_eval_prompts, cfg.seed + 1,
                                              [r.prompt for r in train], "the training rankings")

        base = load_causal_lm(self.sft_path, dtype=torch_dtype(cfg.dtype), tokenizer=self.tokenizer)
        if self.eval_prompts:  # sampled after training, by the online methods' sampler
            from ppo.sampling import check_decodable

            check_decodable(base.config, self.sft_path)
        self.policy = build_policy(base, cfg.lora).to(self.device)  # the adapter is fp32 on a bf16 base (peft)
        self.policy.eval()  # dropout off: the implicit reward is a function of the weights alone
        # the layers that recompute their activations in the training backward (align.precision)
        self.checkpointed = enable_gradient_checkpointing(base) if cfg.gradient_checkpointing else []
        # the held-out samples, their log-probs and the reference's (ppo.evaluation)
        self.sampler = PolicySampler(self.policy, self.tokenizer, temperature=cfg.temperature,
                                     response_length=cfg.response_length,
                                     max_prompt_length=fit_prompt_length(cfg.max_prompt_length, cfg.response_length,
                                                                         base, "response_length"),
                                     chunk_tokens=cfg.logprob_chunk_tokens)
        # the module DDP wraps and FSDP2 shards (each decoder layer a unit, the rest the root); responses
        # read whole after their prompts where no prompt cache can be continued (dpo.model.PolicyLogprobs)
        self.model = PolicyLogprobs(self.policy, buckets=cfg.length_buckets, chunk_tokens=cfg.logprob_chunk_tokens,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     whole=self.fsdp is not None or bool(self.checkpointed))
        if self.fsdp:
            shard(self.model, self.fsdp)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.loop_cfg = cfg
        self.global_batches = self.plan_batches()
        total = len(self.global_batches)
        self.scheduler = lr_schedule(optimizer, total, int(cfg.warmup_ratio * total))
        self.wrapped_model, self.optimizer = ((self.model, optimizer) if self.fsdp
                                              else self.accelerator.prepare(self.model, optimizer))
        keep_until_exit(self.wrapped_model)

        if self.resume:
            self.load_checkpoint(latest_checkpoint(self.run_dir, CHECKPOINT_PREFIX))

        t = time.perf_counter()
        cache_reference_logps(self.model, self.train_set, cfg, self.accelerator)
        self.reference_seconds = time.perf_counter() - t
        if not self.is_main:
            return
        self.open_logs(OUTPUTS)
        (self.run_dir / STAGE_FILE).write_text("dpo\n", encoding="utf-8")
        self.echo(f"dpo: {self.num_train_rankings} training rankings ({cfg.loss}, {len(self.train_set)} examples), "
                  f"{len(self.eval_set)} held-out, {total} steps, beta {cfg.beta}, LoRA on {self.sft_path}")

    def local_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's part of a global batch in gradient_accumulation_steps micro-batches of example
        indices (align.distributed.rank_micro_batches)."""
        return rank_micro_batches(global_batch, self.rank, self.world, self.cfg.gradient_accumulation_steps)

    # ------------------------------------------------------------------------------------ train

    def step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """One optimizer step over this rank's part of a global batch, given as micro-batches of
        example indices (`align.distributed.rank_micro_batches`). Each micro-batch's loss is its
        share of the mean over the global batch, times the number of ranks, whose gradients DDP and
        FSDP2 average: the step of one pass over the global batch, however it is split."""
        cfg = self.cfg
        local = torch.tensor(sum(len(m) for m in micro_batches), dtype=torch.float64, device=self.device)
        examples = self.accelerator.reduce(local, "sum").item()  # in the global batch; every rank takes part
        loss_sum, seen = torch.zeros((), device=self.device), []
        # (checkpointed layers keep only their inputs and recompute in the backward)
        with checkpointing_active(self.checkpointed):
            for n, indices in enumerate(micro_batches):
                batch = collate(self.train_set, indices).to(self.device)
                last = n == len(micro_batches) - 1
                with micro_batch_sync(self.accelerator, self.wrapped_model, last=last, sharded=bool(self.fsdp)):
                    # 1) log pi(y|x) of every response in the micro-batch, each prompt encoded once
                    #    (or, sharded or checkpointed, each response read whole after its prompt)
                    policy_logps = self.wrapped_model(batch.responses)
                    # 2) implicit rewards beta * (log pi - log pi_ref), laid out (rankings, K)
                    rewards = batch.per_ranking(implicit_rewards(policy_logps.float(), batch.reference_logps, cfg.beta))
                    # 3) Plackett-Luce negative log-likelihood of each ranking, mean over the batch's rankings
                    #    (the micro-batch's share of it, times the ranks)
                    loss = plackett_luce_nll(rewards, batch.ranks, batch.valid).sum() * self.world / examples
                    self.accelerator.backward(loss)
                self.responses_forwarded += batch.responses.num_responses
                loss_sum += loss.detach()
                seen.append((batch, rewards.detach()))
        # 4) one AdamW step on the adapter with the accumulated gradients; a non-finite gradient is
        #    never applied
        grad_norm = self.optimizer_step(cfg.max_grad_norm)
        with torch.no_grad():
            margins = []
            for batch, rewards in seen:
                pairs = ranking_pairs(batch)
                margins.append(rewards[pairs[0], pairs[1]] - rewards[pairs[0], pairs[2]])
            margin = torch.cat(margins)
            # the global batch's statistics, from sums over the ranks (every rank takes part); a tie (the
            # first step: the policy is the reference) counts one half, as in the held-out accuracy
            right, margin_sum, pairs, moved, responses = global_sums(
                self.accelerator, pair_accuracy(margin, torch.zeros_like(margin)).sum(), margin.sum(), margin.numel(),
                sum(r.sum() for _, r in seen) / cfg.beta, sum(b.valid.sum() for b, _ in seen))
        return {"train/loss": loss_sum.item(), "train/accuracy": right / pairs, "train/reward_margin": margin_sum / pairs,
                "train/grad_norm": float(grad_norm), "train/logps_policy_minus_ref": moved / responses}

    # ------------------------------------------------------------------------------------ outputs

    def finish(self) -> dict[str, Any]:
        """Save, evaluate and summarise (the main process writes; every rank takes part in gathering
        the adapter and in the held-out forwards, and under FSDP2 in the sampling too)."""
        from ppo.data import gold_judge
        from ppo.evaluation import evaluate
        from reward.evaluate import format_table

        cfg = self.cfg
        self.accelerator.wait_for_everyone()
        trained = full_trainable_state(self.model) if self.fsdp else None
        if self.is_main:
            self.save_policy(trained)
        summary: dict[str, Any] = {}
        t = time.perf_counter()
        summary.update(held_out_ranking_metrics(self.model, self.tokenizer, self.eval_rankings, cfg, self.accelerator,
                                                dataset=self.eval_set))
        summary["eval/label_source"] = "gold" if cfg.data.format == "synthetic" else "annotators"
        if cfg.num_eval_prompts and (self.is_main or self.fsdp):
            prompts = self.eval_prompts
            with gathered(self.model):  # under FSDP2 every rank samples the same prompts with the whole policy
                eval_metrics, samples = evaluate(self.sampler, prompts, gold_judge(cfg.eval_prompts),
                                                 batch_size=cfg.eval_batch_size, seed=cfg.seed)
            summary.update(eval_metrics)
            if self.is_main:
                write_jsonl_atomic(self.run_dir / SAMPLES_FILE, samples)
        if self.is_main:
            summary.update({
                "train/loss_final": self.last_train["train/loss"],
                "train/steps": self.step_count,
                "train/rankings": self.num_train_rankings,
                "train/rankings_left_out": self.train_rankings_left_out,  # too long for max_length (DPODataset)
                "train/examples": len(self.train_set),
                "train/num_processes": self.world,
                "train/responses_forwarded": self.responses_forwarded_total,  # over all ranks
                "timing/reference_s": self.reference_seconds,
                "timing/train_s": self.training["seconds"],
                "timing/eval_s": time.perf_counter() - t,
                "timing/total_s": self.total_seconds(),
                **peak_memory_metrics(self.training),
            })
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            self.run_log.close(summary, self.step_count)
            self.echo(format_table(summary))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return summary if self.is_main else {}

    def save_policy(self, trained: dict[str, torch.Tensor] | None = None) -> None:
        """RUN/policy: the adapter as peft writes it (`trained`: its weights gathered in full from the
        ranks' shards under FSDP2) and the tokenizer."""
        adapter = None if trained is None else {k.removeprefix("policy."): v for k, v in trained.items()}
        save_policy_adapter(self.policy, self.tokenizer, self.sft_path, self.run_dir / POLICY_DIR, adapter)
        (self.run_dir / DATA_FILE).write_text(json.dumps({"data": self.data_source, "config": config_to_dict(self.cfg)},
                                                       indent=2, default=str), encoding="utf-8")


@torch.no_grad()
def dataset_logps(module: PolicyLogprobs, dataset: DPODataset, cfg: DPOConfig, accelerator: Any,
                  adapter: bool = True) -> dict[int, torch.Tensor]:
    """Example index -> (K,) log-probabilities of its responses under the policy (or, `adapter`
    false, the reference), in batches of batch_size / gradient_accumulation_steps examples dealt out
    over the ranks and gathered on every rank. Every rank runs as many forwards (a rank short of
    batches repeats one and drops its result), since under FSDP2 each forward gathers weights from
    all of them."""
    world, rank = accelerator.num_processes, accelerator.process_index
    size = max(1, cfg.batch_size // cfg.gradient_accumulation_steps)
    chunks = [list(range(s, min(s + size, len(dataset)))) for s in range(0, len(dataset), size)]
    mine = chunks[rank::world]
    found: dict[int, torch.Tensor] = {}
    with contextlib.nullcontext() if adapter else module.policy.disable_adapter():
        for r in range(math.ceil(len(chunks) / world)):
            indices = mine[r] if r < len(mine) else chunks[0]
            logps = module(collate(dataset, indices).responses.to(accelerator.device)).float().cpu()
            if r < len(mine):
                found.update(zip(indices, logps.split([len(dataset.items[i].responses) for i in indices])))
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, found)
        found = {i: row for part in parts for i, row in part.items()}
    return found


def cache_reference_logps(module: PolicyLogprobs, dataset: DPODataset, cfg: DPOConfig, accelerator: Any) -> None:
    """log pi_ref of every response, once (the adapter disabled): the reference never changes, so
    each step forwards the policy alone (half the forward passes of recomputing it). In training
    batches: what fits a training step fits its forward alone."""
    for i, row in dataset_logps(module, dataset, cfg, accelerator, adapter=False).items():
        dataset.reference_logps[i] = row


@torch.no_grad()
def held_out_ranking_metrics(module: PolicyLogprobs, tokenizer: Any, rankings: list, cfg: DPOConfig,
                             accelerator: Any, dataset: DPODataset | None = None) -> dict[str, Any]:
    """How well the implicit reward beta * (log pi - log pi_ref) of a LoRA policy orders held-out
    rankings, in the reward stage's terms (`reward.evaluate.ranking_metrics`: eval/accuracy ...; its
    eval/loss is the pairwise InstructGPT loss), and eval/plackett_luce_nll: the mean over held-out
    rankings of the loss K-wise DPO trains (the pairwise mode's too for K = 2 without ties), over the
    rankings that fit max_length; eval/rankings_left_out counts the others. `dataset`: `rankings`
    already tokenized (DPODataset), where the caller has it."""
    from reward.evaluate import ranking_metrics, text_key

    if dataset is None:
        from align.modeling import fit_max_length

        dataset = DPODataset(rankings, tokenizer, fit_max_length(cfg.max_length, module.policy, "max_length"))
    left_out = {"eval/rankings_left_out": len(rankings) - len(dataset)}  # too long for max_length (DPODataset)
    if not len(dataset):  # none to score: no accuracy, and the summary says it was over no ranking
        return {"eval/num_rankings": 0, **left_out}
    cache_reference_logps(module, dataset, cfg, accelerator)
    policy = dataset_logps(module, dataset, cfg, accelerator)
    table, nll = {}, []
    for i, ranking in enumerate(dataset.rankings):
        rewards = implicit_rewards(policy[i], dataset.reference_logps[i], cfg.beta)
        table.update(zip([text_key(ranking.prompt, resp) for resp in ranking.responses], rewards.tolist()))
        ranks = torch.tensor([ranking.ranks])
        nll.append(plackett_luce_nll(rewards[None], ranks, torch.ones_like(ranks, dtype=torch.bool)).item())
    return {**ranking_metrics(dataset.rankings, table, "eval/"), "eval/plackett_luce_nll": sum(nll) / len(nll),
            **left_out}


def ranking_pairs(batch: DPOBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranking, winner, loser) indices of every ordered pair the batch's rankings state."""
    better = (batch.ranks.unsqueeze(2) < batch.ranks.unsqueeze(1)) & batch.valid.unsqueeze(2) & batch.valid.unsqueeze(1)
    return better.nonzero(as_tuple=True)
