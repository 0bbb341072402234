"""Real English prose for real-weights checks that must not depend on files outside the repo: the
docstrings of a fixed list of standard-library modules (present wherever Python is)."""

from __future__ import annotations

import importlib
import inspect

MODULES = ["argparse", "collections", "json", "logging", "subprocess", "unittest", "threading", "pathlib",
           "functools", "itertools", "textwrap", "datetime", "decimal", "fractions", "random", "statistics"]


def stdlib_prose(min_chars: int = 60_000) -> str:
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr, None))
            if doc and len(doc) > 200 and doc not in parts:
                parts.append(doc)
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts)
