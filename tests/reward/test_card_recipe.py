"""An exported reward model's card shows how plain transformers scores with it: its code, run as written,
gives align's own normalised scores, for every way a reward model reads a (prompt, response)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

PROMPTS = ["what is a cat?", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                              {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "and a dog?"}]]
RESPONSES = ["a small animal that purrs", " a larger pet that barks"]


def card_scores(export: Path) -> list[float]:
    """The card's loading code run as a user would paste it, DIR the exported folder."""
    card = (export / "README.md").read_text(encoding="utf-8")
    code = re.search(r"Loading:\n\n```python\n(.*?)```", card, re.S).group(1)
    assert "reward.model" not in code.replace("reward.model.load_reward_model(DIR)", "")  # transformers alone
    namespace: dict = {"DIR": str(export)}
    exec(code, namespace)  # noqa: S102 - the card's own code
    return [namespace["reward"](p, r) for p, r in zip(PROMPTS, RESPONSES)]


def align_scores(export: Path) -> Any:
    """align's normalised scores, to within what batching moves a raw score (1e-5) times the gain."""
    from reward.model import load_reward_model

    model = load_reward_model(export, device="cpu")
    return pytest.approx(model.score(PROMPTS, RESPONSES).tolist(), abs=1e-5 * abs(model.gain) + 1e-6)


def exported(run: Path, out: Path) -> Path:
    from align.commands.export import export_run

    return export_run(run, out, echo=lambda _: None)


def without_chat_template(model_dir: Path, out: Path) -> Path:
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("template", [True, False], ids=["chat template", "plain dialogue"])
def test_an_align_reward_model_reads_as_the_card_says(random_reward_model, tmp_path, template):
    from reward.model import find_model_dir

    run = find_model_dir(random_reward_model) if template else without_chat_template(
        find_model_dir(random_reward_model), tmp_path / "no-template")
    export = exported(run, tmp_path / "export")
    assert card_scores(export) == align_scores(export)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_encoder_reward_model_reads_as_the_card_says(tmp_path, dtype):
    import torch
    from transformers import AutoModelForSequenceClassification

    from align.modeling import load_tokenizer
    from reward.model import configure_padding, save_reward_model
    from tests.families.builders import build_tiny_bert

    base = build_tiny_bert(tmp_path / "bert")
    tokenizer = load_tokenizer(base, encoder=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    configure_padding(model, tokenizer)
    model.to(getattr(torch, dtype))  # as a bf16 base's is saved: the card's code still scores in fp32, as align does
    run = save_reward_model(model, tokenizer, tmp_path / "rm", gain=2.0, bias=0.5, info={})
    export = exported(run, tmp_path / "export")
    assert card_scores(export) == align_scores(export)


@pytest.mark.parametrize("rendering", ["conversation", "text_pair"])
def test_an_imported_reward_model_reads_as_the_card_says(rendering, tiny_random_model, rankings_file, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward.external import import_reward_model
    from tests.reward.test_import_text_pair import pair_encoder

    if rendering == "text_pair":
        source = pair_encoder("bert", tmp_path / "outside")
    else:  # as TRL's reward trainer leaves one: pad == eos
        source = tmp_path / "outside"
        tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
        tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1)
        model.config.pad_token_id = tokenizer.eos_token_id
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    import_reward_model(source, policy=str(tiny_random_model), data=rankings_file, format="kwise", out=tmp_path / "rm",
                        prompts=4, response_length=4, rendering=rendering, echo=lambda _: None)
    export = exported(tmp_path / "rm", tmp_path / "export")
    assert card_scores(export) == align_scores(export)
