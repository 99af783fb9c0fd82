"""One sanitiser per sink, for text that came from data or from a stranger (category and file names, labels,
a results.json's fields, an upload's name):

* :func:`terminal`: control characters (ESC sequences, carriage returns, bells) and undecodable bytes of file
  names shown as escapes, so a name cannot move the cursor, recolour or rewrite the terminal;
* :func:`csv_cell`: a cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab or
  carriage return first) gets a leading ``'``;
* :func:`markdown_cell`: Markdown's special characters (``|`` among them) escaped, line breaks made spaces,
  so a name stays inside its table cell;
* :func:`html_text`: HTML's special characters escaped (the app's page), after :func:`markdown_cell`.
"""

from __future__ import annotations

import html

from rich.markup import escape as rich_escape

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_MARKDOWN_SPECIAL = "\\`*_[]<>|~"


def _escaped(char: str) -> str:
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal(text: object) -> str:
    """``text`` safe to print: every non-printable character (control, line break, lone surrogate) escaped."""
    return "".join(_escaped(char) for char in str(text))


def rich_text(text: object) -> str:
    """``text`` for a rich console or table: :func:`terminal`, and rich's ``[markup]`` shown as it is."""
    return rich_escape(terminal(text))


def csv_cell(value: object) -> object:
    """A CSV cell from data: text starting like a formula gets a leading ``'``; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def markdown_cell(text: object) -> str:
    """Text shown literally in a Markdown table cell (a category named ``**x**`` or ``a|b``), on one line."""
    one_line = terminal(" ".join(str(text).split()))  # a line break would end the table row
    return "".join(f"\\{char}" if char in _MARKDOWN_SPECIAL else char for char in one_line)


def html_text(text: object) -> str:
    """Text for a page that renders Markdown with HTML (the app): Markdown- and HTML-escaped."""
    return html.escape(markdown_cell(text), quote=True)
