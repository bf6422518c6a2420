"""What a run says it trained on when max_length leaves rankings out: the summary and the model card
count the rankings trained on and, apart, the ones left out; the pairwise mode counts rankings, not
pairs; a held-out split left out whole is said in one line, and the run goes on. The reward stage's
line on rankings holding a cut text counts rankings in its pairwise mode too."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.config import load_config
from align.exports import write_kwise
from align.formats import Ranking
from dpo.config import DPOConfig
from dpo.data import DPODataset

MAX_LENGTH = 64  # a short answer after its prompt is about 20 tokens, "word " * 40 about 130


def fitting(prefix: str, n: int) -> list[Ranking]:
    return [Ranking(prompt=f"{prefix} question {i}?", responses=[f"answer {i}", f"reply {i}", f"no {i}"],
                    ranks=[0, 1, 2]) for i in range(n)]


def too_long(prefix: str, n: int) -> list[Ranking]:
    """K = 3 rankings whose best response does not fit MAX_LENGTH after its prompt: 2 of each one's 3
    pairs hold it, the third (the two short responses) fits."""
    return [Ranking(prompt=f"{prefix} long {i}?", responses=["word " * 40, f"fine {i}", f"meh {i}"], ranks=[0, 1, 2])
            for i in range(n)]


def write_split(tmp_path: Path, train: list[Ranking], held_out: list[Ranking]) -> list[str]:
    path, eval_path = tmp_path / "train.kwise.jsonl", tmp_path / "held_out.kwise.jsonl"
    write_kwise(train, path)
    write_kwise(held_out, eval_path)
    return ["data.format=kwise", f"data.path={path}", f"data.eval_path={eval_path}"]


def run(small_dpo_run: list[str], data: list[str], *overrides: str) -> tuple[dict, list[str]]:
    from dpo.train import run_dpo

    said: list[str] = []
    base = [o for o in small_dpo_run if not o.startswith("data.")]
    summary = run_dpo(load_config(DPOConfig, None, [*base, *data, f"max_length={MAX_LENGTH}", "num_eval_prompts=0",
                                                    *overrides]), echo=said.append)
    return summary, said


def card(tmp_path: Path) -> str:
    from align.commands.export import export_run

    return (export_run(tmp_path / "run", tmp_path / "export", merge=False) / "README.md").read_text()


def test_the_summary_and_card_count_the_rankings_trained_on_and_the_ones_left_out_apart(small_dpo_run, tmp_path):
    # 12 rankings fit, 3 hold a response too long for max_length: trained on 12, not 15
    data = write_split(tmp_path, fitting("t", 12) + too_long("t", 3), fitting("h", 4) + too_long("h", 1))
    summary, said = run(small_dpo_run, data)
    assert summary["train/rankings"] == summary["train/examples"] == 12
    assert summary["train/rankings_left_out"] == 3
    assert (summary["eval/num_rankings"], summary["eval/rankings_left_out"]) == (4, 1)
    assert "dpo: left out 3 whose prompt + response exceeds max_length of the training rankings" in said
    assert any(line.startswith("dpo: 12 training rankings (kwise, 12 examples), 4 held-out, ") for line in said)
    text = card(tmp_path)
    assert "- training rankings: 12\n" in text
    assert "- training rankings left out (a response does not follow its whole prompt within max_length): 3\n" in text
    assert "- held-out rankings: 4\n- held-out rankings left out (" in text


def test_the_pairwise_mode_leaves_out_and_counts_whole_rankings_not_pairs(small_dpo_run, tmp_path):
    # the 3 long rankings are left out whole, their fitting pair too: both modes train on the same 12
    # rankings, 3 ordered pairs each
    data = write_split(tmp_path, fitting("t", 12) + too_long("t", 3), fitting("h", 4))
    summary, said = run(small_dpo_run, data, "loss=pairwise")
    assert [line for line in said if line.startswith("dpo: left out")] == [
        "dpo: left out 3 whose prompt + response exceeds max_length of the training rankings"]
    assert (summary["train/rankings"], summary["train/rankings_left_out"], summary["train/examples"]) == (12, 3, 36)


def test_a_held_out_split_left_out_whole_is_said_in_one_line_and_the_run_goes_on(small_dpo_run, tmp_path):
    data = write_split(tmp_path, fitting("t", 12), too_long("h", 2))
    summary, said = run(small_dpo_run, data)
    assert [line for line in said if "held-out" in line and "left out" in line] == [
        "dpo: left out 2 whose prompt + response exceeds max_length of the 2 held-out rankings: "
        "no held-out ranking fits max_length: no held-out accuracy"]
    assert not any("over the others" in line for line in said)
    assert "eval/accuracy" not in summary
    assert (summary["eval/num_rankings"], summary["eval/rankings_left_out"]) == (0, 2)
    assert summary["train/steps"] > 0 and (tmp_path / "run" / "policy").is_dir()
    text = card(tmp_path)
    assert "- held-out rankings: 0\n" in text
    assert "- held-out pairwise accuracy of the implicit reward: none, no held-out ranking fits max_length\n" in text


def test_the_held_out_line_names_what_the_accuracy_is_over(tiny_random_model):
    from align.modeling import load_tokenizer
    from dpo.data import held_out_left_out_line
    from reward.model import prepare_tokenizer

    tok = load_tokenizer(tiny_random_model)
    prepare_tokenizer(tok)
    some = DPODataset(fitting("h", 2) + too_long("h", 1), tok, MAX_LENGTH)
    assert held_out_left_out_line(some, 3) == ("dpo: left out 1 whose prompt + response exceeds max_length of the 3 "
                                               "held-out rankings (the held-out accuracy is over the others)")
    none = DPODataset(too_long("h", 1), tok, MAX_LENGTH)
    assert held_out_left_out_line(none, 1).endswith(": no held-out ranking fits max_length: no held-out accuracy")


@pytest.mark.parametrize("loss, expected", [
    ("kwise", "reward: 3 of 15 training rankings hold a text of 64 tokens"),
    ("pairwise", "reward: 3 of 15 training rankings (6 of 45 pairs) hold a text of 64 tokens")])
def test_the_reward_stage_counts_rankings_holding_a_cut_text_in_rankings(tiny_random_model, tmp_path, loss, expected):
    # the reward stage cuts such a text (it leaves nothing out); its line said "6 of 45 training rankings"
    # of the pairwise mode's pairs
    from reward.config import RewardConfig
    from reward.train import RewardTrainer

    data = write_split(tmp_path, fitting("t", 12) + too_long("t", 3), fitting("h", 4))
    cfg = load_config(RewardConfig, None, [f"model.name_or_path={tiny_random_model}", f"output_dir={tmp_path / 'run'}",
                                           f"model.max_length={MAX_LENGTH}", f"train.loss={loss}", "train.batch_size=8",
                                           "train.num_threads=1",
                                           *data])
    said: list[str] = []
    RewardTrainer(cfg, echo=said.append).setup()
    assert [line.split(" (model.max_length")[0] for line in said if "hold a text" in line] == [expected]


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_training_rankings_holding_a_special_tokens_text_are_said_before_training(stage, tiny_random_model, tmp_path,
                                                                                  small_dpo_run):
    # the model reads "</s>" in a response as its eos: said in one line, counted over the training rankings
    from align.modeling import load_tokenizer
    from dpo.train import DPOTrainer
    from reward.config import RewardConfig
    from reward.train import RewardTrainer

    eos = load_tokenizer(tiny_random_model).eos_token
    train = fitting("t", 12)
    train[5] = Ranking(prompt="how do I strike text?", responses=[f"write <del>old</del>, or {eos}", "no", "maybe"],
                       ranks=[0, 1, 2])
    data = write_split(tmp_path, train, fitting("h", 4))
    said: list[str] = []
    if stage == "reward":
        RewardTrainer(load_config(RewardConfig, None, [f"model.name_or_path={tiny_random_model}", "train.num_threads=1",
                                                       f"output_dir={tmp_path / 'run'}", *data]), echo=said.append).setup()
    else:
        base = [o for o in small_dpo_run if not o.startswith("data.")]
        DPOTrainer(load_config(DPOConfig, None, [*base, *data, "num_eval_prompts=0"]), echo=said.append).setup()
    [line] = [line for line in said if "special tokens" in line]
    assert line.startswith(f"{stage}: 1 of 12 training rankings hold the text of one of the tokenizer's special tokens "
                           f"(first: {eos!r}), which the model reads as that token")
