"""Importing a file of scripts/ (not a package) as a module, to call its functions in process."""

from __future__ import annotations

import importlib.util

from tests.helpers.configs import REPO

__all__ = ["script"]


def script(name: str):
    """scripts/<name>.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
