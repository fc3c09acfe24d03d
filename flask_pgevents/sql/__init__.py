"""Every SQL statement of flask-pgevents, kept as named blocks in ``.sql`` files.

``schema.sql`` holds the DDL (event schema, capture functions, triggers,
grants), ``queries.sql`` the runtime and administration queries. Both are
read once, at import. :func:`render` is the one way to turn a block into SQL
text: its ``{placeholders}`` take identifiers and literals quoted by
:func:`quote_ident` and :func:`quote_literal`; values travel as parameters.
"""
from __future__ import annotations

import re
from importlib import resources

_BLOCK = re.compile(r"^-- name: (\w+)\n", re.MULTILINE)


def parse_blocks(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into its named blocks.

    Each block runs from its ``-- name: <block>`` line to the next one. Its
    leading comment lines document it and are dropped, as is trailing space.
    """
    parts = _BLOCK.split(text)
    blocks: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = body.rstrip().split("\n")
        while lines and (not lines[0].strip() or lines[0].startswith("--")):
            lines.pop(0)
        if name in blocks:
            raise ValueError(f"The SQL block {name!r} is defined twice.")
        blocks[name] = "\n".join(lines)
    return blocks


def _load() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for filename in ("schema.sql", "queries.sql"):
        text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
        for name, sql in parse_blocks(text).items():
            if name in blocks:
                raise ValueError(f"The SQL block {name!r} is defined twice.")
            blocks[name] = sql
    return blocks


#: Every block of both files, by name.
BLOCKS = _load()


def render(name: str, /, **fragments: str) -> str:
    """The SQL of block ``name``, its placeholders filled with quoted fragments.

    :param fragments: SQL text for each ``{placeholder}``: identifiers from
        :func:`quote_ident`, literals from :func:`quote_literal`.

    Example::

        render("drop_trigger", trigger=quote_ident("pgevents_insert"), table='"public"."user"')
    """
    return BLOCKS[name].format(**fragments)


def quote_ident(name: str) -> str:
    """Quote an identifier for PostgreSQL, whatever characters it holds."""
    if "\x00" in name:
        raise ValueError(f"Identifier {name!r} contains a NUL character.")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal, read the same whatever ``standard_conforming_strings`` is.

    A value with a backslash becomes an escape string (``E'a\\\\b'``), as
    PostgreSQL's own ``quote_literal`` does: function bodies are parsed with
    the writing session's settings.
    """
    if "\x00" in value:
        raise ValueError(f"Literal {value!r} contains a NUL character.")
    quoted = "'" + value.replace("'", "''") + "'"
    if "\\" in value:
        return "E" + quoted.replace("\\", "\\\\")
    return quoted


def dollar_tag(*texts: str) -> str:
    """A dollar-quote tag (``$pgevents$``, ``$pgevents1$``, ...) that none of ``texts`` contains."""
    tag, n = "$pgevents$", 0
    while any(tag in text for text in texts):
        n += 1
        tag = f"$pgevents{n}$"
    return tag
