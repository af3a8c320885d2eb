"""What training learns from the data before the first step: the window data sets, their
normalisation statistics and the distance limits (docs/method.md, step 5b)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from openmm_cgml.analysis import evenly_spaced, nearest_nonbonded_distances
from openmm_cgml.training.config import TrainConfig


def build_datasets(config: TrainConfig):
    from openmm_cgml.dataset import make_train_val_datasets

    if not config.data_dir:
        raise ValueError("the config needs data_dir (a generated data set)")
    if not Path(config.data_dir).is_dir():
        raise FileNotFoundError(f"data_dir {config.data_dir} does not exist; make it with `cgml generate`")
    config.check_system_filter()
    train_set, val_set = make_train_val_datasets(
        config.data_dir, config.cg_level, config.seq_len, config.dilation, config.val_fraction,
        seed=config.split_seed, stride=config.stride, kind=config.system,
        small_molecules_as_beads=config.small_molecules_as_beads,
        small_molecule_max_atoms=config.small_molecule_max_atoms)
    if config.train_max_windows is not None:
        train_set.index = train_set.index[: int(config.train_max_windows)]
    if len(train_set) == 0:
        raise ValueError("no training windows: trajectories shorter than seq_len x dilation + 1 frames?")
    return train_set, val_set


def data_statistics(train_set, dilation: int) -> dict[str, float]:
    """Velocity / acceleration std (nm/step, nm/step^2) and bead-mass mean/std of the training set."""
    velocities, accelerations = [], []
    for trajectory in train_set.trajectories:
        frames = torch.as_tensor(trajectory.positions[::dilation], dtype=torch.float64)
        if frames.size(0) >= 3:
            v = frames[1:] - frames[:-1]
            velocities.append(v.reshape(-1))
            accelerations.append((v[1:] - v[:-1]).reshape(-1))
    masses = np.concatenate([s.bead_masses for s in train_set.systems]).astype(np.float64)
    return {"velocity_std": float(torch.cat(velocities).std()),
            "acceleration_std": float(torch.cat(accelerations).std()),
            "mass_mean": float(masses.mean()), "mass_std": float(masses.std())}


def distance_pools(dataset, max_frames: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The pair distances the distance limits are learned from, pooled over at most
    ``max_frames`` evenly spaced frames of each trajectory: (nearest-non-bonded-bead
    distances, CG bond lengths), nm. Computed once, read at any quantile."""
    nonbonded, bonded = [], []
    for trajectory, graph in zip(dataset.trajectories, dataset.systems):
        frames = evenly_spaced(trajectory.n_frames, max_frames)
        if trajectory.n_beads >= 2:
            d = nearest_nonbonded_distances(trajectory.positions, trajectory.box, graph.cg_bonds, frames)
            nonbonded.append(d[np.isfinite(d)].ravel())
        bonds = np.asarray(graph.cg_bonds).reshape(-1, 2)
        if len(bonds):
            x = trajectory.positions[frames].astype(np.float64)
            bonded.append(np.linalg.norm(x[:, bonds[:, 1]] - x[:, bonds[:, 0]], axis=-1).ravel())
    pool = lambda parts: np.concatenate(parts) if parts else np.empty(0)  # noqa: E731
    return pool(nonbonded), pool(bonded)


def exclusion_distance(dataset, quantile: float | None, max_frames: int = 200, pools=None) -> float:
    """The excluded-volume distance (nm) learned from data: ``quantile`` of the
    nearest-non-bonded-bead distances pooled over at most ``max_frames`` evenly spaced
    frames of each training trajectory (0.0 for None or when no bead has a non-bonded
    neighbour). The default 1e-3 sits just above the data's closest approach (the very
    minimum is one outlier frame: on 100-monomer chains 1.5 nm against ~2.05 nm for the
    1e-3 quantile of every chain length), so the correction only removes overlaps the
    data almost never shows. ``pools``: ``distance_pools(dataset, max_frames)``, if
    already computed."""
    if quantile is None:
        return 0.0
    pooled = (pools if pools is not None else distance_pools(dataset, max_frames))[0]
    return float(np.quantile(pooled, quantile)) if pooled.size else 0.0


def bond_length_limit(dataset, quantile: float | None, max_frames: int = 200, pools=None) -> float:
    """The bond-length limit (nm) learned from data: the (1 - ``quantile``) quantile of
    the CG bond lengths pooled over at most ``max_frames`` evenly spaced frames of each
    training trajectory (0.0 for None or without CG bonds). Learned rollouts whose bonds
    outgrow the data's range are out of distribution, and the model does not pull them
    back: on the pretrained chain data, bonds of a swelling rollout reached 40 nm
    against at most ~5 nm in MD. ``pools``: as for ``exclusion_distance``."""
    if quantile is None:
        return 0.0
    pooled = (pools if pools is not None else distance_pools(dataset, max_frames))[1]
    return float(np.quantile(pooled, 1.0 - quantile)) if pooled.size else 0.0
