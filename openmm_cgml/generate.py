"""Reference MD (``cgml generate``): build, minimise, equilibrate and record the systems
of a preset into the trajectory format of :mod:`openmm_cgml.trajectories`.

Generation is resumable: production runs in chunks; after each chunk its frames are
saved, then an OpenMM checkpoint, then ``production/progress.json`` (each written
atomically), so a killed run restarts from its last complete chunk with no duplicated or
missing frames. Complete trajectories are skipped. Resuming (or skipping as done) a
trajectory whose stored spec differs from the requested one (another --seed, preset,
override or frame count) is refused with :class:`SpecMismatchError` naming the fields.

One trajectory goes through four stages (:func:`generate_trajectory`):
:func:`_start_metadata` (check a stored spec, write the metadata), :func:`_equilibrate`
(minimise + the system's equilibration, once), :func:`_produce` (chunked, resumable
production) and :func:`_assemble` (the final files).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.files import write_atomic, write_bytes_atomic, write_json_atomic
from openmm_cgml.runtime import openmm_seed, parse_overrides, timed
from openmm_cgml.systems.base import BuiltSystem, SystemSpec
from openmm_cgml.topology import bond_pairs
from openmm_cgml.trajectories import (EQUILIBRATED_STATE_FILE, METADATA_FILE, THERMO_FILE, WORK_DIR, update_index,
                                      write_trajectory)


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


def md_speed(built: BuiltSystem, positions=None, box=None, platform: str = "CPU", threads: int | None = None,
             min_seconds: float = 2.0) -> float:
    """Simulated picoseconds per wall-clock second of ``built``'s production MD on this
    machine: the one MD timing (``cgml evaluate`` and the speed benchmarks use it).

    ``positions`` / ``box`` (nm): a production state to start from (e.g. a recorded
    frame); without them the built positions are minimised briefly first."""
    platform_object, properties = make_platform(platform, threads)
    simulation = app.Simulation(built.topology, built.system, built.make_integrator(), platform_object, properties)
    if positions is None:
        simulation.context.setPositions(built.positions)
        simulation.minimizeEnergy(maxIterations=200)
    else:
        simulation.context.setPositions(np.asarray(positions))
        if built.periodic and box is not None:
            simulation.context.setPeriodicBoxVectors(*np.asarray(box))
    simulation.context.setVelocitiesToTemperature(built.temperature, openmm_seed(built.spec.seed))
    simulation.step(20)  # warm-up: kernels compiled, neighbour lists built
    steps, seconds = timed(simulation.step, min_seconds)
    return steps * built.timestep.value_in_unit(unit.picosecond) / seconds


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
        "bonds": bond_pairs(built.topology).tolist(),
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
@dataclass
class _Production:
    """Where a (possibly resumed) production run stands."""

    frames_done: int
    chunk_files: list[str]
    wall_seconds: float = 0.0


def _start_metadata(built: BuiltSystem, directory: Path, n_frames: int, platform: str
                    ) -> tuple[dict[str, Any], bool]:
    """The metadata of this request, written (incomplete) to ``directory``; refuses a
    directory generated from another spec. Returns (metadata, already_complete)."""
    metadata_path = directory / METADATA_FILE
    metadata = _base_metadata(built, n_frames)
    metadata["spec_fingerprint"] = spec_fingerprint(metadata)
    existing: dict[str, Any] = {}
    if metadata_path.exists():
        existing = json.loads(metadata_path.read_text())
        _check_same_spec(directory, existing, metadata)
        if existing.get("complete"):
            update_index(directory.parent, existing)
            return existing, True
    metadata["record_interval_steps"] = _steps_per_interval(built.record_interval, built.timestep,
                                                            "record interval")
    metadata["platform"] = platform
    if "equilibration_summary" in existing:  # resumed run: equilibration is not repeated
        metadata["equilibration_summary"] = existing["equilibration_summary"]
    write_json_atomic(metadata_path, metadata)
    update_index(directory.parent, metadata)
    return metadata, False


def _equilibrate(built: BuiltSystem, directory: Path, metadata: dict[str, Any],
                 new_simulation: Callable[[], app.Simulation], progress: bool) -> None:
    """Minimise and equilibrate once; the state it ends in starts production. A new
    equilibration makes any production of an older one stale."""
    from tqdm.auto import tqdm

    state_path = directory / EQUILIBRATED_STATE_FILE
    if state_path.exists():
        return
    simulation = new_simulation()
    simulation.context.setPositions(built.positions)
    if built.periodic:
        simulation.context.setPeriodicBoxVectors(*built.system.getDefaultPeriodicBoxVectors())
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(built.temperature, openmm_seed(built.spec.seed))
    with tqdm(desc=f"{built.spec.name} equilibrate", unit="step", disable=not progress, leave=False,
              total=built.equilibrate.total_steps) as bar:
        summary = built.equilibrate(simulation, bar)
    if summary:
        metadata["equilibration_summary"] = json.loads(json.dumps(summary, default=float))
        write_json_atomic(directory / METADATA_FILE, metadata)
    state = simulation.context.getState(getPositions=True, getVelocities=True, enforcePeriodicBox=False)
    write_bytes_atomic(state_path, openmm.XmlSerializer.serialize(state).encode())
    shutil.rmtree(directory / WORK_DIR, ignore_errors=True)


def _produce(built: BuiltSystem, directory: Path, n_frames: int, chunk_frames: int, record_steps: int,
             new_simulation: Callable[[], app.Simulation], progress: bool,
             after_chunk: Callable[[int], None] | None) -> _Production:
    """Record ``n_frames`` frames in chunks of ``chunk_frames`` into ``directory/production``,
    continuing from its last complete chunk. Each chunk: frames (npz), then an OpenMM
    checkpoint, then progress.json, each written atomically."""
    from tqdm.auto import tqdm

    work = directory / WORK_DIR
    work.mkdir(exist_ok=True)
    progress_path = work / "progress.json"
    simulation = new_simulation()
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        done = _Production(int(saved["frames_done"]), list(saved["chunk_files"]))
        simulation.context.loadCheckpoint((work / saved["checkpoint"]).read_bytes())
    else:
        state = openmm.XmlSerializer.deserialize((directory / EQUILIBRATED_STATE_FILE).read_text())
        simulation.context.setState(state)
        simulation.context.setTime(0.0)
        simulation.context.setStepCount(0)
        done = _Production(0, [])
    if done.frames_done > n_frames:
        raise ValueError(f"{directory}: {done.frames_done} frames already recorded, more than the "
                         f"{n_frames} requested; delete the directory to restart")

    context, integrator = simulation.context, simulation.integrator
    dof = _degrees_of_freedom(built.system)
    gas_constant = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    start = time.perf_counter()
    with tqdm(total=n_frames, initial=done.frames_done, desc=f"{built.spec.name} production",
              unit="frame", disable=not progress, leave=False) as bar:
        while done.frames_done < n_frames:
            count = min(chunk_frames, n_frames - done.frames_done)
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
            chunk_index = len(done.chunk_files)
            chunk_name = f"chunk_{chunk_index:05d}.npz"

            def save_chunk(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    np.savez(handle, positions=positions, boxes=boxes, thermo=thermo)

            write_atomic(work / chunk_name, save_chunk)
            checkpoint_name = f"checkpoint_{chunk_index:05d}.chk"
            write_bytes_atomic(work / checkpoint_name, context.createCheckpoint())
            previous = json.loads(progress_path.read_text())["checkpoint"] if progress_path.exists() else None
            done.frames_done += count
            done.chunk_files.append(chunk_name)
            write_json_atomic(progress_path, {"frames_done": done.frames_done, "chunk_files": done.chunk_files,
                                              "checkpoint": checkpoint_name})
            if previous and previous != checkpoint_name:
                (work / previous).unlink(missing_ok=True)
            if after_chunk is not None:
                after_chunk(len(done.chunk_files))
    done.wall_seconds = time.perf_counter() - start
    return done


def _assemble(built: BuiltSystem, directory: Path, metadata: dict[str, Any], n_frames: int,
              production: _Production) -> None:
    """Stream the production chunks into the final trajectory files, then remove them.
    metadata.json (complete) is written last, so a kill before that only repeats this."""
    work = directory / WORK_DIR
    paths = [work / name for name in production.chunk_files]
    thermo = []
    for path in paths:
        with np.load(path) as data:
            thermo.append(data["thermo"])
    np.savetxt(directory / THERMO_FILE, np.concatenate(thermo)[:n_frames], delimiter=",",
               header="time_ps,potential_energy_kJ_mol,kinetic_energy_kJ_mol,kinetic_temperature_K",
               comments="")
    # write_trajectory stores the production box (after any NPT equilibration), not the initial one
    metadata = dict(metadata, complete=True, production_wall_seconds_last_run=production.wall_seconds)

    def chunks():
        for path in paths:
            with np.load(path) as data:
                yield data["positions"], (data["boxes"] if built.periodic else None)

    write_trajectory(directory, built.topology, chunks(), metadata)
    shutil.rmtree(work)


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
    directory = Path(out_dir) / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    metadata, complete = _start_metadata(built, directory, n_frames, platform)
    if complete:
        return directory
    platform_object, properties = make_platform(platform, threads)

    def new_simulation() -> app.Simulation:
        return app.Simulation(built.topology, built.system, built.make_integrator(),
                              platform_object, properties)

    _equilibrate(built, directory, metadata, new_simulation, progress)
    production = _produce(built, directory, n_frames, chunk_frames, metadata["record_interval_steps"],
                          new_simulation, progress, after_chunk)
    _assemble(built, directory, metadata, n_frames, production)
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


# ----------------------------------------------------------------------------- CLI
def _run_generate(args: argparse.Namespace) -> int:
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        print(f"cgml generate: {err}", file=sys.stderr)
        return 2
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
                        help="any other make_specs override (value parsed as YAML/JSON)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="generate only these specs")
    parser.add_argument("--chunk-frames", type=positive_int, default=50,
                        help="frames between checkpoints (default 50)")
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--threads", type=positive_int, help="CPU platform threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_generate)
