"""Where the time of one learned step goes, from 10 to 10,000 beads (issue 11).

The shipped chain model (dynamics only; CG bond ~3 nm, graph cutoff 10 nm) on copies of
held-out chains laid out far apart, so the graph grows linearly with the beads. For
each size, measured side by side in one run:

  step        Simulation.step(1) through CGMLIntegrator (everything)
  no limits   the same with the distance limits off
  model       the TorchScript dynamics module called from Python on the same inputs
  graph       the radius graph + CG bonds alone (models.graph.build_graph, Python)
  glue        step - model: the C++ step around the model call (history, noise,
              integration, limits, copies)

    python benchmarks/profile_step.py [--beads 10 100 1000 10000] [--seconds 2] [--threads 1]
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
    parser.add_argument("--beads", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from openmm_cgml.models.graph import build_graph
    from openmm_cgml.runtime import timed
    from openmm_cgml.simulator import LearnedSimulator

    torch.set_num_threads(args.threads)
    learned = LearnedSimulator.pretrained("chain")
    dynamics = torch.jit.load(str(learned.dynamicsPath)).eval()
    cutoff = float(learned.manifest["model_config"]["cutoff"])
    platform = openmm.Platform.getPlatformByName("CPU")
    print(f"{args.threads} torch thread(s); milliseconds per learned step")
    print(f"{'beads':>6} {'step':>8} {'no limits':>10} {'model':>8} {'graph':>8} {'glue':>8} {'us/bead':>8}")
    per_bead = {}
    for target in args.beads:
        monomers = 50 if target < 20 else 100  # 10 or 20 beads per chain (cg_level 10, 2 particles per monomer)
        _, one = held_out_chain(learned, monomers)
        k = max(1, round(target / one.n_beads))
        x = one.positions.value_in_unit(unit.nanometer)
        cg, _ = one.replicate(k, float(np.ptp(x, axis=0).max()) + 4 * cutoff)
        positions = cg.positions.value_in_unit(unit.nanometer)
        ms = {}
        for label, off in (("step", None), ("no limits", 0.0)):
            integrator = learned.createIntegrator(cg, score=False, seed=1, exclusionDistance=off, bondLengthLimit=off)
            simulation = app.Simulation(cg.topology, cg.system, integrator, platform)
            simulation.context.setPositions(cg.positions)
            simulation.step(2)
            steps, seconds = timed(simulation.step, args.seconds)
            ms[label] = 1000 * seconds / steps
        history = torch.tensor(np.repeat(positions[None], learned.seqLen, axis=0), dtype=torch.float32)
        box = torch.zeros(3, 3)
        features = torch.tensor(cg.features, dtype=torch.float32)
        bonds = torch.tensor(cg.bonds, dtype=torch.int64)
        with torch.no_grad():
            dynamics(history, box, features, bonds)
            calls, seconds = timed(lambda n: [dynamics(history, box, features, bonds) for _ in range(n)], args.seconds)
            ms["model"] = 1000 * seconds / calls
            calls, seconds = timed(lambda n: [build_graph(history[-1], box, bonds, cutoff) for _ in range(n)],
                                   args.seconds)
            ms["graph"] = 1000 * seconds / calls
        ms["glue"] = ms["step"] - ms["model"]
        per_bead[cg.n_beads] = 1000 * ms["step"] / cg.n_beads
        print(f"{cg.n_beads:>6} {ms['step']:8.3f} {ms['no limits']:10.3f} {ms['model']:8.3f} {ms['graph']:8.3f} "
              f"{ms['glue']:8.3f} {per_bead[cg.n_beads]:8.2f}", flush=True)
    sizes = sorted(per_bead)
    big = [n for n in sizes if n >= 100]
    if len(big) >= 2:
        print(f"per-bead cost from {big[0]} to {big[-1]} beads: x{per_bead[big[-1]] / per_bead[big[0]]:.2f} "
              f"(target: within 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
