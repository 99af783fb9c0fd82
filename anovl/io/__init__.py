"""The I/O layer: every file anovl writes and every untrusted file it reads goes through here.

* :mod:`~anovl.io.files`: atomic writes that never follow links, one error line on a failed write;
* :mod:`~anovl.io.reading` and :mod:`~anovl.io.schemas`: the bounded, schema-checked JSON / YAML reader;
* :mod:`~anovl.io.text`: one sanitiser per sink (terminal, CSV, Markdown, HTML);
* :mod:`~anovl.io.safe_names` and :mod:`~anovl.io.output_names`: names from data as safe path components.

It imports neither Lightning nor torch.
"""

from anovl.io.files import (
    append_text,
    create_new,
    make_folder,
    refuse_links,
    replace_together,
    write_error,
    write_file,
    write_texts,
)
from anovl.io.output_names import OutputNames, output_component, output_stem
from anovl.io.reading import parse_json, parse_yaml, read_json, read_text, read_yaml, validate
from anovl.io.safe_names import safe_component
from anovl.io.text import csv_cell, html_text, markdown_cell, rich_text, terminal

__all__ = [
    "OutputNames",
    "append_text",
    "create_new",
    "csv_cell",
    "html_text",
    "make_folder",
    "markdown_cell",
    "output_component",
    "output_stem",
    "parse_json",
    "parse_yaml",
    "read_json",
    "read_text",
    "read_yaml",
    "refuse_links",
    "replace_together",
    "rich_text",
    "safe_component",
    "terminal",
    "validate",
    "write_error",
    "write_file",
    "write_texts",
]
