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

Then the time per learned step against the number of beads (``--tiles``: the timed
electrolyte frame tiled along its box vectors, a real liquid at every size) shows how cost grows. The last line sums up, e.g.
``speed: chain 1333x MD (compiled: 1912x), refined: no score model; electrolyte 12820x MD
(compiled: 16551x), refined: 749x (compiled: 1112x) (fast 3:3: 1522x)`` (measured 2026-12-06).

    python benchmarks/speed.py [--systems chain electrolyte] [--seconds 3] [--threads 1]
                               [--monomers 100] [--tiles 1 2 4 5] [--data DIR]
                               [--langevin-steps K] [--langevin-levels L] [--fast K:LEVELS] [--no-compiled]

Each learned run is also timed with its networks compiled for this CPU
(``createIntegrator(compiled=True)``, :mod:`openmm_cgml.compiled`; compiled before the
timing, ~10-15 s per network the first time; ``--no-compiled`` skips them).
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
from bead_box import bead_system  # noqa: E402
from held_out_chain import held_out_chain  # noqa: E402


def learned_speed(learned, cg, score: bool, seconds: float, threads: int, langevin: dict | None = None,
                  compiled: bool = False) -> float:
    """Simulated ps per wall-clock second of ``learned`` on ``cg``; ``langevin``: overrides
    of the refinement settings (createIntegrator's langevin* arguments); ``compiled``: the
    networks compiled for this CPU (compiled before the timing starts)."""
    from openmm_cgml.runtime import timed

    integrator = learned.createIntegrator(cg, score=score, seed=1, compiled=compiled,
                                          **(langevin or {} if score else {}))
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


def supercell(cg, tiles):
    """``cg`` (a periodic CG system) tiled (a, b, c) times along its box vectors (or
    m x m x m for an int m): the same liquid, a b c times the beads (bead masses, features
    and CG bonds copied)."""
    from openmm_cgml.simulator import CGSystem

    box = np.asarray(cg.box, dtype=np.float64)
    x = cg.positions.value_in_unit(unit.nanometer)
    n = cg.n_beads
    counts = (tiles,) * 3 if isinstance(tiles, int) else tuple(tiles)
    shifts = np.array([i * box[0] + j * box[1] + k * box[2]
                       for i in range(counts[0]) for j in range(counts[1]) for k in range(counts[2])])
    big = box * np.array(counts, dtype=np.float64)[:, None]
    masses = [cg.system.getParticleMass(i) for i in range(n)] * len(shifts)
    topology, system = bead_system(masses, big)
    positions = (x[None] + shifts[:, None]).reshape(-1, 3)
    bonds = (np.asarray(cg.bonds)[None] + n * np.arange(len(shifts))[:, None, None]).reshape(-1, 2)
    return CGSystem(topology, system, positions * unit.nanometer, None, np.tile(cg.features, (len(shifts), 1)),
                    bonds, True, big, cg.dilation, cg.seq_len)


def scaling(learned, cg, factors, seconds: float, threads: int, langevin: dict | None = None,
            compiled: bool = True) -> None:
    """Seconds per learned step against beads: ``cg``'s liquid tiled for each entry
    of ``factors`` (the same local structure at every size, so the distance limits and
    the graph see a real liquid's neighbours); ``compiled``: also refined with the
    networks compiled for each size class."""
    print("\ntime per learned step vs beads (shipped electrolyte model and settings; the timed frame "
          "tiled along its box vectors)")
    runs = [(False, False), (True, False)] + ([(True, True)] if compiled else [])
    names = ["no score", "refined"] + (["refined, compiled"] if compiled else [])
    print(f"{'tiles':>7} {'beads':>7} " + " ".join(f"{'ms/step (' + n + ')':>28}" for n in names) + " "
          + " ".join(f"{'us/bead (' + n + ')':>28}" for n in names))
    for m in factors:
        tiled = supercell(cg, m)
        row = []
        for score, fused in runs:
            rate = learned_speed(learned, tiled, score, seconds, threads, langevin, compiled=fused)
            row.append(learned.stepSize.value_in_unit(unit.picosecond) / rate * 1000)
        n = tiled.system.getNumParticles()
        print(f"{'x'.join(map(str, m)) if isinstance(m, tuple) else m:>7} {n:>7} "
              + " ".join(f"{ms:>28.4g}" for ms in row) + " " + " ".join(f"{ms / n * 1000:>28.4g}" for ms in row))


def tiling(text: str):
    """'m' -> m; 'AxBxC' -> (A, B, C)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (1, 3) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"tiles must be m or AxBxC with positive integers, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["chain", "electrolyte"], choices=["chain", "electrolyte"])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--monomers", type=int, default=100)
    parser.add_argument("--tiles", type=tiling, nargs="*", default=[1, 2, 4, (4, 4, 5), 5],
                        help="supercells of the per-bead scaling: m (m^3 copies of the electrolyte box) or AxBxC "
                             "(default 1 2 4 4x4x5 5: 122 / 976 / 7,808 / 9,760 / 15,250 beads); none to skip")
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps per noise level of the refined runs (default: the model's)")
    parser.add_argument("--langevin-levels", type=int, default=None,
                        help="noise levels (the smallest) of the refined runs (default: the model's whole ladder)")
    parser.add_argument("--fast", default="3:3", metavar="K:LEVELS",
                        help="also time this cheaper refinement: K Langevin steps on the LEVELS smallest noise "
                             "levels (default 3:3; 'none' to skip)")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the runs with the networks compiled for this CPU (openmm_cgml.compiled)")
    parser.add_argument("--data", default="data/electrolyte-pretrain",
                        help="electrolyte data (make electrolyte-data): its held-out trajectory's last frame is timed")
    args = parser.parse_args(argv)

    from openmm_cgml.evaluate import refinement_settings
    from openmm_cgml.generate import md_speed

    shipped = refinement_settings(args.langevin_steps, args.langevin_levels)
    fast = refinement_settings(*(int(v) for v in args.fast.split(":"))) if args.fast != "none" else None
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s) for MD (OpenMM CPU platform) and for the learned simulator; "
          "simulated ps per wall-clock second\n")
    compiled = not args.no_compiled
    columns = ["no-score/MD"] + (["compiled"] if compiled else []) + ["refined/MD"] + (["compiled"] if compiled else [])
    columns += [f"fast {args.fast}/MD"] if fast else []
    print(f"{'system':<44} {'atoms':>6} {'beads':>6} {'MD ps/s':>9} {'no-score ps/s':>14} {'refined ps/s':>13} "
          + " ".join(f"{c:>12}" for c in columns))
    summary, states, electrolyte = [], [], None
    for kind in args.systems:
        learned, built, cg, label, (positions, box, state) = (
            chain_case(args.monomers) if kind == "chain" else electrolyte_case(Path(args.data)))
        states.append(f"{kind}: {state}")
        md = md_speed(built, positions, box, threads=args.threads, min_seconds=args.seconds)
        scored = learned.scorePath is not None
        bare = learned_speed(learned, cg, False, args.seconds, args.threads)
        bare_c = learned_speed(learned, cg, False, args.seconds, args.threads, compiled=True) if compiled else None
        refined = learned_speed(learned, cg, True, args.seconds, args.threads, shipped) if scored else None
        refined_c = (learned_speed(learned, cg, True, args.seconds, args.threads, shipped, compiled=True)
                     if scored and compiled else None)
        quick = learned_speed(learned, cg, True, args.seconds, args.threads, fast) if scored and fast else None
        ratios = [bare] + ([bare_c] if compiled else []) + [refined] + ([refined_c] if compiled else [])
        ratios += [quick] if fast else []
        print(f"{label:<44} {built.system.getNumParticles():>6} {cg.n_beads:>6} {md:>9.3g} {bare:>14.3g} "
              f"{refined or float('nan'):>13.3g} "
              + " ".join(f"{(r / md) if r else float('nan'):>12.4g}" for r in ratios))
        text = f"{kind} {bare / md:.0f}x MD" + (f" (compiled: {bare_c / md:.0f}x)" if bare_c else "") + ", refined: "
        if refined:
            text += f"{refined / md:.0f}x" + (f" (compiled: {refined_c / md:.0f}x)" if refined_c else "")
            text += f" (fast {args.fast}: {quick / md:.0f}x)" if quick else ""
        else:
            text += "no score model"
        summary.append(text)
        if kind == "electrolyte":
            electrolyte = (learned, cg)
    print("states timed: " + "; ".join(states))
    if electrolyte and args.tiles:
        scaling(*electrolyte, args.tiles, args.seconds, args.threads, shipped, compiled)
    print("speed: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
