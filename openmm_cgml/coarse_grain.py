"""Coarse-graining with METIS (docs/method.md step 3): the single source of truth for the
fine -> CG mapping, used by the data pipeline, the models and the integrator.

For each molecule (connected component of the bond graph) with n atoms, the bond graph
is partitioned by METIS (pymetis, fixed seed) into ``floor(n / cg_level + 0.5)`` parts
(at least 1). Atoms that are never bonded stay single beads (ions); with
``small_molecules_as_beads`` every molecule of at most ``small_molecule_max_atoms``
atoms becomes one bead. Parts are post-processed to be connected: a part that METIS
returned disconnected keeps its largest component; each other component is merged into
the smallest neighbouring part (deterministic order). Beads are numbered by molecule,
then by their lowest atom index.

Bead position = mass-weighted centre of the *unwrapped* atom positions; bead mass = sum
of atom masses; a CG bond joins beads I < J iff a chemical bond joins an atom of I and
an atom of J.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openmm
from openmm import app, unit
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from openmm_cgml.topology import bond_pairs

MAPPING_FORMAT = "openmm-cgml-cgmapping/1"


def _as_bond_array(bonds, n_atoms: int) -> np.ndarray:
    bonds = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    if bonds.size and (bonds.min() < 0 or bonds.max() >= n_atoms):
        raise ValueError(f"bond atom index out of range [0, {n_atoms})")
    if np.any(bonds[:, 0] == bonds[:, 1]):
        raise ValueError("a bond joins an atom to itself")
    return bonds


def _adjacency(n_atoms: int, bonds: np.ndarray) -> sparse.csr_matrix:
    data = np.ones(2 * len(bonds), dtype=np.int8)
    rows = np.concatenate([bonds[:, 0], bonds[:, 1]])
    cols = np.concatenate([bonds[:, 1], bonds[:, 0]])
    adjacency = sparse.csr_matrix((data, (rows, cols)), shape=(n_atoms, n_atoms))
    adjacency.data[:] = 1  # duplicate bonds collapse to one edge
    return adjacency


def _make_parts_connected(labels: np.ndarray, adjacency: sparse.csr_matrix) -> np.ndarray:
    """Split disconnected METIS parts; merge stray fragments into the smallest neighbour."""
    labels = labels.copy()
    n = len(labels)
    while True:
        # components of the graph restricted to intra-part edges
        coo = adjacency.tocoo()
        same = labels[coo.row] == labels[coo.col]
        intra = sparse.csr_matrix((np.ones(same.sum()), (coo.row[same], coo.col[same])), shape=(n, n))
        n_comp, comp = connected_components(intra, directed=False)
        stray = []
        for part in np.unique(labels):
            members = np.flatnonzero(labels == part)
            comps, counts = np.unique(comp[members], return_counts=True)
            if len(comps) > 1:
                # keep the largest component (ties: lowest atom index); others are strays
                order = sorted(zip(-counts, [members[comp[members] == c].min() for c in comps], comps))
                stray.extend(c for _, _, c in order[1:])
        if not stray:
            return labels
        sizes = np.bincount(labels, minlength=labels.max() + 1)
        for c in sorted(stray, key=lambda c: np.flatnonzero(comp == c).min()):
            atoms = np.flatnonzero(comp == c)
            neighbours = np.unique(adjacency[atoms].indices)
            options = sorted({int(labels[a]) for a in neighbours} - {int(labels[atoms[0]])})
            if not options:
                continue  # cannot happen inside a connected molecule
            target = min(options, key=lambda p: (sizes[p], p))
            sizes[labels[atoms[0]]] -= len(atoms)
            sizes[target] += len(atoms)
            labels[atoms] = target


def partition_molecule(n_atoms: int, bonds: np.ndarray, n_parts: int, seed: int = 0) -> np.ndarray:
    """METIS partition of one connected molecule into connected parts; labels [n_atoms]
    renumbered 0.. by lowest atom index (may have fewer than n_parts labels)."""
    import pymetis

    if n_parts <= 1 or n_atoms <= 1:
        return np.zeros(n_atoms, dtype=np.int64)
    if n_parts >= n_atoms:
        return np.arange(n_atoms, dtype=np.int64)
    adjacency = _adjacency(n_atoms, bonds)
    options = pymetis.Options(seed=int(seed), contig=1)
    csr = pymetis.CSRAdjacency(adjacency.indptr.astype(np.int64), adjacency.indices.astype(np.int64))
    _, membership = pymetis.part_graph(n_parts, csr, options=options)
    labels = _make_parts_connected(np.asarray(membership, dtype=np.int64), adjacency)
    # renumber by first atom so bead order follows atom order
    first_atom = {}
    for atom, label in enumerate(labels):
        first_atom.setdefault(int(label), atom)
    renumber = {label: i for i, label in enumerate(sorted(first_atom, key=first_atom.get))}
    return np.asarray([renumber[int(l)] for l in labels], dtype=np.int64)


def _n_parts(n_atoms: int, cg_level: float) -> int:
    """round(n / cg_level), halves rounded up, at least 1."""
    return max(1, int(np.floor(n_atoms / cg_level + 0.5)))


def build_vocabulary(type_lists: Sequence[Sequence[str]]) -> list[str]:
    """Sorted union of type names (atom or bond types) across systems."""
    return sorted({str(t) for types in type_lists for t in types})


def atom_pair_key(type_a: str, type_b: str) -> str:
    """Key of an unordered atom-type pair in a bond-type table ("A|B", sorted)."""
    return "|".join(sorted((str(type_a), str(type_b))))


def bond_type_table(mappings: Sequence["CGMapping"]) -> dict[str, str]:
    """{atom_pair_key: bond type} over the fine bonds of ``mappings``; a pair seen with
    several bond types maps to "" (ambiguous). Lets a model type the bonds of a new
    topology that has atom types only."""
    table: dict[str, set] = {}
    for mapping in mappings:
        types = mapping.atom_types
        for (i, j), bond_type in zip(mapping.fine_bonds.tolist(), mapping.bond_types):
            table.setdefault(atom_pair_key(types[i], types[j]), set()).add(bond_type)
    return {k: (next(iter(v)) if len(v) == 1 else "") for k, v in sorted(table.items())}


def types_to_index(types: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Integer index of each type in ``vocabulary`` (int64); unknown types are an error."""
    lookup = {t: i for i, t in enumerate(vocabulary)}
    missing = sorted({t for t in types if t not in lookup})
    if missing:
        raise ValueError(f"types {missing} are not in the vocabulary {list(vocabulary)}")
    return np.asarray([lookup[t] for t in types], dtype=np.int64)


@dataclass
class CGMapping:
    """Fine -> CG mapping of one system (see the module docstring for the rules).

    Arrays: ``bead_of_atom`` int64 [n], ``atom_masses`` float64 [n] (amu),
    ``fine_bonds`` int64 [B,2], ``atom_types`` [n] str, ``bond_types`` [B] str,
    ``molecule_of_atom`` int64 [n]. Derived: ``bead_masses`` [N], ``cg_bonds`` int64
    [E,2] (i < j, sorted, unique), ``molecule_of_bead`` [N].
    """

    bead_of_atom: np.ndarray
    atom_masses: np.ndarray
    fine_bonds: np.ndarray
    atom_types: list[str]
    bond_types: list[str]
    molecule_of_atom: np.ndarray
    cg_level: float
    small_molecules_as_beads: bool = False
    small_molecule_max_atoms: int = 0
    seed: int = 0
    bead_masses: np.ndarray = field(init=False)
    cg_bonds: np.ndarray = field(init=False)
    molecule_of_bead: np.ndarray = field(init=False)

    def __post_init__(self):
        self.bead_of_atom = np.asarray(self.bead_of_atom, dtype=np.int64)
        self.atom_masses = np.asarray(self.atom_masses, dtype=np.float64)
        self.fine_bonds = np.asarray(self.fine_bonds, dtype=np.int64).reshape(-1, 2)
        self.molecule_of_atom = np.asarray(self.molecule_of_atom, dtype=np.int64)
        self.atom_types = [str(t) for t in self.atom_types]
        self.bond_types = [str(t) for t in self.bond_types]
        n = len(self.bead_of_atom)
        for label, size in (("atom_masses", len(self.atom_masses)), ("atom_types", len(self.atom_types)),
                            ("molecule_of_atom", len(self.molecule_of_atom))):
            if size != n:
                raise ValueError(f"{label} has {size} entries for {n} atoms")
        if len(self.bond_types) != len(self.fine_bonds):
            raise ValueError(f"{len(self.bond_types)} bond types for {len(self.fine_bonds)} bonds")
        if np.any(self.atom_masses <= 0):
            raise ValueError("every atom needs a positive mass (virtual sites are not supported)")
        n_beads = int(self.bead_of_atom.max()) + 1 if n else 0
        if n and np.setdiff1d(np.arange(n_beads), self.bead_of_atom).size:
            raise ValueError("bead_of_atom must use every bead index 0..N-1")
        self.bead_masses = np.bincount(self.bead_of_atom, weights=self.atom_masses, minlength=n_beads)
        pairs = self.bead_of_atom[self.fine_bonds]
        pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
        self.cg_bonds = np.unique(pairs, axis=0).astype(np.int64).reshape(-1, 2)
        molecule_of_bead = np.full(n_beads, -1, dtype=np.int64)
        molecule_of_bead[self.bead_of_atom] = self.molecule_of_atom
        self.molecule_of_bead = molecule_of_bead
        weights = self.atom_masses / self.bead_masses[self.bead_of_atom]
        # [N, n] sparse averaging matrix: bead = sum_i w_i x_i over its atoms
        self._matrix = sparse.csr_matrix((weights, (self.bead_of_atom, np.arange(n))), shape=(n_beads, n))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_graph(cls, n_atoms: int, bonds, masses, cg_level: float,
                   atom_types: Sequence[str] | None = None, bond_types: Sequence[str] | None = None,
                   small_molecules_as_beads: bool = False, small_molecule_max_atoms: int = 20,
                   seed: int = 0) -> "CGMapping":
        """Partition a fine graph (atoms 0..n-1, bond index pairs, masses in amu)."""
        if cg_level <= 0:
            raise ValueError(f"cg_level must be positive, got {cg_level}")
        n_atoms = int(n_atoms)
        bonds = _as_bond_array(bonds, n_atoms)
        masses = np.asarray(masses, dtype=np.float64)
        if len(masses) != n_atoms:
            raise ValueError(f"{len(masses)} masses for {n_atoms} atoms")
        atom_types = list(atom_types) if atom_types is not None else ["atom"] * n_atoms
        bond_types = list(bond_types) if bond_types is not None else ["bond"] * len(bonds)
        adjacency = _adjacency(n_atoms, bonds)
        n_molecules, molecule_of_atom = connected_components(adjacency, directed=False)
        # molecules numbered by their first atom (connected_components already does so)
        bead_of_atom = np.empty(n_atoms, dtype=np.int64)
        next_bead = 0
        order = np.argsort(molecule_of_atom, kind="stable")
        boundaries = np.flatnonzero(np.diff(molecule_of_atom[order])) + 1
        molecule_of_bond = molecule_of_atom[bonds[:, 0]]
        local_index = np.zeros(n_atoms, dtype=np.int64)
        for atoms in np.split(order, boundaries):
            n = len(atoms)
            if small_molecules_as_beads and n <= small_molecule_max_atoms:
                n_parts = 1
            else:
                n_parts = _n_parts(n, cg_level)
            if n_parts == 1:
                labels = np.zeros(n, dtype=np.int64)
            else:
                local_index[atoms] = np.arange(n)
                in_molecule = molecule_of_bond == molecule_of_atom[atoms[0]]
                local_bonds = local_index[bonds[in_molecule]].reshape(-1, 2)
                labels = partition_molecule(n, local_bonds, n_parts, seed)
            bead_of_atom[atoms] = next_bead + labels
            next_bead += int(labels.max()) + 1
        return cls(bead_of_atom, masses, bonds, atom_types, bond_types, molecule_of_atom,
                   float(cg_level), bool(small_molecules_as_beads), int(small_molecule_max_atoms), int(seed))

    @classmethod
    def from_topology(cls, topology, masses, cg_level: float, **kwargs) -> "CGMapping":
        """From an OpenMM ``app.Topology`` or mdtraj ``Topology`` with bonds."""
        atoms = list(topology.atoms() if callable(getattr(topology, "atoms", None)) else topology.atoms)
        bonds = bond_pairs(topology)
        return cls.from_graph(len(atoms), bonds, masses, cg_level, **kwargs)

    @property
    def n_atoms(self) -> int:
        return len(self.bead_of_atom)

    @property
    def n_beads(self) -> int:
        return len(self.bead_masses)

    def atoms_of_bead(self, bead: int) -> np.ndarray:
        return np.flatnonzero(self.bead_of_atom == bead)

    def atom_type_index(self, vocabulary: Sequence[str]) -> np.ndarray:
        return types_to_index(self.atom_types, vocabulary)

    def bond_type_index(self, vocabulary: Sequence[str]) -> np.ndarray:
        return types_to_index(self.bond_types, vocabulary)

    def fine_graph(self, atom_vocabulary: Sequence[str], bond_vocabulary: Sequence[str]) -> dict[str, np.ndarray]:
        """What the embedding GNN needs: atom_type [n], atom_masses [n], fine_bonds [B,2],
        bond_type [B], bead_of_atom [n] (all int64 / float64 NumPy arrays)."""
        return {
            "atom_type": self.atom_type_index(atom_vocabulary),
            "atom_masses": self.atom_masses.copy(),
            "fine_bonds": self.fine_bonds.copy(),
            "bond_type": self.bond_type_index(bond_vocabulary),
            "bead_of_atom": self.bead_of_atom.copy(),
        }

    # ------------------------------------------------------------------ mapping
    def map_positions(self, positions) -> np.ndarray:
        """Fine -> CG centres of mass. positions [n,3] or [F,n,3] (nm, unwrapped; a
        Quantity is converted to nm) -> [N,3] or [F,N,3] in the input dtype."""
        if unit.is_quantity(positions):
            positions = positions.value_in_unit(unit.nanometer)
        positions = np.asarray(positions)
        if positions.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"positions of shape {positions.shape} do not match {self.n_atoms} atoms")
        dtype = positions.dtype if np.issubdtype(positions.dtype, np.floating) else np.float64
        if positions.ndim == 2:
            return (self._matrix @ positions.astype(np.float64)).astype(dtype)
        frames = positions.shape[0]
        flat = np.moveaxis(positions, 0, 1).reshape(self.n_atoms, frames * 3).astype(np.float64)
        mapped = (self._matrix @ flat).reshape(self.n_beads, frames, 3)
        return np.ascontiguousarray(np.moveaxis(mapped, 1, 0)).astype(dtype)

    map_trajectory = map_positions

    def replicate(self, k: int) -> "CGMapping":
        """K independent copies of this system as one mapping (copy r's atoms, beads and
        molecules follow copy r-1's): what a learned step needs to advance K replicas in
        one model call, since no edge joins beads that are far apart."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"the number of replicas must be an integer >= 1, got {k!r}")
        n, n_molecules = self.n_atoms, int(self.molecule_of_atom.max()) + 1 if self.n_atoms else 0
        copies = np.arange(int(k))
        return CGMapping(
            (self.bead_of_atom[None] + self.n_beads * copies[:, None]).ravel(),
            np.tile(self.atom_masses, k),
            (self.fine_bonds[None] + n * copies[:, None, None]).reshape(-1, 2),
            self.atom_types * k, self.bond_types * k,
            (self.molecule_of_atom[None] + n_molecules * copies[:, None]).ravel(),
            self.cg_level, self.small_molecules_as_beads, self.small_molecule_max_atoms, self.seed)

    # ------------------------------------------------------------------ OpenMM objects
    def to_openmm_topology(self, box=None) -> app.Topology:
        """One chain per molecule, one residue ("CG") per bead, atom "B<i>" with no element."""
        topology = app.Topology()
        chains: dict[int, Any] = {}
        atoms = []
        for bead in range(self.n_beads):
            molecule = int(self.molecule_of_bead[bead])
            if molecule not in chains:
                chains[molecule] = topology.addChain(str(molecule))
            residue = topology.addResidue("CG", chains[molecule])
            atoms.append(topology.addAtom(f"B{bead}", None, residue))
        for i, j in self.cg_bonds:
            topology.addBond(atoms[int(i)], atoms[int(j)])
        if box is not None:
            topology.setPeriodicBoxVectors(_box_vectors(box))
        return topology

    def to_openmm_system(self, box=None) -> openmm.System:
        """Bead masses, periodic box if given ([3,3] nm or Vec3 triple), no forces."""
        system = openmm.System()
        for mass in self.bead_masses:
            system.addParticle(float(mass) * unit.dalton)
        if box is not None:
            system.setDefaultPeriodicBoxVectors(*_box_vectors(box))
        return system

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MAPPING_FORMAT,
            "cg_level": self.cg_level,
            "small_molecules_as_beads": self.small_molecules_as_beads,
            "small_molecule_max_atoms": self.small_molecule_max_atoms,
            "seed": self.seed,
            "bead_of_atom": self.bead_of_atom.tolist(),
            "atom_masses": self.atom_masses.tolist(),
            "fine_bonds": self.fine_bonds.tolist(),
            "atom_types": self.atom_types,
            "bond_types": self.bond_types,
            "molecule_of_atom": self.molecule_of_atom.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CGMapping":
        if data.get("format") != MAPPING_FORMAT:
            raise ValueError(f"not a CG mapping (format {data.get('format')!r}, expected {MAPPING_FORMAT!r})")
        return cls(data["bead_of_atom"], data["atom_masses"], data["fine_bonds"], data["atom_types"],
                   data["bond_types"], data["molecule_of_atom"], data["cg_level"],
                   data["small_molecules_as_beads"], data["small_molecule_max_atoms"], data["seed"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the mapping as JSON (atomically: a kill never leaves half a file)."""
        from openmm_cgml.files import write_bytes_atomic

        write_bytes_atomic(Path(path), json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CGMapping":
        """Read a saved mapping; a corrupt or foreign file is a ValueError naming it."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a readable CG mapping file ({type(err).__name__}: {err})") from None

    def fingerprint(self) -> str:
        """SHA-256 of the mapping's content (hex); cache key for CG trajectories."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _box_vectors(box):
    if unit.is_quantity(box):
        box = box.value_in_unit(unit.nanometer)
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (3, 3):
        raise ValueError(f"box must be 3x3 vectors (nm), got shape {box.shape}")
    return tuple(openmm.Vec3(*row) for row in box) * unit.nanometer
