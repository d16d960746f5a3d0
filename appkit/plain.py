"""User-supplied text (checkpoint names, file names) shown inside Markdown elements, literally.

Streamlit's captions and labels render Markdown: a checkpoint named ``[x](http://…)`` or
``**ft**`` would become a link or bold text. :func:`literal` escapes every character Markdown
(and Streamlit's ``:color[...]``/``$math$`` extensions) gives a meaning, so the text reads as typed.

>>> literal("ft_1 *x* [a](b) $y$ :red[z]")
'ft\\\\_1 \\\\*x\\\\* \\\\[a\\\\]\\\\(b\\\\) \\\\$y\\\\$ \\\\:red\\\\[z\\\\]'
"""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def literal(text: str) -> str:
    """``text`` with each Markdown-significant character backslash-escaped."""
    return _SPECIAL.sub(r"\\\1", text)
