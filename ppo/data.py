"""Prompts for rollouts and evaluation, and a resumable sampler over them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.files import read_text_file
from align.formats import read_prompts

Prompt = Any  # str, or chat messages [{"role", "content"}, ...]


def load_prompts(spec: str, n: int, seed: int, split: str) -> list[Prompt]:
    """'synthetic' -> align.synthetic prompts of `split`; a .jsonl file -> its lines' prompts, each
    line a JSON string or an object with a 'prompt' field (text or chat messages), the prompts file
    `align annotate import` reads (duplicates dropped, order kept); a .txt file -> one prompt per
    non-empty line."""
    if spec == "synthetic":
        from align.synthetic import make_prompts

        return make_prompts(n, seed=seed, split=split)
    path = Path(spec)
    if path.suffix == ".txt":
        prompts = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
    else:  # the prompts file `align annotate import --format prompts` reads, read by the same reader
        prompts, seen = [], set()
        for record in read_prompts(path, prompts_only=True):  # its other fields are the annotation app's
            key = json.dumps(record.prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(record.prompt)
    if not prompts:
        raise UserError(f"{path}: no prompts found")
    return prompts


def load_eval_prompts(spec: str, n: int, seed: int, training: list[Prompt], training_key: str) -> list[Prompt]:
    """The `n` held-out prompts a run samples to report its held-out results (`eval_prompts`, read
    as `load_prompts` reads a prompts file; its held-out split for 'synthetic'), refused where they are
    also training prompts (`check_held_out`; the synthetic task's splits are disjoint)."""
    prompts = load_prompts(spec, n, seed, "heldout")[:n] if n else []
    if not is_synthetic(spec):
        check_held_out(prompts, training, "eval_prompts", training_key)
    return prompts


def check_held_out(held_out: list[Prompt], training: list[Prompt], held_out_key: str, training_key: str) -> None:
    """Refuse held-out prompts that are also training prompts: the results sampled on them would
    measure the training prompts and pass for held-out ones (the reward stage refuses such a split too)."""
    from align.chat import as_messages

    def key(prompt: Prompt) -> str:  # a text and the one user turn holding it are one prompt to the model
        return json.dumps(as_messages(prompt), sort_keys=True)

    trained = {key(p) for p in training}
    shared = sum(key(p) in trained for p in held_out)
    if shared:
        raise UserError(f"{shared} of the {len(held_out)} held-out prompts ({held_out_key}) are also training "
                        f"prompts ({training_key}): the held-out results would measure the training prompts; "
                        f"give {held_out_key} prompts that are not in {training_key}")


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic"


class PromptSampler:
    """Shuffled passes over the prompts; every process sees its own slice of each global batch.

    The order is a function of (seed, epoch) only, so the state to resume from is just
    (epoch, position): the data position of the issue's resume requirement.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Prompt]:
        """This process's `batch_size` prompts of the next global batch (batch_size * world_size)."""
        global_batch = []
        while len(global_batch) < self.batch_size * self.world_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size * self.world_size - len(global_batch), len(self._order) - self.position)
            global_batch.extend(self._order[self.position : self.position + take])
            self.position += take
        mine = global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def gold_judge(spec: str) -> Any:
    """The judge the final evaluation reports `eval/gold_*` with: the synthetic task's gold judge
    for synthetic prompts (`align.synthetic.gold_score`), else None (real prompts have no gold)."""
    if not is_synthetic(spec):
        return None
    from align.synthetic import gold_score

    return gold_score
