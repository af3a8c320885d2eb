"""Overhead of CGMLIntegrator against calling the same TorchScript modules from Python.

For N = 100, 1,000 and 10,000 beads, one run times (a) ``Simulation.step`` with the
integrator and (b) a Python loop doing the same work with the same exported modules
(dynamics call, sampling, update, annealed Langevin refinement, history shift), side
by side, alternating repeats to share the machine's noise. Prints the ratio (a)/(b).
Target: overhead under 5%.

    python benchmarks/integrator_overhead.py [--sizes 100 1000 10000] [--steps 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app

from openmm_cgml import CGMLIntegrator
from openmm_cgml.models import ModelConfig, build_dynamics_model, build_score_model, export_models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bead_box import bead_box  # noqa: E402


def export(directory: Path, config: ModelConfig) -> tuple[Path, Path]:
    torch.manual_seed(0)
    dynamics = build_dynamics_model(config, num_features=config.num_features)
    score = build_score_model(config, num_features=config.num_features, latent_dim=config.latent_dim)
    export_models(dynamics, score, directory)
    return directory / "dynamics.pt", directory / "score.pt"


def make_case(n: int, density: float, seq_len: int, features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    edge = (n / density) ** (1 / 3)
    x = rng.uniform(0, edge, (n, 3))
    history = np.stack([x + 0.01 * k * rng.normal(size=x.shape) for k in range(seq_len)])
    bonds = np.stack([np.arange(0, n - 1, 2), np.arange(1, n, 2)], axis=1)
    feats = rng.normal(size=(n, features)).astype(np.float32)
    return edge, history, bonds, feats


def run_integrator(paths, edge, history, bonds, feats, steps, langevin_steps):
    topology, system = bead_box(history.shape[1], edge, 10.0)
    integrator = CGMLIntegrator(*paths)
    integrator.setUsesPeriodicBoundaryConditions(True)
    integrator.setLangevinSteps(langevin_steps)
    integrator.setBeadFeatures(feats)
    integrator.setBonds(bonds)
    integrator.setRandomNumberSeed(1)
    integrator.setHistory(history)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"),
                                {"Threads": "1"})
    simulation.context.setPositions(history[-1])
    simulation.step(1)  # warm-up (TorchScript profiling runs)
    start = time.perf_counter()
    simulation.step(steps)
    return time.perf_counter() - start


def run_python(paths, edge, history, bonds, feats, steps, langevin_steps):
    dynamics = torch.jit.load(str(paths[0]))
    score = torch.jit.load(str(paths[1]))
    box = torch.eye(3) * edge
    feats_t = torch.from_numpy(feats)
    bonds_t = torch.from_numpy(bonds).long()
    generator = torch.Generator().manual_seed(1)
    sigmas = score.sigmas
    eps = float(score.langevin_step_size)
    hist = torch.from_numpy(history).double()

    def one_step(hist):
        with torch.no_grad():
            mean, std, latent = dynamics(hist.float(), box, feats_t, bonds_t)
            a = mean.double() + std.double() * torch.randn(mean.shape, generator=generator, dtype=torch.float64)
            x = hist[-1] + (hist[-1] - hist[-2]) + a
            for sigma in sigmas:
                for _ in range(langevin_steps):
                    s = score(x.float(), latent, box, feats_t, bonds_t, sigma).double()
                    x = x + eps * s + math.sqrt(2 * eps) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
            return torch.cat([hist[1:], x.unsqueeze(0)])

    hist = one_step(hist)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        hist = one_step(hist)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--langevin-steps", type=int, default=1, help="K per noise level (ladder of 4 levels)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ModelConfig(backbone="gns", seq_len=5, step_size_ps=1.0, cutoff=0.6, latent_dim=64, hidden_dim=64,
                         rounds=3, embedding_out_dim=16, score_levels=4)
    with tempfile.TemporaryDirectory() as tmp:
        paths = export(Path(tmp), config)
        print(f"gns model: latent 64, 3 rounds, seq_len 5; score ladder 4 x K={args.langevin_steps}; "
              f"torch threads {args.threads}")
        print(f"{'beads':>7} {'integrator s/step':>18} {'python s/step':>14} {'ratio':>7}")
        for n in args.sizes:
            case = make_case(n, density=30.0, seq_len=config.seq_len, features=config.num_features)
            steps = max(1, args.steps if n < 10000 else args.steps // 2)
            times = {"integrator": [], "python": []}
            for _ in range(args.repeats):  # alternate so both see the same machine noise
                times["integrator"].append(run_integrator(paths, *case, steps, args.langevin_steps) / steps)
                times["python"].append(run_python(paths, *case, steps, args.langevin_steps) / steps)
            a, b = min(times["integrator"]), min(times["python"])
            print(f"{n:>7} {a:>18.4f} {b:>14.4f} {a / b:>7.3f}")


if __name__ == "__main__":
    main()
