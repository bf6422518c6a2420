"""Launched by test_multiproc.py under `accelerate launch`: a PPO run, then every process
writes its own copy of the trainable weights (and its last rollout) for the test to compare, and,
once the trainer is gone, whether its DDP module is still alive (kept until the process exits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from align.commands.cli import exit_process
from align.config import load_config
from ppo.config import PPOConfig
from ppo.data import PromptSampler
from ppo.trainer import PPOTrainer


def main(overrides: list[str]) -> tuple[Path, int]:
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides))
    trainer.setup()
    rank = trainer.accelerator.process_index
    prompts = trainer.sampler.next_batch()  # what this rank would see next: ranks must differ
    trainer.sampler.load_state_dict({"epoch": 0, "position": 0})
    cfg = trainer.cfg  # what one process would draw with the same config: the ranks' shares together
    one_process = PromptSampler(trainer.sampler.prompts, cfg.batch_size // cfg.samples_per_prompt, cfg.seed).next_batch()
    trainer.train()
    out = Path(trainer.cfg.output_dir) / "per_rank"
    out.mkdir(exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad},
              str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"first_prompts": prompts, "one_process_prompts": one_process,
                                                          "episodes": trainer.batch.episodes}))
    return out, rank


def ddp_modules_alive() -> int:
    import gc

    from torch.nn.parallel import DistributedDataParallel

    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


if __name__ == "__main__":
    out, rank = main(sys.argv[1:])
    (out / f"rank{rank}_after.json").write_text(json.dumps({"ddp_modules_alive": ddp_modules_alive()}))
    exit_process(0)  # as `align` does: without the interpreter's finalization (see exit_process)
