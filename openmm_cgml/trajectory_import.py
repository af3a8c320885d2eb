"""Bring users' own trajectories into the data set format (``cgml import-trajectory``).

Any mdtraj-readable trajectory + a topology with bonds becomes one trajectory directory
of :mod:`openmm_cgml.trajectories` (the format), typed by the same atom-type rule the
learned simulator applies (:func:`~openmm_cgml.topology.atom_types_from_topology`).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import openmm
from openmm import unit

from openmm_cgml.files import check_plain_name, quiet_stdout
from openmm_cgml.topology import atom_types_from_topology, bond_pairs
from openmm_cgml.trajectories import TrajectoryRecord, load_trajectory, unwrap_positions, write_trajectory


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
    with quiet_stdout():  # mdtraj's C DCD reader prints to stdout (we warn ourselves)
        traj = mdtraj.load(str(trajectory_path), top=str(topology_path))
    if trajectory_path.suffix.lower() == ".dcd":
        problem = _dcd_truncation(trajectory_path, int(traj.n_frames))
        if problem:
            warnings.warn(problem, stacklevel=2)
    top = traj.topology
    if top.n_bonds == 0 and top.n_atoms > 1:
        raise ValueError(f"topology {topology} has no bonds; give one with bonds (e.g. a PDB "
                         "with CONECT records written by OpenMM)")
    bonds = bond_pairs(top)
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

    directory = Path(out_dir) / name
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
        "box": None,  # periodic: frame 0's box, set by write_trajectory
        "n_atoms": int(top.n_atoms),
        "atom_types": list(map(str, atom_types)),
        "bond_types": list(map(str, bond_types)),
        "bonds": bonds.tolist(),
        "masses_amu": [float(m) for m in masses],
        "openmm_version": openmm.__version__,
        "source": "openmm_cgml.trajectory_import",
        "unwrapped_on_import": bool(unwrap),
        "elements_guessed_on_import": int(n_guessed),
        "complete": True,
    }
    write_trajectory(directory, top.to_openmm(), [(positions, box)], metadata)
    return load_trajectory(directory)



# ----------------------------------------------------------------------------- CLI
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
