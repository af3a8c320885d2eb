"""Registry of the embedded reference systems.

Each system module exposes ``make_specs(preset, seed, **overrides) -> list[SystemSpec]``
and ``build(spec) -> BuiltSystem`` (see :mod:`openmm_cgml.systems.base`). Modules are
imported on first use so that importing this package stays cheap.
"""
from __future__ import annotations

import importlib
from types import ModuleType

SYSTEM_MODULES = {
    "chain": "openmm_cgml.systems.chain",
    "electrolyte": "openmm_cgml.systems.electrolyte",
}


def available_systems() -> list[str]:
    """Names accepted by :func:`get_system_module` (and by ``cgml generate``)."""
    return sorted(SYSTEM_MODULES)


def get_system_module(kind: str) -> ModuleType:
    """Import and return the module implementing system ``kind``."""
    try:
        module_name = SYSTEM_MODULES[kind]
    except KeyError:
        raise ValueError(
            f"unknown system kind {kind!r}; known kinds: {', '.join(available_systems())}"
        ) from None
    module = importlib.import_module(module_name)
    for required in ("make_specs", "build"):
        if not callable(getattr(module, required, None)):
            raise TypeError(f"system module {module_name} does not define {required}()")
    return module
