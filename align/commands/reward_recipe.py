"""The exported reward model's card: how plain transformers scores a (prompt, response) as align does.

An exported reward model is an ordinary sequence-classification checkpoint, but its score means what
align means by it only when the text is rendered as the model was trained to read it
(`reward.model.render_texts`) and the raw score is normalised (`reward_normalization.json`). The card
writes that reading out as a function of a dozen lines for this checkpoint's case: its rendering, chat
template or not, decoder or encoder, the bos its tokenizer puts first, its eos; tests run each case's
code against `reward.model.load_reward_model`.
"""

from __future__ import annotations

from pathlib import Path

MESSAGES = "    messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)"


def reward_recipe(folder: Path, rendering: str) -> list[str]:
    """Python lines (DIR: the exported folder) defining `reward(prompt, response) -> float`, the normalised
    reward of one response, for the checkpoint written to `folder` read as `rendering` says."""
    from transformers import AutoTokenizer

    from align.chat import leading_bos
    from align.modeling import checkpoint_is_encoder
    from reward.run_dir import CONVERSATION, TEXT_PAIR

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder, template = checkpoint_is_encoder(folder), bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token or ""
    if encoder and eos == getattr(tokenizer, "sep_token", None):
        eos = ""  # its own [SEP] ends the text (align.chat.render_example)
    lines = ["import json",
             "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             "model = AutoModelForSequenceClassification.from_pretrained(DIR).eval()",
             "tokenizer = AutoTokenizer.from_pretrained(DIR)",
             "norm = json.load(open(f'{DIR}/reward_normalization.json'))  # mean 0, std 1 on the SFT model's samples",
             "",
             "def reward(prompt, response):  # prompt: a string, or chat messages ending with the user's",
             MESSAGES]
    if rendering == TEXT_PAIR:  # align.chat.render_question
        sep = tokenizer.sep_token
        joiner = f" {sep} " if sep else "\n\n"
        lines += [f"    question = {joiner!r}.join(m['content'] for m in messages)",
                  "    inputs = tokenizer(question, response, return_tensors='pt')"]
    elif template:
        lines += ["    text = tokenizer.apply_chat_template(messages + [{'role': 'assistant', 'content': response}], "
                  "tokenize=False)" if rendering == CONVERSATION else
                  f"    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) "
                  f"+ response + {eos!r}",
                  f"    inputs = tokenizer(text, add_special_tokens={encoder}, return_tensors='pt')"]
    else:  # the plain HH-RLHF dialogue every stage renders without a template (align.chat.render_prompt)
        lines += ["    turns = ''.join(f\"\\n\\n{'Human' if m['role'] == 'user' else m['role'].title()}: {m['content']}\" "
                  "for m in messages)",
                  "    space = ' ' if response and not response[0].isspace() else ''",
                  f"    text = {leading_bos(tokenizer)!r} + turns + '\\n\\nAssistant:' + space + response + {eos!r}",
                  f"    inputs = tokenizer(text, add_special_tokens={encoder}, return_tensors='pt')"]
    lines += ["    # (a text longer than the run's model.max_length: align reads its last max_length tokens)",
              "    return norm['gain'] * model(**inputs).logits[0, 0].item() + norm['bias']"]
    return lines
