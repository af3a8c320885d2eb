"""Reference trajectories: generation (``cgml generate``), import of users' own data
(``cgml import-trajectory``) and the common on-disk format.

On-disk format (one directory per trajectory, all readable by mdtraj)::

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
                                     spec_fingerprint (SHA-256 of the resolved spec:
                                     SPEC_KEYS; a resume with another spec is refused)
    DIR/<name>/equilibrated_state.xml  OpenMM State at the start of production (kept)
    DIR/<name>/production/           chunks, checkpoint, progress.json while running
                                     (deleted when the trajectory is complete)

``metadata.json`` is the source of truth for the fine graph (atom types, masses, bonds);
the PDB carries the same bonds for other tools.

Generation is resumable: production runs in chunks; after each chunk its frames are
saved, then an OpenMM checkpoint, then ``production/progress.json`` (each written
atomically), so a killed run restarts from its last complete chunk with no duplicated or
missing frames. Complete trajectories are skipped. Resuming (or skipping as done) a
trajectory whose stored spec differs from the requested one (another --seed, preset,
override or frame count) is refused with :class:`SpecMismatchError` naming the fields.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.systems.base import BuiltSystem, SystemSpec

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


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _box_to_lengths_angles(box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[F,3,3] box vectors (nm) -> lengths (nm) [F,3] and angles (deg) [F,3]."""
    a, b, c = box[:, 0], box[:, 1], box[:, 2]
    la, lb, lc = (np.linalg.norm(v, axis=1) for v in (a, b, c))

    def angle(u, v, lu, lv):
        return np.degrees(np.arccos(np.clip(np.sum(u * v, axis=1) / (lu * lv), -1, 1)))

    lengths = np.stack([la, lb, lc], axis=1)
    angles = np.stack([angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb)], axis=1)
    return lengths, angles


def _bond_index_pairs(topology: app.Topology) -> list[list[int]]:
    return [[int(a.index), int(b.index)] for a, b in topology.bonds()]


def write_topology_pdb(path: Path, topology: app.Topology, positions_nm: np.ndarray) -> None:
    """PDB with CONECT records (OpenMM writes them for non-standard residues)."""
    with open(path, "w") as handle:
        app.PDBFile.writeFile(topology, np.asarray(positions_nm) * unit.nanometer, handle)


class _DCDAppender:
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


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level writes to stdout (file descriptor 1) for the duration."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (e.g. some notebook kernels): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def load_trajectory(directory: str | os.PathLike) -> TrajectoryRecord:
    """Read one stored trajectory (see the module docstring for the layout)."""
    import mdtraj

    directory = Path(directory)
    metadata = read_metadata(directory)
    with _quiet_stdout():  # mdtraj's C DCD reader prints two lines per file
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


# ----------------------------------------------------------------------------- untrusted paths
def check_plain_name(name: str, what: str = "name") -> str:
    """``name`` if it is one plain path component (no separators, not "." or ".."),
    else ValueError: names become directory names inside an output directory."""
    text = str(name) if name is not None else ""
    if (not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text
            or (os.altsep and os.altsep in text) or Path(text).name != text):
        raise ValueError(f"{what} {name!r} is not a single plain path component "
                         "(no '/', no '..', not empty); it names a directory inside the output directory")
    return text


def contained_path(base: str | os.PathLike, relative: Any, what: str, where: str) -> Path:
    """``base / relative`` for a relative path read from a file we do not trust (a data
    set index, a model manifest): absolute paths and paths that climb out of ``base``
    with ``..`` are refused (ValueError naming ``what`` and ``where``). The check is
    lexical, so symbolic links the user made inside ``base`` keep working."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{what} must be a non-empty relative path string, got {relative!r}")
    normal = os.path.normpath(relative)
    if (os.path.isabs(relative) or Path(relative).drive or normal == ".."
            or normal.startswith(".." + os.sep) or normal == "."):
        raise ValueError(f"{what} {relative!r} points outside {where} {base}; refusing to follow it "
                         "(paths there must be relative and stay inside)")
    return Path(base) / normal


# ----------------------------------------------------------------------------- index
def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / INDEX_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"format": INDEX_FORMAT, "trajectories": []}


def _update_index(out_dir: Path, metadata: dict[str, Any]) -> None:
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
    _write_json_atomic(out_dir / INDEX_FILE, index)


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


# ----------------------------------------------------------------------------- platform
def make_platform(name: str = "CPU", threads: int | None = None
                  ) -> tuple[openmm.Platform, dict[str, str]]:
    """OpenMM platform and properties; ``threads`` sets CpuThreads on the CPU platform."""
    try:
        platform = openmm.Platform.getPlatformByName(name)
    except Exception:  # OpenMMException
        available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise ValueError(f"OpenMM platform {name!r} is not available; have {available}") from None
    properties: dict[str, str] = {}
    if name == "CPU" and threads is not None:
        properties["Threads"] = str(int(threads))
    return platform, properties


def _degrees_of_freedom(system: openmm.System) -> int:
    dof = 3 * sum(system.getParticleMass(i).value_in_unit(unit.dalton) > 0
                  for i in range(system.getNumParticles()))
    dof -= system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return int(dof)


def _steps_per_interval(interval: unit.Quantity, timestep: unit.Quantity, what: str) -> int:
    ratio = (interval / timestep)
    ratio = float(ratio.value_in_unit(unit.dimensionless)) if unit.is_quantity(ratio) else float(ratio)
    steps = int(round(ratio))
    if steps < 1 or abs(ratio - steps) > 1e-6 * max(1.0, ratio):
        raise ValueError(f"{what} ({interval}) is not a whole number of time steps ({timestep})")
    return steps


def _spec_n_frames(spec: SystemSpec) -> int:
    n_frames = spec.n_frames if spec.n_frames is not None else spec.composition.get("n_frames")
    if n_frames is None:
        raise ValueError(f"spec {spec.name!r} does not say how many frames to record "
                         "(set SystemSpec.n_frames or pass n_frames)")
    if int(n_frames) < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames} for {spec.name!r}")
    return int(n_frames)


def _base_metadata(built: BuiltSystem, n_frames: int) -> dict[str, Any]:
    spec = built.spec
    box = None
    if built.periodic:
        vectors = built.system.getDefaultPeriodicBoxVectors()
        box = [[float(x) for x in v.value_in_unit(unit.nanometer)] for v in vectors]
    return {
        "kind": spec.kind,
        "name": spec.name,
        "split": spec.split,
        "seed": int(spec.seed),
        "composition": spec.composition,
        "record_interval_ps": float(built.record_interval.value_in_unit(unit.picosecond)),
        "temperature_K": float(built.temperature.value_in_unit(unit.kelvin)),
        "timestep_ps": float(built.timestep.value_in_unit(unit.picosecond)),
        "n_frames": int(n_frames),
        "periodic": bool(built.periodic),
        "box": box,
        "n_atoms": built.topology.getNumAtoms(),
        "atom_types": list(built.atom_types),
        "bond_types": list(built.bond_types),
        "bonds": _bond_index_pairs(built.topology),
        "masses_amu": [float(built.system.getParticleMass(i).value_in_unit(unit.dalton))
                       for i in range(built.system.getNumParticles())],
        "openmm_version": openmm.__version__,
        "source": "openmm_cgml.generate",
        "complete": False,
    }


# ----------------------------------------------------------------------------- spec fingerprint
#: metadata keys that together are the *resolved spec* of a generated trajectory: what
#: was asked for (spec + frame count) and what the built model made of it
SPEC_KEYS = ("kind", "name", "split", "seed", "composition", "n_frames", "record_interval_ps",
             "temperature_K", "timestep_ps", "n_atoms", "periodic")


class SpecMismatchError(ValueError):
    """A trajectory directory holds data of another spec than the one requested."""


def _plain(value: Any) -> Any:
    """JSON round trip: the form a value has after metadata.json was written and read."""
    return json.loads(json.dumps(value, default=float))


def resolved_spec(metadata: dict[str, Any]) -> dict[str, Any]:
    """The resolved-spec part of a metadata dict (see ``SPEC_KEYS``)."""
    return {key: _plain(metadata.get(key)) for key in SPEC_KEYS}


def spec_fingerprint(metadata: dict[str, Any]) -> str:
    """SHA-256 (hex) of the resolved spec; stored as ``spec_fingerprint`` in metadata.json."""
    text = json.dumps(resolved_spec(metadata), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            label = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{label}: absent on disk, {new[key]!r} requested")
            elif key not in new:
                out.append(f"{label}: {old[key]!r} on disk, absent in the request")
            else:
                out.extend(_differences(old[key], new[key], label))
        return out
    return [] if old == new else [f"{prefix}: {old!r} on disk, {new!r} requested"]


def _check_same_spec(directory: Path, existing: dict[str, Any], requested: dict[str, Any],
                     keys: Sequence[str] = SPEC_KEYS) -> None:
    """Refuse to resume (or skip as done) a trajectory generated from another spec.

    ``requested`` holds the resolved-spec keys of the new request (only ``keys`` are
    compared; metadata written before fingerprints existed is compared key by key)."""
    if (existing.get("spec_fingerprint") and set(keys) == set(SPEC_KEYS)
            and existing["spec_fingerprint"] == spec_fingerprint(requested)):
        return
    old = {k: _plain(existing.get(k)) for k in keys if k in existing}
    new = {k: _plain(requested.get(k)) for k in keys if k in existing}
    differences = _differences(old, new)
    if not differences:
        return
    shown = "; ".join(differences[:8]) + (f"; ... ({len(differences)} differences)" if len(differences) > 8 else "")
    state = "a complete trajectory" if existing.get("complete") else "an unfinished trajectory"
    raise SpecMismatchError(
        f"{directory} already holds {state} generated from another spec ({shown}); "
        f"{'it would be kept' if existing.get('complete') else 'resuming would continue the old system'} "
        "under the new settings. Rerun with the original settings (seed, preset, overrides, "
        "n_frames), or delete that directory / use another --out")


def _requested_spec_keys(spec: SystemSpec, n_frames: int) -> dict[str, Any]:
    """The spec-level part of the resolved spec (known before the system is built)."""
    return {"kind": spec.kind, "name": spec.name, "split": spec.split, "seed": int(spec.seed),
            "composition": spec.composition, "n_frames": int(n_frames)}


# ----------------------------------------------------------------------------- generation
def generate_trajectory(
    built: BuiltSystem,
    out_dir: str | os.PathLike,
    n_frames: int | None = None,
    chunk_frames: int = 50,
    platform: str = "CPU",
    threads: int | None = None,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Minimise, equilibrate and record one system into ``out_dir/<name>/``; resumable.

    ``after_chunk(chunks_done)`` is called after each saved chunk (tests use it to
    simulate a kill). Returns the trajectory directory.
    """
    from tqdm.auto import tqdm

    spec = built.spec
    n_frames = int(n_frames) if n_frames is not None else _spec_n_frames(spec)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if len(built.atom_types) != built.topology.getNumAtoms():
        raise ValueError(f"{spec.name}: {len(built.atom_types)} atom types for "
                         f"{built.topology.getNumAtoms()} atoms")
    if len(built.bond_types) != built.topology.getNumBonds():
        raise ValueError(f"{spec.name}: {len(built.bond_types)} bond types for "
                         f"{built.topology.getNumBonds()} bonds")
    out_dir = Path(out_dir)
    directory = out_dir / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    work = directory / WORK_DIR
    metadata_path = directory / METADATA_FILE

    record_steps = _steps_per_interval(built.record_interval, built.timestep, "record interval")
    metadata = _base_metadata(built, n_frames)
    metadata["spec_fingerprint"] = spec_fingerprint(metadata)
    existing: dict[str, Any] = {}
    if metadata_path.exists():
        existing = json.loads(metadata_path.read_text())
        _check_same_spec(directory, existing, metadata)
        if existing.get("complete"):
            _update_index(out_dir, existing)
            return directory

    metadata["record_interval_steps"] = record_steps
    metadata["platform"] = platform
    if "equilibration_summary" in existing:  # resumed run: equilibration is not repeated
        metadata["equilibration_summary"] = existing["equilibration_summary"]
    _write_json_atomic(metadata_path, metadata)
    _update_index(out_dir, metadata)
    platform_object, properties = make_platform(platform, threads)

    def new_simulation() -> app.Simulation:
        return app.Simulation(built.topology, built.system, built.make_integrator(),
                              platform_object, properties)

    # --- minimise + equilibrate (once; its result is the production start) -------------
    state_path = directory / EQUILIBRATED_STATE_FILE
    if not state_path.exists():
        simulation = new_simulation()
        simulation.context.setPositions(built.positions)
        if built.periodic:
            simulation.context.setPeriodicBoxVectors(*built.system.getDefaultPeriodicBoxVectors())
        simulation.minimizeEnergy()
        simulation.context.setVelocitiesToTemperature(built.temperature, int(spec.seed) % (2**31 - 2) + 1)
        with tqdm(desc=f"{spec.name} equilibrate", unit="step", disable=not progress, leave=False,
                  total=getattr(built.equilibrate, "total_steps", None)) as bar:
            built.equilibrate(simulation, bar)
        summary = getattr(built.equilibrate, "summary", None)
        if summary:
            metadata["equilibration_summary"] = json.loads(json.dumps(summary, default=float))
            _write_json_atomic(metadata_path, metadata)
        state = simulation.context.getState(getPositions=True, getVelocities=True,
                                            enforcePeriodicBox=False)
        _write_bytes_atomic(state_path, openmm.XmlSerializer.serialize(state).encode())
        del simulation
        if work.exists():
            shutil.rmtree(work)  # production of an older equilibration is stale

    # --- production in chunks -------------------------------------------------------
    work.mkdir(exist_ok=True)
    progress_path = work / "progress.json"
    simulation = new_simulation()
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        frames_done = int(saved["frames_done"])
        chunk_files = list(saved["chunk_files"])
        with open(work / saved["checkpoint"], "rb") as handle:
            simulation.context.loadCheckpoint(handle.read())
    else:
        state = openmm.XmlSerializer.deserialize(state_path.read_text())
        simulation.context.setState(state)
        simulation.context.setTime(0.0)
        simulation.context.setStepCount(0)
        frames_done, chunk_files = 0, []
    if frames_done > n_frames:
        raise ValueError(f"{directory}: {frames_done} frames already recorded, more than the "
                         f"{n_frames} requested; delete the directory to restart")

    context = simulation.context
    integrator = simulation.integrator
    dof = _degrees_of_freedom(built.system)
    gas_constant = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    n_chunks = -(-n_frames // chunk_frames)
    start = time.perf_counter()
    with tqdm(total=n_frames, initial=frames_done, desc=f"{spec.name} production",
              unit="frame", disable=not progress, leave=False) as bar:
        while frames_done < n_frames:
            count = min(chunk_frames, n_frames - frames_done)
            positions = np.empty((count, built.topology.getNumAtoms(), 3), dtype=np.float32)
            boxes = np.zeros((count, 3, 3), dtype=np.float64)
            thermo = np.empty((count, 4), dtype=np.float64)
            for k in range(count):
                integrator.step(record_steps)
                state = context.getState(getPositions=True, getEnergy=True, enforcePeriodicBox=False)
                positions[k] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                if built.periodic:
                    boxes[k] = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
                kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
                thermo[k] = (state.getTime().value_in_unit(unit.picosecond),
                             state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                             kinetic, 2 * kinetic / (dof * gas_constant))
                bar.update(1)
            chunk_index = len(chunk_files)
            chunk_name = f"chunk_{chunk_index:05d}.npz"
            tmp = work / (chunk_name + ".tmp.npz")
            np.savez(tmp, positions=positions, boxes=boxes, thermo=thermo)
            os.replace(tmp, work / chunk_name)
            checkpoint_name = f"checkpoint_{chunk_index:05d}.chk"
            _write_bytes_atomic(work / checkpoint_name, context.createCheckpoint())
            previous = json.loads(progress_path.read_text())["checkpoint"] if progress_path.exists() else None
            frames_done += count
            chunk_files.append(chunk_name)
            _write_json_atomic(progress_path, {"frames_done": frames_done, "chunk_files": chunk_files,
                                               "checkpoint": checkpoint_name})
            if previous and previous != checkpoint_name:
                (work / previous).unlink(missing_ok=True)
            if after_chunk is not None:
                after_chunk(len(chunk_files))
    elapsed = time.perf_counter() - start

    # --- assemble the final files ------------------------------------------------------
    writer = _DCDAppender(directory / TRAJECTORY_FILE, built.periodic)
    thermo_all, first_positions, first_box = [], None, None
    for chunk_name in chunk_files:
        with np.load(work / chunk_name) as data:
            writer.write(data["positions"], data["boxes"] if built.periodic else None)
            thermo_all.append(data["thermo"])
            if first_positions is None:
                first_positions, first_box = data["positions"][0], data["boxes"][0]
    writer.close()
    topology = built.topology
    if built.periodic:
        # the production box (after any NPT equilibration), not the initial one
        metadata["box"] = first_box.tolist()
        topology = app.Topology()
        topology.__dict__.update(built.topology.__dict__)  # shallow copy keeps bonds
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in first_box] * unit.nanometer)
    write_topology_pdb(directory / TOPOLOGY_FILE, topology, first_positions)
    np.savetxt(directory / THERMO_FILE, np.concatenate(thermo_all)[:n_frames], delimiter=",",
               header="time_ps,potential_energy_kJ_mol,kinetic_energy_kJ_mol,kinetic_temperature_K",
               comments="")
    metadata["production_wall_seconds_last_run"] = elapsed
    metadata["complete"] = True
    _write_json_atomic(metadata_path, metadata)
    shutil.rmtree(work)
    _update_index(out_dir, metadata)
    return directory


def generate_dataset(
    kind: str,
    preset: str,
    out_dir: str | os.PathLike,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    n_frames: int | None = None,
    names: Iterable[str] | None = None,
    chunk_frames: int = 50,
    platform: str = "CPU",
    threads: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate every spec of ``kind``/``preset`` (or only ``names``) into ``out_dir``."""
    from tqdm.auto import tqdm

    from openmm_cgml.systems import get_system_module

    module = get_system_module(kind)
    specs: list[SystemSpec] = module.make_specs(preset, seed, **(overrides or {}))
    if names is not None:
        wanted = set(names)
        unknown = wanted - {s.name for s in specs}
        if unknown:
            raise ValueError(f"no spec named {sorted(unknown)} in {kind}/{preset}")
        specs = [s for s in specs if s.name in wanted]
    if n_frames is not None:
        specs = [replace(s, n_frames=int(n_frames)) for s in specs]
    # refuse a changed request before generating anything (generate_trajectory checks
    # the full resolved spec, including what the built model makes of it, again)
    for spec in specs:
        metadata_path = Path(out_dir) / spec.name / METADATA_FILE
        if metadata_path.exists():
            requested = _requested_spec_keys(spec, _spec_n_frames(spec))
            _check_same_spec(metadata_path.parent, json.loads(metadata_path.read_text()), requested,
                             keys=tuple(requested))
    directories = []
    for spec in tqdm(specs, desc=f"{kind} systems", unit="system", disable=not progress):
        built = module.build(spec)
        directories.append(generate_trajectory(
            built, out_dir, n_frames=_spec_n_frames(spec), chunk_frames=chunk_frames,
            platform=platform, threads=threads, progress=progress))
    return directories


# ----------------------------------------------------------------------------- atom types
#: element "symbols" that are not elements (virtual sites / extra particles)
_NOT_ELEMENTS = ("", "VS", "EP")


def atom_types_from_topology(atoms, known: Iterable[str] | None = None,
                             element_guessed: Sequence[bool] | None = None
                             ) -> tuple[list[str], list[bool]]:
    """THE atom-type rule of openmm-cgml for a topology without stored types, shared by
    ``import_trajectory`` and ``LearnedSimulator`` (OpenMM or mdtraj atoms).

    An atom's type is its element symbol, except that its *name* is used when

    - it has no element (or a virtual-site "element"), or
    - its element was guessed from the name (``element_guessed[i]``; PDB readers guess
      "B1" -> boron, "S1" -> sulfur when the element column is empty or not an element,
      as in coarse-grained PDBs written by OpenMM), or
    - ``known`` (the atom types a model was trained on) contains the name but not the
      element symbol: a known name wins over an element that is then taken as guessed.

    Returns ``(types, element_typed)``: ``element_typed[i]`` is True when the type is a
    trusted element symbol, i.e. when the element's mass may be used for that atom.
    """
    known = set(known) if known is not None else None
    types, element_typed = [], []
    for i, atom in enumerate(atoms):
        element = atom.element
        symbol = getattr(element, "symbol", None) if element is not None else None
        name = str(atom.name)
        guessed = bool(element_guessed[i]) if element_guessed is not None else False
        if symbol is None or symbol in _NOT_ELEMENTS or guessed:
            use_name = True
        elif known is not None:
            use_name = symbol not in known and name in known
        else:
            use_name = False
        types.append(name if use_name else str(symbol))
        element_typed.append(not use_name)
    return types, element_typed


def _guessed_elements(topology_path: Path, n_atoms: int) -> list[bool] | None:
    """Per atom, whether mdtraj had to guess its element from its name: PDB atoms whose
    element column (77-78) is empty or not an element; every atom of a GRO file. None
    when the format stores elements (or the PDB cannot be matched atom for atom)."""
    name = topology_path.name.lower()
    if name.endswith(".gro"):
        return [True] * n_atoms
    if not name.endswith((".pdb", ".pdb.gz", ".ent", ".pqr")):
        return None
    from mdtraj.core import element as mdtraj_element

    opener = __import__("gzip").open if name.endswith(".gz") else open
    guessed = []
    with opener(topology_path, "rt") as handle:
        for line in handle:
            if line.startswith("ENDMDL"):
                break
            if line.startswith(("ATOM  ", "HETATM")):
                try:
                    mdtraj_element.get_by_symbol(line[76:78].strip())
                    guessed.append(False)
                except KeyError:
                    guessed.append(True)
    return guessed if len(guessed) == n_atoms else None


def _dcd_truncation(path: Path, n_read: int) -> str | None:
    """A description of why the DCD file at ``path`` looks truncated (header frame count
    or file size not matching ``n_read`` whole frames), or None. mdtraj reads the whole
    frames a cut-off DCD holds without an error (its C reader only prints to stdout)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(92 + 12)
            if len(head) < 104:
                return f"{path} is truncated: {size} bytes, shorter than a DCD header"
            for order in ("<", ">"):
                if struct.unpack(order + "i", head[:4])[0] == 84 and head[4:8] == b"CORD":
                    break
            else:
                return None  # 64-bit record markers or not a CHARMM/NAMD DCD: no check
            icntrl = struct.unpack(order + "20i", head[8:88])
            nset, fixed, has_cell, four_d, charmm = icntrl[0], icntrl[8], icntrl[10], icntrl[11], icntrl[19]
            title_size = struct.unpack(order + "i", head[92:96])[0]
            handle.seek(92 + 4 + title_size + 4)
            natoms_block = handle.read(12)
    except OSError:
        return None
    if len(natoms_block) < 12 or fixed != 0:
        return None
    n_atoms = struct.unpack(order + "i", natoms_block[4:8])[0]
    header = 92 + 8 + title_size + 12
    frame = 3 * (8 + 4 * n_atoms) + (56 if (charmm and has_cell) else 0) + ((8 + 4 * n_atoms) if (charmm and four_d) else 0)
    whole, stray = divmod(max(0, size - header), frame)
    if nset == n_read == whole and stray == 0:
        return None
    extra = f" plus {stray} bytes of a partial frame" if stray else ""
    return (f"{path} looks truncated: its header says {nset} frames, the file holds {whole} whole "
            f"frames{extra}; {n_read} frames were read (was the run that wrote it killed?)")


def _per_atom(values, label: str, atoms, key_of, default, convert) -> list:
    """Expand ``values`` (None, a list with one entry per atom, or a dict keyed by
    ``key_of(i)``) into a per-atom list; ``default(i)`` fills atoms a dict does not name."""
    n = len(atoms)
    if values is None:
        return [default(i) for i in range(n)]
    if isinstance(values, dict):
        unused = set(values) - {key_of(i) for i in range(n)}
        if unused:
            warnings.warn(f"{label}: keys {sorted(unused)} match no atom", stacklevel=3)
        return [convert(values[key_of(i)]) if key_of(i) in values else default(i) for i in range(n)]
    values = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else list(values)
    if len(values) != n:
        raise ValueError(f"{label} has {len(values)} entries, expected {n}")
    return [convert(v) for v in values]


# ----------------------------------------------------------------------------- users' data
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


def import_trajectory(
    trajectory: str | os.PathLike,
    topology: str | os.PathLike,
    record_interval: float | unit.Quantity,
    out_dir: str | os.PathLike,
    name: str | None = None,
    split: str = "train",
    atom_types: list[str] | dict[str, str] | None = None,
    masses: list[float] | np.ndarray | dict[str, float] | None = None,
    bond_types: list[str] | None = None,
    unwrap: bool | None = None,
    temperature: float | unit.Quantity | None = None,
    kind: str = "user",
) -> TrajectoryRecord:
    """Bring any mdtraj-readable trajectory + topology with bonds into the data set format.

    ``record_interval``: time between frames (ps, or a Quantity). Atom types follow
    :func:`atom_types_from_topology` (the rule ``LearnedSimulator`` uses): the element
    symbol, or the atom name when there is no element or it was guessed from the name
    (PDB without a usable element column, GRO) -- a warning says when that happened.
    ``atom_types``: one per atom, or a dict atom name -> type (other atoms keep the rule).
    ``masses`` (amu): one per atom, or a dict atom type -> mass; by default the element
    mass of atoms typed by a trusted element; any other atom without a mass is an error
    (a guessed element's mass is never used: "B1" is not boron). ``bond_types`` default
    to "bond". ``unwrap`` (default: when the trajectory has a unit cell) makes molecules
    whole and removes periodic jumps, e.g. for DCDReporter output written with periodic
    wrapping. A DCD that looks truncated (header frame count or file size not matching
    the whole frames read) gives a warning. ``name`` (default: the trajectory's file
    stem) must be one plain path component. Writes ``out_dir/<name>/`` and returns the record.
    """
    import mdtraj

    name = check_plain_name(name if name is not None else Path(trajectory).stem, "name")
    if unit.is_quantity(record_interval):
        record_interval = record_interval.value_in_unit(unit.picosecond)
    record_interval = float(record_interval)
    if record_interval <= 0:
        raise ValueError(f"record_interval must be positive, got {record_interval} ps")
    if unit.is_quantity(temperature):
        temperature = temperature.value_in_unit(unit.kelvin)
    trajectory_path, topology_path = Path(trajectory), Path(topology)
    with _quiet_stdout():  # mdtraj's C DCD reader prints to stdout (we warn ourselves)
        traj = mdtraj.load(str(trajectory_path), top=str(topology_path))
    if trajectory_path.suffix.lower() == ".dcd":
        problem = _dcd_truncation(trajectory_path, int(traj.n_frames))
        if problem:
            warnings.warn(problem, stacklevel=2)
    top = traj.topology
    if top.n_bonds == 0 and top.n_atoms > 1:
        raise ValueError(f"topology {topology} has no bonds; give one with bonds (e.g. a PDB "
                         "with CONECT records written by OpenMM)")
    bonds = np.asarray([[b[0].index, b[1].index] for b in top.bonds], dtype=np.int64).reshape(-1, 2)
    atoms = list(top.atoms)
    guessed = _guessed_elements(topology_path, top.n_atoms)
    rule_types, element_typed = atom_types_from_topology(atoms, element_guessed=guessed)
    n_guessed = sum(guessed) if guessed is not None else 0
    explicit = isinstance(atom_types, (list, tuple, np.ndarray)) and isinstance(masses, (list, tuple, np.ndarray))
    if n_guessed and not explicit:
        examples = sorted({f"{a.name} -> {a.element.symbol}" for a, g in zip(atoms, guessed)
                           if g and a.element is not None})[:6]
        warnings.warn(
            f"{topology}: {n_guessed} of {len(atoms)} atoms have no usable element column, so their "
            f"elements were guessed from atom names ({', '.join(examples) or 'none recognised'}); their atom "
            "types are the atom names and the guessed element masses are not used. Pass atom_types=/masses= "
            "(cgml import-trajectory --atom-types/--masses) to set them.", stacklevel=2)
    atom_types = _per_atom(atom_types, "atom_types", atoms, lambda i: atoms[i].name,
                           lambda i: rule_types[i], str)
    mass_ok = [ok and t == r for ok, t, r in zip(element_typed, atom_types, rule_types)]

    def element_mass(i):
        return float(atoms[i].element.mass) if mass_ok[i] and atoms[i].element.mass > 0 else None

    masses = _per_atom(masses, "masses", atoms, lambda i: atom_types[i], element_mass,
                       lambda m: None if m is None else float(m))
    missing = sorted({atom_types[i] for i, m in enumerate(masses) if m is None or not m > 0})
    if missing:
        raise ValueError(
            f"no trustworthy mass for atom types {missing} of {topology} (no element, or an element "
            "guessed from the atom name); pass masses= as a dict type -> amu or one per atom "
            f"(cgml import-trajectory --masses {','.join(f'{t}=AMU' for t in missing[:4])}...)")
    if bond_types is None:
        bond_types = ["bond"] * len(bonds)
    if len(bond_types) != len(bonds):
        raise ValueError(f"bond_types has {len(bond_types)} entries, expected {len(bonds)}")
    periodic = traj.unitcell_vectors is not None
    box = np.asarray(traj.unitcell_vectors, dtype=np.float64) if periodic else None
    positions = np.asarray(traj.xyz, dtype=np.float64)
    if unwrap is None:
        unwrap = periodic
    if unwrap:
        if not periodic:
            raise ValueError("unwrap=True needs a trajectory with unit-cell information")
        positions = unwrap_positions(positions, box, bonds)

    out_dir = Path(out_dir)
    directory = out_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    omm_topology = top.to_openmm()
    if periodic:
        omm_topology.setPeriodicBoxVectors(box[0] * unit.nanometer)
    writer = _DCDAppender(directory / TRAJECTORY_FILE, periodic)
    writer.write(positions, box)
    writer.close()
    write_topology_pdb(directory / TOPOLOGY_FILE, omm_topology, positions[0])
    metadata = {
        "kind": kind,
        "name": name,
        "split": split,
        "seed": None,
        "composition": {"source_trajectory": str(trajectory), "source_topology": str(topology)},
        "record_interval_ps": record_interval,
        "temperature_K": temperature,
        "timestep_ps": None,
        "n_frames": int(traj.n_frames),
        "periodic": periodic,
        "box": box[0].tolist() if periodic else None,
        "n_atoms": int(top.n_atoms),
        "atom_types": list(map(str, atom_types)),
        "bond_types": list(map(str, bond_types)),
        "bonds": bonds.tolist(),
        "masses_amu": [float(m) for m in masses],
        "openmm_version": openmm.__version__,
        "source": "openmm_cgml.generate.import_trajectory",
        "unwrapped_on_import": bool(unwrap),
        "elements_guessed_on_import": int(n_guessed),
        "complete": True,
    }
    _write_json_atomic(directory / METADATA_FILE, metadata)
    _update_index(out_dir, metadata)
    return load_trajectory(directory)


# ----------------------------------------------------------------------------- CLI
def _parse_set(values: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in values or []:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def _run_generate(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set)
    for key in ("n_train", "n_test", "n_monomers"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    start = time.perf_counter()
    try:
        directories = generate_dataset(
            args.system, args.preset, args.out, seed=args.seed, overrides=overrides,
            n_frames=args.n_frames, names=args.only, chunk_frames=args.chunk_frames,
            platform=args.platform, threads=args.threads, progress=not args.no_progress)
    except SpecMismatchError as err:
        print(f"cgml generate: {err}", file=sys.stderr)
        return 2
    print(f"{len(directories)} trajectories in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


def parse_per_atom_option(text: str, option: str, number: bool = False) -> list | dict:
    """``--atom-types`` / ``--masses`` value: a JSON file (a list with one entry per atom,
    or an object keyed by atom name (types) / atom type (masses)), comma-separated
    KEY=VALUE pairs (an object), or a comma-separated list with one entry per atom."""
    path = Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"{option} {text}: not a readable JSON file ({err})") from None
        if not isinstance(data, (list, dict)):
            raise SystemExit(f"{option} {text}: expected a JSON list or object, got {type(data).__name__}")
    elif "=" in text:
        data = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SystemExit(f"{option} expects KEY=VALUE pairs separated by commas, got {item!r}")
            data[key.strip()] = value.strip()
    else:
        data = [item.strip() for item in text.split(",")]
    if number:
        values = data.values() if isinstance(data, dict) else data
        try:
            converted = [float(v) for v in values]
        except (TypeError, ValueError):
            raise SystemExit(f"{option}: masses must be numbers (amu), got {list(values)[:6]}") from None
        data = dict(zip(data, converted)) if isinstance(data, dict) else converted
    else:
        data = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else [str(v) for v in data]
    return data


def _run_import(args: argparse.Namespace) -> int:
    atom_types = parse_per_atom_option(args.atom_types, "--atom-types") if args.atom_types else None
    masses = parse_per_atom_option(args.masses, "--masses", number=True) if args.masses else None
    try:
        record = import_trajectory(args.trajectory, args.topology, args.record_interval_ps, args.out,
                                   name=args.name, split=args.split, atom_types=atom_types, masses=masses,
                                   unwrap=None if args.unwrap == "auto" else args.unwrap == "yes",
                                   temperature=args.temperature)
    except ValueError as err:
        print(f"cgml import-trajectory: {err}", file=sys.stderr)
        return 2
    print(f"imported {record.n_frames} frames of {record.n_atoms} atoms into {record.directory}")
    return 0


def add_cli(subparsers) -> None:
    from openmm_cgml.cli import non_negative_int, positive_int
    from openmm_cgml.systems import available_systems
    from openmm_cgml.systems.base import PRESETS

    parser = subparsers.add_parser(
        "generate", help="generate reference MD trajectories for a system",
        description="Build, minimise, equilibrate and record every system of a preset. "
                    "Resumable: rerun the same command to continue.")
    parser.add_argument("system", choices=available_systems())
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--out", required=True, help="output data directory")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--n-train", type=non_negative_int,
                        help="number of training systems (chain; see --set for others)")
    parser.add_argument("--n-test", type=non_negative_int, help="number of test systems (chain)")
    parser.add_argument("--n-frames", type=positive_int, help="production frames per trajectory")
    parser.add_argument("--n-monomers", type=positive_int, help="chain length (chain system)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any other make_specs override (value parsed as JSON)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="generate only these specs")
    parser.add_argument("--chunk-frames", type=positive_int, default=50,
                        help="frames between checkpoints (default 50)")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--threads", type=positive_int, help="CPU platform threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_generate)

    parser = subparsers.add_parser(
        "import-trajectory", help="bring your own trajectory into the data set format",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write an mdtraj-readable trajectory + topology (with bonds) as OUT/NAME/ in the "
                    "data set format.\n\n"
                    "Atom types: the element symbol, or the atom name when an atom has no element or its\n"
                    "element was guessed from its name (a PDB without a usable element column -- e.g.\n"
                    "coarse-grained PDBs written by OpenMM, element 'EP' -- or a GRO file); the same rule\n"
                    "LearnedSimulator applies. Masses: element masses of atoms typed by a real element;\n"
                    "every other atom needs --masses (guessed element masses are never used).\n\n"
                    "--atom-types / --masses take one of:\n"
                    "  a JSON file      a list (one entry per atom, in topology order) or an object\n"
                    "                   (--atom-types: atom name -> type; --masses: atom type -> amu)\n"
                    "  KEY=VALUE,...    the same object inline, e.g. --masses B1=1,B2=1,S1=1,S2=1\n"
                    "  V1,V2,...        one value per atom, e.g. --masses 12.011,15.999\n"
                    "Atoms an object does not name keep the default rule.")
    parser.add_argument("trajectory", help="any mdtraj-readable trajectory (DCD, XTC, ...)")
    parser.add_argument("--topology", required=True, help="topology with bonds (e.g. PDB)")
    parser.add_argument("--record-interval-ps", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", help="directory name inside --out (one plain path component; "
                                       "default: the trajectory's file stem)")
    parser.add_argument("--atom-types", metavar="SPEC",
                        help="atom types: JSON file, NAME=TYPE,... or one type per atom (see above)")
    parser.add_argument("--masses", metavar="SPEC",
                        help="masses in amu: JSON file, TYPE=AMU,... or one mass per atom (see above)")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--unwrap", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--temperature", type=float, help="K, stored in the metadata")
    parser.set_defaults(func=_run_import)
