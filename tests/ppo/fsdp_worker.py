"""Launched by test_fsdp.py (under `accelerate launch` with an FSDP2 or DDP config, or alone as the
one-rank reference): one PPO optimiser step on a fixed global batch, each rank taking its contiguous share
of the rows. Writes OUT/step.safetensors (the trained parameters after the step, gathered in full
by the main rank), OUT/before.safetensors (before it), OUT/stats.json (the step's statistics as the
trainer logs them) and OUT/rank{R}.json (how many elements of the frozen and trained parameters this
rank stores, against the totals)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from align.checkpoint import trainable_state
from align.commands.cli import exit_process
from align.config import load_config
from align.distributed import full_trainable_state, local_numel
from ppo.config import PPOConfig
from ppo.experience import Experience
from ppo.trainer import PPOTrainer

GLOBAL_BATCH, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 6, 5
# The first half of the rows (rank 0's share on two ranks) answers in 1-2 tokens, the second in 5: a
# token weighs the same in the one-rank step only if each rank's loss is weighed by its token count.
RESPONSE_LENGTHS = [1, 2, 1, 2, 5, 5, 5, 5]


def fixed_batch(trainer: PPOTrainer) -> Experience:
    """The same rows on every rank and in the one-rank run: random tokens, responses of
    RESPONSE_LENGTHS tokens right-padded, pi_old and V_old = the current policy's (ratio 1 at the step),
    fixed per-token rewards (the step's advantages and returns are computed from them)."""
    g = torch.Generator().manual_seed(1234)
    tok = trainer.tokenizer
    low = max(tok.all_special_ids) + 1  # ordinary tokens only: no row holds padding but the responses'
    query = torch.randint(low, len(tok), (GLOBAL_BATCH, PROMPT_TOKENS), generator=g)
    response = torch.randint(low, len(tok), (GLOBAL_BATCH, RESPONSE_TOKENS), generator=g)
    ones_q = torch.ones_like(query)
    mask_r = (torch.arange(RESPONSE_TOKENS) < torch.tensor(RESPONSE_LENGTHS)[:, None]).long()
    response = response.masked_fill(mask_r == 0, tok.pad_token_id)
    exp = Experience(query_ids=query, query_mask=ones_q, response_ids=response, response_mask=mask_r,
                     logprobs=torch.zeros(response.shape), ref_logprobs=torch.zeros(response.shape),
                     values=torch.zeros(response.shape), scores=torch.zeros(GLOBAL_BATCH))
    exp.logprobs, exp.values = trainer.policy_logprobs_and_values(exp)
    exp.ref_logprobs = trainer.reference_logprobs(exp)
    # per-token rewards whose scale and level differ between the halves, so that the advantages each rank
    # whitens its own half to are not those whitened over the whole batch
    exp.rewards = torch.randn(response.shape, generator=g) * torch.tensor([1.0] * 4 + [3.0] * 4)[:, None]
    exp.rewards[GLOBAL_BATCH // 2:] += 2.0
    exp.rewards *= mask_r
    return exp


def main(out: Path, overrides: list[str]) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    share = GLOBAL_BATCH // world  # batch_size counts every process's episodes; each takes its share
    trainer = PPOTrainer(load_config(PPOConfig, None, [*overrides, f"batch_size={GLOBAL_BATCH}", "num_ppo_epochs=1",
                                                       "num_mini_batches=1", "gradient_accumulation_steps=1"]))
    trainer.setup()
    assert trainer.batch.episodes == share
    rank = trainer.accelerator.process_index
    out.mkdir(parents=True, exist_ok=True)
    before = full_trainable_state(trainer.model) if trainer.fsdp else trainable_state(trainer.model)
    before = {k: v.clone() for k, v in before.items()}  # the one-rank state is the live parameters' storage
    exp = fixed_batch(trainer)
    mine = exp.select(slice(rank * share, (rank + 1) * share))
    trainer.gae_advantages(mine)  # advantages whitened over the global batch, returns from this rank's rows
    stats = trainer.optimise(mine)
    names = sorted(stats)  # averaged over the ranks as PPOTrainer.step logs them
    logged = trainer.accelerator.reduce(torch.tensor([stats[k] for k in names], device=trainer.device), "mean")
    after = full_trainable_state(trainer.model) if trainer.fsdp else trainable_state(trainer.model)
    if trainer.is_main:
        (out / "stats.json").write_text(json.dumps(dict(zip(names, logged.tolist()))))
        save_file({k: v.contiguous() for k, v in before.items()}, str(out / "before.safetensors"))
        save_file({k: v.contiguous() for k, v in after.items()}, str(out / "step.safetensors"))
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "sharded": bool(trainer.fsdp),
        "frozen_local": local_numel(frozen), "frozen_total": sum(p.numel() for p in frozen),
        "trained_local": local_numel(trained), "trained_total": sum(p.numel() for p in trained)}))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    exit_process(0)  # as `align` does: without the interpreter's finalization (see exit_process)
