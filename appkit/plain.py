r"""User-supplied text (checkpoint names, file names, paths, error messages) shown in Markdown, literally.

Streamlit renders Markdown in errors, captions and labels: a checkpoint named ``[x](http://…)``,
a shared link's ``?folder=![x](https://host/p.png)`` echoed in an error, or a bare URL would
become a link, an image fetched from elsewhere or bold text. :func:`literal` escapes every
character that gives inline Markdown (and Streamlit's ``:color[...]``/``$math$`` extensions) a
meaning, and the markers that start a block (``#``, ``-``, ``1.``) at the start of a line, so the
text reads as typed and nothing in it is followed; ``-`` and ``.`` elsewhere stay as they are
(``ft-05.safetensors`` reads the same in the source and on the page).

>>> print(literal("ft_1 *x* [a](b) $y$ :red[z] ft-05.safetensors"))
ft\_1 \*x\* \[a\]\(b\) \$y\$ \:red\[z\] ft-05.safetensors
>>> print(literal("# not a heading\n- not a list"))
\# not a heading
\- not a list
"""

from __future__ import annotations

import html
import re

import streamlit as st

_INLINE = re.compile(r"([\\`*_{}\[\]()!|<>~$:])")
_BLOCK = re.compile(r"^(\s*)([#>+-]|\d+\.)", re.MULTILINE)


def percent(fraction: float) -> str:
    """A fraction as every page shows a percentage: one decimal (one image of 269 is 0.4 points).

    >>> percent(0.96654)
    '96.7%'
    """
    return f"{100 * fraction:.1f}%"


def literal(text: str) -> str:
    """``text`` with each Markdown-significant character backslash-escaped."""
    return _BLOCK.sub(lambda m: m.group(1) + "\\" + m.group(2), _INLINE.sub(r"\\\1", text))


def in_figure(text: object) -> str:
    """``text`` as a Plotly figure shows it, typed: Plotly reads ``<a href>``, ``<b>``, ``<br>`` in titles,
    tick labels, hover and point text (a link there is followed), so ``<``, ``>`` and ``&`` become entities.

    >>> in_figure('<a href="https://example.com">ft-1</a> & co')
    '&lt;a href="https://example.com"&gt;ft-1&lt;/a&gt; &amp; co'
    """
    return html.escape(str(text), quote=False)


def error(text: str, where=st) -> None:
    """An error box (``where``: ``st`` or ``st.sidebar``) showing ``text`` as typed."""
    where.error(literal(text))


def as_read(markdown: str) -> str:
    """What a reader sees of :func:`literal`'s output (its escapes removed): ``as_read(literal(t)) == t``.

    >>> as_read(literal("ft_1 [a](b) $y$"))
    'ft_1 [a](b) $y$'
    """
    return re.sub(r"\\(.)", r"\1", markdown)
