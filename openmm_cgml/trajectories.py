"""The on-disk trajectory format: the one place that writes and reads reference data.

Readers (``dataset.py``, ``evaluate.py``, the trainer, notebooks) import this module, not
the MD driver (``generate.py``) or the importer (``trajectory_import.py``), which both
write through it.

One directory per trajectory, all readable by mdtraj::

    DIR/dataset.json                 index: {"format", "trajectories": [{name, kind, split,
                                     path, n_frames, complete}, ...]}
    DIR/<name>/topology.pdb          topology with CONECT bonds (first frame, nm -> A)
    DIR/<name>/trajectory.dcd        positions, *unwrapped* (no periodic jumps); unit cell
                                     stored only for periodic systems
    DIR/<name>/thermo.csv            per frame: time_ps, potential/kinetic energy (kJ/mol),
                                     kinetic temperature (K)   [generated data only]
    DIR/<name>/metadata.json         kind, name, split, seed, composition,
                                     record_interval_ps, temperature_K, timestep_ps,
                                     n_frames, periodic, box (nm, 3x3 or null), atom_types
                                     (one per atom), bond_types (one per bond), bonds
                                     (atom index pairs, aligned with bond_types),
                                     masses_amu, openmm_version, complete,
                                     spec_fingerprint (generated data: SHA-256 of the
                                     resolved spec, see ``generate.SPEC_KEYS``)
    DIR/<name>/equilibrated_state.xml  OpenMM State at the start of production (generated)
    DIR/<name>/production/           chunks, checkpoint, progress.json while running
                                     (deleted when the trajectory is complete)

``metadata.json`` is the source of truth for the fine graph (atom types, masses, bonds);
the PDB carries the same bonds for other tools.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.files import contained_path, quiet_stdout, write_json_atomic

INDEX_FILE = "dataset.json"
INDEX_FORMAT = "openmm-cgml-trajectories/1"
METADATA_FILE = "metadata.json"
TOPOLOGY_FILE = "topology.pdb"
TRAJECTORY_FILE = "trajectory.dcd"
THERMO_FILE = "thermo.csv"
EQUILIBRATED_STATE_FILE = "equilibrated_state.xml"
WORK_DIR = "production"


# ----------------------------------------------------------------------------- records
@dataclass
class TrajectoryRecord:
    """One stored trajectory in memory.

    ``positions``: [F, n, 3] nm (float32 as stored in DCD), unwrapped.
    ``box``: [F, 3, 3] nm periodic box vectors (rows a, b, c), or None if not periodic.
    """

    directory: Path | None
    topology: app.Topology
    positions: np.ndarray
    box: np.ndarray | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def split(self) -> str:
        return self.metadata.get("split", "train")

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[1])

    @property
    def record_interval_ps(self) -> float:
        return float(self.metadata["record_interval_ps"])

    @property
    def masses(self) -> np.ndarray:
        return np.asarray(self.metadata["masses_amu"], dtype=np.float64)

    @property
    def atom_types(self) -> list[str]:
        return list(self.metadata["atom_types"])

    @property
    def bonds(self) -> np.ndarray:
        return np.asarray(self.metadata["bonds"], dtype=np.int64).reshape(-1, 2)

    @property
    def bond_types(self) -> list[str]:
        return list(self.metadata["bond_types"])

    @property
    def periodic(self) -> bool:
        return self.box is not None


def _box_to_lengths_angles(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[F,3,3] box vectors (nm) -> lengths (nm) [F,3] and angles (deg) [F,3]."""
    a, b, c = box[:, 0], box[:, 1], box[:, 2]
    la, lb, lc = (np.linalg.norm(v, axis=1) for v in (a, b, c))

    def angle(u, v, lu, lv):
        return np.degrees(np.arccos(np.clip(np.sum(u * v, axis=1) / (lu * lv), -1, 1)))

    lengths = np.stack([la, lb, lc], axis=1)
    angles = np.stack([angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb)], axis=1)
    return lengths, angles


def write_topology_pdb(path: Path, topology: app.Topology, positions_nm: np.ndarray) -> None:
    """PDB with CONECT records (OpenMM writes them for non-standard residues)."""
    with open(path, "w") as handle:
        app.PDBFile.writeFile(topology, np.asarray(positions_nm) * unit.nanometer, handle)


class DCDWriter:
    """Writes frames (nm) to a DCD file through mdtraj (A inside the file)."""

    def __init__(self, path: Path, periodic: bool):
        import mdtraj

        self._file = mdtraj.formats.DCDTrajectoryFile(str(path), "w", force_overwrite=True)
        self._periodic = periodic

    def write(self, positions_nm: np.ndarray, box_nm: np.ndarray | None) -> None:
        xyz = np.asarray(positions_nm, dtype=np.float32) * 10.0
        if self._periodic:
            lengths, angles = _box_to_lengths_angles(np.asarray(box_nm, dtype=np.float64))
            self._file.write(xyz, cell_lengths=lengths * 10.0, cell_angles=angles)
        else:
            self._file.write(xyz)

    def close(self) -> None:
        self._file.close()


def write_trajectory(directory: str | os.PathLike, topology: app.Topology,
                     chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], metadata: dict[str, Any]) -> Path:
    """Write a whole trajectory into ``directory`` and list it in the parent's index.

    ``chunks``: (positions [f,n,3] nm, box [f,3,3] nm or None) blocks in time order,
    streamed into the DCD (a long trajectory never sits in memory at once). The PDB
    holds frame 0; for a periodic trajectory (``metadata["periodic"]``) frame 0's box is
    also the PDB's and metadata's ``box``. metadata.json is written last, so a trajectory
    with metadata is whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    periodic = bool(metadata.get("periodic"))
    writer = DCDWriter(directory / TRAJECTORY_FILE, periodic)
    first_positions = first_box = None
    try:
        for positions, box in chunks:
            writer.write(positions, box if periodic else None)
            if first_positions is None:
                first_positions = np.asarray(positions)[0]
                first_box = np.asarray(box)[0] if periodic else None
    finally:
        writer.close()
    if first_positions is None:
        raise ValueError(f"{directory}: no frames to write")
    if periodic:
        topology = _with_box(topology, first_box)
        metadata = dict(metadata, box=first_box.tolist())
    write_topology_pdb(directory / TOPOLOGY_FILE, topology, first_positions)
    write_json_atomic(directory / METADATA_FILE, metadata)
    update_index(directory.parent, metadata)
    return directory


def _with_box(topology: app.Topology, box_nm: np.ndarray) -> app.Topology:
    """A shallow copy of ``topology`` (same atoms and bonds) with these box vectors."""
    copy = app.Topology()
    copy.__dict__.update(topology.__dict__)
    copy.setPeriodicBoxVectors([openmm.Vec3(*map(float, row)) for row in box_nm] * unit.nanometer)
    return copy


def read_metadata(directory: str | os.PathLike, require_complete: bool = True) -> dict[str, Any]:
    """``metadata.json`` of a trajectory directory (cheap: no coordinates are read)."""
    directory = Path(directory)
    metadata_path = directory / METADATA_FILE
    if not metadata_path.exists():
        raise FileNotFoundError(f"{directory} is not a trajectory directory (no {METADATA_FILE})")
    metadata = json.loads(metadata_path.read_text())
    if require_complete and not metadata.get("complete", False):
        raise ValueError(f"trajectory {directory} is incomplete (generation did not finish)")
    return metadata


def load_trajectory(directory: str | os.PathLike) -> TrajectoryRecord:
    """Read one stored trajectory (see the module docstring for the layout)."""
    import mdtraj

    directory = Path(directory)
    metadata = read_metadata(directory)
    with quiet_stdout():  # mdtraj's C DCD reader prints two lines per file
        trajectory = mdtraj.load_dcd(str(directory / TRAJECTORY_FILE), top=str(directory / TOPOLOGY_FILE))
    if trajectory.n_atoms != len(metadata["atom_types"]):
        raise ValueError(
            f"{directory}: trajectory has {trajectory.n_atoms} atoms but metadata lists "
            f"{len(metadata['atom_types'])} atom types"
        )
    if metadata.get("n_frames") is not None and trajectory.n_frames != int(metadata["n_frames"]):
        raise ValueError(f"{directory / TRAJECTORY_FILE} holds {trajectory.n_frames} frames but "
                         f"{METADATA_FILE} says {metadata['n_frames']}: the file was truncated or replaced")
    box = None
    if metadata.get("periodic"):
        box = np.asarray(trajectory.unitcell_vectors, dtype=np.float64)
    topology = trajectory.topology.to_openmm()
    return TrajectoryRecord(directory, topology, np.asarray(trajectory.xyz), box, metadata)


# ----------------------------------------------------------------------------- index
def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / INDEX_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"format": INDEX_FORMAT, "trajectories": []}


def update_index(out_dir: Path, metadata: dict[str, Any]) -> None:
    index = read_index(out_dir)
    entry = {
        "name": metadata["name"],
        "kind": metadata["kind"],
        "split": metadata["split"],
        "path": metadata["name"],
        "n_frames": metadata["n_frames"],
        "complete": bool(metadata.get("complete", False)),
    }
    entries = [e for e in index["trajectories"] if e["name"] != entry["name"]]
    entries.append(entry)
    index["trajectories"] = sorted(entries, key=lambda e: e["name"])
    write_json_atomic(out_dir / INDEX_FILE, index)


def list_trajectories(data_dir: str | os.PathLike, split: str | None = None,
                      kind: str | None = None) -> list[Path]:
    """Directories of the complete trajectories listed in ``data_dir/dataset.json``."""
    data_dir = Path(data_dir)
    if not (data_dir / INDEX_FILE).exists():
        raise FileNotFoundError(f"no {INDEX_FILE} in {data_dir}: not a generated data set")
    return [
        contained_path(data_dir, e.get("path"), f"{INDEX_FILE} entry {e.get('name')!r}: path", "the data set")
        for e in read_index(data_dir)["trajectories"]
        if e.get("complete") and (split is None or e["split"] == split)
        and (kind is None or e["kind"] == kind)
    ]


# ----------------------------------------------------------------------------- periodic unwrapping
def _minimum_image(delta: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Minimum-image displacement(s) for box rows a, b, c (triclinic via fractions)."""
    fractional = delta @ np.linalg.inv(box)
    fractional -= np.round(fractional)
    return fractional @ box


def unwrap_positions(positions: np.ndarray, box: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """Undo periodic wrapping: make molecules whole in frame 0 along bonds, then follow
    every atom in time by minimum-image steps (valid when atoms move less than half a
    box between frames). positions [F,n,3], box [F,3,3] (nm)."""
    positions = np.array(positions, dtype=np.float64)
    n_atoms = positions.shape[1]
    neighbours: list[list[int]] = [[] for _ in range(n_atoms)]
    for a, b in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        neighbours[a].append(int(b))
        neighbours[b].append(int(a))
    first = positions[0].copy()
    visited = np.zeros(n_atoms, dtype=bool)
    for root in range(n_atoms):
        if visited[root]:
            continue
        visited[root] = True
        stack = [root]
        while stack:
            atom = stack.pop()
            for other in neighbours[atom]:
                if not visited[other]:
                    first[other] = first[atom] + _minimum_image(first[other] - first[atom], box[0])
                    visited[other] = True
                    stack.append(other)
    steps = np.diff(positions, axis=0)
    for t in range(steps.shape[0]):
        steps[t] = _minimum_image(steps[t], box[t + 1])
    unwrapped = np.empty_like(positions)
    unwrapped[0] = first
    unwrapped[1:] = first + np.cumsum(steps, axis=0)
    return unwrapped
