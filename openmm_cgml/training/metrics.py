"""The training log (``metrics.csv``): its columns, reading and writing, and the arrays
the loss-curve plot takes."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from openmm_cgml.files import write_atomic

ROLLOUT_COLUMNS = ["val_rollout_score", "val_rollout_rg2_bias", "val_rollout_collisions",
                   "val_reference_collisions", "val_rollout_relaxation_error", "val_rollout_failures"]
PROPERTY_COLUMNS = ["val_property", "val_property_zero_residual", "val_property_constant_ratio"]
METRIC_COLUMNS = ["step", "epoch", "train_dynamics", "train_score", "train_property", "train_total",
                  "val_dynamics", "val_score", *PROPERTY_COLUMNS, *ROLLOUT_COLUMNS, "lr", "grad_norm", "time_s",
                  "cpu_s"]



def read_metrics(path: Path, up_to_step: int) -> list[dict[str, str]]:
    """Rows of ``metrics.csv`` up to ``up_to_step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(float(row["step"])) <= up_to_step]


def write_metrics(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})

    write_atomic(path, write)


def metric_column(rows: list[dict], name: str) -> np.ndarray:
    """One column as floats (NaN where a row has no value)."""
    return np.array([float(r[name]) if r.get(name) not in ("", None) else np.nan for r in rows])


def plot_metrics(rows: list[dict], png: Path) -> None:
    """Loss curves (train/val NLL and DSM) and, beside them, the rollout validation."""
    from openmm_cgml.plots import plot_training_curves

    losses = {c: metric_column(rows, c) for c in ("train_dynamics", "train_score", "val_dynamics", "val_score")}
    losses = {c: v for c, v in losses.items() if np.isfinite(v).any()}
    if not rows or not losses:
        return
    rollout = {c.removeprefix("val_"): metric_column(rows, c)
               for c in ("val_rollout_rg2_bias", "val_rollout_collisions", "val_reference_collisions")}
    plot_training_curves(metric_column(rows, "step"), losses, rollout, path=png, title=png.parent.name)
