"""Safe Markdown: CommonMark with raw HTML turned off, so model output like
`<img src=x onerror=...>` is escaped and shows as text; javascript: links are refused by
markdown-it's link validation."""

from __future__ import annotations

from functools import lru_cache

from markupsafe import Markup


@lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(["table", "strikethrough"])


def markdown(text: str) -> Markup:
    return Markup(_md().render(text or ""))
