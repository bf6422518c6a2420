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
    """The text a model continues to answer `prompt` (chat template + generation prompt)."""
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No template (a base model): plain dialogue text, as in the HH-RLHF transcripts.
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else m['role'].title()}: {m['content']}" for m in messages)
    return f"{turns}\n\nAssistant:"


def render_example(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> str:
    """Prompt, response and end-of-sequence token: what SFT trains on and the reward model reads."""
    return render_prompt(tokenizer, prompt) + response + (tokenizer.eos_token or "")
