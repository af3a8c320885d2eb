"""Small rules every stage shares: random seeds for OpenMM, software versions recorded
with results, ``--set KEY=VALUE`` overrides and progress reporting."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable


def openmm_seed(seed: int) -> int:
    """A seed OpenMM uses as given: OpenMM treats 0 as "pick one at random", so map any
    integer onto 1 .. 2**31 - 2 (a different ``seed`` gives a different result)."""
    return int(seed) % (2**31 - 2) + 1


def versions() -> dict[str, str]:
    """Versions stored beside every trained model and result."""
    import openmm
    import torch

    import openmm_cgml

    return {"openmm_cgml": openmm_cgml.__version__, "torch": str(torch.__version__),
            "openmm": openmm.__version__, "python": sys.version.split()[0]}


def parse_overrides(items: Iterable[str] | None, option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict. Values are parsed as YAML (a superset of JSON:
    ``3``, ``1e-3``, ``[30,50]``, ``true``, ``{a: 1}``); text that is not YAML stays text.
    A malformed item is a ValueError naming ``option``."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            out[key.strip()] = text  # not YAML: the text itself (the consumer judges it)
    return out


ProgressReport = Callable[[int, str], None]


def progress_reporter(progress: Any, total_steps: int) -> ProgressReport:
    """Adapt ``progress`` to ``report(steps_done_now, stage)``.

    ``progress`` is None, a tqdm-like object (has ``update`` and is not callable; gets
    ``update(steps)`` and, if it has one, ``set_description_str(stage)``) or a callable
    ``progress(fraction_done, stage)`` with fraction_done in (0, 1]."""
    done = [0]

    def report(steps: int, stage: str) -> None:
        done[0] += steps
        if progress is None:
            return
        if hasattr(progress, "update") and not callable(progress):
            progress.update(steps)
            if hasattr(progress, "set_description_str"):
                progress.set_description_str(stage)
        else:
            progress(min(1.0, done[0] / max(total_steps, 1)), stage)

    return report


def timed(run: Callable[[int], Any], min_seconds: float) -> tuple[int, float]:
    """The one timing loop: call ``run(n)`` with growing n until one call takes
    ``min_seconds``; return (n, seconds) of that call."""
    n = 1
    while True:
        start = time.perf_counter()
        run(n)
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return n, seconds
        # grow at least by one: a call just under min_seconds must not be repeated forever
        grown = n * 2 if seconds < min_seconds / 4 else n + 1
        n = max(grown, math.ceil(n * min_seconds / max(seconds, 1e-3)))
