"""Sphinx configuration: build with ``sphinx-build -W docs docs/_build/html``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docutils.parsers.rst import directives
from pallets_sphinx_themes import ProjectLink, get_version
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

# Project --------------------------------------------------------------------

project = "flask-pgevents"
copyright = "2026 The flask-pgevents developers"
author = "The flask-pgevents developers"
release, version = get_version("flask-pgevents")

# General --------------------------------------------------------------------

master_doc = "index"
default_role = "code"
# Quotes, not dashes: "--drop-schema" in a command's help must not become an en dash.
smartquotes_action = "qe"
exclude_patterns = ["_build"]
extensions = [
    "sphinx.ext.autodoc",
    "sphinx_click",
    "pallets_sphinx_themes",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
autoclass_content = "class"

# HTML -----------------------------------------------------------------------

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {"project_links": [ProjectLink("Changes", "changes.html")]}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
singlehtml_sidebars = {"index": ["project.html", "localtoc.html"]}
html_title = f"flask-pgevents Documentation ({version})"
html_show_sourcelink = False

# The README as the single source of the guide ------------------------------

README = Path(__file__).resolve().parent.parent / "README.rst"

#: A title of the README: a line, then ``=`` (the README's own) or ``-`` (a section) as long as it.
SECTION_TITLE = re.compile(r"^(?P<title>\S[^\n]*)\n(?P<rule>=+|-+)\n", re.MULTILINE)


def readme_sections(text: str) -> dict[str, tuple[int, int, int]]:
    """The README's sections by title: where the title starts, the body starts and the section ends."""
    titles = [m for m in SECTION_TITLE.finditer(text) if len(m["rule"]) == len(m["title"])]
    ends = [m.start() for m in titles[1:]] + [len(text)]
    return {m["title"]: (m.start(), m.end(), end) for m, end in zip(titles, ends)}


class ReadmeSection(SphinxDirective):
    """Insert a section of README.rst, its title included, so that the README
    stays the one source of the text shared by the front page and the docs.

    ``.. readme:: Configuration`` inserts the section up to the next title;
    ``:body-only:`` leaves out its title, for a page that has its own.
    ``.. readme:: flask-pgevents`` with ``:body-only:`` is the introduction.
    A section renamed in the README fails the build.
    """

    required_arguments = 1
    final_argument_whitespace = True
    option_spec = {"body-only": directives.flag}  # noqa: RUF012 (docutils reads it from the class)

    def run(self) -> list[Any]:
        title = self.arguments[0]
        text = README.read_text(encoding="utf-8")
        sections = readme_sections(text)
        if title not in sections:
            raise self.error(
                f"README.rst has no section {title!r}. Its sections are: {', '.join(sections)}."
            )
        start, body, end = sections[title]
        lines = text[body if "body-only" in self.options else start:end].splitlines()
        # The README names its images from the repository's root (docs/x.png);
        # Sphinx reads "/x.png" from this directory.
        lines = [line.replace(".. image:: docs/", ".. image:: /", 1) for line in lines]
        self.env.note_dependency(str(README))
        self.state_machine.insert_input(lines, str(README))
        return []


def setup(app: Sphinx) -> None:
    app.add_directive("readme", ReadmeSection)
