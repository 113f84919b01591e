"""Captions from FashionGen's text fields: the template, cleaning and fall-backs.

Usage::

    check_template("{name}. {description}")          # PipelineError naming data.caption
    make_caption("{name}", {"name": "Black leather mini skirt", ...})
"""

from __future__ import annotations

import re
import string

from fashiondiff.errors import PipelineError

CAPTION_FIELDS = ("name", "description", "category", "subcategory", "composition", "gender",
                  "season", "brand", "department")
_SEPARATORS = re.compile(r"\s*([,;:.])(?:\s*[,;:.])+")  # "a, , b" -> "a, b" (empty fields)


def check_template(template: str) -> None:
    """Fail with the params key's name if ``template`` uses anything but known fields."""
    known = ", ".join(CAPTION_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
        for _, field, _, _ in parsed:
            if field is not None and field not in CAPTION_FIELDS:
                raise PipelineError(f"params: data.caption: unknown field '{{{field}}}' in "
                                    f"{template!r} (known: {known})")
        template.format_map(dict.fromkeys(CAPTION_FIELDS, ""))
    except ValueError as exc:
        raise PipelineError(f"params: data.caption: bad template {template!r} ({exc})") from None


def clean(text: str) -> str:
    """One line, single spaces, no separators left dangling by empty fields; "" if no words."""
    text = _SEPARATORS.sub(r"\1", " ".join(text.split()))
    text = text.lstrip(" .,;:-|/").rstrip(" ,;:-|/")
    return text if any(c.isalnum() for c in text) else ""


def make_caption(template: str, fields: dict[str, str]) -> str:
    """The template filled from ``fields``; falls back to the name, then the description."""
    return (clean(template.format_map(fields)) or clean(fields.get("name", ""))
            or clean(fields.get("description", "")))
