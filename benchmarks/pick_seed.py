"""Print the training run (of those given) whose best.pt has the lowest validation
rollout score, then one line per run: used by `make pretrained` to choose the seed that
ships. Selection uses only the runs' own validation systems, never held-out test data.

    python benchmarks/pick_seed.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from openmm_cgml.training import load_checkpoint

    runs = list(argv if argv is not None else sys.argv[1:])
    if not runs:
        sys.exit(__doc__)
    scores = {}
    for run in runs:
        ckpt = load_checkpoint(f"{run}/checkpoints/best.pt")
        scores[run] = (float(ckpt["metrics"].get("val_rollout_score", "inf")), int(ckpt["step"]),
                       ckpt["metrics"].get("val_dynamics"))
    best = min(scores, key=lambda r: scores[r][0])
    print(best)
    for run, (score, step, nll) in scores.items():
        print(f"{run}: best.pt step {step}, validation rollout score {score:.4f}, validation NLL {nll}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
