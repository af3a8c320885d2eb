"""The held-out chain the speed benchmarks time: a class-II (test split) chain of
``n_monomers``, built (not equilibrated) and coarse-grained by a learned simulator."""
from __future__ import annotations

from openmm import unit


def held_out_chain(learned, n_monomers: int = 100, seed: int = 11):
    """(built fine system, its CGSystem under ``learned``)."""
    from openmm_cgml.systems import chain

    spec = [s for s in chain.make_specs("tiny", seed, n_train=0, n_test=1, n_monomers=n_monomers)
            if s.split == "test"][0]
    built = chain.build(spec)
    masses = [built.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(built.system.getNumParticles())]
    return built, learned.coarseGrain(built.topology, built.positions, masses=masses)
