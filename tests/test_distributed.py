"""How a stage's data is dealt into global batches and split over the ranks (align.distributed)."""

from __future__ import annotations

import pytest

from align.distributed import global_batches, rank_micro_batches, rank_slice
from align.errors import UserError


def test_global_batches_shuffle_each_epoch_and_drop_a_batch_too_small_for_the_ranks():
    batches = global_batches(7, 3, epochs=2, max_steps=None, seed=0, world=2)
    # per epoch 3 + 3 + 1: the batch of one is dropped with two ranks
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    first, second = (sorted(sum(batches[i:i + 2], [])) for i in (0, 2))
    assert len(set(first)) == len(first) == 6 and len(set(second)) == 6  # no index twice in an epoch
    assert batches[:2] != batches[2:]  # another order in the second epoch
    assert global_batches(7, 3, epochs=2, max_steps=None, seed=0, world=1)[2] == [i for i in range(7)
                                                                                  if i not in first]
    assert global_batches(7, 3, epochs=2, max_steps=None, seed=0, world=2) == batches  # seeded
    assert len(global_batches(7, 3, epochs=1, max_steps=5, seed=0, world=1)) == 5  # as many epochs as it needs
    # each epoch of 3 on 2 ranks keeps one batch of 2 (the 1 left over is dropped): still the steps asked for
    assert len(global_batches(3, 2, epochs=1, max_steps=20, seed=0, world=2)) == 20


def test_no_batch_for_every_rank_is_a_clear_error():
    with pytest.raises(UserError, match="no training steps: 1 training rankings are too few"):
        global_batches(1, 4, epochs=3, max_steps=None, seed=0, world=2, what="rankings")


def test_rank_slices_cover_the_batch_once_in_order():
    batch = [10, 11, 12, 13, 14]
    parts = [rank_slice(batch, r, 3) for r in range(3)]
    assert parts == [[10, 11], [12, 13], [14]]


def test_micro_batches_split_each_rank_part_as_many_times_on_every_rank():
    batch = list(range(9))  # over 2 ranks: rank 0 holds 0-4, rank 1 holds 5-8
    assert rank_micro_batches(batch, 0, 1, 4) == [[0, 1, 2], [3, 4], [5, 6], [7, 8]]  # sizes differ by one at most
    assert [rank_micro_batches(batch, r, 2, 1) for r in (0, 1)] == [[[0, 1, 2, 3, 4]], [[5, 6, 7, 8]]]
    assert [rank_micro_batches(batch, r, 2, 2) for r in (0, 1)] == [[[0, 1, 2], [3, 4]], [[5, 6], [7, 8]]]
    # 5 steps: the smaller part has 4 items, so 4 micro-batches on each rank, none empty
    assert [rank_micro_batches(batch, r, 2, 5) for r in (0, 1)] == [[[0, 1], [2], [3], [4]],
                                                                    [[5], [6], [7], [8]]]


def test_only_ppo_runs_under_deepspeed_and_the_other_stages_say_so_before_loading():
    from accelerate.utils import DistributedType

    from align.distributed import check_engine

    for stage in ("align reward train", "align dpo"):
        with pytest.raises(UserError, match=f"uses DeepSpeed, which {stage} does not run under .* DDP or FSDP2 config"):
            check_engine(DistributedType.DEEPSPEED, stage)
        check_engine(DistributedType.MULTI_GPU, stage)
        check_engine(DistributedType.FSDP, stage)
    check_engine(DistributedType.DEEPSPEED, "align ppo")  # experimental: its settings are checked as it starts


def test_a_launchs_processes_share_the_cores_out_rather_than_each_taking_num_threads(monkeypatch):
    import os

    import torch

    from align.distributed import set_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_cpu_threads(2) == torch.get_num_threads() == 2  # 2 x 2 on 4 cores: as asked
        assert set_cpu_threads(4) == torch.get_num_threads() == 2  # 2 x 4 on 4 cores: 2 each
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert set_cpu_threads(2) == torch.get_num_threads() == 1  # never none
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
        assert set_cpu_threads(4) == torch.get_num_threads() == 4  # not a count: one process
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert set_cpu_threads(4) == torch.get_num_threads() == 4  # one process: as asked
        assert set_cpu_threads(None) == 4  # torch's (or the launcher's) choice stands
    finally:
        torch.set_num_threads(before)
