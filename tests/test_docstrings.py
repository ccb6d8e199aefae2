"""The public API documents itself: every exported function names each parameter under Args and says what it
returns; every public method of an exported class has a docstring."""

from __future__ import annotations

import inspect

import pytest

import fisherstore

EXPORTED = [getattr(fisherstore, name) for name in sorted(fisherstore.__all__) if name != "__version__"]
FUNCTIONS = [f for f in EXPORTED if inspect.isfunction(f)]
CLASSES = [c for c in EXPORTED if inspect.isclass(c) and not issubclass(c, BaseException)]


def documented_parameters(doc: str) -> set[str]:
    """Names listed in a Google-style ``Args:`` section."""
    lines = doc.splitlines()
    if "Args:" not in lines:
        return set()
    names: set[str] = set()
    for line in lines[lines.index("Args:") + 1 :]:
        if line and not line.startswith(" "):
            break  # the next section
        if line.startswith("    ") and not line.startswith("     ") and ":" in line:
            names.add(line.strip().split(":")[0].lstrip("*"))
    return names


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_public_functions_have_args_and_returns(function):
    doc = inspect.getdoc(function) or ""
    params = {
        n
        for n, p in inspect.signature(function).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL,) and n not in ("self", "cls")
    }
    assert doc.splitlines() and doc.splitlines()[0], f"{function.__name__}: no summary line"
    assert params <= documented_parameters(doc), (
        f"{function.__name__}: Args misses {params - documented_parameters(doc)}"
    )
    returns_none = inspect.signature(function).return_annotation in (None, "None")
    assert returns_none or "Returns:" in doc.splitlines(), f"{function.__name__}: no Returns section"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_public_methods_have_docstrings(cls):
    missing = [
        name
        for name, member in vars(cls).items()
        if not name.startswith("_")
        and (inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod, property)))
        and not inspect.getdoc(getattr(cls, name) if not isinstance(member, property) else member)
    ]
    assert missing == [], f"{cls.__name__}: {missing} have no docstring"


def test_the_args_reader_reads_sections():
    doc = "Summary.\n\nArgs:\n    a: one.\n    b: two,\n        continued: not a name.\n    **kw: more.\n"
    doc += "\nReturns:\n    x."
    assert documented_parameters(doc) == {"a", "b", "kw"}
    assert documented_parameters("Summary only.") == set()
