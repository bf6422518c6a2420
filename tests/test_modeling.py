"""Loading checkpoints: adapters stacked on adapters merge level by level."""

from __future__ import annotations

import json

import pytest
import torch

from align.errors import UserError
from align.modeling import load_causal_lm, load_tokenizer
from tests.adapters import merged_by_hand, save_random_adapter

IDS = torch.tensor([[1, 5, 9, 12, 40, 7]])


def test_an_adapter_on_an_adapter_is_merged_with_both(tiny_random_model, tmp_path):
    tokenizer = load_tokenizer(tiny_random_model)
    first = save_random_adapter(tiny_random_model, tmp_path / "a1", tokenizer, seed=1)
    second = save_random_adapter(first, tmp_path / "a2", tokenizer, seed=2)
    model = load_causal_lm(second, tokenizer=load_tokenizer(second))
    assert not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(IDS).logits
        both = merged_by_hand(tiny_random_model, [first, second], tokenizer)(IDS).logits
        second_only = merged_by_hand(tiny_random_model, [second], tokenizer)(IDS).logits
    assert (both - second_only).abs().max() > 1e-2  # the first adapter matters to the result
    torch.testing.assert_close(got, both, atol=1e-5, rtol=1e-5)


def test_adapters_whose_bases_form_a_loop_are_refused(tiny_random_model, tmp_path):
    tokenizer = load_tokenizer(tiny_random_model)
    first = save_random_adapter(tiny_random_model, tmp_path / "a1", tokenizer, seed=1)
    second = save_random_adapter(first, tmp_path / "a2", tokenizer, seed=2)
    config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(second)}))
    with pytest.raises(UserError, match="chain comes back to"):
        load_causal_lm(second, tokenizer=tokenizer)


def test_an_adapter_saved_without_a_tokenizer_reads_the_first_one_down_its_bases(tiny_random_model, tmp_path):
    tokenizer = load_tokenizer(tiny_random_model)
    first = save_random_adapter(tiny_random_model, tmp_path / "a1", tokenizer, seed=1)
    second = save_random_adapter(first, tmp_path / "a2", tokenizer, seed=2)
    for level in (first, second):
        for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
            (level / name).unlink(missing_ok=True)
    assert load_tokenizer(second).get_vocab() == tokenizer.get_vocab()


@pytest.fixture
def untied_model(tiny_random_model, tmp_path):
    """The tiny model with an output layer of its own (not tied to the embeddings), as most
    checkpoints of 1B parameters and more are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_random_model)
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, config=config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "untied")
    load_tokenizer(tiny_random_model).save_pretrained(tmp_path / "untied")
    return tmp_path / "untied"


def test_a_checkpoint_without_an_lm_head_is_refused_as_a_causal_lm(untied_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    reward = AutoModelForSequenceClassification.from_pretrained(untied_model, num_labels=1)
    reward.save_pretrained(tmp_path / "reward")
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    del config["architectures"]  # nothing but its weights says what it is
    (tmp_path / "reward" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"reward.*not a causal LM checkpoint, it has no weights for lm_head\.weight"):
        load_causal_lm(tmp_path / "reward")


def test_tied_and_untied_causal_lms_load_with_their_own_output_layer(tiny_random_model, untied_model):
    from safetensors.torch import load_file

    untied = load_causal_lm(untied_model)
    saved = load_file(untied_model / "model.safetensors")
    assert torch.equal(untied.lm_head.weight, saved["lm_head.weight"])
    tied = load_causal_lm(tiny_random_model)
    assert "lm_head.weight" not in load_file(tiny_random_model / "model.safetensors")
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


def test_encoders_are_told_from_causal_lms_by_their_config():
    from transformers import BertConfig, DebertaV2Config, GPT2Config, LlamaConfig, ModernBertConfig, Qwen2Config, RobertaConfig

    from align.modeling import is_encoder

    assert all(is_encoder(c()) for c in (BertConfig, RobertaConfig, DebertaV2Config, ModernBertConfig))
    assert not any(is_encoder(c()) for c in (LlamaConfig, GPT2Config, Qwen2Config))


def test_an_adapters_relative_base_is_found_beside_it_whatever_the_working_directory(tiny_random_model, tmp_path,
                                                                                     monkeypatch):
    # an adapter moved with its base ("../base" in adapter_config.json) loads from any folder; a base found
    # nowhere is named with the adapter_config.json it came from
    import shutil

    from align.modeling import adapter_base_path

    tokenizer = load_tokenizer(tiny_random_model)
    shutil.copytree(tiny_random_model, tmp_path / "moved" / "base")
    adapter = save_random_adapter(tmp_path / "moved" / "base", tmp_path / "moved" / "adapter", tokenizer, seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert adapter_base_path(adapter).resolve() == (tmp_path / "moved" / "base").resolve()
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../nowhere"}))
    with pytest.raises(UserError, match=rf"^{adapter / 'adapter_config.json'}: base_model_name_or_path: model not found"):
        adapter_base_path(adapter)


def test_a_reward_model_given_as_the_policy_is_refused(tiny_random_model, random_reward_model, tmp_path):
    # tied embeddings: no weight is missing, the reward model would load as a causal LM of its own weights
    with pytest.raises(UserError, match=r"a reward model \(sequence classification\), not a causal LM; give the SFT"):
        load_causal_lm(random_reward_model)
    adapter = save_random_adapter(tiny_random_model, tmp_path / "reward-lora", load_tokenizer(tiny_random_model), seed=0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(UserError, match=r"reward-lora: a reward model"):
        load_causal_lm(adapter)


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "broken config", "broken tokenizer"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tiny_random_model, tmp_path, damage):
    import shutil

    from reward.model import build_reward_model

    copy = tmp_path / "sft"
    shutil.copytree(tiny_random_model, copy)
    weights = copy / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
        expected = r"sft: damaged or truncated weights \("
    elif damage == "no weights":
        weights.unlink()
        expected = r"sft: no model weights"
    else:
        broken = copy / ("config.json" if damage == "broken config" else "tokenizer.json")
        broken.write_text(broken.read_text()[:50])
        expected = rf"{broken.name}: damaged \(not valid JSON\)"
    with pytest.raises(UserError, match=expected):
        load_causal_lm(copy, tokenizer=load_tokenizer(tiny_random_model))
    with pytest.raises(UserError, match=expected):
        build_reward_model(copy, load_tokenizer(tiny_random_model))
    if damage == "broken tokenizer":
        with pytest.raises(UserError, match=expected):
            load_tokenizer(copy)


@pytest.mark.parametrize("damage,expected", [
    ("no tokenizer.json", r"sft: cannot be loaded \(no tokenizer.json: Couldn't instantiate the backend tokenizer"),
    ("a tokenizer.json of its version alone", r"sft: cannot be loaded \(its files lack 'added_tokens'"),
    ("an empty config", r"sft: cannot be loaded \(Unrecognized model in .*Should have a `model_type` key"),
    ("an unknown model type", r"sft: cannot be loaded \(The checkpoint you are trying to load has model type "
                              r"`nosuchmodel` but Transformers does not recognize this architecture\."),
    ("a config that is a list", r"sft/config.json: damaged \(not a JSON object\)$"),
])
def test_a_checkpoint_transformers_cannot_read_is_one_line_saying_what_is_wrong(tiny_random_model, tmp_path, damage,
                                                                                expected):
    import shutil

    from reward.model import build_reward_model

    copy = tmp_path / "sft"
    shutil.copytree(tiny_random_model, copy)
    config = json.loads((copy / "config.json").read_text())
    if damage == "no tokenizer.json":
        (copy / "tokenizer.json").unlink()
    elif damage == "a tokenizer.json of its version alone":
        (copy / "tokenizer.json").write_text('{"version": "1.0"}')
    else:
        damaged = {"an empty config": {}, "an unknown model type": {**config, "model_type": "nosuchmodel"},
                   "a config that is a list": [1, 2]}[damage]
        (copy / "config.json").write_text(json.dumps(damaged))
    files = {p.name: p.read_bytes() for p in copy.iterdir()}
    loads = [load_tokenizer] if "tokenizer" in damage else [
        lambda path: load_causal_lm(path, tokenizer=load_tokenizer(tiny_random_model)),
        lambda path: build_reward_model(path, load_tokenizer(tiny_random_model))]
    for load in loads:
        with pytest.raises(UserError, match=expected):
            load(copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == files  # read, never changed


def test_a_checkpoint_defined_by_its_own_code_is_one_line_and_never_a_question(tiny_random_model, tmp_path,
                                                                                 monkeypatch):
    import shutil
    import sys

    from reward.model import build_reward_model

    class Terminal:  # transformers asks "Do you wish to run the custom code?" where stdin is a terminal
        def isatty(self):
            return True

        def readline(self):
            raise AssertionError("asked on the terminal")

    monkeypatch.setattr(sys, "stdin", Terminal())
    custom, tokenizer_code = tmp_path / "custom", tmp_path / "tokenizer-code"
    for folder in (custom, tokenizer_code):
        shutil.copytree(tiny_random_model, folder)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({
        **config, "model_type": "custom_llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                             "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (custom / "configuration_custom.py").write_text("raise SystemExit('ran the checkpoint's code')\n")
    tokenizer_config = json.loads((tokenizer_code / "tokenizer_config.json").read_text())
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps({
        **tokenizer_config, "tokenizer_class": "CustomTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}}))
    architecture = (r"custom: its architecture \('custom_llama'\) is defined only by the Python code it names "
                    r"\(configuration_custom.py, modeling_custom.py\), and align does not run a checkpoint's own code")
    for load in (lambda path: load_causal_lm(path, tokenizer=load_tokenizer(tiny_random_model)),
                 lambda path: build_reward_model(path, load_tokenizer(tiny_random_model))):
        with pytest.raises(UserError, match=architecture):
            load(custom)
    with pytest.raises(UserError, match=r"tokenizer-code: its tokenizer \('CustomTokenizer'\) is defined only by "
                                        r"the Python code it names \(tokenization_custom.py\)"):
        load_tokenizer(tokenizer_code)
    # an older tokenizer_config.json's auto_map is the list itself; without a class the code is still its own
    without_class = {k: v for k, v in tokenizer_config.items() if k != "tokenizer_class"}
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps({
        **without_class, "auto_map": ["org/Repo--tokenization_other.OtherTokenizer", None]}))
    with pytest.raises(UserError, match=r"tokenizer-code: its tokenizer is defined only by the Python code it names "
                                        r"\(tokenization_other.py\)"):
        load_tokenizer(tokenizer_code)
    # transformers reads a tokenizer's AutoTokenizer entry alone: a processor's code is not the tokenizer's
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps({
        **without_class, "auto_map": {"AutoProcessor": "processing_custom.CustomProcessor"}}))
    assert load_tokenizer(tokenizer_code).eos_token is not None
    # an auto_map beside an architecture transformers ships (Phi-3's checkpoints keep one): its own classes load
    native = tmp_path / "native"
    shutil.copytree(tiny_random_model, native)
    (native / "config.json").write_text(json.dumps({**json.loads((native / "config.json").read_text()),
                                                    "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    (native / "configuration_custom.py").write_text("raise SystemExit('ran the checkpoint's code')\n")
    assert type(load_causal_lm(native, tokenizer=load_tokenizer(native))).__name__ == "LlamaForCausalLM"


def test_the_backward_through_a_prompts_repeated_cache_rows_is_the_same_every_time():
    # each prompt's K responses read its cache rows: on the CPU the gradients added into one row came
    # in the order the threads arrived, so no two runs of a reward or DPO stage were alike
    import torch
    from transformers import DynamicCache

    from align.forward import prompt_cache_rows

    torch.set_num_threads(2)  # (the suite's fixture restores the count)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(16, 4, 23, 32, generator=generator)  # the demo's shape: 47k elements a layer
    rows = torch.arange(4).repeat(5)[torch.randperm(20, generator=generator)]  # each row read 5 times, apart
    weights = torch.randn(20, 4, 23, 32, generator=generator)
    grads = set()
    for _ in range(100):
        leaf = keys.clone().requires_grad_()
        cache = prompt_cache_rows(DynamicCache([(leaf, leaf * 1.0)]), rows)
        (cache.layers[0].keys * weights).sum().backward()
        grads.add(leaf.grad.numpy().tobytes())
    assert len(grads) == 1


def sft_adapter_with_chat_tokens(tmp_path):
    """What TRL's setup_chat_format leaves: a LoRA adapter on a base whose tokenizer has no pad token, with
    two chat tokens added and the resized embeddings and output layer saved whole in the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.families.builders import build_family_model

    base = build_family_model("llama", tmp_path / "base", pad=False, chat_template=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    with torch.no_grad():  # the chat tokens' rows as an SFT would have trained them
        model.get_input_embeddings().weight[-2:].normal_(0, 1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "sft", save_embedding_layers=True)
    tokenizer.save_pretrained(tmp_path / "sft")
    return base, tmp_path / "sft", len(tokenizer)


def test_an_adapter_that_grew_the_embeddings_loads_on_a_padless_base_then_gets_its_pad(tmp_path):
    # load_tokenizer adds <pad>: the base was grown to len(tokenizer) before the adapter, whose saved
    # embeddings are one row short of it, loaded (a size-mismatch traceback)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, chat_vocab = sft_adapter_with_chat_tokens(tmp_path)
    tokenizer = load_tokenizer(adapter)
    assert len(tokenizer) == chat_vocab + 1 and tokenizer.pad_token_id == chat_vocab  # the added <pad>
    model = load_causal_lm(adapter, tokenizer=tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    expected = AutoModelForCausalLM.from_pretrained(base)
    expected.resize_token_embeddings(chat_vocab)
    expected = PeftModel.from_pretrained(expected, adapter).merge_and_unload().eval()
    ids = torch.tensor([[1, 5, 9, chat_vocab - 2, 40, chat_vocab - 1]])  # the chat tokens' trained rows read
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :chat_vocab], expected(ids).logits, atol=1e-5, rtol=1e-5)
