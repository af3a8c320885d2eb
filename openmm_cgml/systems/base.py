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


@dataclass
class BuiltSystem:
    """An OpenMM model of one spec, ready to equilibrate and record.

    ``atom_types`` are the fine-graph node types (strings) the embedding GNN learns from;
    ``bond_types`` one string per ``topology.bonds()`` entry, in that order.
    ``make_integrator()`` returns a fresh integrator for production (NVT);
    ``equilibrate(simulation, progress)`` brings the freshly minimised model to the
    production state (e.g. NPT compression for melts); it may be a no-op.
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
    equilibrate: Callable[..., None]
    periodic: bool
