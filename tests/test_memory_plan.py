"""The memory plan: its parameter counts against built models, its activation term against the tensors
autograd actually saves, its FSDP and checkpointing terms, and the command's handling of bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from align.errors import UserError
from align.memory_plan import (
    LINEARS,
    PRESETS,
    PlanSettings,
    block_activation_bytes,
    block_parameters,
    causal_lm_parameters,
    embedding_parameters,
    forward_working_bytes,
    load_shape,
    lora_parameters,
    plan,
    reward_model_parameters,
)

FAMILY_OF = {"qwen2.5": ("Qwen2Config", "qwen2"), "llama-3.1": ("LlamaConfig", "llama")}


def small_config(preset: str, layers: int = 2, head_dim: int = 8):
    """A transformers config of the preset's family with its head counts, tying and biases, shrunk."""
    import transformers

    shape = PRESETS[preset]
    class_name, _ = FAMILY_OF[preset.rsplit("-", 1)[0]]
    hidden = shape.num_heads * head_dim
    return getattr(transformers, class_name)(
        vocab_size=500, hidden_size=hidden, intermediate_size=3 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=256)


def write_config(config, tmp_path) -> str:
    config.save_pretrained(tmp_path)
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_equal_the_built_models(preset, tmp_path):
    import transformers

    config = small_config(preset)
    shape = load_shape(write_config(config, tmp_path))
    assert (shape.num_heads, shape.num_kv_heads, shape.tie_embeddings) == (
        PRESETS[preset].num_heads, PRESETS[preset].num_kv_heads, PRESETS[preset].tie_embeddings)
    causal = transformers.AutoModelForCausalLM.from_config(config)
    assert causal_lm_parameters(shape) == sum(p.numel() for p in causal.parameters())
    config.num_labels = 1
    reward = transformers.AutoModelForSequenceClassification.from_config(config)
    assert reward_model_parameters(shape) == sum(p.numel() for p in reward.parameters())


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["o_proj", "down_proj"]])
def test_lora_count_equals_peft(targets, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    from align.memory_plan import lora_targets

    config = small_config("qwen2.5-7b")
    shape = load_shape(write_config(config, tmp_path))
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules=list(lora_targets(targets))))
    assert lora_parameters(shape, 4, lora_targets(targets)) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_bytes_per_token(model, tokens_shape, vocab) -> float:
    """Bytes of the tensors autograd saves in a forward (parameters excluded, each storage once)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, vocab, tokens_shape, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model.model.model(input_ids=ids, use_cache=False)
    return sum(seen.values()) / ids.numel()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_block_activations_match_what_autograd_saves(dtype, tmp_path):
    """One block's saved tensors = the model with 3 blocks minus the model with 2, under LoRA on every linear."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    per_token = []
    for layers in (2, 3):
        config = small_config("qwen2.5-0.5b", layers=layers, head_dim=16)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(LINEARS)))  # the adapter in fp32
        per_token.append(saved_bytes_per_token(model, (2, 64), config.vocab_size))
    shape = load_shape(write_config(small_config("qwen2.5-0.5b", head_dim=16), tmp_path))
    width = 2 if dtype == "bfloat16" else 4
    planned = block_activation_bytes(shape, stream_bytes=width, input_copy_bytes=4 if width == 2 else None,
                                     trained=LINEARS, lora_rank=8)
    assert planned == pytest.approx(per_token[1] - per_token[0], rel=0.01)


def test_fsdp_halves_the_sharded_terms_and_checkpointing_lowers_activations():
    shape = PRESETS["llama-3.1-8b"]
    one, two = (plan(shape, PlanSettings(stage="ppo", fsdp_ranks=n)) for n in (1, 2))
    assert two.term("base weights (frozen)") == one.term("base weights (frozen)") // 2
    assert two.term("reward model") == one.term("reward model") // 2
    assert two.term("FSDP gathered blocks + root unit") > 0 == one.term("FSDP gathered blocks + root unit")
    for stage in ("ppo", "ppo-critic", "rloo", "reward", "dpo"):
        off = plan(shape, PlanSettings(stage=stage))
        on = plan(shape, dataclasses.replace(off.settings, gradient_checkpointing=True))
        assert on.term("activations") < off.term("activations")
        assert on.total < off.total


def test_fsdp_gathers_the_root_unit_with_an_untied_output_layer_and_the_reward_model_too():
    # align.distributed.shard: 1 + prefetch blocks, and the root unit of embedding, final norm and the output
    # layer (untied in Llama-3.1, tied in Qwen2.5-0.5B) with the value head; the reward model is sharded alike
    for name, untied in (("llama-3.1-8b", True), ("qwen2.5-0.5b", False)):
        shape = PRESETS[name]
        assert shape.tie_embeddings is not untied
        root = embedding_parameters(shape) * (2 if untied else 1) + shape.hidden_size + (shape.hidden_size + 1)
        expected = (2 * block_parameters(shape) + root) * 2  # bf16
        assert plan(shape, PlanSettings(stage="ppo", fsdp_ranks=2)).term("FSDP gathered blocks + root unit") == expected
    shape = PRESETS["llama-3.1-8b"]
    reward = plan(shape, PlanSettings(stage="reward", fsdp_ranks=8)).term("FSDP gathered blocks + root unit")
    assert reward == (2 * block_parameters(shape) + embedding_parameters(shape) + 2 * shape.hidden_size) * 2


def test_fsdp_counts_a_critics_root_unit_and_the_reward_models_gathered_units_while_it_scores():
    # the critic is sharded inside the policy's module: its embedding, norm and score head (fp32, trained
    # whole) join the policy's root unit; the reward model gathers its units only while it scores
    shape = PRESETS["llama-3.1-8b"]
    head, critic = (plan(shape, PlanSettings(stage=s, fsdp_ranks=8)) for s in ("ppo", "ppo-critic"))
    value_head = shape.hidden_size + 1
    assert (critic.term("FSDP gathered blocks + root unit") - head.term("FSDP gathered blocks + root unit")
            == (embedding_parameters(shape) + 2 * shape.hidden_size) * 4 - value_head * 2)
    assert critic.term("critic's gathered blocks beyond the policy's") == 2 * block_parameters(shape) * (4 - 2)
    # the reward model scores a minibatch (4 rows of 512 + 512 tokens) at a time, as the policy's forwards
    # do; small log-prob chunks make its forward the larger of the no-grad forwards
    eight = plan(shape, PlanSettings(stage="ppo", fsdp_ranks=8, logprob_chunk_tokens=64))
    scoring = (2 * block_parameters(shape) + embedding_parameters(shape) + 2 * shape.hidden_size) * 2
    assert eight.phase_bytes("forwards") == forward_working_bytes(shape, 4 * 1024, 2) + scoring


def test_a_config_without_tie_word_embeddings_is_untied_as_transformers_reads_it(tmp_path):
    config = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 2,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    shape = load_shape(str(path))
    assert not shape.tie_embeddings
    assert causal_lm_parameters(shape) == 2 * embedding_parameters(shape) + 2 * block_parameters(shape) + 896


def test_sharded_dpo_reads_each_response_whole():
    # one process reads each ranking's prompt once and continues it K times; FSDP2 reads each response
    # whole after its prompt (dpo.model.PolicyLogprobs): 4 rankings of 4 responses cost what 16 of one do
    shape = PRESETS["llama-3.1-8b"]

    def activations(ranks: int, rankings: int, k: int) -> int:
        return plan(shape, PlanSettings(stage="dpo", fsdp_ranks=ranks, micro_batch=rankings,
                                        responses_per_prompt=k)).term("activations")

    assert activations(8, 4, 4) == activations(8, 16, 1)
    assert activations(1, 4, 4) < activations(1, 16, 1)
    one, eight = (plan(shape, PlanSettings(stage="dpo", fsdp_ranks=n)) for n in (1, 8))
    assert eight.term("base weights (frozen)") == one.term("base weights (frozen)") // 8
    assert eight.term("FSDP gathered blocks + root unit") > 0


def test_a_critic_holds_a_trained_copy_of_the_reward_model():
    shape = PRESETS["qwen2.5-1.5b"]
    head, critic = (plan(shape, PlanSettings(stage=s)) for s in ("ppo", "ppo-critic"))
    extra = critic.total - head.total
    assert extra >= 16 * reward_model_parameters(shape)  # fp32 weights, grads and two AdamW moments


@pytest.mark.parametrize(("settings", "message"), [
    ({"stage": "sft"}, "stage 'sft'"),
    ({"micro_batch": 0}, "micro-batch must be at least 1"),
    ({"dtype": "float16"}, "dtype 'float16'"),
    ({"lora_targets": ("lm_head",)}, "['lm_head'] are not linear layers"),
])
def test_settings_refuse_nonsense(settings, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PlanSettings(**settings)


def run_align(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", "memory-plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_command_prints_the_breakdown_of_a_config(tmp_path):
    out = run_align(write_config(small_config("llama-3.1-8b"), tmp_path), "--stage", "ppo-critic")
    assert out.returncode == 0, out.stderr
    assert "critic: weights + grads + AdamW (fp32)" in out.stdout and "total" in out.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["/no/such/config.json"], "is neither a preset"),
    (["Qwen9-1T"], "is neither a preset"),
    (["Qwen2.5-7B", "--micro-batch", "-3"], "micro-batch must be at least 1"),
    (["Qwen2.5-7B", "--checkpointing", "sometimes"], "--checkpointing must be off, on or both"),
    (["Qwen2.5-7B", "--stage", "sft"], "stage 'sft'"),
    (["Qwen2.5-7B", "--card-gib", "0"], "--card-gib must be a positive number"),
    (["Qwen2.5-7B", "--card-gib", "nan"], "--card-gib must be a positive number"),
    (["BADJSON"], "not a readable JSON config"),
    (["BERT"], "model_type 'bert' is not planned"),
    (["SIZE", "num_attention_heads", 0], "num_attention_heads must be a whole number from 1 to 2**31, got 0"),
    (["SIZE", "num_key_value_heads", -2], "num_key_value_heads must be a whole number"),
    (["SIZE", "hidden_size", 1e300], "hidden_size must be a whole number"),
    (["SIZE", "text_config", "abc"], "the model's config is not an object of settings"),
])
def test_command_refuses_bad_input_in_one_line(args, expected, tmp_path, capsys):
    if args[0] == "SIZE":  # a valid llama config with one value spoilt
        config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 200, "num_hidden_layers": 2,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 500, args[1]: args[2]}
        (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        args = [str(tmp_path / "config.json")]
    elif args == ["BADJSON"]:
        (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
        args = [str(tmp_path)]
    elif args == ["BERT"]:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}), encoding="utf-8")
        args = [str(tmp_path / "config.json")]
    # in this process, through the command's own entry point (a process of its own: the test above and below)
    from align.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["memory-plan", *map(str, args)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_process_refusing_bad_input_prints_one_line():
    out = run_align("Qwen2.5-7B", "--micro-batch", "-3")
    assert out.returncode == 2 and "micro-batch must be at least 1" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
