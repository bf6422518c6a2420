"""PPO's optimisation phase (step 5 of `PPOTrainer.step`): epochs of shuffled minibatches, one
optimiser step each, gradients accumulated over micro-batches; and the engineering under it that
leaves the math alone: which rows are forwarded together (length-grouped micro-batches, right-padded
and trimmed to their longest row); between micro-batches the process reuses its freed memory
(align.host_memory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.distributed import clip_and_check_gradients, micro_batch_sync
from align.host_memory import keep_freed_memory
from align.precision import checkpointing_active
from ppo import core
from ppo.experience import Experience


@dataclass(frozen=True)
class MicroBatch:
    """Rows of the experience forwarded together, and the widths their padding is trimmed to."""

    rows: list[int]
    width: int  # the longest prompt + response among the rows: their right-padded sequences' width
    response_width: int  # the longest response among them (at least 1)


def length_grouped_micro_batches(rows: list[int], prompt_lengths: list[int], response_lengths: list[int],
                                 micro_batch_size: int) -> list[MicroBatch]:
    """A minibatch's rows sorted by length (prompt + response) and cut into micro-batches of
    `micro_batch_size` rows, each as wide as its longest row.

    The loss is a token mean over the minibatch (each micro-batch weighted by its share of its
    response tokens), so which rows share a micro-batch changes no gradient, only how much padding
    is forwarded: short rows go with short rows."""
    rows = sorted(rows, key=lambda i: prompt_lengths[i] + response_lengths[i])
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start: start + micro_batch_size]
        batches.append(MicroBatch(chunk, max(prompt_lengths[i] + response_lengths[i] for i in chunk),
                                  max(1, *(response_lengths[i] for i in chunk))))
    return batches


def optimise(trainer: Any, exp: Experience) -> dict[str, float]:
    """PPO's step 5 for `trainer` (a set-up ppo.trainer.PPOTrainer): num_ppo_epochs passes of the loss
    over shuffled minibatches, one optimiser step each, gradients accumulated over micro-batches of
    similar length. Returns the mean statistics over the minibatches."""
    cfg, mini_batch = trainer.cfg, trainer.batch.mini_batch
    keep_freed_memory()  # once: each micro-batch reuses the previous one's freed activations
    # What batching needs (each row's prompt and response length) is read back to the host once
    # here, and the statistics stay on the device until the end: the micro-step loop never waits
    # for the device, so on a GPU the host queues the next kernels while it computes.
    prompt_lengths, lengths = torch.stack([exp.query_mask.sum(-1), exp.response_mask.sum(-1)]).tolist()
    sums: dict[str, torch.Tensor] = {}
    n_minibatches, grad_norms = 0, []
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(len(exp), device="cpu")
        starts = range(0, len(exp), mini_batch)
        tokens = [max(sum(lengths[i] for i in order[s: s + mini_batch].tolist()), 1) for s in starts]
        rank_scales = minibatch_rank_scales(trainer.accelerator, tokens, trainer.device)
        for mb_index, mb_start in enumerate(starts):
            mb_rows = order[mb_start: mb_start + mini_batch].tolist()
            mb_tokens = tokens[mb_index]
            trainer.optimizer.zero_grad(set_to_none=True)
            micro_batches = length_grouped_micro_batches(mb_rows, prompt_lengths, lengths, trainer.batch.micro_batch)
            for n, plan in enumerate(micro_batches):
                micro = exp.select(torch.tensor(plan.rows).to(trainer.device)).trim_padding((0, plan.response_width))
                weight = micro.response_mask.sum() / mb_tokens
                last = n == len(micro_batches) - 1
                with micro_batch_sync(trainer.accelerator, trainer.wrapped_model, last=last, sharded=bool(trainer.fsdp)):
                    for k, v in trainer.micro_step(micro, weight, plan.width, rank_scales[mb_index]).items():
                        sums[k] = sums[k] + v if k in sums else v
            n_minibatches += 1
            grad_norm = clip_and_check_gradients(
                trainer.accelerator, trainer.trainable, cfg.max_grad_norm, sharded=bool(trainer.fsdp),
                where=f"iteration {trainer.iteration + 1}, epoch {epoch + 1}, minibatch {mb_start // mini_batch + 1}")
            grad_norms.append(torch.as_tensor(grad_norm, dtype=torch.float32, device=trainer.device))
            trainer.optimizer.step()
            trainer.scheduler.step()
    names = list(sums)
    values = torch.stack([sums[k].float() / n_minibatches for k in names] + [torch.stack(grad_norms).mean()])
    return dict(zip([*names, "train/grad_norm"], values.tolist()))


def minibatch_rank_scales(accelerator: Any, tokens: list[int], device: torch.device) -> torch.Tensor | list[float]:
    """(num_minibatches,) this process's response tokens in each minibatch of an epoch over their mean
    over the processes: the factor that turns its token mean into its share of the token mean over
    every process's minibatch, once DDP or FSDP2 average the gradients over the processes. Ranks
    whose responses are longer weigh more, as each token does in one process. One all-reduce an
    epoch; 1 in one process."""
    if accelerator.num_processes == 1:
        return [1.0] * len(tokens)
    local = torch.tensor(tokens, dtype=torch.float64, device=device)
    return (local * accelerator.num_processes / accelerator.reduce(local.clone(), "sum")).float()


def micro_step(trainer: Any, micro: Experience, weight: torch.Tensor, width: int | None = None,
               rank_scale: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch, its sequences right-padded to `width` columns (None:
    untrimmed); `weight` = its share of this process's minibatch's response tokens, `rank_scale` that
    minibatch's weight among the processes' (minibatch_rank_scales). Returns its statistics as device
    scalars weighted by `weight` and `rank_scale`: summed over the micro-batches and averaged over the
    processes, they are the token means of the whole minibatch, the loss that was optimised (a plain
    mean of the processes' own token means would weigh a process's short responses as its long)."""
    cfg = trainer.cfg
    with_entropy = cfg.ent_coef > 0  # else no (chunk, vocabulary) entropy product in the backward
    input_ids, attention_mask, response_start = micro.right_padded(width)
    # checkpointed layers (gradient_checkpointing) keep only their inputs and recompute in the backward;
    # compiled layers (torch_compile) run their compiled forward and backward, the recomputation included
    with checkpointing_active(trainer.checkpointed), trainer.compiler.active():
        new_logprobs, new_entropy, new_values = trainer.wrapped_model(
            input_ids, attention_mask, response_start, micro.response_ids, cfg.temperature,
            cfg.logprob_chunk_tokens, with_entropy=with_entropy)
        pg_loss, pg_stats = core.policy_loss(new_logprobs, micro.logprobs, micro.advantages, micro.response_mask,
                                             cfg.clip_coef)
        loss = pg_loss
        stats = {"policy/loss": pg_loss, "policy/clipfrac": pg_stats["clipfrac"],
                 "policy/approxkl": pg_stats["approxkl"]}
        if new_values is not None:  # PPO: the clipped value loss
            vf_loss, vf_stats = core.value_loss(new_values, micro.values, micro.returns, micro.response_mask,
                                                cfg.vf_clip_coef)
            loss = loss + cfg.vf_coef * vf_loss
            stats.update({"val/loss": vf_loss, "val/clipfrac": vf_stats["clipfrac"],
                          "val/values": core.masked_mean(new_values.detach(), micro.response_mask)})
        if cfg.kl_in_loss:  # GRPO: beta * KL(pi || pi_ref), k3 from the current policy (Shao et al. 2024, eq. 4)
            kl_loss = core.masked_mean(core.kl_penalty(new_logprobs, micro.ref_logprobs, "k3", micro.response_mask), micro.response_mask)
            loss = loss + trainer.kl_ctl.value * kl_loss
            stats["policy/kl_loss"] = kl_loss
        if with_entropy:
            entropy = core.masked_mean(new_entropy, micro.response_mask)
            loss = loss - cfg.ent_coef * entropy
            stats["policy/entropy"] = entropy
        trainer.accelerator.backward(loss * weight * rank_scale)
    stats["train/loss"] = loss
    return {k: v.detach() * weight * rank_scale for k, v in stats.items()}
