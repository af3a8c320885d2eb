"""Which distance limits? Rollout validation of one checkpoint at several quantiles q of
the training data: excluded volume at the q quantile of nearest-non-bonded distances,
bond-length limit at the 1 - q quantile of CG bond lengths (validation systems only: no
test data; the trainer's ``exclusion_calibration`` does the same for best.pt).

    python benchmarks/exclusion_scan.py RUN_DIR_OR_CHECKPOINT [--quantiles 0 1e-3 1e-2]
        [--steps 250] [--starts 8] [--systems 4] [--seeds 2]

Prints, per quantile, the distance and the rollout metrics (Rg^2 bias, relaxation
error, collisions per bead against the reference's) averaged over rollout seeds, with
the seed-to-seed spread of the Rg^2 bias. Quantile 0 means no limits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--quantiles", type=float, nargs="+", default=[0.0, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--systems", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--data-dir", help="override the checkpoint's data_dir")
    args = parser.parse_args(argv)

    from openmm_cgml.packaging import run_checkpoint
    from openmm_cgml.training import TrainConfig, build_datasets, build_models_from_checkpoint, bond_length_limit, \
        distance_pools, exclusion_distance, load_checkpoint
    from openmm_cgml.validation import RolloutValidator

    path = run_checkpoint(args.checkpoint) if args.checkpoint.is_dir() else args.checkpoint
    ckpt = load_checkpoint(path)
    config = TrainConfig.from_dict({**ckpt["config"], **({"data_dir": args.data_dir} if args.data_dir else {})})
    train_set, val_set = build_datasets(config)
    net = build_models_from_checkpoint(ckpt).eval()
    print(f"{path} (step {ckpt['step']}); validation systems: {', '.join(s.name for s in val_set.systems)}")
    print("| quantile | exclusion (nm) | bond limit (nm) | Rg2 bias | seed spread | relaxation error | collisions / reference | score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    pools = distance_pools(train_set)
    for q in args.quantiles:
        net.dynamics.exclusion_distance = exclusion_distance(train_set, q, pools=pools) if q > 0 else 0.0
        net.dynamics.bond_length_limit = bond_length_limit(train_set, q, pools=pools) if q > 0 else 0.0
        results = [RolloutValidator(val_set, config.dilation, args.steps, args.starts, args.systems, seed).evaluate(net)
                   for seed in range(args.seeds)]
        mean = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        spread = float(np.std([r["rollout_rg2_bias"] for r in results]))
        print(f"| {q:g} | {net.dynamics.exclusion_distance:.3f} | {net.dynamics.bond_length_limit:.3f} | {mean['rollout_rg2_bias']:+.1%} | {spread:.1%} | "
              f"{mean['rollout_relaxation_error']:+.0%} | "
              f"{mean['rollout_collisions'] / max(mean['reference_collisions'], 1e-12):.1f}x | "
              f"{mean['rollout_score']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
