"""The shipped pretrained chain model against OpenMM MD of the same fine chain, side by
side in one run: simulated tau per wall-clock second and their ratio.

    python benchmarks/speed_pretrained.py [--monomers 100] [--seconds 5] [--threads 1]

MD: the embedded bead-spring chain (class-II sequence) at its usual 0.01 tau step on the
CPU platform with ``--threads`` threads; learned: ``LearnedSimulator.pretrained("chain")``
(20 tau per step, distance limits on, no refinement) through CGMLIntegrator in an
app.Simulation, with ``--threads`` torch threads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openmm
import torch
from openmm import app, unit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from held_out_chain import held_out_chain  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--monomers", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from openmm_cgml.generate import md_speed
    from openmm_cgml.runtime import timed
    from openmm_cgml.simulator import LearnedSimulator
    from openmm_cgml.systems import chain

    torch.set_num_threads(args.threads)
    learned = LearnedSimulator.pretrained("chain")
    built, cg = held_out_chain(learned, args.monomers)
    platform = openmm.Platform.getPlatformByName("CPU")
    tau_ps = chain.ChainParameters().tau.value_in_unit(unit.picosecond)
    md_rate = md_speed(built, threads=args.threads, min_seconds=args.seconds) / tau_ps

    integrator = learned.createIntegrator(cg, seed=1)
    simulation = app.Simulation(cg.topology, cg.system, integrator, platform, {"Threads": str(args.threads)})
    simulation.context.setPositions(cg.positions)
    simulation.step(5)
    steps, seconds = timed(simulation.step, args.seconds)
    learned_rate = steps * integrator.getStepSize().value_in_unit(unit.picosecond) / tau_ps / seconds
    print(f"chain of {args.monomers} monomers ({built.system.getNumParticles()} particles -> {cg.n_beads} beads), "
          f"{args.threads} thread(s)")
    print(f"MD (dt 0.01 tau):            {md_rate:10.1f} tau/s")
    print(f"learned (20 tau per step):   {learned_rate:10.1f} tau/s  ({steps / seconds:.0f} steps/s)")
    print(f"speed: pretrained chain {learned_rate / md_rate:.0f}x MD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
