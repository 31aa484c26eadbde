"""griffe extension for the API reference: jaxdp's docstrings are written for ``help()`` and Sphinx-style readers
(``:func:`x```, ``Example::``, bare ``>>>`` doctests); this turns them into the markdown mkdocstrings renders.

- ``:func:`a.b```, ``:class:`~a.b``` and the other roles become inline code (``~`` keeps the last name only);
- a run of ``>>>`` lines at the docstring's own indentation, with its output, becomes a fenced Python block;
- ``Example::`` loses its second colon (the indented block after it is already code in markdown).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|mod|class|meth|data|attr|exc|obj|const):`~?(?P<target>[^`]+)`")


def _role(match: re.Match) -> str:
    target = match["target"]
    if match[0].split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _fence_doctests(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip():  # the doctest and its output, up to a blank line
            block.append(lines[i])
            i += 1
        out += ["```python", *block, "```"]
    return "\n".join(out)


def markdown(text: str) -> str:
    """A jaxdp docstring as mkdocstrings' markdown (see the module docstring)."""
    text = _ROLE.sub(_role, text)
    text = re.sub(r"(?m)^(\s*\S[^\n]*?)::$", r"\1:", text)
    return _fence_doctests(text)


class JaxdpDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
