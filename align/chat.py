"""How a prompt (text or chat messages) and a response become model input text.

One place decides this, so the SFT data, the reward model, PPO rollouts and the
annotation app's generator all see exactly the same formatting.
"""

from __future__ import annotations

from typing import Any

# The demo tokenizer's template. A real checkpoint brings its own (tokenizer_config.json).
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text a model continues to answer `prompt`: the checkpoint's own chat template (from its
    tokenizer_config.json / chat_template.jinja) with the generation prompt.

    Fallback, for a checkpoint without a template (a base model such as GPT-2, Pythia, OPT, or an
    encoder such as BERT): the plain dialogue of the HH-RLHF transcripts (Bai et al. 2022),
    "\n\nHuman: {user}\n\nAssistant:" per turn (other roles by name, e.g. "System:"), and
    `render_example` ends the response with the eos token (an encoder has none: its [SEP] ends it).
    """
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _note_fallback(tokenizer)
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else m['role'].title()}: {m['content']}" for m in messages)
    return f"{turns}\n\nAssistant:"


def _note_fallback(tokenizer: Any) -> None:
    """Say once per tokenizer that the plain-dialogue fallback is in use."""
    import logging

    name = getattr(tokenizer, "name_or_path", "")
    if name not in _FALLBACK_NOTED:
        _FALLBACK_NOTED.add(name)
        logging.getLogger("align").info("%s has no chat template: prompts are rendered as plain "
                                        "'\\n\\nHuman: ...\\n\\nAssistant:' dialogue", name or "the tokenizer")


_FALLBACK_NOTED: set[str] = set()


def render_example(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> str:
    """Prompt, response and end-of-sequence token: what SFT trains on and the reward model reads."""
    return render_prompt(tokenizer, prompt) + response + (tokenizer.eos_token or "")
