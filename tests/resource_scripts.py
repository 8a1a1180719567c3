"""The generator scripts of ``upo/resources/`` (data, not a package), loaded from their paths by the tests."""
from __future__ import annotations

import importlib.util

from upo.rewards import RESOURCES_DIR


def load_resource_script(name: str):
    """``upo/resources/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, RESOURCES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
