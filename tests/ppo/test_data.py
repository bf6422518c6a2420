"""Prompt sampling (resumable, per-rank slices), the Experience container, report_to's missing package."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from align.errors import UserError
from ppo.data import PromptSampler, check_held_out, load_prompts
from ppo.experience import Experience, encode_prompts, prompt_notes


@pytest.mark.parametrize("saved_after", [2, 3, 6])  # in the first pass, the second, the fifth
def test_sampler_state_round_trip_continues_the_same_order(saved_after):
    prompts = [f"p{i}" for i in range(10)]
    a = PromptSampler(prompts, batch_size=4, seed=7)
    first = [a.next_batch() for _ in range(saved_after)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(3)]  # crosses a pass boundary (10 prompts, 4 per batch)
    b = PromptSampler(prompts, batch_size=4, seed=7)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(3)] == rest
    # one pass sees every prompt once, each pass in its own order
    assert sorted(sum(first[:2], []) + (first + rest)[2][:2]) == sorted(prompts)
    assert sum(first + rest, [])[:10] != sum(first + rest, [])[10:20]


def test_ranks_take_disjoint_slices_of_the_global_batch():
    prompts = [f"p{i}" for i in range(16)]
    r0 = PromptSampler(prompts, batch_size=4, seed=1, rank=0, world_size=2).next_batch()
    r1 = PromptSampler(prompts, batch_size=4, seed=1, rank=1, world_size=2).next_batch()
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)


def test_load_prompts_from_jsonl_and_txt(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a", "responses": []}) + "\n" + json.dumps({"prompt": "a"}) + "\n"
                     + json.dumps({"prompt": [{"role": "user", "content": "b"}]}) + "\n" + json.dumps("c") + "\n")
    # a line that is a JSON string is a prompt, as in the prompts file `align annotate import` reads; the
    # fields only the annotation app reads (id, candidates) are neither read nor checked
    assert load_prompts(str(jsonl), 0, 0, "train") == ["a", [{"role": "user", "content": "b"}], "c"]
    jsonl.write_text(json.dumps({"prompt": "d", "id": 1.5, "candidates": [{"response": "x"}]}) + "\n")
    assert load_prompts(str(jsonl), 0, 0, "train") == ["d"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_prompts(str(txt), 0, 0, "train") == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_prompts(str(bad), 0, 0, "train")


@pytest.mark.parametrize(("prompt", "expected"), [
    (5, "the prompt must be a string or a list of messages, got 5"),
    (None, "the prompt must be a string or a list of messages, got None"),
    ({"role": "user"}, "the prompt must be a string or a list of messages"),
    ([{"role": "user"}], "every message needs string 'role' and 'content'"),
    ([], "expected a non-empty list of messages"),
    ("", "empty prompt"),  # as align annotate import reads the same file
    (float("nan"), "not valid JSON (NaN is not a JSON value)"),
])
def test_a_prompt_that_is_neither_text_nor_messages_is_refused_naming_its_line(tmp_path, prompt, expected):
    # refused as the file is read (before any model loads; for eval_prompts, before the training),
    # not as a traceback where the chat template meets it
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(UserError, match=rf"^{f}:2: " + re.escape(expected)):
        load_prompts(str(f), 0, 0, "train")


def test_experience_select_slices_every_field():
    B, Q, T = 3, 2, 4
    exp = Experience(query_ids=torch.arange(B * Q).view(B, Q), query_mask=torch.ones(B, Q),
                     response_ids=torch.arange(B * T).view(B, T), response_mask=torch.ones(B, T),
                     logprobs=torch.zeros(B, T), ref_logprobs=torch.zeros(B, T), values=torch.zeros(B, T),
                     scores=torch.tensor([1.0, 2.0, 3.0]))
    mb = exp.select(torch.tensor([2, 0]))
    assert mb.scores.tolist() == [3.0, 1.0] and mb.kl is None
    assert mb.input_ids.shape == (2, Q + T) and mb.context_length == Q
    assert mb.input_ids[0].tolist() == [4, 5, 8, 9, 10, 11]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_the_package_fails_before_training(capsys, small_run, tmp_path):
    from align.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["ppo", *small_run, "report_to=wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1] == "error: report_to=wandb needs wandb: pip install wandb"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_host_padding_bounds_of_any_rows_are_those_read_from_the_masks():
    # The micro-step loop trims with bounds computed on the host once per optimisation; for every
    # set of rows they must be the columns that are padding in none of those rows.
    import itertools

    from ppo.experience import batch_trim_bounds, per_row_padding

    query_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])  # prompts start at 2, 1, 3
    response_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])  # end at 2, 4, none
    first, last = per_row_padding(query_mask, response_mask)
    assert (first, last) == ([2, 1, 3], [2, 4, 0])
    for n in (1, 2, 3):
        for rows in itertools.combinations(range(3), n):
            index = list(rows)
            real_prompt = [c for c in range(4) if query_mask[index, c].any()]
            real_response = [c for c in range(5) if response_mask[index, c].any()]
            expected = (real_prompt[0], real_response[-1] + 1 if real_response else 1)
            assert batch_trim_bounds(first, last, index) == expected
    assert batch_trim_bounds(first, last, [2]) == (3, 1)  # no response token: one column is kept


@pytest.mark.parametrize("which", ["prompts", "eval_prompts"])
def test_a_bad_prompts_file_is_refused_before_any_model_loads(small_run, tmp_path, monkeypatch, which):
    import align.modeling
    import reward.model
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompts were read")

    monkeypatch.setattr(align.modeling, "load_causal_lm", no_model)
    monkeypatch.setattr(reward.model, "load_reward_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": None}) + "\n")
    cfg = load_config(PPOConfig, None, [*small_run, f"{which}={bad}"])
    with pytest.raises(UserError, match=rf"^{bad}:1: the prompt must be"):
        PPOTrainer(cfg).setup()


def test_held_out_prompts_that_are_training_prompts_are_counted_and_refused():
    chat = [{"role": "user", "content": "b"}]
    check_held_out(["x", [{"role": "user", "content": "y"}]], ["a", chat, "c"], "eval_prompts", "prompts")  # none shared
    with pytest.raises(UserError) as info:  # "c" as text is the one user turn [{"user", "c"}]: the same input
        check_held_out([[{"content": "c", "role": "user"}], "b", "d"], ["a", chat, "c"], "eval_prompts", "prompts")
    assert str(info.value) == ("2 of the 3 held-out prompts (eval_prompts) are also training prompts (prompts): the "
                               "held-out results would measure the training prompts; give eval_prompts prompts that "
                               "are not in prompts")


def test_ppo_refuses_held_out_prompts_from_its_training_prompts_before_any_model_loads(small_run, tmp_path,
                                                                                      monkeypatch):
    # eval_prompts = prompts ran, and its summary's held-out gains were measured on the training prompts
    import align.modeling
    import reward.model
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(align.modeling, "load_causal_lm", no_model)
    monkeypatch.setattr(reward.model, "load_reward_model", no_model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"question {i}\n" for i in range(16)))
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("question 3\nanother question\n")
    for eval_prompts in (prompts, held_out):
        cfg = load_config(PPOConfig, None, [*small_run, f"prompts={prompts}", f"eval_prompts={eval_prompts}",
                                            "num_eval_prompts=2"])
        with pytest.raises(UserError, match=r"^\d of the 2 held-out prompts \(eval_prompts\) are also training"):
            PPOTrainer(cfg).setup()
    assert not (tmp_path / "run").exists()


def test_prompts_longer_than_max_prompt_length_are_counted_and_the_policy_reads_their_end(tiny_random_model):
    from align.chat import encode_rendered, render_prompt
    from align.modeling import load_tokenizer

    tok = load_tokenizer(tiny_random_model)
    short, long = "hi", "a much longer question " * 8

    def tokens(prompt) -> list[int]:
        return encode_rendered(tok, [render_prompt(tok, prompt)], 10**6)[0]

    max_length = len(tokens(short)) + 2
    assert len(tokens(long)) > max_length  # the precondition: one prompt fits, the other does not
    [note] = prompt_notes(tok, [short, long, short], [long], max_length)
    assert note.startswith(f"ppo: 1 of 3 training and 1 of 1 held-out prompts are longer than "
                           f"max_prompt_length={max_length} tokens")
    assert prompt_notes(tok, [short, long], [], max_length)[0].startswith("ppo: 1 of 2 training prompts")
    assert prompt_notes(tok, [short, short], [short], max_length) == []
    # a prompt quoting a special token's text: the policy would read the token itself
    [special] = prompt_notes(tok, [short, f"what does {tok.eos_token} mean?"], [short], 10**6)
    assert special.startswith(f"ppo: 1 of 3 training and held-out prompts hold the text of one of the tokenizer's "
                              f"special tokens (first: {tok.eos_token!r})")
    # what the note says is what the policy reads: the long prompt's last tokens, the short one whole
    ids, mask = encode_prompts(tok, [short, long], max_length, "cpu")
    assert mask.sum(1).tolist() == [len(tokens(short)), max_length]
    assert ids[1].tolist()[-(max_length - 1):] == tokens(long)[-(max_length - 1):]


def test_a_run_says_how_many_of_its_prompts_the_policy_reads_cut(small_run, tmp_path, caplog):
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo
    from tests.ppo.test_learning import HashScorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["hi"] * 6 + ["a much longer question " * 8] * 2) + "\n")
    cfg = load_config(PPOConfig, None, [*small_run, f"prompts={prompts}", "num_prompts=8", "num_eval_prompts=0",
                                        "num_iterations=1", "max_prompt_length=16"])
    with caplog.at_level("WARNING", logger="align"):
        run_ppo(cfg, reward_model=HashScorer())
    assert [r.getMessage()[:74] for r in caplog.records if "max_prompt_length" in r.getMessage()] == [
        "ppo: 2 of 8 training prompts are longer than max_prompt_length=16 tokens: "]
