"""The README's Python examples type-check under ``mypy --strict``, as users' code would."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from mypy import api as mypy_api

README = Path(__file__).resolve().parents[2] / "README.rst"

#: What the README's snippets use without defining it, as an app around them would.
PRELUDE = {
    "app": "from flask import Flask\napp = Flask(__name__)",
    "db": "from flask_sqlalchemy import SQLAlchemy\ndb = SQLAlchemy()",
    "User": (
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "class _Base(DeclarativeBase): pass\n"
        "class User(_Base):\n"
        "    __tablename__ = 'user'\n"
        "    id: Mapped[int] = mapped_column(primary_key=True)\n"
        "    email: Mapped[str]"
    ),
    "Product": (
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "class _ProductBase(DeclarativeBase): pass\n"
        "class Product(_ProductBase):\n"
        "    __tablename__ = 'product'\n"
        "    id: Mapped[int] = mapped_column(primary_key=True)"
    ),
    "pgevents": "from flask_pgevents import PGEvents\npgevents = PGEvents()",
    "Event": "from flask_pgevents import Event",
    "send_welcome_mail": "def send_welcome_mail(address: str) -> None: ...",
    "product_cache": "product_cache: dict[int, object] = {}",
    "Order": (
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "class _OrderBase(DeclarativeBase): pass\n"
        "class Order(_OrderBase):\n"
        "    __tablename__ = 'order'\n"
        "    id: Mapped[int] = mapped_column(primary_key=True)\n"
        "    status: Mapped[str]"
    ),
    "send_invoice": "def send_invoice(order_id: int) -> None: ...",
    "ship": "def ship(order_id: int) -> None: ...",
    "search": (
        "class _Search:\n"
        "    def delete_index(self, name: str) -> None: ...\n"
        "    def index(self, name: str, row: dict[str, object]) -> None: ...\n"
        "search = _Search()"
    ),
}


#: The first line of a block that is one file of a multi-file example.
FILE_LINE = re.compile(r"# file: (\S+)\n")


def code_blocks() -> list[str]:
    """Every ``.. code-block:: python`` of the README, dedented."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, re.MULTILINE)
    return [textwrap.dedent(block) for block in blocks]


def python_examples() -> list[str]:
    """The README's snippets: the code blocks that are not files of a project."""
    return [block for block in code_blocks() if not FILE_LINE.match(block)]


def project_files() -> dict[str, str]:
    """The blocks that start with ``# file: NAME``, by name: *Testing your handlers*."""
    return {match[1]: block for block in code_blocks() if (match := FILE_LINE.match(block))}


def with_prelude(example: str) -> str:
    defined = set(re.findall(r"^(?:class|def) (\w+)|^(\w+) =|^from \S+ import (.+)$", example, re.MULTILINE))
    names = {name.strip() for groups in defined for group in groups for name in group.split(",") if name.strip()}
    used = [name for name in PRELUDE if re.search(rf"\b{name}\b", example) and name not in names]
    return "\n".join([*(PRELUDE[name] for name in used), example])


@pytest.fixture(scope="session")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One incremental cache for every run: Flask's and SQLAlchemy's stubs are read once."""
    return str(tmp_path_factory.mktemp("mypy_cache"))


def test_the_readme_has_python_examples() -> None:
    assert len(python_examples()) >= 3


@pytest.mark.parametrize("number", range(len(python_examples())))
def test_a_readme_example_type_checks_strictly(number: int, tmp_path: Path, mypy_cache: str) -> None:
    source = with_prelude(python_examples()[number])
    path = tmp_path / f"readme_example_{number}.py"
    path.write_text(source, encoding="utf-8")
    out, err, status = mypy_api.run([
        "--strict", "--cache-dir", mypy_cache,
        "--config-file", "", str(path),
    ])
    # Subclassing Flask-SQLAlchemy's db.Model is an error for mypy whatever the
    # extension (python/mypy#8603): those two errors are Flask-SQLAlchemy's, not ours.
    errors = [
        line for line in out.splitlines()
        if ": error:" in line and not re.search(r'Name "db\.Model" is not defined|cannot subclass "Model"', line)
    ]
    assert errors == [] and not err, f"{out}{err}\n--- example ---\n{source}"
    assert status in (0, 1)


def test_the_testing_example_type_checks_strictly_as_one_project(tmp_path: Path, mypy_cache: str) -> None:
    files = project_files()
    assert sorted(files) == ["conftest.py", "myapp.py", "test_myapp.py"]
    for name, source in files.items():
        (tmp_path / name).write_text(source, encoding="utf-8")
    out, err, status = mypy_api.run([
        "--strict", "--cache-dir", mypy_cache,
        "--config-file", "", *(str(tmp_path / name) for name in sorted(files)),
    ])
    errors = [
        line for line in out.splitlines()
        if ": error:" in line and not re.search(r'Name "db\.Model" is not defined|cannot subclass "Model"', line)
    ]
    assert errors == [] and not err, out + err
    assert status in (0, 1)
