"""Does one learned step keep the liquid's structure? (issue 13)

From every window of the held-out reference (true histories), one learned step is
taken in Python with the exported TorchScript modules, and the frames so made are
scored against the true next frames: bead collisions per bead and the first peaks of
the Li-polymer, Li-TFSI and polymer-polymer bead RDFs. A rollout can be no better than
its single step, so this separates what the dynamics model loses in one step from what
accumulates over a rollout, and shows what refinement can restore from there:

  true next frames          the reference itself
  x_t (no move)             the trivial baseline: every bead stays where it is
  mean                      x_t + v_t + mean (no sampling noise)
  sampled                   x_t + v_t + mean + std z (what the integrator does)
  sampled, std x s          the sampling noise scaled (``--std-scales``)
  refined K/eps/schedule    sampled, then annealed Langevin over the score model's
                            ladder, computed as docs/contract.md step 4 says
                            (``--refinements``; ``:quiet`` adds no Langevin noise)

Distance limits are not applied, so what is shown is the models' own work.

    python benchmarks/one_step_structure.py MODEL_DIR [--data data/electrolyte-pretrain]
        [--std-scales 0.5] [--refinements 2:5e-5:constant 10:2e-4:constant:quiet]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

PAIRS = (("LI", "PEH"), ("LI", "TFS"), ("PEH", "PEH"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default="data/electrolyte-pretrain")
    parser.add_argument("--std-scales", type=float, nargs="*", default=[0.5])
    parser.add_argument("--refinements", nargs="*", default=["2:5e-5:constant", "10:2e-4:constant:quiet"],
                        help="K:eps:schedule[:quiet] (schedule constant or ncsn)")
    parser.add_argument("--every", type=int, default=5, help="recorded frames between window starts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from openmm_cgml import analysis
    from openmm_cgml.evaluate import bead_species
    from openmm_cgml.simulator import LearnedSimulator
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    learned = LearnedSimulator.load(args.model)
    if learned.scorePath is None and args.refinements:
        raise SystemExit("the model has no score model: pass --refinements with no values")
    record = load_trajectory(list_trajectories(args.data, split="test")[0])
    cg = learned.coarseGrain(record)
    full = cg.mapping.map_positions(record.positions).astype(np.float32)
    d = learned.dilation
    # windows start every --every recorded frames (not only every model step): more samples
    ends = range((learned.seqLen - 1) * d, len(full) - d, args.every)
    histories = [full[t - (learned.seqLen - 1) * d: t + 1: d] for t in ends]
    targets = np.stack([full[t + d] for t in ends])
    species = bead_species(record, cg.mapping)
    box = record.box[-1]
    bonds = np.asarray(cg.bonds)
    threshold = analysis.collision_threshold(full[::d], boxes=box, bonds=bonds)
    dynamics = torch.jit.load(str(learned.dynamicsPath)).eval()
    score = torch.jit.load(str(learned.scorePath)).eval() if learned.scorePath else None
    box_t, features = torch.tensor(box, dtype=torch.float32), torch.tensor(cg.features)
    bonds_t = torch.tensor(bonds, dtype=torch.long)

    def report(label, frames):
        frames = np.asarray(frames)
        cells = []
        for a, b in PAIRS:
            ia, ib = np.flatnonzero(species == a), np.flatnonzero(species == b)
            peak = analysis.rdf_first_peak(*analysis.rdf(frames, box, ia, ib, n_bins=80)) if len(ia) and len(ib) \
                else None
            cells.append("-" if peak is None else f"{peak[0]:.3f} / {peak[1]:.2f}")
        collisions = analysis.collision_rate(frames, threshold, boxes=box, bonds=bonds).mean()
        print(f"{label:<34}" + "".join(f" {c:>16}" for c in cells) + f" {collisions:>11.3f}", flush=True)

    def refine(y, latent, steps, eps, schedule, noise):
        sigmas = score.sigmas
        for sigma in sigmas:
            alpha = eps if schedule == "constant" else eps * float(sigma) ** 2 / float(sigmas[-1]) ** 2
            for _ in range(steps):
                y = y + alpha * score(y, latent, box_t, features, bonds_t, sigma.reshape(()))
                if noise:
                    y = y + np.sqrt(2 * alpha) * torch.randn_like(y)
        return y

    print(f"{record.name}: {cg.n_beads} beads, {len(targets)} one-step predictions from true histories "
          f"({learned.stepSize}); collision threshold {threshold:.3f} nm; first peak position (nm) / height")
    print(f"{'frames':<34}" + "".join(f" {a + '-' + b:>16}" for a, b in PAIRS) + f" {'collisions':>11}")
    report("true next frames", targets)
    report("x_t (no move; baseline)", np.stack([h[-1] for h in histories]))
    with torch.no_grad():
        base, spread, latents = [], [], []
        for frames in histories:
            history = torch.tensor(frames)
            mean, std, latent = dynamics(history, box_t, features, bonds_t)
            base.append(history[-1] + (history[-1] - history[-2]) + mean)
            spread.append(std)
            latents.append(latent)
        noise = [torch.randn_like(s) for s in spread]
        report("mean", [b.numpy() for b in base])
        sampled = [b + s * z for b, s, z in zip(base, spread, noise)]
        report("sampled", [y.numpy() for y in sampled])
        for scale in args.std_scales:
            report(f"sampled, std x {scale:g}", [(b + scale * s * z).numpy() for b, s, z in zip(base, spread, noise)])
        for setting in args.refinements:
            parts = setting.split(":")
            steps, eps, schedule = int(parts[0]), float(parts[1]), parts[2] if len(parts) > 2 else "constant"
            quiet = len(parts) > 3 and parts[3] == "quiet"
            refined = [refine(y, lat, steps, eps, schedule, not quiet).numpy() for y, lat in zip(sampled, latents)]
            report(f"refined {setting}", refined)
    return 0


if __name__ == "__main__":
    sys.exit(main())
