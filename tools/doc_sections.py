"""A generated section of a docs page: the text between two marker comments, replaced by a tool's latest run."""

from __future__ import annotations

from pathlib import Path


def replace_section(page: Path, start: str, end: str, body: str) -> None:
    """Replace what lies between the markers `start` and `end` on the page with `body`; an error when they are
    missing, so a page that lost its markers is noticed rather than silently left stale."""
    text = page.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{page}: the markers {start} and {end} are missing")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{body}{end}{tail}")
