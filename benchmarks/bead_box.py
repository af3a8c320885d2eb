"""N identical beads in a cubic periodic box: the OpenMM Topology and System the timing
benchmarks hand to CGMLIntegrator (no forces: the learned step moves the beads)."""
from __future__ import annotations

import openmm
from openmm import app, unit


def bead_box(n: int, edge: float, mass: float) -> tuple[app.Topology, openmm.System]:
    """``n`` beads of ``mass`` amu in a cube of ``edge`` nm (the box set on both)."""
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for _ in range(n):
        system.addParticle(mass)
        topology.addAtom("B", None, residue)
    vectors = [openmm.Vec3(edge, 0, 0), openmm.Vec3(0, edge, 0), openmm.Vec3(0, 0, edge)]
    system.setDefaultPeriodicBoxVectors(*vectors)
    topology.setPeriodicBoxVectors(vectors * unit.nanometer)
    return topology, system
