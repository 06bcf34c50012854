"""CLI help from the config dataclasses: each field's docstring is its help text (as in litgpt)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written right below it in the class body (inherited too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def describe_fields(cls: type, prefix: str = "", indent: str = "  ") -> str:
    """One line per field: ``prefix.name = default  doc``."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        lines.append(f"{indent}{prefix}{f.name} = {default_of(f)!r}")
        if docs.get(f.name):
            lines.append(f"{indent}    {docs[f.name]}")
    return "\n".join(lines)


def first_sentence(text: str, limit: int = 100) -> str:
    """The first sentence of the first paragraph, on one line, at most ``limit`` characters."""
    paragraph = " ".join(text.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    line = paragraph[: end + 1] if end >= 0 else paragraph
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def summary(cls: type) -> str:
    """The plug-in's module docstring (else its class docstring), first sentence, without the name tag."""
    module = inspect.getmodule(cls)
    doc = (module.__doc__ if module else None) or cls.__dict__.get("__doc__") or ""
    line = first_sentence(doc)
    if line.startswith("`") and "`: " in line:  # "`lora`: low-rank updates ..." -> "low-rank updates ..."
        line = line.split("`: ", 1)[1]
    return line
