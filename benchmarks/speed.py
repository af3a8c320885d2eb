"""Simulated time per wall-clock second: OpenMM MD against the shipped learned
simulators, side by side in one run (issue 11).

For each system, on this machine, with ``--threads`` threads for both:
  MD         the fine system at its usual time step (OpenMM CPU platform);
  learned    ``LearnedSimulator.pretrained(system)`` through CGMLIntegrator in an
             app.Simulation with the model's shipped settings (distance limits on),
             with score refinement (when the model has a score model) and without;
and the ratios learned / MD.

  chain        a held-out (class-II) chain of ``--monomers`` monomers, built and
               coarse-grained (the accuracy benchmark's kind of chain);
  electrolyte  the held-out composition of the shipped model's data (n_eo 12, EO:Li 16,
               840 atoms) at the last frame of its recorded trajectory (``--data``); without
               the data, as packed (lower density: both MD and the learned step faster).

Then the time per learned step against the number of beads (``--sizes``, random beads at
the electrolyte's CG density) shows how cost grows. The last line sums up, e.g.
``speed: chain 352x MD (refined: no score model), electrolyte 14000x MD (refined: 700x)``.

    python benchmarks/speed.py [--systems chain electrolyte] [--seconds 3] [--threads 1]
                               [--monomers 100] [--sizes 100 1000 10000] [--data DIR]
                               [--langevin-steps K] [--langevin-levels L] [--fast K:LEVELS]

``--fast K:LEVELS`` (default 3:3) also times a cheaper refinement, K Langevin steps on
the LEVELS smallest noise levels (``CGMLIntegrator.setLangevinLevels``), in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bead_box import bead_box  # noqa: E402
from held_out_chain import held_out_chain  # noqa: E402


def learned_speed(learned, cg, score: bool, seconds: float, threads: int, langevin: dict | None = None) -> float:
    """Simulated ps per wall-clock second of ``learned`` on ``cg``; ``langevin``: overrides
    of the refinement settings (createIntegrator's langevin* arguments)."""
    from openmm_cgml.runtime import timed

    integrator = learned.createIntegrator(cg, score=score, seed=1, **(langevin or {} if score else {}))
    integrator.setNumThreads(threads)
    simulation = app.Simulation(cg.topology, cg.system, integrator, openmm.Platform.getPlatformByName("CPU"),
                                {"Threads": str(threads)})
    simulation.context.setPositions(cg.positions)
    simulation.step(3)
    steps, wall = timed(simulation.step, seconds)
    return steps * integrator.getStepSize().value_in_unit(unit.picosecond) / wall


def chain_case(monomers: int):
    from openmm_cgml.simulator import LearnedSimulator

    learned = LearnedSimulator.pretrained("chain")
    built, cg = held_out_chain(learned, monomers)
    return learned, built, cg, f"chain, {monomers} monomers", (None, None, "as built, minimised")


def electrolyte_case(data_dir: Path):
    """The held-out composition at its production state (the last frame of its recorded
    trajectory in ``data_dir``, when there) or else as packed (lower density than in
    production, so both MD and the learned step come out faster)."""
    from openmm_cgml.simulator import LearnedSimulator
    from openmm_cgml.systems import electrolyte
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    learned = LearnedSimulator.pretrained("electrolyte")
    spec = [s for s in electrolyte.make_specs("demo", seed=0, target_atoms=900) if s.split == "test"][0]
    built = electrolyte.build(spec)
    masses = [built.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(built.system.getNumParticles())]
    recorded = [p for p in (list_trajectories(data_dir, split="test") if data_dir.is_dir() else [])
                if p.name == spec.name]
    if recorded:
        record = load_trajectory(recorded[0])
        positions, box, state = record.positions[-1], record.box[-1], f"last frame of {recorded[0]}"
    else:
        positions = built.positions.value_in_unit(unit.nanometer)
        box = np.array([[v.x, v.y, v.z] for v in built.system.getDefaultPeriodicBoxVectors()])
        state = "as packed (no recorded trajectory: lower density than production)"
    cg = learned.coarseGrain(built.topology, positions, atom_types=built.atom_types, masses=masses,
                             bond_types=built.bond_types, box=box)
    return learned, built, cg, f"electrolyte {spec.name}", (positions, box, state)


def scaling(learned, cg, sizes, seconds: float, threads: int, langevin: dict | None = None) -> None:
    """Seconds per learned step against beads, random beads at ``cg``'s density."""
    from openmm_cgml.simulator import CGSystem

    per_nm3 = cg.n_beads / abs(np.linalg.det(cg.box))
    print(f"\ntime per learned step vs beads (shipped electrolyte model and settings, random beads at "
          f"{per_nm3:.2g} beads/nm^3)")
    print(f"{'beads':>7} {'ms/step (no score)':>19} {'ms/step (refined)':>18} {'us/bead (no score)':>19}")
    rng = np.random.default_rng(0)
    for n in sizes:
        edge = (n / per_nm3) ** (1 / 3)
        box = np.eye(3) * edge
        topology, system = bead_box(n, edge, 50.0)
        features = rng.normal(size=(n, cg.features.shape[1])).astype(np.float32)
        bonds = np.stack([np.arange(0, n - 1, 2), np.arange(1, n, 2)], axis=1)
        boxed = CGSystem(topology, system, rng.uniform(0, edge, (n, 3)) * unit.nanometer, None, features, bonds,
                        True, box, learned.dilation, learned.seqLen)
        row = []
        for score in (False, True):
            rate = learned_speed(learned, boxed, score, seconds, threads, langevin)
            row.append(learned.stepSize.value_in_unit(unit.picosecond) / rate * 1000)
        print(f"{n:>7} {row[0]:>19.4g} {row[1]:>18.4g} {row[0] / n * 1000:>19.4g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["chain", "electrolyte"], choices=["chain", "electrolyte"])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--monomers", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps per noise level of the refined runs (default: the model's)")
    parser.add_argument("--langevin-levels", type=int, default=None,
                        help="noise levels (the smallest) of the refined runs (default: the model's whole ladder)")
    parser.add_argument("--fast", default="3:3", metavar="K:LEVELS",
                        help="also time this cheaper refinement: K Langevin steps on the LEVELS smallest noise "
                             "levels (default 3:3; 'none' to skip)")
    parser.add_argument("--data", default="data/electrolyte-pretrain",
                        help="electrolyte data (make electrolyte-data): its held-out trajectory's last frame is timed")
    args = parser.parse_args(argv)

    from openmm_cgml.generate import md_speed

    shipped = {k: v for k, v in (("langevinSteps", args.langevin_steps), ("langevinLevels", args.langevin_levels))
               if v is not None}
    fast = None
    if args.fast != "none":
        steps, levels = (int(v) for v in args.fast.split(":"))
        fast = {"langevinSteps": steps, "langevinLevels": levels}
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s) for MD (OpenMM CPU platform) and for the learned simulator; "
          "simulated ps per wall-clock second\n")
    print(f"{'system':<44} {'atoms':>6} {'beads':>6} {'MD ps/s':>9} {'refined ps/s':>13} {'no-score ps/s':>14} "
          f"{'refined/MD':>11} {'no-score/MD':>12}" + (f" {'fast ' + args.fast + '/MD':>13}" if fast else ""))
    summary, states, electrolyte = [], [], None
    for kind in args.systems:
        learned, built, cg, label, (positions, box, state) = (
            chain_case(args.monomers) if kind == "chain" else electrolyte_case(Path(args.data)))
        states.append(f"{kind}: {state}")
        md = md_speed(built, positions, box, threads=args.threads, min_seconds=args.seconds)
        bare = learned_speed(learned, cg, False, args.seconds, args.threads)
        refined = learned_speed(learned, cg, True, args.seconds, args.threads, shipped) if learned.scorePath else None
        quick = learned_speed(learned, cg, True, args.seconds, args.threads, fast) if learned.scorePath and fast else None
        print(f"{label:<44} {built.system.getNumParticles():>6} {cg.n_beads:>6} {md:>9.3g} "
              f"{refined if refined else float('nan'):>13.3g} {bare:>14.3g} "
              f"{(refined / md) if refined else float('nan'):>11.3g} {bare / md:>12.3g}"
              + (f" {(quick / md) if quick else float('nan'):>13.3g}" if fast else ""))
        summary.append(f"{kind} {bare / md:.0f}x MD (refined: "
                       + (f"{refined / md:.0f}x" + (f"; fast {args.fast}: {quick / md:.0f}x" if quick else "") + ")"
                          if refined else "no score model)"))
        if kind == "electrolyte":
            electrolyte = (learned, cg)
    print("states timed: " + "; ".join(states))
    if electrolyte and args.sizes:
        scaling(*electrolyte, args.sizes, args.seconds, args.threads, shipped)
    print("speed: " + ", ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
