"""Models with a table of learned absolute positions (GPT-2, OPT, BERT, RoBERTa) read no more tokens than
it holds: a max_length past it is cut to it, with one line saying so, before any training or scoring
(it was an IndexError, or BERT's buffers failing to expand, mid-run). Rotary models are not cut."""

from __future__ import annotations

import json

import pytest
import torch

from align.config import load_config
from tests.families.builders import FAMILIES, build_family_model, build_tiny_bert

LEARNED = {"gpt2", "opt"}  # the causal-LM families of FAMILIES with learned positions
WORDS = "the cat sat on the mat and looked at the dog while birds sang".split()
CUT = "is past the 64 positions"


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def forward(model, n: int) -> None:
    ids = torch.randint(5, 300, (1, n))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_causal_lm_reads_up_to_its_position_limit_and_rotary_ones_have_none(family, family_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from align.modeling import position_limit

    model = AutoModelForCausalLM.from_pretrained(family_model(family)).eval()  # 512 positions each
    limit = position_limit(model)
    assert position_limit(AutoConfig.from_pretrained(family_model(family))) == limit
    if family in LEARNED:
        assert limit == 512
        forward(model, limit)
        with pytest.raises((IndexError, RuntimeError)):
            forward(model, limit + 1)
    else:  # rotary: positions past max_position_embeddings are computed, nothing fails
        assert limit is None
        forward(model, 600)


@pytest.mark.parametrize("family,limit", [("bert", 64), ("roberta", 63), ("deberta-v2", 64), ("modernbert", None)])
def test_an_encoder_reads_up_to_its_position_limit(family, limit, tmp_path):
    # (the tiny RoBERTa's padding_idx is 0: its positions start at 1, so 64 rows hold 63 tokens)
    from transformers import AutoModelForSequenceClassification, DebertaV2Config, RobertaConfig

    from align.modeling import position_limit

    model = AutoModelForSequenceClassification.from_pretrained(
        build_tiny_bert(tmp_path / family, family=family, positions=64), num_labels=1).eval()
    assert position_limit(model) == limit
    forward(model, limit or 100)
    if limit:
        with pytest.raises((IndexError, RuntimeError)):
            forward(model, limit + 1)
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # roberta-base, MiniLM
    assert position_limit(DebertaV2Config(position_biased_input=False, relative_attention=True)) is None  # DeBERTa-v3


def write_rankings(path) -> str:
    """kwise rankings for a 64-position model: short prompts with long responses, long prompts with short
    ones (each text fits, a prompt and another's response together do not), and a few texts far longer."""
    rows = []
    for i in range(16):
        if i % 4 == 3:
            prompt, responses = f"question {i}", [words(60, k) for k in range(3)]
        elif i % 2:
            prompt, responses = f"question {i} {words(14)}", [f"answer {k} yes" for k in range(3)]
        else:
            prompt, responses = f"question {i}", [words(14, k) for k in range(3)]
        rows.append({"prompt": prompt, "prompt_id": f"p{i}", "responses": responses, "ranks": [0, 1, 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def gpt2_64(tmp_path):
    return build_family_model("gpt2", tmp_path / "gpt2", pad=False, chat_template=False, positions=64)


def reward_run(model, tmp_path, *overrides):
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={model}", f"output_dir={tmp_path / 'run'}", "model.max_length=1024", "data.format=kwise",
        f"data.path={write_rankings(tmp_path / 'rankings.jsonl')}", "data.eval_fraction=0.25", "train.batch_size=12",
        "train.length_buckets=1", "train.max_steps=2", "train.learning_rate=1e-2", "eval.normalize_prompts=4",
        "eval.normalize_response_length=4", "train.num_threads=1", *overrides])
    return train_reward_model(cfg, echo=lambda text: None)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_a_reward_model_past_its_positions_trains_and_scores_cut_to_them(kind, gpt2_64, tmp_path, caplog):
    from reward.model import load_reward_model

    model = gpt2_64 if kind == "gpt2" else build_tiny_bert(tmp_path / "bert", positions=64)
    with caplog.at_level("INFO", logger="align"):
        summary = reward_run(model, tmp_path, *(["eval.normalize=false"] if kind == "bert" else []))
    assert caplog.text.count(f"model.max_length=1024 {CUT} {model} reads") == 1  # once, before the training
    assert summary["train/steps"] == 2 and summary["eval/num_rankings"] == 4
    caplog.clear()
    with caplog.at_level("INFO", logger="align"):
        reward = load_reward_model(tmp_path / "run", device="cpu")
    assert reward.max_length == 64 and CUT in caplog.text
    scores = reward.score(["what is a cat?", f"tell me {words(80)}"], ["a small animal", words(90)])
    assert torch.isfinite(scores).all()


def test_dpo_on_a_gpt2_policy_past_its_positions_trains_on_what_fits(gpt2_64, tmp_path, caplog):
    from dpo.config import DPOConfig
    from dpo.train import run_dpo

    cfg = load_config(DPOConfig, None, [
        f"policy_model={gpt2_64}", f"output_dir={tmp_path / 'run'}", "max_length=1024", "data.format=kwise",
        f"data.path={write_rankings(tmp_path / 'rankings.jsonl')}", "data.eval_fraction=0.25", "batch_size=12",
        "length_buckets=1", "max_steps=2", "num_eval_prompts=0", "num_threads=1", "progress=false"])
    lines = []
    with caplog.at_level("INFO", logger="align"):
        summary = run_dpo(cfg, echo=lines.append)
    assert caplog.text.count(f"max_length=1024 {CUT} {gpt2_64} reads") == 1
    # the far longer rankings left out (3 training, 1 held out), the others trained on and scored
    assert summary["train/steps"] == 2 and summary["train/examples"] == 9 and summary["eval/rankings_left_out"] == 1
    assert any("left out 3 whose prompt + response exceeds max_length" in line for line in lines)


def test_prompts_shared_in_a_slice_wider_than_the_positions_score_as_whole_sequences(gpt2_64):
    # a long prompt continued in the slice of another ranking's long response: each sequence fits the
    # 64 positions, but the slice's padding ran past them (IndexError) until padding kept its row's last position
    from align.config import LoraOptions
    from align.formats import Ranking
    from align.modeling import load_causal_lm, load_tokenizer
    from dpo.data import DPODataset, collate
    from dpo.model import PolicyLogprobs
    from ppo.model import build_policy
    from reward.model import build_reward_model, forward_rewards, forward_rewards_shared_prompts, prepare_tokenizer

    tokenizer = load_tokenizer(gpt2_64)
    prepare_tokenizer(tokenizer)
    rankings = [Ranking(prompt=f"question {words(14)}", responses=["yes", "no"], ranks=[0, 1]),
                Ranking(prompt="question", responses=[words(14), words(14, 3)], ranks=[1, 0])]
    dataset = DPODataset(rankings, tokenizer, 64)
    assert len(dataset) == 2
    batch = collate(dataset, [0, 1]).responses
    assert int(batch.prompt_mask.sum(1).max()) + int(batch.continuation_mask.sum(1).max()) > 64
    reward = build_reward_model(gpt2_64, tokenizer).eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_rewards_shared_prompts(reward, batch, 1),
                                   forward_rewards(reward, *batch.whole_sequences(tokenizer.pad_token_id)))
    policy = build_policy(load_causal_lm(gpt2_64, tokenizer=tokenizer), LoraOptions()).eval()
    shared, whole = (PolicyLogprobs(policy, buckets=1, chunk_tokens=0, pad_token_id=tokenizer.pad_token_id, whole=w)
                     for w in (False, True))
    with torch.no_grad():
        torch.testing.assert_close(shared(batch), whole(batch))


def test_ppo_on_a_gpt2_policy_keeps_prompt_and_response_within_its_positions(gpt2_64, tmp_path, caplog):
    # prompts of about 90 tokens and 24 new ones: the prompts keep their last 40 (an IndexError mid-rollout
    # before); 64 new tokens leave no room for any prompt: one line before anything samples
    from align.errors import UserError
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo

    reward_run(gpt2_64, tmp_path, "eval.normalize=false")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me {i} {words(80, i)}"}) + "\n" for i in range(8)))
    settings = [f"policy_model={gpt2_64}", f"reward_model={tmp_path / 'run'}", f"prompts={prompts}",
                f"output_dir={tmp_path / 'ppo'}", "batch_size=4", "num_mini_batches=1", "num_iterations=1",
                "num_eval_prompts=0", "save_every=0", "progress=false", "num_threads=1"]
    with caplog.at_level("INFO", logger="align"):
        run_ppo(load_config(PPOConfig, None, [*settings, "response_length=24"]))
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["response/length"] > 0
    assert "response_length=24 with max_prompt_length=128 is past the 64 positions" in caplog.text
    assert "prompts are cut to their last 40 tokens" in caplog.text
    with pytest.raises(UserError, match=r"^response_length=64 leaves no room for a prompt in the 64 positions"):
        run_ppo(load_config(PPOConfig, None, [*settings, "response_length=64", "overwrite=true"]))


def test_generated_candidates_continue_a_cut_prompt_as_ppo_reads_it(tmp_path, caplog):
    # GPT-2's 64 positions with 24 new tokens leave 40 for a prompt: the generator keeps the end and the
    # template's bos, the tokens PPO's rollouts start from (it cut the bos away with the start before)
    from align.chat import render_prompt
    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer
    from ppo.experience import encode_prompts

    path = build_family_model("gpt2", tmp_path / "gpt2", positions=64)  # the demo template writes a bos
    tok = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer=tok)
    prompts = ["hi", f"tell me {words(80)}"]
    assert len(tok(render_prompt(tok, prompts[1]), add_special_tokens=False)["input_ids"]) > 40  # cut
    fed, generate = [], model.generate
    model.generate = lambda **kwargs: fed.append(kwargs["input_ids"]) or generate(**kwargs)
    with caplog.at_level("WARNING", logger="align"):
        generate_responses(model, tok, prompts, max_new_tokens=24, device="cpu")
    ids, _ = encode_prompts(tok, prompts, 40, "cpu")
    assert ids[1, 0] == tok.bos_token_id and torch.equal(fed[0], ids)
    assert "1 of 2 prompts were cut to their last 40 tokens: the model reads 64 positions" in caplog.text
