"""Beads in a periodic box: the OpenMM Topology and System the timing benchmarks hand to
CGMLIntegrator (no forces: the learned step moves the beads)."""
from __future__ import annotations

import openmm
from openmm import app, unit


def bead_system(masses, box_vectors) -> tuple[app.Topology, openmm.System]:
    """One bead per entry of ``masses`` (amu) in the periodic box with rows
    ``box_vectors`` ([3, 3] nm), the box set on both."""
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for mass in masses:
        system.addParticle(mass)
        topology.addAtom("B", None, residue)
    vectors = [openmm.Vec3(*(float(v) for v in row)) for row in box_vectors]
    system.setDefaultPeriodicBoxVectors(*vectors)
    topology.setPeriodicBoxVectors(vectors * unit.nanometer)
    return topology, system


def bead_box(n: int, edge: float, mass: float) -> tuple[app.Topology, openmm.System]:
    """``n`` beads of ``mass`` amu in a cube of ``edge`` nm (the box set on both)."""
    return bead_system([mass] * n, [[edge, 0, 0], [0, edge, 0], [0, 0, edge]])
