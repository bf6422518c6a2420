"""`align reward import --rendering text_pair`: an encoder trained on (question, answer) text pairs, as
OpenAssistant's DeBERTa and ELECTRA reward models are (read there as `model(**tokenizer(question, answer))`),
is read by every stage exactly so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PROMPTS = ["what is a cat?", [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"},
                              {"role": "user", "content": "and a dog?"}], "and a long answer?"]
RESPONSES = ["a small animal that purrs", "a larger pet that barks loudly",
             "it starts well " + "and goes on " * 20 + "and ends badly"]  # past MAX_LENGTH: cut as trained
MAX_LENGTH = 32


def pair_encoder(family: str, out: Path) -> Path:
    """A one-output sequence-classification encoder as a pair-trained reward model is saved: its head
    drawn large enough to tell texts apart, and (where the family has them) segment embeddings that
    differ, so reading a pair without its token types would give other scores."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.families.builders import build_tiny_bert

    base = build_tiny_bert(out.parent / f"{family}-base", family=family)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "classifier" in name or "token_type_embeddings" in name:
                param.normal_(0.0, 1.0)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    (out / "tokenizer_config.json").write_bytes((base / "tokenizer_config.json").read_bytes())
    return out



def direct_scores(source: Path, questions: list[str], answers: list[str], *, with_types: bool = True) -> list[float]:
    """The model card's reading, one pair at a time: model(**tokenizer(question, answer))."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    scores = []
    for q, a in zip(questions, answers):
        enc = tokenizer(q, a, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        if not with_types:
            enc.pop("token_type_ids", None)
        with torch.no_grad():
            scores.append(model(**enc).logits[0, 0].item())
    return scores


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "electra"])
def test_a_pair_trained_encoder_is_read_as_its_pairs(family, tiny_random_model, rankings_file, tmp_path):
    """BERT and ELECTRA read the answer as segment 1; DeBERTa-v2 (as DeBERTa-v3 ships: no segment
    embeddings) reads the pair's tokens alone. Either way, scores equal the direct reading, in one padded batch."""
    from align.commands.export import export_run
    from reward.external import import_reward_model
    from reward.model import load_reward_model
    from reward.run_dir import TEXT_PAIR

    source = pair_encoder(family, tmp_path / "outside")
    lines: list[str] = []
    summary = import_reward_model(source, policy=str(tiny_random_model), data=rankings_file, format="kwise",
                                  out=tmp_path / "rm", prompts=4, response_length=4, batch_size=4,
                                  max_length=MAX_LENGTH, rendering=TEXT_PAIR, echo=lines.append)
    assert "as a text pair ([CLS] question [SEP] response [SEP]" in lines[0]
    assert json.loads((tmp_path / "rm" / "reward_model_info.json").read_text())["rendering"] == TEXT_PAIR
    assert 0.0 <= summary["eval/accuracy"] <= 1.0

    questions = ["what is a cat?", "hello there [SEP] hi! [SEP] and a dog?",  # a conversation's turns by [SEP]
                 "and a long answer?"]
    expected = direct_scores(source, questions, RESPONSES)
    if family != "deberta-v2":  # the precondition: the segments change the scores, so they must be passed
        assert direct_scores(source, questions, RESPONSES, with_types=False) != pytest.approx(expected, abs=1e-3)
    got = load_reward_model(tmp_path / "rm", device="cpu").score_raw(PROMPTS, RESPONSES)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    exported = load_reward_model(export_run(tmp_path / "rm", tmp_path / "export", echo=lambda _: None), device="cpu")
    assert exported.score_raw(PROMPTS, RESPONSES).tolist() == pytest.approx(expected, abs=1e-5)
    assert "`rendering: text_pair`" in (tmp_path / "export" / "README.md").read_text(encoding="utf-8")


def test_the_pair_reading_is_refused_for_a_causal_lm_and_an_unknown_one_is_named(tiny_random_model, rankings_file,
                                                                                 tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.errors import UserError
    from reward.external import import_reward_model

    decoder = tmp_path / "decoder-rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1).save_pretrained(decoder)
    AutoTokenizer.from_pretrained(tiny_random_model).save_pretrained(decoder)
    common = dict(policy=str(tiny_random_model), data=rankings_file, format="kwise", out=tmp_path / "rm",
                  echo=lambda _: None)
    with pytest.raises(UserError, match=f"--rendering text_pair is for an encoder .* {decoder} is a causal LM"):
        import_reward_model(decoder, rendering="text_pair", **common)
    with pytest.raises(UserError, match="--rendering 'pairs' is not one of conversation, text_pair"):
        import_reward_model(decoder, rendering="pairs", **common)
    assert not (tmp_path / "rm").exists()


def test_a_reward_model_with_a_reading_this_align_does_not_know_is_refused(random_reward_model, tmp_path):
    import shutil

    from align.errors import UserError
    from reward.model import find_model_dir, load_reward_model

    copy = tmp_path / "rm"
    shutil.copytree(find_model_dir(random_reward_model), copy)
    info = copy / "reward_model_info.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "rendering": "sideways"}))
    with pytest.raises(UserError, match="its rendering 'sideways' is not one this align reads"):
        load_reward_model(copy, device="cpu")
