"""Families whose forward changes the logits after the output layer (Gemma 2's soft cap, Granite's
and Cohere's scaling): every stage reads logits from the trunk's states through
align.forward.OutputHead, which must give the checkpoint's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.families.builders import build_family_model

# family -> (config class, its sizes and the setting that changes the logits, as the published checkpoints ship it)
TRANSFORMING = {
    "gemma2": ("Gemma2Config", {"head_dim": 16, "final_logit_softcapping": 30.0}),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625}),
}


@pytest.fixture(scope="module", params=sorted(TRANSFORMING))
def transforming_model(request, tmp_path_factory):
    from tests.families import builders

    builders.FAMILIES.setdefault(request.param, TRANSFORMING[request.param])
    return request.param, build_family_model(request.param, tmp_path_factory.mktemp(request.param) / "model")


def test_ppo_and_dpo_read_the_logits_of_the_checkpoints_forward(transforming_model):
    from align.modeling import load_causal_lm
    from dpo.model import trunk_and_head
    from ppo.model import ActorCritic

    family, path = transforming_model
    model = load_causal_lm(path)  # its check passes: OutputHead reproduces the forward
    with torch.no_grad():  # logits of tens, as a trained model's, where the soft cap bites
        model.get_output_embeddings().weight.mul_(400.0)
    ids = torch.randint(5, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits[:, 2:-1].float(), -1).gather(-1, ids[:, 3:, None])[..., 0]
        body, head = trunk_and_head(model)
        plain = torch.log_softmax(model.get_output_embeddings()(body(input_ids=ids).last_hidden_state)[:, 2:-1], -1)
        assert (plain.gather(-1, ids[:, 3:, None])[..., 0] - expected).abs().max() > 1e-2  # the transform matters
        dpo_logits = head(body(input_ids=ids).last_hidden_state)[:, 2:-1]
        torch.testing.assert_close(torch.log_softmax(dpo_logits, -1).gather(-1, ids[:, 3:, None])[..., 0], expected)
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
        ppo = ActorCritic(policy, value_head=False).policy_logprobs(ids, mask, 3, ids[:, 3:], 1.0)
    torch.testing.assert_close(ppo, expected, atol=1e-5, rtol=1e-5)


def test_a_setting_of_that_name_that_the_forward_ignores_is_ignored_too(tmp_path):
    # MPT's config has a logit_scale (a number or a string) that MptForCausalLM never applies
    from align.forward import OutputHead
    from align.modeling import load_causal_lm
    from tests.families import builders

    builders.FAMILIES.setdefault("mpt", ("MptConfig", {"logit_scale": 0.5, "expansion_ratio": 2}))
    model = load_causal_lm(build_family_model("mpt", tmp_path / "mpt"))  # the check at load passes
    assert OutputHead(model).scale == 1.0


def test_every_family_loaded_without_the_check_is_one_its_forward_is_checked_against_here(tmp_path):
    # align.forward.OUTPUT_HEAD_TESTED skips the check at load: each family in it must pass it here
    import transformers

    from align.forward import OUTPUT_HEAD_TESTED, check_output_head
    from tests.families import builders

    extra = {"mpt": ("MptConfig", {"logit_scale": 0.5, "expansion_ratio": 2})}
    families = {**builders.FAMILIES, **TRANSFORMING, **extra}
    by_type = {getattr(transformers, cls).model_type: name for name, (cls, _) in families.items()}
    assert OUTPUT_HEAD_TESTED <= by_type.keys(), OUTPUT_HEAD_TESTED - by_type.keys()
    for model_type in sorted(OUTPUT_HEAD_TESTED):
        name = by_type[model_type]
        builders.FAMILIES.setdefault(name, families[name])
        path = build_family_model(name, tmp_path / name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        if name in TRANSFORMING:  # logits of tens, where a soft cap bites
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(400.0)
        check_output_head(model, path)


def test_a_forward_that_changes_its_logits_in_an_unknown_way_is_refused(tiny_random_model):
    from align.errors import UserError
    from align.forward import check_output_head
    from align.modeling import load_causal_lm

    model = load_causal_lm(tiny_random_model)
    forward = model.forward
    model.forward = lambda *args, **kwargs: SimpleNamespace(logits=forward(*args, **kwargs).logits * 2.0)
    with pytest.raises(UserError, match="changes its logits after the output layer"):
        check_output_head(model, tiny_random_model)
