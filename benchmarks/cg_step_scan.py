"""How much of the next CG step is predictable, per (CG level, learned step)?

Before training, measure what a model could learn at all. For chain trajectories (fine
positions, one frame every 5 tau) and each pair (cg_level atoms per bead, step k
frames), on the CG trajectory X:

- ``bond``: mean CG bond length; ``move/bond``: per-axis rms of one learned step's bead
  displacement, relative to it (a large move makes excluded volume hard to keep);
- ``R2 history``: fraction of the variance of the next move X_{t+k} - X_t that an
  equivariant *linear* predictor explains from the last 4 moves; ``R2 +structure``:
  the same with structural terms added (sum of bond vectors to bonded beads, vector to
  the chain centre, both at time t). Fitted on the first half of each trajectory,
  scored on the second half. Linear models bound the learnable part from below: a GNN
  can do better, never from a smaller signal. (For the *acceleration* a_t = next move
  - last move, which the model predicts, the same residual leaves R2 ~ 0.5 more: the
  "reverse the last move" part that any model gets for free.)
- ``lag1``: correlation of successive per-bead moves (0: the history says little).

Usage::

    python benchmarks/cg_step_scan.py DATA_DIR [DATA_DIR ...] [--levels 5 10 20 40] [--steps 1 2 4]

(DATA_DIR: any ``cgml generate chain`` data set, e.g. ``data/accuracy-reference/len40``.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HISTORY = 4  # velocities used by the linear predictor


def _features(x: np.ndarray, k: int, bonds: np.ndarray, structure: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per (frame t, bead, axis) rows: features [.., p] and target acceleration [..]."""
    frames = x[::k]                                   # one learned step apart
    v = frames[1:] - frames[:-1]                      # v[t] = X_{t+1} - X_t
    a = v[1:] - v[:-1]                                # a[t] = X_{t+2} - 2 X_{t+1} + X_t
    rows, targets = [], []
    for t in range(HISTORY, a.shape[0]):
        cols = [v[t - j] for j in range(HISTORY)]     # v[t] is the newest velocity before a[t]
        if structure:
            xt = frames[t + 1]
            pull = np.zeros_like(xt)
            np.add.at(pull, bonds[:, 0], xt[bonds[:, 1]] - xt[bonds[:, 0]])
            np.add.at(pull, bonds[:, 1], xt[bonds[:, 0]] - xt[bonds[:, 1]])
            cols += [pull, xt.mean(axis=0, keepdims=True) - xt]
        rows.append(np.stack(cols, axis=-1).reshape(-1, len(cols)))  # (bead, axis) rows
        targets.append(a[t].reshape(-1))
    return np.concatenate(rows), np.concatenate(targets)


def _r2(x: np.ndarray, k: int, bonds: np.ndarray, structure: bool) -> float:
    """R2 of the next move (target: acceleration + the newest move, feature column 0)."""
    half = x.shape[0] // 2
    f_train, y_train = _features(x[:half], k, bonds, structure)
    f_test, y_test = _features(x[half:], k, bonds, structure)
    coef, *_ = np.linalg.lstsq(f_train, y_train + f_train[:, 0], rcond=None)
    move = y_test + f_test[:, 0]
    residual = move - f_test @ coef
    return float(1.0 - residual.var() / move.var())


def scan(data_dirs, levels, steps) -> list[dict]:
    from openmm_cgml.dataset import mapping_for_trajectory
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    results = []
    for data in data_dirs:
        for directory in list_trajectories(data):
            record = load_trajectory(directory)
            for level in levels:
                mapping = mapping_for_trajectory(directory, level)
                x = mapping.map_positions(record.positions).astype(np.float64)
                bonds = np.asarray(mapping.cg_bonds, dtype=np.int64).reshape(-1, 2)
                bond = float(np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1).mean()) \
                    if len(bonds) else float("nan")
                for k in steps:
                    frames = x[::k]
                    move = frames[1:] - frames[:-1]
                    lag1 = float(np.corrcoef(move[1:].ravel(), move[:-1].ravel())[0, 1])
                    results.append({
                        "trajectory": f"{Path(data).name}/{Path(directory).name}", "atoms": record.n_atoms,
                        "cg_level": level, "beads": int(mapping.n_beads),
                        "step_tau": float(k * record.record_interval_ps), "bond_nm": bond,
                        "move_over_bond": float(move.std() / bond), "lag1": lag1,
                        "r2_history": _r2(x, k, bonds, False), "r2_structure": _r2(x, k, bonds, True)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--levels", nargs="+", type=int, default=[5, 10, 20, 40])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = scan(args.data, args.levels, args.steps)
    keys = sorted({(r["cg_level"], r["step_tau"]) for r in rows})
    print("| atoms/bead | beads | step (tau) | CG bond (sigma) | move/bond | lag-1 corr | R2 history | "
          "R2 +structure |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for level, step in keys:
        sel = [r for r in rows if r["cg_level"] == level and r["step_tau"] == step]
        mean = {k: np.mean([r[k] for r in sel]) for k in ("beads", "bond_nm", "move_over_bond", "lag1",
                                                          "r2_history", "r2_structure")}
        print(f"| {level} | {mean['beads']:.0f} | {step:g} | {mean['bond_nm']:.2f} | {mean['move_over_bond']:.2f} | "
              f"{mean['lag1']:+.2f} | {mean['r2_history']:.3f} | {mean['r2_structure']:.3f} |")
    print(f"({len({r['trajectory'] for r in rows})} trajectories, mean over them)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
