"""The plain-dialogue rendering of a checkpoint without a chat template: the bos its tokenizer puts
first, the space that begins the response, and no second end token for an encoder."""

from __future__ import annotations

import pytest

from align.chat import render_example, render_prompt


@pytest.fixture(scope="module")
def base_tokenizer():
    """The demo tokenizer as a base checkpoint ships it: no chat template."""
    from align.demo_model import build_tokenizer

    tokenizer = build_tokenizer(384, 0)
    tokenizer.chat_template = None
    return tokenizer


def adds_bos(tokenizer):
    """The tokenizer made to put its bos first in its own encoding, as Llama and Mistral base do."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return tokenizer


def test_the_bos_a_base_tokenizer_puts_first_begins_the_rendered_prompt(base_tokenizer):
    import copy

    assert not render_prompt(base_tokenizer, "hi").startswith(base_tokenizer.bos_token)  # its encoding has none
    llama_like = adds_bos(copy.deepcopy(base_tokenizer))
    assert llama_like("hi")["input_ids"][0] == llama_like.bos_token_id  # the precondition
    text = render_prompt(llama_like, "hi")
    assert text == f"{llama_like.bos_token}\n\nHuman: hi\n\nAssistant:"
    # every stage tokenizes the rendered text without special tokens: the bos is there once
    ids = llama_like(render_example(llama_like, "hi", "hello"), add_special_tokens=False)["input_ids"]
    assert ids[0] == llama_like.bos_token_id and ids.count(llama_like.bos_token_id) == 1


def test_a_base_tokenizer_that_also_ends_its_encoding_with_the_eos_keeps_the_bos(base_tokenizer):
    # a Llama tokenizer saved with add_eos_token=True (LoRA SFT recipes leave it so): <s> $A </s>
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(base_tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A {tok.eos_token}",
        special_tokens=[(tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)])
    assert tok("hi")["input_ids"][::len(tok("hi")["input_ids"]) - 1] == [tok.bos_token_id, tok.eos_token_id]
    assert render_prompt(tok, "hi") == f"{tok.bos_token}\n\nHuman: hi\n\nAssistant:"
    # an encoder whose separator is its eos adds both ends itself: no bos written in
    tok.sep_token = tok.eos_token
    tok2 = copy.deepcopy(tok)
    assert tok2.sep_token_id == tok2.eos_token_id and not render_prompt(tok2, "hi").startswith(tok2.bos_token)


def test_the_response_follows_assistant_after_a_space_and_the_prompt_stays_a_prefix(base_tokenizer):
    # as in HH-RLHF's "\n\nAssistant: text", where a base model samples the space-led token
    from reward.data import shared_prompt_len

    example = render_example(base_tokenizer, "hi", "hello there")
    assert example == f"\n\nHuman: hi\n\nAssistant: hello there{base_tokenizer.eos_token}"
    assert render_example(base_tokenizer, "hi", " spaced") == f"\n\nHuman: hi\n\nAssistant: spaced{base_tokenizer.eos_token}"
    prompt = base_tokenizer(render_prompt(base_tokenizer, "hi"), add_special_tokens=False)["input_ids"]
    full = base_tokenizer(example, add_special_tokens=False)["input_ids"]
    assert shared_prompt_len(prompt, [full]) == len(prompt)
    response = base_tokenizer.decode(full[len(prompt):], skip_special_tokens=True)
    assert response == " hello there"  # what the policy writes after "Assistant:"


def test_an_encoder_whose_eos_is_its_separator_gets_one_end_token(tmp_path):
    from transformers import AutoTokenizer

    from tests.families.builders import build_tiny_bert

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_bert(tmp_path / "deberta", family="deberta-v2"))
    tokenizer.eos_token = tokenizer.sep_token  # as DeBERTa-v2 ships it (RoBERTa: </s>, its separator too)
    ids = tokenizer(render_example(tokenizer, "hi", "fine thanks"))["input_ids"]
    assert ids[-1] == tokenizer.sep_token_id and ids[-2] != tokenizer.sep_token_id


GEMMA_LIKE_TEMPLATE = (  # Gemma-it's shape: turns closed by <end_of_turn>, the tokenizer's eos another token
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_response_ends_where_the_chat_template_ends_an_assistant_turn(tmp_path):
    # sampling stops at the tokenizer's eos, and the reward model and DPO read the response up to it:
    # for a template whose turns end with another special token, that token is the response's end
    from align.demo_model import build_tokenizer
    from align.modeling import load_tokenizer

    tokenizer = build_tokenizer(384, 0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE_TEMPLATE
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token == "<end_of_turn>" and loaded.eos_token_id == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert render_example(loaded, "hi", "hello").endswith("<start_of_turn>model\nhello<end_of_turn>")
    assert loaded.pad_token_id not in (None, loaded.eos_token_id)
    # a turn end that is only an added token flagged special, as Llama 3 ships <|eot_id|>
    from tokenizers import AddedToken

    llama3 = build_tokenizer(384, 0)
    llama3.add_tokens([AddedToken("<|eot_id|>", special=True)])
    llama3.chat_template = GEMMA_LIKE_TEMPLATE.replace("<end_of_turn>", "<|eot_id|>")
    llama3.save_pretrained(tmp_path / "llama3")
    assert load_tokenizer(tmp_path / "llama3").eos_token == "<|eot_id|>"
    # a template closing the turn with the eos itself (the demo's) leaves the eos as it is
    plain = build_tokenizer(384, 0)
    plain.save_pretrained(tmp_path / "plain")
    assert load_tokenizer(tmp_path / "plain").eos_token == plain.eos_token


def test_a_text_cut_from_the_left_keeps_its_end_and_its_bos():
    # the demo template begins with the bos: a prompt longer than the limit loses its start, not the bos
    import torch

    from align.chat import encode_rendered
    from align.demo_model import build_tokenizer
    from ppo.experience import encode_prompts
    from reward.model import encode

    tokenizer = build_tokenizer(384, 0)
    long, short = "tell me about tea " * 40, "hi"
    whole = tokenizer(render_prompt(tokenizer, long), add_special_tokens=False)["input_ids"]
    assert len(whole) > 32 and whole[0] == tokenizer.bos_token_id  # the precondition
    cut = encode_rendered(tokenizer, [render_prompt(tokenizer, long)], 32)[0]
    assert cut == [tokenizer.bos_token_id, *whole[-31:]]
    ids, mask = encode_prompts(tokenizer, [long, short], 32, "cpu")  # left-padded for the rollout
    assert ids.shape == (2, 32) and ids[0].tolist() == cut and mask[0].all()
    short_ids = tokenizer(render_prompt(tokenizer, short), add_special_tokens=False)["input_ids"]
    assert ids[1, -len(short_ids):].tolist() == short_ids and mask[1].sum() == len(short_ids)
    scored = encode(tokenizer, [render_example(tokenizer, long, "yes")], 32)  # the reward model's input
    assert scored["input_ids"][0, 0] == tokenizer.bos_token_id and torch.equal(scored["attention_mask"][0],
                                                                                torch.ones(32, dtype=torch.long))


def test_a_model_loaded_with_such_a_tokenizer_stops_generating_at_the_turn_end(tmp_path):
    # what an export saves from it: generation_config stops at the turn end and at the checkpoint's own eos
    import transformers

    from align.demo_model import build_tokenizer
    from align.modeling import load_causal_lm, load_tokenizer

    tokenizer = build_tokenizer(384, 0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE_TEMPLATE
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    model = load_causal_lm(tmp_path, tokenizer=loaded)
    assert model.generation_config.eos_token_id == [loaded.eos_token_id, tokenizer.eos_token_id]
    assert loaded.eos_token_id != tokenizer.eos_token_id  # the precondition: the turn end is another token


MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.1's: no system role, and the turns must alternate
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}")


def test_a_chat_template_that_refuses_a_prompt_is_one_line_naming_it_the_file_and_the_line(base_tokenizer, tmp_path):
    import copy
    import json

    from align.errors import UserError
    from align.formats import merge_repeated_responses, read_kwise
    from reward.data import RankingDataset, expand_to_pairs

    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.chat_template, tokenizer.name_or_path = MISTRAL_TEMPLATE, "ckpt/mistral"
    user = [{"role": "user", "content": "q?"}]
    rows = [{"prompt": user, "responses": ["a", "b"], "ranks": [0, 1]},
            {"prompt": [{"role": "system", "content": "be nice"}, *user], "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}]
    data = tmp_path / "k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rankings = read_kwise(data)
    assert len(RankingDataset(rankings[:1], tokenizer, 64)) == 1  # the template renders the other prompt
    expected = (rf"^{data}:2: the chat template of ckpt/mistral cannot render this prompt \(Conversation roles must "
                r"alternate user/assistant/user/assistant/...\)$")
    # as read, and as reward training and DPO pass the rankings on (repeats merged, pairs expanded)
    for given in (rankings, [merge_repeated_responses(r) for r in rankings], expand_to_pairs(rankings, 0)):
        with pytest.raises(UserError, match=expected):
            RankingDataset(given, tokenizer, 64)
    with pytest.raises(UserError, match=r"^the chat template of ckpt/mistral cannot render this prompt \(Conversation"):
        render_prompt(tokenizer, rows[1]["prompt"])  # a caller that knows no line: the rest of the line


def test_a_text_pairs_question_is_the_prompt_with_its_turns_joined_by_the_separator():
    from types import SimpleNamespace

    from align.chat import render_question

    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a cat?"}]
    encoder = SimpleNamespace(sep_token="[SEP]")
    assert render_question(encoder, "what is a cat?") == "what is a cat?"
    assert render_question(encoder, conversation[-1:]) == "a cat?"
    assert render_question(encoder, conversation) == "be brief [SEP] hi [SEP] hello [SEP] a cat?"
    assert render_question(SimpleNamespace(sep_token=None), conversation[1:]) == "hi\n\nhello\n\na cat?"


LLAMA2_LIKE_TEMPLATE = (  # Llama-2-chat's shape: whitespace around an assistant's words, inside its turn
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'].strip() }} [/INST]"
    "{% else %} {{ m['content'].strip() }} {{ eos_token }}{% endif %}{% endfor %}")


def test_a_response_is_written_as_the_chat_template_writes_the_models_own_turn():
    # the reward model and DPO read a response's tokens as the model writes them after the prompt: for
    # Llama 2's template "[/INST] Apple ... </s>", not "[/INST]Apple ...</s>" (a first token it never samples)
    from align.chat import render_conversation, template_turn_spaces
    from align.demo_model import build_tokenizer
    from align.formats import Ranking
    from dpo.data import DPODataset

    tok = build_tokenizer(384, 0)
    tok.chat_template = LLAMA2_LIKE_TEMPLATE
    assert template_turn_spaces(tok) == (" ", " ")
    prompt, response = "Name a fruit.", "Apple is a fruit."
    assert render_example(tok, prompt, response) == render_conversation(tok, prompt, response)
    own_turn = tok(render_conversation(tok, prompt, response), add_special_tokens=False)["input_ids"]
    prompt_ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    assert own_turn[:len(prompt_ids)] == prompt_ids  # the precondition: the prompt is a prefix of the turn
    item = DPODataset([Ranking(prompt, [response, "No."], [0, 1])], tok, 512).items[0]
    assert item.responses[0][item.prompt_len:] == own_turn[len(prompt_ids):]  # the tokens DPO trains on
    # templates that write the words straight after the generation prompt and close the turn at once
    demo = build_tokenizer(384, 0)
    assert template_turn_spaces(demo) == ("", "")
    assert render_example(demo, prompt, response) == f"{render_prompt(demo, prompt)}{response}{demo.eos_token}"
    # more than whitespace written into a past turn (Qwen3's empty thinking block) is the model's to write
    demo.chat_template = demo.chat_template.replace("<|assistant|>\n{{ message['content'] }}",
                                                    "<|assistant|>\n<think>\n\n</think>\n\n{{ message['content'] }}")
    assert "<think>" in render_conversation(demo, prompt, response)  # the precondition
    assert template_turn_spaces(demo) == ("", "")


def test_special_token_text_in_a_prompt_or_a_response_is_found_and_counted(base_tokenizer):
    # the model would read it as the token itself: an eos inside an answer, a turn marker inside a question
    from align.chat import special_text_line, special_token_text
    from align.demo_model import build_tokenizer

    tok = build_tokenizer(384, 0)
    eos, user = tok.eos_token, "<|user|>"
    ids = tok(f"strike <s>old{eos} text", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in ids and tok.bos_token_id in ids  # the precondition: parsed as the tokens
    assert special_token_text(tok, "what is html?", ["use <s>old</s> to strike", "plain"]) == "<s>"
    assert special_token_text(tok, [{"role": "user", "content": f"hi {user} again"}], []) == user
    assert special_token_text(tok, "a < s > b", ["<b>bold</b>", "s>"]) is None  # near misses are text
    examples = [("fine", ["a", "b"]), ("fine", ["a", f"ends{eos}early"]), (f"x{user}", ["a", "b"])]
    line = special_text_line("dpo", tok, examples, "training rankings")
    assert line.startswith(f"dpo: 2 of 3 training rankings hold the text of one of the tokenizer's special tokens "
                           f"(first: {eos!r})")
    assert special_text_line("dpo", tok, examples[:1], "training rankings") is None
