"""Launched by test_fsdp.py under `accelerate launch` with the FSDP2 config, sample_gathered=false:
each decoding step gathers every layer's weights from both ranks, a collective, so a rank whose
rows have all ended must keep stepping until the other's are done.

Sampling is greedy in effect (temperature 1e-4), so a second rollout of the same prompts repeats
the first. Each rank samples its own prompts once; then rank 0 takes the first token of its
rows as its end-of-sequence token (its rows now end at their first token) and rank 1 a token
its rows never produce (they run the whole length), and both sample again. Writes
OUT/rank{R}.json: the two rollouts' response ids and masks, and the end token each used."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from align.commands.cli import exit_process
from align.config import load_config
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer


def main(out: Path, overrides: list[str]) -> None:
    cfg = load_config(PPOConfig, None, [*overrides, "sample_gathered=false"])
    cfg.temperature = 1e-4  # greedy in effect (a run's config stops at 0.01): each rank's tokens known in advance
    trainer = PPOTrainer(cfg)
    trainer.setup()
    assert trainer.fsdp is not None, "run under an FSDP2 accelerate config"
    tok, rank = trainer.tokenizer, trainer.accelerator.process_index
    prompts = [f"Question {rank}: what comes next?"] * 2
    first = trainer.generate(prompts)
    produced = set(first.response_ids.flatten().tolist())
    if rank == 0:
        end = int(first.response_ids[0, 0])
    else:
        end = next(t for t in range(max(tok.all_special_ids) + 1, len(tok)) if t not in produced)
    tok.eos_token = tok.convert_ids_to_tokens(end)
    second = trainer.generate(prompts)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "end": end, "pad": tok.pad_token_id,
        "first": first.response_ids.tolist(), "first_mask": first.response_mask.tolist(),
        "second": second.response_ids.tolist(), "second_mask": second.response_mask.tolist()}))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    exit_process(0)  # as `align` does: without the interpreter's finalization (see exit_process)
