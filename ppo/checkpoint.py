"""PPO checkpoints: everything a resumed run needs to continue bit for bit, written atomically,
and the final policy the run leaves.

    RUN/checkpoints/iter-NNNNNN/  trainable.safetensors  optimizer.pt  scheduler.pt
                                  rng_states.pt (every process)  trainer_state.json
                                  (iteration, data position, KL controller, world size)

Under FSDP2 each rank holds a shard of the trained parameters and of their optimiser state, so
`trainable.safetensors` and `optimizer.pt` give way to `sharded/`, torch's distributed checkpoint
that every rank writes its part of (align.distributed.save_sharded).

The functions read and write the state of a set-up `ppo.trainer.PPOTrainer`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.errors import UserError
from align.run import atomic_directory, write_json_atomic
from ppo.run_dir import CHECKPOINTS_DIR, POLICY_DIR, VALUE_HEAD_FILE

log = logging.getLogger("align")

SHARDED_DIR = "sharded"  # a checkpoint's trained weights and optimiser state under FSDP2


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS_DIR).glob("iter-*")) if (run_dir / CHECKPOINTS_DIR).is_dir() else []
    return found[-1] if found else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(trainer: Any) -> None:
    """Write RUN/checkpoints/iter-NNNNNN (main process) and keep the newest `keep_checkpoints`."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    rng_all = gather_object([rng])  # one per process, in rank order
    target = trainer.run_dir / CHECKPOINTS_DIR / f"iter-{trainer.iteration:06d}"
    if trainer.fsdp:  # every rank writes its shards first, into a directory only the main rank renames
        from align.distributed import save_sharded

        sharded = target.with_name(f".{target.name}.sharded")
        if trainer.is_main:
            shutil.rmtree(sharded, ignore_errors=True)  # left by a run killed while writing
        trainer.accelerator.wait_for_everyone()
        save_sharded(trainer.model, trainer.optimizer, sharded)
        trainer.accelerator.wait_for_everyone()
    if trainer.is_main:
        with atomic_directory(target, overwrite=True) as tmp:
            if trainer.fsdp:
                os.replace(sharded, tmp / SHARDED_DIR)
            else:
                save_file(trainable_state(trainer.model), str(tmp / "trainable.safetensors"))
                torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_all, tmp / "rng_states.pt")
            write_json_atomic(tmp / "trainer_state.json", {
                "iteration": trainer.iteration, "sampler": trainer.sampler.state_dict(),
                "kl_controller": trainer.kl_ctl.state_dict(), "world_size": trainer.accelerator.num_processes,
            })
        old = sorted((trainer.run_dir / CHECKPOINTS_DIR).glob("iter-*"))[: -trainer.cfg.keep_checkpoints]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def load_checkpoint(trainer: Any, path: Path) -> None:
    """Restore weights, optimiser, scheduler, KL controller, data position and this process's RNGs."""
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    processes = trainer.accelerator.num_processes
    if state["world_size"] != processes:
        raise UserError(f"{path} was written by {state['world_size']} processes; resume it with the same "
                        f"number (got {processes})")
    if (path / SHARDED_DIR).is_dir() != bool(trainer.fsdp):
        raise UserError(f"{path} was written {'with' if (path / SHARDED_DIR).is_dir() else 'without'} FSDP "
                        "sharding; resume it under the same accelerate config")
    if trainer.fsdp:
        from align.distributed import load_sharded

        load_sharded(trainer.model, trainer.optimizer, path / SHARDED_DIR)
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    trainer.sampler.load_state_dict(state["sampler"])
    trainer.iteration = state["iteration"]
    rng = torch.load(path / "rng_states.pt", weights_only=False)[trainer.accelerator.process_index]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if trainer.is_main:
        log.info("resumed %s at iteration %d", trainer.run_dir, trainer.iteration)


def truncate_metrics(path: Path, iteration: int) -> None:
    """On resume, drop metric rows written after the checkpoint's iteration (they will be recomputed)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("iteration", 0) <= iteration:
            rows.append(row)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def check_run_dir(cfg: Any, run_dir: Path, resume: bool) -> None:
    """Before anything loads: a resumed run has a checkpoint; a fresh run does not write into a
    run directory that holds one unless `overwrite` (whose stale checkpoints are removed)."""
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"{run_dir}: no checkpoint to resume from (checkpoints/iter-* not found)")
        return
    if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"output_dir {run_dir} is not empty: resume it with `align ppo --resume "
                        f"{run_dir}`, choose another output_dir, or set overwrite=true")
    if cfg.overwrite and run_dir.is_dir() and os.environ.get("LOCAL_RANK", "0") == "0":
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)


def check_distributed_setup(accelerator: Any, cfg: Any, resume: bool, fsdp: Any = None) -> None:
    """What sharding cannot do here. FSDP2: the graphed decoding step replays kernels on one
    rank's full weights, and a separate reference checkpoint would be a whole unsharded copy per
    rank. DeepSpeed ZeRO steps the optimiser inside backward and shards the optimiser state, which
    the checkpoints do not gather."""
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


def save_final_policy(trainer: Any, trained: dict[str, torch.Tensor] | None = None) -> None:
    """RUN/policy (the LoRA adapter, as peft writes it, + tokenizer) and RUN/value_head.safetensors
    (main process). `trained`: the trained parameters gathered in full (align.distributed
    .full_trainable_state) when the module itself holds only this rank's shards."""
    from safetensors.torch import save_file

    policy = trainer.model.policy
    policy.peft_config["default"].base_model_name_or_path = str(trainer.sft_path)
    adapter = None if trained is None else {k.removeprefix("policy."): v for k, v in trained.items()
                                             if k.startswith("policy.")}
    with atomic_directory(trainer.run_dir / POLICY_DIR, overwrite=True) as tmp:
        policy.save_pretrained(tmp, state_dict=adapter)
        trainer.tokenizer.save_pretrained(tmp)
    if trainer.model.value_module is None:  # RLOO, GRPO: no value model to keep
        return
    if trained is None:
        values = trainer.model.value_state_dict()
    else:  # the critic's frozen buffers, if any, are not in `trained`; its parameters all train
        prefix = "critic." if trainer.model.critic is not None else "value_head."
        values = {k.removeprefix(prefix): v.contiguous() for k, v in trained.items() if k.startswith(prefix)}
    tmp_file = trainer.run_dir / f".{VALUE_HEAD_FILE}.tmp"
    save_file(values, str(tmp_file))
    os.replace(tmp_file, trainer.run_dir / VALUE_HEAD_FILE)
