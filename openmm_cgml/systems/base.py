"""The interface every embedded reference system implements.

A *system module* (``chain``, ``electrolyte``) turns a preset name and a seed into a list
of :class:`SystemSpec` (what to simulate: composition, split) and builds each one into a
:class:`BuiltSystem` (OpenMM topology with bonds, System, initial positions, simulation
protocol). ``openmm_cgml.generate`` runs any :class:`BuiltSystem` the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import openmm
from openmm import app, unit

from openmm_cgml.runtime import ProgressReport, progress_reporter

PRESETS = ("tiny", "demo", "full")


@dataclass
class SystemSpec:
    """What to simulate. JSON-serialisable apart from nothing: all fields are plain data."""

    kind: str                 # "chain" | "electrolyte"
    name: str                 # unique within a data set, used as the directory name
    split: str                # "train" | "test"
    seed: int
    composition: dict[str, Any] = field(default_factory=dict)
    # production length in recorded frames (one every BuiltSystem.record_interval);
    # ``cgml generate --n-frames`` overrides it. None: the generator reads
    # composition["n_frames"] instead.
    n_frames: int | None = None


@dataclass(frozen=True)
class Equilibration:
    """How a freshly minimised model reaches its production state.

    ``run(simulation, report)`` advances ``simulation`` ``total_steps`` MD steps in all,
    calling ``report(steps_done_now, stage)`` after each chunk, and returns a summary
    (plain data, e.g. the final density; may be empty) that the generator stores in the
    trajectory's metadata. Call the object itself with any progress sink
    (:func:`openmm_cgml.runtime.progress_reporter`: None, a tqdm bar or
    ``callable(fraction_done, stage)``).
    """

    total_steps: int
    run: Callable[[app.Simulation, ProgressReport], dict[str, Any]]

    def __call__(self, simulation: app.Simulation, progress: Any = None) -> dict[str, Any]:
        return dict(self.run(simulation, progress_reporter(progress, self.total_steps)) or {})


@dataclass
class BuiltSystem:
    """An OpenMM model of one spec, ready to equilibrate and record.

    ``atom_types`` are the fine-graph node types (strings) the embedding GNN learns from;
    ``bond_types`` one string per ``topology.bonds()`` entry, in that order.
    ``make_integrator()`` returns a fresh integrator for production (NVT);
    ``equilibrate`` brings the freshly minimised model to the production state (e.g. NPT
    compression for melts); it may run zero steps.
    """

    spec: SystemSpec
    topology: app.Topology
    system: openmm.System
    positions: unit.Quantity
    temperature: unit.Quantity
    timestep: unit.Quantity
    record_interval: unit.Quantity
    atom_types: list[str]
    bond_types: list[str]
    make_integrator: Callable[[], openmm.Integrator]
    equilibrate: Equilibration
    periodic: bool
