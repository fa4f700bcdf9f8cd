"""MkDocs hooks: the pages are GitHub-flavoured Markdown, readable on GitHub and on the site."""

from __future__ import annotations

import re

CODE_SPAN = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown: str, **kwargs) -> str:
    """A `|` inside a code span of a table cell is written `\\|`, as GitHub requires; Python-Markdown
    keeps the backslash there (and needs no escape: it never splits a cell inside backticks)."""
    return "\n".join(
        CODE_SPAN.sub(lambda span: span.group(0).replace("\\|", "|"), line) if line.startswith("|") else line
        for line in markdown.split("\n")
    )
