"""Training windows over coarse-grained trajectories.

A *window* starting at recorded frame ``s`` uses the input frames
``s, s + d, ..., s + (T-1) d`` (oldest first; T = ``seq_len``, d = ``dilation``) and the
target frame ``s + T d`` (one learned step = d x record interval after the newest input).
Train/validation splits are made by *system* (trajectory), never by frame.

CG trajectories are cached as ``<trajectory dir>/cg_<fingerprint[:16]>.npz`` (key: the
:class:`~openmm_cgml.coarse_grain.CGMapping` fingerprint; the DCD size and mtime are
checked too), with the mapping beside it as ``cg_<fingerprint[:16]>.mapping.json``. A
cache that cannot be read or does not fit the trajectory is reported (warning with its
path), deleted and rebuilt. The cache also holds ``fine_rg2`` [F, M]: the true
fine-level (atomistic) Rg^2 of each molecule with >= 2 beads in every frame (the
property head's target, ``openmm_cgml.models.property``); a cache written before it
existed is rebuilt silently (once) to add it.

Sample format (``WindowDataset[i]``, NumPy)::

    history      float32 [T, N, 3]  CG positions (nm), oldest first
    target       float32 [N, 3]     CG positions of the target frame
    box          float32 [3, 3]     box vectors (rows a,b,c) of the newest input frame,
                                    all zero for non-periodic systems
    system       int                index into ``dataset.systems``
    start_frame  int                recorded frame index of history[0]
    fine_rg2     float32 [M]        true fine Rg^2 (nm^2) of the target frame per molecule
                                    with >= 2 beads (NaN when the trajectory has none)

The fine graph and CG topology are kept once per *system* in ``dataset.systems[k]``
(:class:`SystemGraph`): ``cg_bonds`` int64 [E,2], ``bead_masses`` float32 [N],
``atom_type`` int64 [n], ``atom_masses`` float32 [n], ``fine_bonds`` int64 [B,2],
``bond_type`` int64 [B], ``bead_of_atom`` int64 [n], ``periodic``, ``step_ps``,
``mapping``, ``bead_molecule`` int64 [N] (molecule index among those with >= 2 beads,
-1 for other beads). Type indices refer to ``dataset.atom_vocabulary`` / ``bond_vocabulary``.

Batch format (``dataset.collate(samples)``, torch tensors; B graphs, Ntot beads,
Atot atoms)::

    history       float32 [T, Ntot, 3]   beads of all graphs concatenated in batch order
    target        float32 [Ntot, 3]
    bead_masses   float32 [Ntot]
    batch         int64   [Ntot]         graph id (0..B-1) of each bead
    cg_bonds      int64   [Etot, 2]      bead indices, offset by the graph's first bead
    box           float32 [B, 3, 3]      zero for non-periodic graphs
    periodic      bool    [B]
    n_beads       int64   [B]
    system        int64   [B]            index into dataset.systems
    start_frame   int64   [B]
    step_ps       float32 [B]            time of one learned step (dilation x interval)
    atom_type     int64   [Atot]         fine graph of every graph, concatenated
    atom_masses   float32 [Atot]
    fine_bonds    int64   [Btot, 2]      atom indices, offset by the graph's first atom
    bond_type     int64   [Btot]
    bead_of_atom  int64   [Atot]         bead index in the batch (offset by first bead)
    atom_batch    int64   [Atot]         graph id of each atom
    property_bead     int64   [K]        beads of molecules with >= 2 beads (batch indices)
    property_molecule int64   [K]        their molecule, numbered over the batch (0..Mtot-1)
    fine_rg2          float32 [Mtot]     true fine Rg^2 of each such molecule (target frame)
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from openmm_cgml.coarse_grain import CGMapping, bond_type_table, build_vocabulary
from openmm_cgml.files import write_atomic
from openmm_cgml.trajectories import (TRAJECTORY_FILE, list_trajectories, load_trajectory,
                                  read_metadata)


@dataclass
class CGTrajectory:
    """A coarse-grained trajectory: positions float32 [F,N,3] nm, box [F,3,3] or None."""

    name: str
    split: str
    kind: str
    directory: Path | None
    positions: np.ndarray
    box: np.ndarray | None
    mapping: CGMapping
    record_interval_ps: float
    fine_rg2: np.ndarray | None = None  # [F, M] true fine Rg^2 per molecule with >= 2 beads

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_beads(self) -> int:
        return int(self.positions.shape[1])


def mapping_for_trajectory(directory: str | os.PathLike, cg_level: float,
                           small_molecules_as_beads: bool = False,
                           small_molecule_max_atoms: int = 20, seed: int = 0) -> CGMapping:
    """The CG mapping of a stored trajectory (from its metadata; no coordinates read)."""
    metadata = read_metadata(directory)
    return CGMapping.from_graph(
        len(metadata["atom_types"]), metadata["bonds"], metadata["masses_amu"], cg_level,
        atom_types=metadata["atom_types"], bond_types=metadata["bond_types"],
        small_molecules_as_beads=small_molecules_as_beads,
        small_molecule_max_atoms=small_molecule_max_atoms, seed=seed)


def _read_cg_cache(path: Path, source_stamp: np.ndarray, n_beads: int, n_frames: int | None,
                   n_molecules: int = 0) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(positions, box, fine_rg2) from a CG cache file, or Nones when it is stale (the
    DCD changed) or unusable; an unreadable or inconsistent cache (truncated write, disk
    error) is reported with its path, deleted, and rebuilt by the caller. A cache
    without ``fine_rg2`` (written before the property head) gives fine_rg2 None."""
    try:
        with np.load(path) as data:
            if not np.array_equal(data["source_stamp"], source_stamp):
                return None, None, None
            positions = data["positions"]
            box = data["box"] if bool(data["periodic"]) else None
            fine = data["fine_rg2"] if "fine_rg2" in data.files else None
        problem = None
        if positions.ndim != 3 or positions.shape[1:] != (n_beads, 3):
            problem = f"positions of shape {positions.shape}, expected [frames, {n_beads}, 3]"
        elif n_frames is not None and positions.shape[0] != int(n_frames):
            problem = f"{positions.shape[0]} frames, the trajectory has {n_frames}"
        elif box is not None and box.shape != (positions.shape[0], 3, 3):
            problem = f"box of shape {box.shape}"
        elif fine is not None and fine.shape != (positions.shape[0], n_molecules):
            problem = f"fine_rg2 of shape {fine.shape}, expected [{positions.shape[0]}, {n_molecules}]"
        if problem is None:
            return positions, box, fine
    except Exception as err:  # BadZipFile, EOFError, KeyError, ValueError, OSError, ...
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(f"CG cache {path} is unreadable or inconsistent ({problem}); deleting and rebuilding it",
                  stacklevel=3)
    path.unlink(missing_ok=True)
    return None, None, None


def load_cg_trajectory(directory: str | os.PathLike, mapping: CGMapping | None = None,
                       cg_level: float | None = None, cache: bool = True,
                       **mapping_options) -> CGTrajectory:
    """Coarse-grain one stored trajectory with ``mapping`` (or build one from
    ``cg_level`` and ``mapping_options``), using/refreshing the npz cache."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    if mapping is None:
        if cg_level is None:
            raise ValueError("give either a CGMapping or a cg_level")
        mapping = mapping_for_trajectory(directory, cg_level, **mapping_options)
    if mapping.n_atoms != len(metadata["atom_types"]):
        raise ValueError(f"mapping is for {mapping.n_atoms} atoms, {directory} has "
                         f"{len(metadata['atom_types'])}")
    key = mapping.fingerprint()[:16]
    cache_path = directory / f"cg_{key}.npz"
    dcd = (directory / TRAJECTORY_FILE).stat()
    source_stamp = np.asarray([dcd.st_size, dcd.st_mtime_ns], dtype=np.int64)
    from openmm_cgml.models.property import fine_rg2, property_molecules

    bead_molecule = property_molecules(mapping.molecule_of_bead)
    n_molecules = int(bead_molecule.max()) + 1 if len(bead_molecule) else 0
    positions = box = fine = None
    if cache and cache_path.exists():
        positions, box, fine = _read_cg_cache(cache_path, source_stamp, mapping.n_beads, metadata.get("n_frames"),
                                              n_molecules)
    if positions is None or fine is None:
        record = load_trajectory(directory)
        positions = mapping.map_positions(record.positions).astype(np.float32)
        box = record.box
        fine = fine_rg2(record.positions, mapping).astype(np.float32)
        if cache:
            def save(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    np.savez(handle, positions=positions, box=box if box is not None else np.zeros((0, 3, 3)),
                             periodic=box is not None, source_stamp=source_stamp, fine_rg2=fine)

            write_atomic(cache_path, save)
            mapping.save(directory / f"cg_{key}.mapping.json")
    return CGTrajectory(metadata["name"], metadata.get("split", "train"), metadata["kind"], directory,
                        positions, box, mapping, float(metadata["record_interval_ps"]), fine)


# ----------------------------------------------------------------------------- windows
def window_indices(n_frames: int, seq_len: int, dilation: int, stride: int = 1) -> np.ndarray:
    """Recorded-frame indices of every window: int64 [W, seq_len + 1]; row w is
    ``[s, s+d, ..., s+(T-1)d, s+Td]`` with s = w * stride (last column = target)."""
    if seq_len < 1 or dilation < 1 or stride < 1:
        raise ValueError(f"seq_len, dilation and stride must be >= 1 (got {seq_len}, {dilation}, {stride})")
    span = seq_len * dilation  # target offset from the window start
    starts = np.arange(0, max(0, n_frames - span), stride, dtype=np.int64)
    return starts[:, None] + dilation * np.arange(seq_len + 1, dtype=np.int64)[None, :]


def split_by_system(names: Sequence[str], val_fraction: float, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of system names (never by frame)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    names = sorted(set(names))
    if not names:
        return [], []
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    n_val = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(names) > 1:
        n_val = min(max(n_val, 1), len(names) - 1)
    else:
        n_val = 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class SystemGraph:
    """Per-system graph data shared by all its windows (see module docstring)."""

    name: str
    cg_bonds: np.ndarray
    bead_masses: np.ndarray
    atom_type: np.ndarray
    atom_masses: np.ndarray
    fine_bonds: np.ndarray
    bond_type: np.ndarray
    bead_of_atom: np.ndarray
    periodic: bool
    step_ps: float
    mapping: CGMapping
    bead_molecule: np.ndarray | None = None

    def __post_init__(self):
        if self.bead_molecule is None:
            from openmm_cgml.models.property import property_molecules

            self.bead_molecule = property_molecules(self.mapping.molecule_of_bead)

    @property
    def n_molecules(self) -> int:
        """Molecules with >= 2 beads (those the property head covers)."""
        return int(self.bead_molecule.max()) + 1 if len(self.bead_molecule) else 0

    @property
    def n_beads(self) -> int:
        return len(self.bead_masses)

    @property
    def n_atoms(self) -> int:
        return len(self.atom_type)


class WindowDataset:
    """Map-style dataset of training windows over several CG trajectories; use with
    ``torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, collate_fn=dataset.collate)``.
    """

    def __init__(self, trajectories: Sequence[CGTrajectory], seq_len: int, dilation: int,
                 stride: int = 1, atom_vocabulary: Sequence[str] | None = None,
                 bond_vocabulary: Sequence[str] | None = None, bond_type_of_pair: dict[str, str] | None = None):
        self.trajectories = list(trajectories)
        self.seq_len, self.dilation, self.stride = int(seq_len), int(dilation), int(stride)
        self.atom_vocabulary = list(atom_vocabulary) if atom_vocabulary is not None else \
            build_vocabulary([t.mapping.atom_types for t in self.trajectories])
        self.bond_vocabulary = list(bond_vocabulary) if bond_vocabulary is not None else \
            build_vocabulary([t.mapping.bond_types for t in self.trajectories])
        #: bond type of each atom-type pair (coarse_grain.bond_type_table), for new topologies
        self.bond_type_of_pair = dict(bond_type_of_pair) if bond_type_of_pair is not None else \
            bond_type_table([t.mapping for t in self.trajectories])
        self.systems: list[SystemGraph] = []
        index_rows = []
        for k, trajectory in enumerate(self.trajectories):
            mapping = trajectory.mapping
            fine = mapping.fine_graph(self.atom_vocabulary, self.bond_vocabulary)
            self.systems.append(SystemGraph(
                name=trajectory.name,
                cg_bonds=mapping.cg_bonds,
                bead_masses=mapping.bead_masses.astype(np.float32),
                atom_type=fine["atom_type"],
                atom_masses=fine["atom_masses"].astype(np.float32),
                fine_bonds=fine["fine_bonds"],
                bond_type=fine["bond_type"],
                bead_of_atom=fine["bead_of_atom"],
                periodic=trajectory.box is not None,
                step_ps=self.dilation * trajectory.record_interval_ps,
                mapping=mapping,
            ))
            windows = window_indices(trajectory.n_frames, self.seq_len, self.dilation, self.stride)
            index_rows.append(np.stack([np.full(len(windows), k, dtype=np.int64), windows[:, 0]], axis=1))
        self.index = np.concatenate(index_rows) if index_rows else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        system, start = (int(v) for v in self.index[i])
        trajectory = self.trajectories[system]
        frames = start + self.dilation * np.arange(self.seq_len + 1)
        window = trajectory.positions[frames]
        newest = frames[-2]
        box = trajectory.box[newest].astype(np.float32) if trajectory.box is not None \
            else np.zeros((3, 3), dtype=np.float32)
        if trajectory.fine_rg2 is not None:
            fine = np.asarray(trajectory.fine_rg2[frames[-1]], dtype=np.float32)
        else:
            fine = np.full(self.systems[system].n_molecules, np.nan, dtype=np.float32)
        return {
            "history": np.ascontiguousarray(window[:-1], dtype=np.float32),
            "target": np.ascontiguousarray(window[-1], dtype=np.float32),
            "box": box,
            "system": system,
            "start_frame": start,
            "fine_rg2": fine,
        }

    def target_frames(self, indices: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(system, recorded target frame) of the given windows (default: all)."""
        rows = self.index if indices is None else self.index[np.asarray(indices, dtype=np.int64)]
        span = self.seq_len * self.dilation
        return [(int(k), int(s) + span) for k, s in rows]

    def rg2_pairs(self, indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(CG Rg^2, true fine Rg^2), float64 1-D over (window, molecule with >= 2 beads), of
        the target frames of the given windows (default: all): what the property head's
        no-learning baselines are measured on. Windows without fine Rg^2 are left out."""
        from openmm_cgml.models.property import cg_rg2

        by_system: dict[int, list[int]] = {}
        for system, frame in self.target_frames(indices):
            by_system.setdefault(system, []).append(frame)
        cg_parts, fine_parts = [], []
        for system, frames in sorted(by_system.items()):
            trajectory = self.trajectories[system]
            if trajectory.fine_rg2 is None or not self.systems[system].n_molecules:
                continue
            frames = np.asarray(frames)
            cg_parts.append(cg_rg2(trajectory.positions[frames], trajectory.mapping.bead_masses,
                                   trajectory.mapping.molecule_of_bead).ravel())
            fine_parts.append(np.asarray(trajectory.fine_rg2[frames], dtype=np.float64).ravel())
        if not cg_parts:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(cg_parts), np.concatenate(fine_parts)

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Batch samples into one disjoint graph (torch tensors; format in module docstring)."""
        import torch

        bead_offset = atom_offset = molecule_offset = 0
        parts: dict[str, list] = {k: [] for k in (
            "batch", "cg_bonds", "bead_masses", "atom_type", "atom_masses", "fine_bonds",
            "bond_type", "bead_of_atom", "atom_batch", "property_bead", "property_molecule", "fine_rg2")}
        for graph_id, sample in enumerate(samples):
            system = self.systems[sample["system"]]
            parts["batch"].append(np.full(system.n_beads, graph_id, dtype=np.int64))
            parts["cg_bonds"].append(system.cg_bonds + bead_offset)
            parts["bead_masses"].append(system.bead_masses)
            parts["atom_type"].append(system.atom_type)
            parts["atom_masses"].append(system.atom_masses)
            parts["fine_bonds"].append(system.fine_bonds + atom_offset)
            parts["bond_type"].append(system.bond_type)
            parts["bead_of_atom"].append(system.bead_of_atom + bead_offset)
            parts["atom_batch"].append(np.full(system.n_atoms, graph_id, dtype=np.int64))
            in_molecule = np.flatnonzero(system.bead_molecule >= 0)
            parts["property_bead"].append(in_molecule + bead_offset)
            parts["property_molecule"].append(system.bead_molecule[in_molecule] + molecule_offset)
            fine = sample.get("fine_rg2")
            parts["fine_rg2"].append(np.asarray(fine, dtype=np.float32) if fine is not None
                                     else np.full(system.n_molecules, np.nan, dtype=np.float32))
            molecule_offset += system.n_molecules
            bead_offset += system.n_beads
            atom_offset += system.n_atoms
        batch = {key: torch.from_numpy(np.concatenate(values)) for key, values in parts.items()}
        batch["cg_bonds"] = batch["cg_bonds"].reshape(-1, 2)
        batch["fine_bonds"] = batch["fine_bonds"].reshape(-1, 2)
        batch["history"] = torch.from_numpy(np.concatenate([s["history"] for s in samples], axis=1))
        batch["target"] = torch.from_numpy(np.concatenate([s["target"] for s in samples], axis=0))
        batch["box"] = torch.from_numpy(np.stack([s["box"] for s in samples]))
        systems = [self.systems[s["system"]] for s in samples]
        batch["periodic"] = torch.tensor([g.periodic for g in systems], dtype=torch.bool)
        batch["n_beads"] = torch.tensor([g.n_beads for g in systems], dtype=torch.int64)
        batch["system"] = torch.tensor([s["system"] for s in samples], dtype=torch.int64)
        batch["start_frame"] = torch.tensor([s["start_frame"] for s in samples], dtype=torch.int64)
        batch["step_ps"] = torch.tensor([g.step_ps for g in systems], dtype=torch.float32)
        return batch


def load_cg_trajectories(data_dir: str | os.PathLike, cg_level: float, split: str | None = None,
                         kind: str | None = None, cache: bool = True, **mapping_options
                         ) -> list[CGTrajectory]:
    """Every complete trajectory of a generated data set (optionally one split/kind), CG."""
    return [load_cg_trajectory(d, cg_level=cg_level, cache=cache, **mapping_options)
            for d in list_trajectories(data_dir, split=split, kind=kind)]


def make_train_val_datasets(data_dir: str | os.PathLike, cg_level: float, seq_len: int,
                            dilation: int, val_fraction: float = 0.2, seed: int = 0,
                            stride: int = 1, kind: str | None = None, **mapping_options
                            ) -> tuple[WindowDataset, WindowDataset]:
    """Training and validation window sets from the "train" systems of ``data_dir``,
    split by system; both share one type vocabulary (built from every system in the
    data set, so test systems can be indexed with it too), and so do the bond types of
    atom-type pairs (``bond_type_of_pair``)."""
    all_trajectories = load_cg_trajectories(data_dir, cg_level, kind=kind, **mapping_options)
    train_pool = [t for t in all_trajectories if t.split == "train"]
    if not train_pool:
        raise ValueError(f"no complete 'train' trajectories in {data_dir}")
    train_names, val_names = split_by_system([t.name for t in train_pool], val_fraction, seed)
    atom_vocabulary = build_vocabulary([t.mapping.atom_types for t in all_trajectories])
    bond_vocabulary = build_vocabulary([t.mapping.bond_types for t in all_trajectories])
    pair_types = bond_type_table([t.mapping for t in all_trajectories])

    def subset(names):
        return WindowDataset([t for t in train_pool if t.name in set(names)], seq_len, dilation,
                             stride, atom_vocabulary, bond_vocabulary, pair_types)

    return subset(train_names), subset(val_names)
