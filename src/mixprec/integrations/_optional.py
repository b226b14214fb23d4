"""Parts of mixprec the integrations plug in when present (the stability guard, the diagnostics)."""
from __future__ import annotations

import importlib
from typing import Any


def require(module: str, name: str, who: str) -> Any:
    """`module.name`, or ImportError saying who needs it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"{who} needs {module}.{name}, which this mixprec does not have yet ({error})") from error
