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


def reward_recipe(folder: Path, rendering: str, max_length: int) -> list[str]:
    """Python lines (DIR: the exported folder) defining `reward(prompt, response) -> float`, the normalised
    reward of one response, for the checkpoint written to `folder` read as `rendering` says, in fp32 as
    align scores (a bf16 checkpoint loads as bf16 otherwise); `max_length`: the tokens align reads."""
    from transformers import AutoTokenizer

    from align.chat import leading_bos, response_end
    from align.modeling import checkpoint_is_encoder, fit_max_length
    from reward.run_dir import CONVERSATION, TEXT_PAIR

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    max_length = fit_max_length(max_length, folder, "model.max_length")  # as load_reward_model cuts it
    encoder, template = checkpoint_is_encoder(folder), bool(getattr(tokenizer, "chat_template", None))
    eos = response_end(tokenizer)
    lines = ["import json",
             "import torch",
             "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             "model = AutoModelForSequenceClassification.from_pretrained(DIR, dtype=torch.float32).eval()",
             "tokenizer = AutoTokenizer.from_pretrained(DIR)",
             "norm = json.load(open(f'{DIR}/reward_normalization.json'))  # mean 0, std 1 on the SFT model's samples",
             "",
             "def reward(prompt, response):  # prompt: a string, or chat messages ending with the user's",
             MESSAGES]
    if rendering == TEXT_PAIR:  # align.chat.render_question
        sep = tokenizer.sep_token
        joiner = f" {sep} " if sep else "\n\n"
        lines += [f"    question = {joiner!r}.join(m['content'] for m in messages)",
                  f"    inputs = tokenizer(question, response, truncation=True, max_length={max_length}, "
                  "return_tensors='pt')"]
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
    if rendering != TEXT_PAIR:
        lines.append(f"    # (a text over {max_length} tokens: align cuts it from the left, keeping its special tokens)")
    lines += ["    return norm['gain'] * model(**inputs).logits[0, 0].item() + norm['bias']"]
    return lines
