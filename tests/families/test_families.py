"""Every causal-LM family through every stage with the default settings (LoRA on `all-linear`):
reward training with adapters on every linear layer of every block, train_layers, a saved reward
model that loads back, one PPO iteration in both value modes, the export of the policy, and the
rollout's cached decoding against the full forward."""

from __future__ import annotations

import pytest
import torch

from align.config import load_config
from reward.config import RewardConfig
from tests.families.builders import FAMILIES

FAMILY_NAMES = sorted(FAMILIES)


def reward_config(model, out, *overrides):
    return load_config(RewardConfig, None, [
        f"model.name_or_path={model}", f"output_dir={out}", "model.max_length=96", "data.num_rankings=16",
        "data.num_eval_rankings=8", "train.batch_size=8", "train.max_steps=2", "train.learning_rate=1e-2",
        "eval.normalize_prompts=4", "eval.normalize_response_length=8", "train.num_threads=1", *overrides])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_reward_lora_defaults_cover_every_block_and_train(family, family_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from align.lora import block_linear_layers
    from reward.model import load_reward_model
    from reward.train import RewardTrainer

    trainer = RewardTrainer(reward_config(family_model(family), tmp_path / "run", "lora.enabled=true", "lora.r=2"),
                            echo=lambda s: None)
    trainer.setup()
    model = trainer.model
    adapted = {n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")}
    for block in block_linear_layers(AutoModelForSequenceClassification.from_pretrained(family_model(family))):
        assert block and {f"base_model.model.{n}" for n in block} <= adapted  # every linear layer, every block
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    base = [n for n in before if "lora_" not in n and "modules_to_save" not in n]
    assert all(torch.equal(before[n], after[n]) for n in base), "a base weight moved under LoRA"
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    summary = trainer.finish()  # normalisation samples the family's own causal LM
    # the saved model (adapter merged into the family's base) scores as the trained one did
    from reward.model import render_texts, score_texts

    rm = load_reward_model(tmp_path / "run", device="cpu")
    prompts, responses = ["what is a cat?", "what is a cat?"], ["a small animal", "a larger one"]
    trained = trainer.model.eval()
    expected = score_texts(trained, trainer.tokenizer, render_texts(trainer.tokenizer, prompts, responses),
                           max_length=rm.max_length)
    loaded = rm.score_raw(prompts, responses)
    assert loaded[0] != loaded[1]
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=1e-4)
    assert summary["reward/normalization_samples"] == 4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_train_layers_trains_only_the_top_block_in_full_finetuning(family, family_model, tmp_path):
    from align.modeling import find_blocks
    from reward.train import RewardTrainer

    trainer = RewardTrainer(reward_config(family_model(family), tmp_path / "run", "model.train_layers=1"),
                            echo=lambda s: None)
    trainer.setup()
    prefix, blocks = find_blocks(trainer.model)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    top = f"{prefix}.{len(blocks) - 1}."
    assert any(n.startswith(top) for n in changed) and "score.weight" in changed
    assert not [n for n in changed if n.startswith(prefix) and not n.startswith(top)], "a lower block trained"
    assert not [n for n in changed if "emb" in n or "wte" in n or "wpe" in n], "an embedding trained"


def test_padless_tokenizer_gets_a_new_pad_row(family_model):
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model

    path = family_model("gpt2")
    tokenizer = load_tokenizer(path)
    model = build_reward_model(path, tokenizer)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == model.get_input_embeddings().weight.shape[0] - 1


@pytest.mark.parametrize("targets, message", [
    ("[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "match no linear layer"),  # a Llama list on GPT-2
    ("[c_attn,nonexistent]", r"\['nonexistent'\] match no linear layer"),
])
def test_lora_targets_that_miss_are_an_error_naming_the_linear_layers(family_model, tmp_path, targets, message):
    from align.errors import UserError
    from reward.train import RewardTrainer

    trainer = RewardTrainer(reward_config(family_model("gpt2"), tmp_path / "run", "lora.enabled=true",
                                          f"lora.target_modules={targets}"), echo=lambda s: None)
    with pytest.raises(UserError, match=message) as error:
        trainer.setup()
    assert "c_attn, c_fc, c_proj" in str(error.value)


@pytest.mark.parametrize("family, targets", [("opt", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                             ("phi3", ["o_proj", "down_proj", "q_proj"])])
def test_a_list_matching_only_part_of_the_layers_is_an_error(family, targets, family_model):
    from transformers import AutoModelForCausalLM

    from align.errors import UserError
    from align.lora import resolve_lora_targets

    model = AutoModelForCausalLM.from_pretrained(family_model(family))
    with pytest.raises(UserError, match="match no linear layer"):
        resolve_lora_targets(model, targets)


def test_a_list_leaving_blocks_bare_is_an_error(family_model):
    from transformers import AutoModelForCausalLM

    from align.errors import UserError
    from align.lora import resolve_lora_targets

    model = AutoModelForCausalLM.from_pretrained(family_model("llama"))
    with pytest.raises(UserError, match=r"leave blocks \[0\] without an adapter"):
        resolve_lora_targets(model, ["layers.1.self_attn.q_proj"])
    assert resolve_lora_targets(model, ["q_proj"], layers=[1]) == ["model.layers.1.self_attn.q_proj"]


def test_moe_routed_experts_are_reported(family_model, caplog):
    from transformers import AutoModelForCausalLM

    from align.lora import resolve_lora_targets, routed_expert_parameters

    model = AutoModelForCausalLM.from_pretrained(family_model("qwen3_moe"))
    assert routed_expert_parameters(model) == [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1)
                                               for w in ("gate_up_proj", "down_proj")]
    with caplog.at_level("WARNING", logger="align"):
        targets = resolve_lora_targets(model, ["all-linear"])
    assert "get no adapter" in caplog.text and all("experts" not in t for t in targets)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("value_model", ["policy_trunk", "reward_model"])
def test_ppo_one_iteration_with_default_lora_and_export(family, value_model, family_model, tmp_path):
    from align.commands.export import export_run
    from align.modeling import load_tokenizer
    from ppo.config import PPOConfig
    from ppo.trainer import run_ppo
    from reward.model import build_reward_model, save_reward_model

    policy = family_model(family)
    tokenizer = load_tokenizer(policy)
    reward = save_reward_model(build_reward_model(policy, tokenizer, seed=1), tokenizer, tmp_path / "reward",
                               gain=1.0, bias=0.0, info={})
    cfg = load_config(PPOConfig, None, [
        f"policy_model={policy}", f"reward_model={reward}", f"value_model={value_model}", f"output_dir={tmp_path / 'ppo'}",
        "num_prompts=8", "num_eval_prompts=0", "num_iterations=1", "batch_size=4", "num_mini_batches=2",
        "num_ppo_epochs=1", "response_length=6", "save_every=0", "progress=false", "num_threads=1"])
    run_ppo(cfg)
    exported = export_run(tmp_path / "ppo", tmp_path / "export", merge=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(exported)  # a plain reload, no align code
    ids = AutoTokenizer.from_pretrained(exported)("hello there", return_tensors="pt")["input_ids"]
    assert plain.config.model_type == AutoModelForCausalLM.from_pretrained(policy).config.model_type
    assert torch.isfinite(plain(input_ids=ids).logits).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_decoding_samples_what_the_full_forward_samples(family, family_model, tmp_path):
    # Each family's attention and mask code meets the rollout's own KV cache (ppo.kv_cache): some pass the
    # cache extra arguments and some none (GPT-NeoX), GPT-2 and OPT learn their position embeddings.
    from tests.ppo.decoding import discrepancy_on_prompts, trained_trainer

    found = discrepancy_on_prompts(trained_trainer(family_model(family), tmp_path, "float32", "num_threads=1"))
    assert found.same_tokens and found.rows_ended_early >= 1
    assert found.logprobs <= 1e-5 and found.values <= 1e-5, found


def test_own_chat_template_is_used_and_a_checkpoint_without_one_gets_the_hh_dialogue(family_model):
    from align.chat import render_example
    from align.modeling import load_tokenizer

    with_template = load_tokenizer(family_model("llama"))
    assert render_example(with_template, "hi", "hello") == "<s><|user|>\nhi\n<|assistant|>\nhello</s>"
    without = load_tokenizer(family_model("gpt2"))  # a base checkpoint: no template
    assert render_example(without, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                          "hello") == "\n\nSystem: be brief\n\nHuman: hi\n\nAssistant: hello</s>"


def test_a_head_is_not_a_lora_target(family_model):
    from transformers import AutoModelForCausalLM

    from align.errors import UserError
    from align.lora import resolve_lora_targets

    model = AutoModelForCausalLM.from_pretrained(family_model("llama"))
    with pytest.raises(UserError, match=r"\['lm_head'\] match no linear layer of the transformer blocks"):
        resolve_lora_targets(model, ["q_proj", "lm_head"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dpo_trains_the_adapter_and_its_exported_adapter_loads_as_its_model_card_says(family, family_model, tmp_path):
    # The adapter leaves without align: the model card's loading code on the plain base (grown by the <pad>
    # row align added where the tokenizer had none: GPT-2) gives the logits align's own loading gives.
    from align.commands.export import export_run
    from align.modeling import load_causal_lm, load_tokenizer
    from dpo.config import DPOConfig
    from dpo.train import DPOTrainer

    trainer = DPOTrainer(load_config(DPOConfig, None, [
        f"policy_model={family_model(family)}", f"output_dir={tmp_path / 'dpo'}", "data.num_rankings=8",
        "data.num_eval_rankings=4", "data.k=3", "batch_size=4", "epochs=1", "learning_rate=1e-2",
        "num_eval_prompts=0", "progress=false", "num_threads=1"]), echo=lambda _: None)
    trainer.setup()
    before = snapshot(trainer.policy)
    trainer.train()
    trainer.finish()
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), "DPO moved a base weight, or nothing"

    out = export_run(tmp_path / "dpo", tmp_path / "adapter", merge=False)
    card = (out / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    scope = {"DIR": str(out)}
    exec(code, scope)  # the card's own lines: plain transformers and peft
    model, tokenizer = scope["model"].eval(), scope["tokenizer"]
    batch = tokenizer(["hello there, how are you", "hi"], return_tensors="pt", padding=True)
    ours = load_causal_lm(out, tokenizer=load_tokenizer(out)).eval()
    with torch.no_grad():
        theirs_logits, ours_logits = (m(**batch).logits for m in (model, ours))
    real = batch["attention_mask"].bool()
    vocab = min(theirs_logits.shape[-1], ours_logits.shape[-1])
    torch.testing.assert_close(theirs_logits[real][:, :vocab], ours_logits[real][:, :vocab], atol=1e-4, rtol=1e-4)
