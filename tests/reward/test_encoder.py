"""Encoder reward models (BERT-like): their own tokenizer and special tokens, left truncation, the
K-wise loss without a shared-prompt cache, normalisation on a causal policy's samples, save/load,
export, and PPO of a causal policy with another tokenizer scored through text."""

from __future__ import annotations

import pytest
import torch

from align.config import load_config
from reward.config import RewardConfig


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tests.families.builders import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("bert") / "model")


def bert_config(bert, policy, out, *overrides):
    return load_config(RewardConfig, None, [
        f"model.name_or_path={bert}", f"output_dir={out}", "model.max_length=64", "data.num_rankings=32",
        "data.num_eval_rankings=8", "train.batch_size=8", "train.learning_rate=1e-3", "train.num_threads=1",
        f"eval.normalize_policy={policy}", "eval.normalize_prompts=4", "eval.normalize_response_length=8", *overrides])


def test_encoder_text_has_cls_and_sep_and_keeps_the_end(tiny_bert):
    from align.modeling import load_tokenizer
    from reward.model import encode, prepare_tokenizer

    tokenizer = load_tokenizer(tiny_bert, encoder=True)  # no eos: accepted for an encoder
    prepare_tokenizer(tokenizer)
    text = "the start of a long dialogue " * 20 + "and the final reply"
    ids = encode(tokenizer, [text], 12, encoder=True)["input_ids"][0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == 12 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokenizer.decode(ids[1:-1]).endswith("and the final reply")


def test_encoder_dataset_runs_whole_sequences(tiny_bert):
    from align.formats import Ranking
    from align.modeling import load_tokenizer
    from reward.data import RankingCollator, RankingDataset
    from reward.model import build_reward_model, forward_rewards, forward_rewards_shared_prompts, prepare_tokenizer

    tokenizer = load_tokenizer(tiny_bert, encoder=True)
    prepare_tokenizer(tokenizer)
    rankings = [Ranking(prompt="what is a cat?", responses=["a small animal", "a pet", "no idea at all"], ranks=[0, 1, 2]),
                Ranking(prompt="and a dog?", responses=["a larger pet", "a dog"], ranks=[1, 0])]
    dataset = RankingDataset(rankings, tokenizer, 64, encoder=True)
    assert all(item.prompt_len == 0 for item in dataset.items)
    batch = RankingCollator(tokenizer.pad_token_id)(list(dataset))
    model = build_reward_model(tiny_bert, tokenizer).eval()
    with torch.no_grad():
        bucketed = forward_rewards_shared_prompts(model, batch, buckets=2)
        whole = forward_rewards(model, batch.continuation_ids, batch.continuation_mask)
    assert torch.allclose(bucketed, whole, atol=1e-5)
    assert batch.continuation_ids[0, 0] == tokenizer.cls_token_id


def test_encoder_needs_a_policy_for_normalisation(tiny_bert, tmp_path):
    from align.errors import UserError
    from reward.train import RewardTrainer

    cfg = load_config(RewardConfig, None, [f"model.name_or_path={tiny_bert}", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match="eval.normalize_policy"):
        RewardTrainer(cfg, echo=lambda s: None).setup()
    # the mismatched-prompt term would log 0 and do nothing: an encoder has no shared prompt to swap
    cfg = load_config(RewardConfig, None, [f"model.name_or_path={tiny_bert}", f"output_dir={tmp_path}",
                                           "eval.normalize=false", "train.mismatch_coef=1.0"])
    with pytest.raises(UserError, match="train.mismatch_coef needs a causal-LM reward model"):
        RewardTrainer(cfg, echo=lambda s: None).setup()


@pytest.mark.parametrize("lora", [False, True])
def test_encoder_trains_normalises_on_the_policy_and_drives_ppo(tiny_bert, tiny_random_model, tmp_path, lora):
    from align.commands.export import export_run
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo
    from reward.model import load_reward_model
    from reward.train import RewardTrainer

    cfg = bert_config(tiny_bert, tiny_random_model, tmp_path / "rm", f"lora.enabled={str(lora).lower()}")
    trainer = RewardTrainer(cfg, echo=lambda s: None)
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert any("classifier" in n for n in changed)
    assert any("encoder.layer.0." in n for n in changed)  # the adapter or the weights of the lowest block
    summary = trainer.finish()
    assert summary["reward/normalization_samples"] == 4 and summary["eval/num_pairs"] > 0

    rm = load_reward_model(tmp_path / "rm")
    prompts, responses = ["what is a cat?"] * 2, ["a small animal", "no idea"]
    assert torch.allclose(rm.score(prompts, responses), rm.score(prompts[::-1], responses[::-1]).flip(0), atol=1e-5)
    exported = export_run(tmp_path / "rm", tmp_path / "export", merge=True)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(exported).config.model_type == "bert"

    ppo = load_config(PPOConfig, None, [
        f"policy_model={tiny_random_model}", f"reward_model={tmp_path / 'rm'}", f"output_dir={tmp_path / 'ppo'}",
        "num_prompts=8", "num_eval_prompts=4", "num_iterations=1", "batch_size=4", "num_mini_batches=2",
        "num_ppo_epochs=1", "response_length=6", "save_every=0", "progress=false", "num_threads=1"])
    summary = run_ppo(ppo)
    assert summary["iteration"] == 1


@pytest.mark.parametrize("family", ["roberta", "deberta-v2", "modernbert"])
def test_other_encoder_families_train_and_load_back(family, tmp_path):
    from reward.model import load_reward_model
    from reward.train import RewardTrainer
    from tests.families.builders import build_tiny_bert

    encoder = build_tiny_bert(tmp_path / "model", family=family)
    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={encoder}", f"output_dir={tmp_path / 'rm'}", "model.max_length=64", "data.num_rankings=16",
        "data.num_eval_rankings=8", "train.batch_size=8", "train.learning_rate=1e-2", "train.num_threads=1",
        "eval.normalize=false", "lora.enabled=true", "lora.r=2"])
    trainer = RewardTrainer(cfg, echo=lambda s: None)
    trainer.setup()
    head = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "modules_to_save" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any("classifier" in n and n.endswith("weight") and not torch.equal(p, after[n]) for n, p in head.items())
    trainer.finish()
    rm = load_reward_model(tmp_path / "rm")
    assert rm.model.config.model_type == family and torch.isfinite(rm.score(["hi"], ["hello"])).all()


def test_encoder_scores_a_text_the_same_alone_and_batched_with_a_longer_one(tiny_bert):
    # the head reads [CLS] at the first position and BERT's positions count from the first column:
    # the shorter text must be padded on the right
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model, score_texts

    tokenizer = load_tokenizer(tiny_bert, encoder=True)
    model = build_reward_model(tiny_bert, tokenizer, seed=0)
    texts = ["a cat", "what is a cat? it is a small animal that many people keep at home as a pet, and it purrs"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[1] > lengths[0] + 10  # the precondition: the short text is mostly padding in the batch
    batched = score_texts(model, tokenizer, texts, max_length=64)
    alone = torch.cat([score_texts(model, tokenizer, [t], max_length=64) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
