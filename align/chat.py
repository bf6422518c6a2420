"""How a prompt (text or chat messages) and a response become model input text.

One place decides this, so the SFT data, the reward model, PPO rollouts and the
annotation app's generator all see exactly the same formatting.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from align.errors import UserError

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


# The roles a message may have: the ones every chat template renders (the demo's, Llama's, Qwen's,
# ...). Another role would be left out by some templates without a word, its text lost ("human" in
# the demo's), and a tool message is half a conversation here: only a message's role and content
# are kept, never the assistant's tool calls it answers.
CHAT_ROLES = ("system", "user", "assistant")


def messages_problem(messages: Any, *, prompt: bool = True) -> str | None:
    """Why `messages` are not chat messages the stages render as they were meant (None: they are).

    A prompt's last message is the user's: every stage renders a prompt with the template's
    generation prompt, so the responses are a new assistant turn answering that last message. After
    an assistant message they would be a second assistant turn in a row, not the continuation of it
    that the data may mean (TRL's reading), and after a system message alone an answer to no
    question; templates that check the turns (Llama 2's, Mistral's) refuse both, the others render
    them and a model would learn to speak twice or to answer nothing."""
    if not isinstance(messages, list) or not messages:
        return "expected a non-empty list of messages"
    for i, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return "every message needs string 'role' and 'content'"
        if m["role"] not in CHAT_ROLES:
            return f"message {i} has the role {m['role']!r:.40}; a message's role is system, user or assistant"
    last = messages[-1]["role"]
    if prompt and last != "user":
        return (f"the prompt ends with a{'n' if last == 'assistant' else ''} {last} message, not with the user's turn "
                "the responses answer" + ("; to have them continue an assistant's words, put those at the start of "
                                          "each response" if last == "assistant" else ""))
    return None


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class ChatTemplateError(UserError):
    """A checkpoint's chat template that raises on a prompt, in its own words (Mistral's and Llama 2's
    refuse a system message: "Conversation roles must alternate ...")."""


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as exc:  # the template's raise_exception(...), or a template that is broken
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatTemplateError(f"the chat template of {name} cannot render this prompt "
                                f"({exc.message or type(exc).__name__})") from None


@contextlib.contextmanager
def naming_prompt(where: str | None) -> Iterator[None]:
    """A chat template's refusal of a prompt with where the prompt was read (FILE:LINE) in front,
    where that is known."""
    try:
        yield
    except ChatTemplateError as exc:
        if where is None:
            raise
        raise ChatTemplateError(f"{where}: {exc}") from None


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text a model continues to answer `prompt`: the checkpoint's own chat template (from its
    tokenizer_config.json / chat_template.jinja) with the generation prompt.

    Fallback, for a checkpoint without a template (a base model such as Llama, Mistral, GPT-2, Pythia,
    OPT, or an encoder such as BERT): the plain dialogue of the HH-RLHF transcripts (Bai et al. 2022),
    "\n\nHuman: {user}\n\nAssistant:" per turn (other roles by name, e.g. "System:"), after the
    tokenizer's bos token where its own encoding starts with one (Llama and Mistral base: a template
    writes {{ bos_token }} itself, and every caller tokenizes the rendered text without special tokens).
    """
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return _apply_template(tokenizer, messages, add_generation_prompt=True)
    _note_fallback(tokenizer)
    turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else m['role'].title()}: {m['content']}" for m in messages)
    return f"{leading_bos(tokenizer)}{turns}\n\nAssistant:"


def leading_bos(tokenizer: Any) -> str:
    """The bos token's text if the tokenizer's own encoding puts it first, else ''. Its encoding may
    end with the eos (a Llama tokenizer saved with add_eos_token=True, as LoRA recipes leave it), but
    not with an encoder's separator: RoBERTa's <s> ... </s> and DeBERTa's [CLS] ... [SEP] are added by
    the tokenizer itself, around the rendered text. Worked out once per tokenizer and bos (every
    prompt of a dataset is rendered through here)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return ""
    known = _OWN_BOS.get(tokenizer)
    if known is None or known[0] != bos_id:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        own = tokenizer("a")["input_ids"]
        after = own[1 + len(plain):]
        eos_id, sep_id = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "sep_token_id", None)
        decoder_end = after == [] or (after == [eos_id] and eos_id != sep_id)
        known = (bos_id, tokenizer.bos_token if own[:1 + len(plain)] == [bos_id, *plain] and decoder_end else "")
        _OWN_BOS[tokenizer] = known
    return known[1]


_OWN_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_MARK = "ALIGN_RESPONSE_MARK"


def template_turn_end(tokenizer: Any) -> str | None:
    """The special token the checkpoint's chat template closes an assistant turn with (Gemma's
    <end_of_turn>, Phi-3's <|end|>, Qwen's <|im_end|>, Llama 3's <|eot_id|>, or the eos itself); None
    without a template, or where the template closes the turn with no special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation tells us nothing
        return None
    after = text[text.rfind(_MARK) + len(_MARK):] if _MARK in text else ""
    ids = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"] if after.strip() else []
    # special: a named one (eos, ...), or an added token flagged special (Llama 3's <|eot_id|> is only that)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        return None
    return tokenizer.convert_ids_to_tokens(ids[0])


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
    """Prompt, response and end-of-sequence token: what SFT trains on and the reward model reads.

    The response is written as the model writes its own turn after the prompt: where the chat template
    puts whitespace between the generation prompt and an assistant's words, or between the words and
    the turn's end (Llama 2's "[/INST] {content} </s>"), so does this (`template_turn_spaces`); without
    it the reward model and DPO would read a first token the policy never samples ("A" for "▁A"). In the
    plain-dialogue fallback the response follows "Assistant:" after a space, as in the HH-RLHF
    transcripts, where the space belongs to the response: a base model continuing "Assistant:" samples
    a space-led token. A response that brings its own whitespace keeps it instead. An encoder whose eos
    is its separator (RoBERTa's </s>, DeBERTa's [SEP]) gets no eos text: its own [SEP] ends the sequence."""
    text = render_prompt(tokenizer, prompt)
    before, after = template_turn_spaces(tokenizer) if getattr(tokenizer, "chat_template", None) else (" ", "")
    if response and not response[0].isspace():
        text += before
    if response and not response[-1].isspace():
        response += after
    return text + response + response_end(tokenizer)


def template_turn_spaces(tokenizer: Any) -> tuple[str, str]:
    """The whitespace the chat template writes before an assistant's words (after the generation
    prompt) and after them (before the turn's end): (" ", " ") for Llama 2's template, ("", "") for
    ChatML's, Llama 3's, Gemma's, the demo's. Only whitespace is taken: a template that writes more
    into a past assistant turn than the model is prompted with (Qwen3's empty <think> block) is the
    model's to write."""
    key = tokenizer.chat_template
    known = _TURN_SPACES.get(tokenizer)
    if known is None or known[0] != key:
        spaces = ("", "")
        user = [{"role": "user", "content": "hi"}]
        try:
            prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            turn = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _MARK}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation tells us nothing
            turn = prompt = ""
        if turn.startswith(prompt) and _MARK in turn:
            before, after = turn[len(prompt):turn.index(_MARK)], turn[turn.index(_MARK) + len(_MARK):]
            trailing = after[:len(after) - len(after.lstrip(" "))]
            spaces = (before if before.isspace() else "", trailing if after.strip() else "")
        known = _TURN_SPACES[tokenizer] = (key, spaces)
    return known[1]


_TURN_SPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def response_end(tokenizer: Any) -> str:
    """The text `render_example` ends a response with: the eos token, or nothing where the eos is the
    separator an encoder adds itself."""
    eos = tokenizer.eos_token or ""
    return "" if eos and eos == getattr(tokenizer, "sep_token", None) else eos


def render_conversation(tokenizer: Any, prompt: str | list[dict[str, str]], response: str) -> str:
    """The whole conversation, the response as its last assistant turn, as the checkpoint's chat template
    writes it: how TRL's reward trainer renders conversational data, and how published reward models
    are read (a template may write more after the end of the turn, a newline, where the score is read).
    Without a template, `render_example`: the prompt as HH-RLHF dialogue, the response and eos (TRL's
    standard-text form where its prompts were written so)."""
    if not getattr(tokenizer, "chat_template", None):
        return render_example(tokenizer, prompt, response)
    return _apply_template(tokenizer, [*as_messages(prompt), {"role": "assistant", "content": response}])


def render_question(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The first text of a (question, answer) text pair, as encoder reward models trained on pairs read
    it (OpenAssistant's DeBERTa and ELECTRA ones: tokenizer(question, answer)): a one-turn prompt's
    text as it is; a conversation's turns joined by the tokenizer's separator token, as Open-Assistant's
    ranking datasets join a conversation's history to its last question."""
    messages = as_messages(prompt)
    sep = getattr(tokenizer, "sep_token", None)
    return (f" {sep} " if sep else "\n\n").join(m["content"] for m in messages)


def encode_rendered(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Rendered texts (their special tokens written in by the template or `render_prompt`) as token
    ids, each cut to `max_length` by `keep_end`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [keep_end(ids, max_length, bos) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def keep_end(ids: list[int], max_length: int, bos_token_id: int | None) -> list[int]:
    """`ids` cut to `max_length` from the left, so a long text keeps its end, where its response is;
    a bos the text begins with stays first (cut away with the start, the model read a sequence with
    no bos, unlike anything it was trained on)."""
    if len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id and max_length > 1:
        return [ids[0], *ids[len(ids) - max_length + 1:]]
    return ids[len(ids) - max_length:]


def special_token_text(tokenizer: Any, prompt: str | list[dict[str, str]], responses: Sequence[str] = ()) -> str | None:
    """The first text of one of the tokenizer's special tokens (its eos, bos, pad, a template's turn
    markers) that a prompt's messages or a response hold, or None. Every stage tokenizes the rendered
    text with special tokens parsed, as the template's own markers must be, so the model reads such
    text as the token itself: a response quoting "</s>" to a Llama model ends there, and a prompt
    quoting "<|im_start|>assistant" opens a turn nobody wrote."""
    pattern = _SPECIAL_TEXT.get(tokenizer)
    if pattern is None:
        special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        words = sorted((t for t in special if t), key=len, reverse=True)
        pattern = _SPECIAL_TEXT[tokenizer] = re.compile("|".join(map(re.escape, words))) if words else re.compile("(?!)")
    for text in [m["content"] for m in as_messages(prompt)] + list(responses):
        if found := pattern.search(text):
            return found.group(0)
    return None


_SPECIAL_TEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def special_text_line(stage: str, tokenizer: Any, examples: Sequence[tuple[Any, Sequence[str]]], what: str) -> str | None:
    """The run's line on the examples (a prompt and its responses each) whose text holds a special
    token's text (`special_token_text`), or None where none does."""
    found = [t for prompt, responses in examples if (t := special_token_text(tokenizer, prompt, responses))]
    if not found:
        return None
    return (f"{stage}: {len(found)} of {len(examples)} {what} hold the text of one of the tokenizer's special tokens "
            f"(first: {found[0]!r}), which the model reads as that token, not as characters; clean the data where it "
            "was meant as text")


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int, *, left: bool) -> tuple[Any, Any]:
    """(ids, mask) long tensors of shape (len(rows), longest row, at least 1), each row padded on the
    left (a prompt the response continues) or on the right (a whole sequence)."""
    import torch

    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask
