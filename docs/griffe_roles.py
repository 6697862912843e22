"""A griffe extension for the API reference: Sphinx roles in docstrings become code spans.

The package's docstrings cross-reference with Sphinx roles (``:func:`hyperfleet.optimize```),
which Markdown would print as they are; this turns each into ``hyperfleet.optimize`` in code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj|ref):`~?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
