"""openmm-cgml: learned, time-integrated coarse-grained MD as an OpenMM integrator.

Heavy pieces (the compiled plugin, torch models) load on first use, so that
``import openmm_cgml.coarse_grain`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {
    "CGMLIntegrator": "openmm_cgml.integrator",
    "LearnedSimulator": "openmm_cgml.simulator",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openmm_cgml' has no attribute {name!r}")


__all__ = list(_LAZY)
