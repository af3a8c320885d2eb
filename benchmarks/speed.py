"""Simulated time per wall-clock second: reference OpenMM MD vs the learned simulator.

For each embedded system (demo size), in one run on this machine:
  (a) reference MD of the fine system at its usual time step (CPU platform);
  (b) the learned simulator through CGMLIntegrator in an app.Simulation, with and
      without score refinement, using the model architecture of the system's demo
      training preset (cost does not depend on the weights: an untrained model of the
      same size is timed unless --model gives an exported one for the chain);
and the ratio (b)/(a). Then the time per learned step against the number of beads
(100 to 10,000 beads at the electrolyte's CG bead density) shows how cost grows.

    python benchmarks/speed.py [--systems chain electrolyte] [--sizes 100 1000 10000]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit

from openmm_cgml import CGMLIntegrator
from openmm_cgml.coarse_grain import CGMapping
from openmm_cgml.generate import md_speed
from openmm_cgml.models import build_dynamics_model, build_score_model, export_models
from openmm_cgml.runtime import timed
from openmm_cgml.systems import get_system_module
from openmm_cgml.training import load_config



def export_untrained(config, num_features: int, directory: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    dynamics = build_dynamics_model(config, num_features=num_features)
    score = build_score_model(config, num_features=num_features, latent_dim=config.latent_dim)
    export_models(dynamics, score, directory)
    return directory / "dynamics.pt", directory / "score.pt"


def learned_speed(paths, positions, masses, bonds, box, num_features, score: bool, min_seconds: float,
                  langevin_steps: int | None = None) -> float:
    """Learned simulator: simulated ns per wall-clock second."""
    n = len(positions)
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for mass in masses:
        system.addParticle(float(mass))
        topology.addAtom("B", None, residue)
    integrator = CGMLIntegrator(paths[0], paths[1] if score else None)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
        integrator.setUsesPeriodicBoundaryConditions(True)
    integrator.setBeadFeatures(np.random.default_rng(0).normal(size=(n, num_features)).astype(np.float32))
    integrator.setBonds(bonds)
    integrator.setRandomNumberSeed(1)
    integrator.setDeterministic(True)  # untrained weights: keep the rollout finite
    if score and langevin_steps is not None:
        integrator.setLangevinSteps(langevin_steps)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
    simulation.context.setPositions(positions)
    simulation.step(1)
    steps, seconds = timed(simulation.step, min_seconds)
    return steps * integrator.getStepSize().value_in_unit(unit.nanosecond) / seconds


def system_case(kind: str):
    module = get_system_module(kind)
    spec = module.make_specs("demo", seed=0)[0]
    built = module.build(spec)
    config = load_config(f"{kind}-demo")
    masses = np.array([built.system.getParticleMass(i).value_in_unit(unit.dalton)
                       for i in range(built.system.getNumParticles())])
    mapping = CGMapping.from_topology(built.topology, masses, config.cg_level,
                                      small_molecules_as_beads=config.small_molecules_as_beads)
    x = mapping.map_positions(built.positions)
    box = None
    if built.periodic:
        box = np.array([[v.x, v.y, v.z] for v in built.system.getDefaultPeriodicBoxVectors()])
        box = box if not hasattr(box[0][0], "unit") else box
    step_ps = config.dilation * built.record_interval.value_in_unit(unit.picosecond)
    return built, config, mapping, x, box, step_ps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["chain", "electrolyte"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}; OpenMM CPU platform; simulated time per wall-clock second\n")
    print(f"{'system':<12} {'atoms':>6} {'beads':>6} {'MD ns/s':>10} {'learned ns/s':>13} {'no-score ns/s':>14} "
          f"{'ratio':>9} {'ratio (no score)':>17}")
    density = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.systems:
            built, config, mapping, x, box, step_ps = system_case(kind)
            model_config = config.model_config(step_size_ps=step_ps)
            paths = export_untrained(model_config, model_config.num_features, Path(tmp) / kind)
            md = md_speed(built, min_seconds=args.seconds) / 1000.0  # ns per second
            full = learned_speed(paths, x, mapping.bead_masses, mapping.cg_bonds, box, model_config.num_features,
                                 True, args.seconds)
            bare = learned_speed(paths, x, mapping.bead_masses, mapping.cg_bonds, box, model_config.num_features,
                                 False, args.seconds)
            print(f"{kind:<12} {mapping.n_atoms:>6} {mapping.n_beads:>6} {md:>10.3g} {full:>13.3g} {bare:>14.3g} "
                  f"{full / md:>9.3g} {bare / md:>17.3g}")
            if box is not None:
                density = (mapping.n_beads / abs(np.linalg.det(box)), config, paths, model_config, step_ps)
        if density is None:
            return
        per_nm3, config, paths, model_config, step_ps = density
        levels = model_config.score_levels
        print(f"\ntime per learned step vs beads (electrolyte demo model, {per_nm3:.2g} beads/nm^3); "
              f"refinement timed with K=1 x {levels} levels (the preset uses K={model_config.langevin_steps})")
        print(f"{'beads':>7} {'s/step (no score)':>18} {'s/step (K=1)':>13} {'s per score call':>17}")
        rng = np.random.default_rng(0)
        for n in args.sizes:
            edge = (n / per_nm3) ** (1 / 3)
            positions = rng.uniform(0, edge, (n, 3))
            bonds = np.stack([np.arange(0, n - 1, 2), np.arange(1, n, 2)], axis=1)
            row = []
            for score in (False, True):
                ns_per_s = learned_speed(paths, positions, np.full(n, 50.0), bonds, np.eye(3) * edge,
                                         model_config.num_features, score, args.seconds, langevin_steps=1)
                row.append(step_ps / 1000 / ns_per_s)
            print(f"{n:>7} {row[0]:>18.4g} {row[1]:>13.4g} {(row[1] - row[0]) / levels:>17.4g}")


if __name__ == "__main__":
    main()
