"""Throughput of K replicas advanced together in one integrator call (issue 11).

The shipped chain model on a held-out 100-monomer chain (20 beads): K copies laid out
far apart (LearnedSimulator.rollout_replicas' layout) advance in one model call per
step. Prints learned steps per second per replica against K, side by side in one run,
with and without score refinement; the last line sums it up.

    python benchmarks/replicas.py [--k 1 2 4 8 16 32] [--seconds 3] [--threads 1] [--compiled]
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
from held_out_chain import held_out_chain  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--monomers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compiled", action="store_true",
                        help="networks compiled for this CPU and each K's size (openmm_cgml.compiled)")
    args = parser.parse_args(argv)

    from openmm_cgml.runtime import timed
    from openmm_cgml.simulator import LearnedSimulator

    torch.set_num_threads(args.threads)
    learned = LearnedSimulator.pretrained("chain")
    _, cg = held_out_chain(learned, args.monomers)
    x = cg.positions.value_in_unit(unit.nanometer)
    spacing = float(np.ptp(x, axis=0).max()) + 4 * float(learned.manifest["model_config"]["cutoff"])
    platform = openmm.Platform.getPlatformByName("CPU")
    print(f"chain of {args.monomers} monomers -> {cg.n_beads} beads per replica; {args.threads} torch thread(s)"
          + ("; compiled networks" if args.compiled else ""))
    modes = (False, True) if learned.scorePath is not None else (False,)  # the shipped chain model has no score
    print(f"{'K':>4} {'beads':>6}" + "".join(f" {'steps/s' + (' (score)' if m else ''):>16} {'per replica':>12} "
                                              f"{'gain':>6}" for m in modes))
    base = {}
    gains = {}
    for k in args.k:
        big, _ = cg.replicate(k, spacing)
        row = [f"{k:>4} {big.n_beads:>6}"]
        for score in modes:
            integrator = learned.createIntegrator(big, score=score, seed=1, compiled=args.compiled)
            simulation = app.Simulation(big.topology, big.system, integrator, platform)
            simulation.context.setPositions(big.positions)
            simulation.step(2)
            steps, seconds = timed(simulation.step, args.seconds)
            rate = steps / seconds
            per = rate * k
            base.setdefault(score, per)
            gains[(k, score)] = per / base[score]
            row.append(f"{rate:16.1f} {per:12.1f} {per / base[score]:6.1f}")
        print(" ".join(row), flush=True)
    k_max = max(args.k)
    best = max(args.k, key=lambda k: gains[(k, False)])
    text = f"replicas: K={k_max} gives {gains[(k_max, False)]:.1f}x the per-replica throughput of K={min(args.k)}"
    if True in modes:
        text += f" ({gains[(k_max, True)]:.1f}x with refinement)"
    print(f"{text}; best K={best} ({gains[(best, False)]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
