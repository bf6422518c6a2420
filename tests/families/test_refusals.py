"""Families align cannot train some way are refused in one line, never trained wrong: a MoE whose MLP
targets PEFT moves to its experts, a family without a sequence-classification head as a reward model."""

from __future__ import annotations

import pytest

from tests.families.builders import build_family_model

DEEPSEEK_V3 = ("DeepseekV3Config", {"kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                    "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                    "moe_intermediate_size": 32, "n_shared_experts": 1, "head_dim": 8})


def test_a_moe_whose_mlp_targets_peft_moves_to_its_experts_is_refused_naming_the_layers(tmp_path):
    # peft maps gate/up/down_proj of DeepSeek-V3 to its routed experts' parameters: the dense first layer's
    # MLP and the shared experts would train without an adapter, and PPO would stop on the experts
    from align.config import LoraOptions
    from align.errors import UserError
    from align.modeling import load_causal_lm
    from ppo.model import build_policy
    from tests.families import builders

    builders.FAMILIES.setdefault("deepseek_v3", DEEPSEEK_V3)
    base = load_causal_lm(build_family_model("deepseek_v3", tmp_path / "ds"))
    with pytest.raises(UserError, match=r"PEFT put no adapter on \d+ of the \d+ layers .*deepseek_v3.*mlp"):
        build_policy(base, LoraOptions())
    attention = LoraOptions(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    policy = build_policy(load_causal_lm(tmp_path / "ds"), attention)  # what it does adapt is taken
    assert any("lora_A" in name for name, _ in policy.named_parameters())


def test_a_family_without_a_sequence_classification_head_is_refused_as_a_reward_model(tmp_path):
    from align.errors import UserError
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model
    from tests.families import builders

    builders.FAMILIES.setdefault("granite", ("GraniteConfig", {"logits_scaling": 8.0}))
    path = build_family_model("granite", tmp_path / "granite")
    with pytest.raises(UserError, match="no sequence-classification head for its model type 'granite'"):
        build_reward_model(path, load_tokenizer(path))


@pytest.mark.parametrize("family, config", [("bloom", {"model_type": "bloom"}),
                                            ("falcon", {"model_type": "falcon", "alibi": True})])
def test_a_family_the_sampler_cannot_decode_is_refused_before_training(family, config):
    # BLOOM and ALiBi Falcon read their position bias off the mask's length: every rollout stopped in transformers
    from types import SimpleNamespace

    from align.errors import UserError
    from ppo.sampling import check_decodable

    with pytest.raises(UserError, match=f"cannot decode a {family} model .*num_eval_prompts=0"):
        check_decodable(SimpleNamespace(**config), "ckpt")
    check_decodable(SimpleNamespace(model_type="falcon", alibi=False), "ckpt")  # rotary Falcon decodes
    check_decodable(SimpleNamespace(model_type="mpt"), "ckpt")  # MPT's ALiBi is built from the cache


def test_targets_peft_refuses_for_the_family_are_one_line(tiny_random_model, monkeypatch):
    # falcon_h1's Mamba mixers: peft refuses their in/out projections with a ValueError
    import peft

    from align.config import LoraOptions
    from align.errors import UserError
    from align.modeling import load_causal_lm
    from ppo.model import build_policy

    def refuses(*_args, **_kwargs):
        raise ValueError("Module 'out_proj' is incompatible with Mamba-based models")

    monkeypatch.setattr(peft, "get_peft_model", refuses)
    with pytest.raises(UserError, match="PEFT refused the targets chosen for this llama model .*out_proj"):
        build_policy(load_causal_lm(tiny_random_model), LoraOptions())


def test_a_router_built_on_nn_linear_is_not_a_linear_layer_to_adapt(tmp_path):
    # Phi-3.5-MoE's router subclasses nn.Linear and returns (weights, experts): an adapter around it made
    # every stage stop inside peft
    import torch

    from align.config import LoraOptions
    from align.lora import resolve_lora_targets
    from align.modeling import load_causal_lm
    from ppo.model import build_policy
    from tests.families import builders

    builders.FAMILIES.setdefault("phimoe", ("PhimoeConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}))
    base = load_causal_lm(build_family_model("phimoe", tmp_path / "phimoe"))
    targets = resolve_lora_targets(base, ["all-linear"])
    assert not any(t.endswith("router") for t in targets) and any(t.endswith("q_proj") for t in targets)
    policy = build_policy(base, LoraOptions())
    with torch.no_grad():
        assert torch.isfinite(policy(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_a_lora_rank_wider_than_a_layer_is_refused_before_its_memory_is_taken(tiny_random_model):
    # lora.r=100000 on a 1M-parameter model grew to 24 GB and was killed without a word
    from align.config import LoraOptions
    from align.errors import UserError
    from align.modeling import load_causal_lm
    from ppo.model import build_policy

    base = load_causal_lm(tiny_random_model)
    width = max(min(m.weight.shape) for name, m in base.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj", "gate_proj",
                                                                                          "up_proj", "down_proj")))
    with pytest.raises(UserError, match=rf"^lora.r={width + 1} is more than any adapted layer can use: .*, {width} "
                                        rf"at the most here \(model\.layers\.\d+\.\w+\.\w+\); choose lora.r <= {width}$"):
        build_policy(base, LoraOptions(r=width + 1))
    assert build_policy(load_causal_lm(tiny_random_model), LoraOptions(r=width)).peft_config["default"].r == width
