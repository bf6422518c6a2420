"""PPO checkpoints (align.checkpoint: every stage's layout, written atomically) and the final
policy the run leaves.

    RUN/checkpoints/iter-NNNNNN/  align.checkpoint's files; trainer_state.json holds the
                                  iteration, the data position, the KL controller and a
                                  fingerprint of the training prompts

The functions read and write the state of a set-up `ppo.trainer.PPOTrainer`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from align.checkpoint import (
    check_checkpoint_layout,
    check_same_run,
    data_fingerprint,
    latest_checkpoint,
    load_training_state,
    resumed_line,
    save_training_state,
)
from align.config import config_to_dict
from align.errors import UserError
from align.lora import save_policy_adapter
from align.modeling import resolve_model_path
from align.provenance import model_fingerprints
from align.run import give_ordinary_modes
from ppo.config import RESUME_OVERRIDABLE, PPOConfig
from ppo.run_dir import POLICY_DIR, VALUE_HEAD_FILE

log = logging.getLogger("align")

CHECKPOINT_PREFIX = "iter"


def save_checkpoint(trainer: Any) -> None:
    """Write RUN/checkpoints/iter-NNNNNN (main process) and keep the newest `keep_checkpoints`."""
    save_training_state(trainer.run_dir, f"{CHECKPOINT_PREFIX}-{trainer.iteration:06d}",
                        accelerator=trainer.accelerator, model=trainer.model, optimizer=trainer.optimizer,
                        scheduler=trainer.scheduler, sharded=bool(trainer.fsdp), keep=trainer.cfg.keep_checkpoints,
                        state={"iteration": trainer.iteration, "config": config_to_dict(trainer.cfg),
                               "sampler": trainer.sampler.state_dict(),
                               "data": data_fingerprint(trainer.sampler.prompts),
                               "models": model_fingerprints(model_paths(trainer)),
                               "kl_controller": trainer.kl_ctl.state_dict(), "clock": trainer.clock.state_dict()})


def model_paths(trainer: Any) -> dict[str, Path | None]:
    """The models a run reads, by the config key naming them: a resumed run holds them to the
    checkpoint's (a reward model handed in without a directory is not checked)."""
    ref = trainer.cfg.ref_model
    return {"policy_model": trainer.sft_path, "reward_model": getattr(trainer.reward_model, "path", None),
            "ref_model": None if ref is None else resolve_model_path(ref)}


def load_checkpoint(trainer: Any, path: Path) -> None:
    """Restore weights, optimiser, scheduler, KL controller, data position and this process's RNGs."""
    state = load_training_state(
        path, accelerator=trainer.accelerator, model=trainer.model, optimizer=trainer.optimizer,
        scheduler=trainer.scheduler, sharded=bool(trainer.fsdp),
        check=lambda state: check_same_run(path, state, config=config_to_dict(trainer.cfg), may_change=RESUME_OVERRIDABLE,
                                           data=data_fingerprint(trainer.sampler.prompts),
                                           aliases=getattr(type(trainer.cfg), "key_aliases", None),
                                           models=model_paths(trainer)))
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.iteration = state["iteration"]
    trainer.clock.load_state_dict(state.get("clock"))
    if trainer.is_main:
        log.info(resumed_line("ppo", trainer.run_dir, trainer.iteration, trainer.cfg.num_iterations, "iteration"))


def check_distributed_setup(accelerator: Any, cfg: PPOConfig, resume: bool, fsdp: Any = None) -> None:
    """What sharding cannot do here. FSDP2: the graphed decoding step replays kernels on one
    rank's full weights, and a separate reference checkpoint would be a whole unsharded copy per
    rank. DeepSpeed ZeRO steps the optimiser inside backward and shards the optimiser state, which
    the checkpoints do not gather. A resumed run's checkpoint must be of this layout."""
    from accelerate.utils import DistributedType

    if fsdp is not None:
        if cfg.cuda_graphs:
            raise UserError("cuda_graphs=true does not run under FSDP sharding; leave it unset")
        if cfg.torch_compile:
            raise UserError("torch_compile=true is not supported under FSDP sharding yet; leave it unset")
        if cfg.ref_model is not None:
            raise UserError("ref_model is not sharded under FSDP; leave it unset (the reference is the policy "
                            "with its adapter disabled)")
        if cfg.sample_merged:
            raise UserError("sample_merged=true does not run under FSDP sharding (each rank holds a slice of "
                            "the weights); leave it unset")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if cfg.gradient_accumulation_steps != 1:
            raise UserError("under DeepSpeed set gradient_accumulation_steps=1 (use num_mini_batches for memory)")
        if cfg.save_every or resume:
            raise UserError("checkpoints and --resume are not supported under DeepSpeed ZeRO yet; "
                            "set save_every=0 (or use DDP)")
    if resume:  # a checkpoint of another number of processes or sharding: said before the models load
        check_checkpoint_layout(latest_checkpoint(Path(cfg.output_dir), CHECKPOINT_PREFIX),
                                processes=accelerator.num_processes, sharded=fsdp is not None)


def save_final_policy(trainer: Any, trained: dict[str, torch.Tensor] | None = None) -> None:
    """RUN/policy (the LoRA adapter, as peft writes it, + tokenizer) and RUN/value_head.safetensors
    (main process). `trained`: the trained parameters gathered in full (align.distributed
    .full_trainable_state) when the module itself holds only this rank's shards."""
    from safetensors.torch import save_file

    adapter = None if trained is None else {k.removeprefix("policy."): v for k, v in trained.items()
                                             if k.startswith("policy.")}
    save_policy_adapter(trainer.model.policy, trainer.tokenizer, trainer.sft_path, trainer.run_dir / POLICY_DIR,
                        adapter)
    if trainer.model.value_module is None:  # RLOO, GRPO: no value model to keep
        return
    if trained is None:
        values = trainer.model.value_state_dict()
    else:  # the critic's frozen buffers, if any, are not in `trained`; its parameters all train
        prefix = "critic." if trainer.model.critic is not None else "value_head."
        values = {k.removeprefix(prefix): v.contiguous() for k, v in trained.items() if k.startswith(prefix)}
    tmp_file = trainer.run_dir / f".{VALUE_HEAD_FILE}.tmp"
    save_file(values, str(tmp_file))
    give_ordinary_modes(tmp_file)  # safetensors writes 0600
    os.replace(tmp_file, trainer.run_dir / VALUE_HEAD_FILE)
