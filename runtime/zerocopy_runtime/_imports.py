"""Import paths from configuration (`package.module:function`) to callables."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ._errors import SettingError


def import_callable(path: str, setting: str) -> Callable[..., Any]:
    """The callable at `path`, or a SettingError naming the setting to fix."""
    module_name, _, attr = path.partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SettingError(
            f"{setting} {path!r} cannot be imported ({type(exc).__name__}: {exc}); "
            f"check {setting} and that its package is installed in the runtime image."
        ) from exc
    if not callable(value):
        raise SettingError(f"{setting} {path!r} is not callable.")
    return value
