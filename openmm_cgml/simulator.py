"""``LearnedSimulator``: run an exported learned CG simulator on any system, in five lines::

    sim = openmm_cgml.LearnedSimulator.load(DIR)           # a `cgml export` directory
    cg = sim.coarseGrain(topology, positions)              # fine topology (with bonds) + positions
    integrator = sim.createIntegrator(cg)                  # CGMLIntegrator, bead features/bonds/PBC set
    simulation = app.Simulation(cg.topology, cg.system, integrator)
    simulation.context.setPositions(cg.positions)
    integrator.setHistory(cg.map_trajectory(traj))          # optional: real history frames

With a property head (``property.pt``, optional), ``sim.fineRg2(cg, frames)`` predicts
each molecule's fine-level (atomistic) Rg^2 from CG frames, e.g. a learned rollout's.

``coarseGrain`` applies the exported CG options (cg_level, small-molecule rule, METIS
seed) to the fine graph, and computes the bead features with the exported embedding GNN
(once; it sees no positions). Atom types follow the rule the training data used:
a :class:`~openmm_cgml.trajectories.TrajectoryRecord` carries them in its metadata; for an
OpenMM topology they are the element symbol, or the atom name when there is no element
(the ``import-trajectory`` rule; the name also wins when only it is a known type, since
PDB readers guess elements from names), unless ``atom_types=`` is given. Bond types come from
the atom-type pair (the table of pairs seen in training) unless ``bond_types=`` is given.
Types the model never saw are an error naming them.

The manifest is not trusted: :meth:`LearnedSimulator.load` validates it (format,
required keys and their types), keeps every file it names inside the model directory,
and checks seq_len / step size against the dynamics archive and the vocabularies
against the embedding; a periodic model refuses a system without a box and vice versa.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.coarse_grain import CGMapping, atom_pair_key
from openmm_cgml.manifest import MANIFEST, load_embedding_state, read_manifest
from openmm_cgml.topology import bond_pairs

__all__ = ["LearnedSimulator", "CGSystem", "CGRun"]

PRETRAINED_DIR = Path(__file__).with_name("pretrained")


def _nm(value) -> np.ndarray:
    if unit.is_quantity(value):
        value = value.value_in_unit(unit.nanometer)
    if isinstance(value, (list, tuple)) and value and hasattr(value[0], "x"):
        value = [[v.x, v.y, v.z] for v in value]
    return np.asarray(value, dtype=np.float64)


@dataclass
class CGSystem:
    """A coarse-grained system ready for an OpenMM Simulation.

    ``topology`` / ``system``: CG OpenMM objects (one particle per bead, bead masses, box);
    ``positions``: CG positions (Quantity, nm); ``mapping``: the fine -> CG
    :class:`~openmm_cgml.coarse_grain.CGMapping`; ``features``: float32 [N, F] bead
    features; ``bonds``: int64 [E, 2] CG bonds; ``periodic``; ``box``: [3, 3] nm or None.
    """

    topology: app.Topology
    system: openmm.System
    positions: unit.Quantity
    mapping: CGMapping
    features: np.ndarray
    bonds: np.ndarray
    periodic: bool
    box: np.ndarray | None
    dilation: int = 1
    seq_len: int = 2

    @property
    def n_beads(self) -> int:
        return self.mapping.n_beads

    def map_trajectory(self, trajectory, dilation: int | None = None) -> unit.Quantity:
        """Fine trajectory (mdtraj.Trajectory, TrajectoryRecord, or [F, n, 3] nm array /
        Quantity; unwrapped) -> CG frames one model step apart (every ``dilation``-th
        recorded frame, ending with the last one), [T, N, 3] nm, oldest first."""
        if hasattr(trajectory, "xyz"):  # mdtraj
            frames = np.asarray(trajectory.xyz, dtype=np.float64)
        elif hasattr(trajectory, "positions") and hasattr(trajectory, "metadata"):  # TrajectoryRecord
            frames = np.asarray(trajectory.positions, dtype=np.float64)
        else:
            frames = _nm(trajectory)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.ndim != 3 or frames.shape[1:] != (self.mapping.n_atoms, 3):
            raise ValueError(f"trajectory of shape {frames.shape} does not match "
                             f"[frames, {self.mapping.n_atoms} atoms, 3]")
        step = int(self.dilation if dilation is None else dilation)
        picked = frames[::-1][::step][::-1]
        return self.mapping.map_positions(picked) * unit.nanometer

    def replicate(self, k: int, spacing: float) -> tuple["CGSystem", np.ndarray]:
        """K copies of this (non-periodic) system as one, on a cubic grid ``spacing`` nm
        apart (copy r's beads follow copy r-1's). Returns the system and the [K, 3] nm
        offset of each copy."""
        if self.periodic:
            raise ValueError("a periodic system cannot be replicated into one box: each copy would see the "
                             "others as its periodic images")
        side = int(np.ceil(k ** (1 / 3) - 1e-9))
        offsets = np.stack(np.unravel_index(np.arange(k), (side, side, side)), axis=1)[:, ::-1] * float(spacing)
        mapping = self.mapping.replicate(k)
        positions = (self.positions.value_in_unit(unit.nanometer)[None] + offsets[:, None]).reshape(-1, 3)
        system = CGSystem(mapping.to_openmm_topology(), mapping.to_openmm_system(), positions * unit.nanometer,
                          mapping, np.tile(self.features, (k, 1)), mapping.cg_bonds, False, None, self.dilation,
                          self.seq_len)
        return system, offsets.astype(np.float64)

    def __repr__(self):
        return (f"<CGSystem {self.mapping.n_atoms} atoms -> {self.n_beads} beads, {len(self.bonds)} CG bonds, "
                f"features {self.features.shape[1]}, periodic={self.periodic}>")


@dataclass
class CGRun:
    """A CG trajectory: positions [F,N,3] nm, one frame every ``dt_ps`` (a learned
    rollout, or reference MD mapped to beads). A rollout records its wall time, where
    and why it failed (if it did) and how often the distance limits acted."""

    label: str
    positions: np.ndarray
    dt_ps: float
    box: np.ndarray | None = None
    wall_seconds: float | None = None
    failed_at_step: int | None = None
    failure: str | None = None
    limit_corrections: int | None = 0  # None: not known per run (replicas share one count)

    @property
    def duration_ps(self) -> float:
        return self.dt_ps * max(len(self.positions) - 1, 0)


class LearnedSimulator:
    """An exported learned simulator (``cgml export`` directory); see the module docstring."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any], embedding, property_model=None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.embedding = embedding
        self.property_model = property_model  # TorchScript property head, or None
        self.atom_vocabulary: list[str] = list(manifest["atom_vocabulary"])
        self.bond_vocabulary: list[str] = list(manifest["bond_vocabulary"])
        self.bond_type_of_pair: dict[str, str] = dict(manifest.get("bond_type_of_pair", {}))

    @classmethod
    def pretrained(cls, name: str) -> "LearnedSimulator":
        """A model shipped with the package (``openmm_cgml/pretrained/<name>``, each with
        a ``MODEL_CARD.md`` stating its data, the command that made it and its measured
        accuracy). Names: :meth:`available_pretrained`."""
        names = cls.available_pretrained()
        if name not in names:
            raise ValueError(f"no pretrained model {name!r}; shipped: {', '.join(names) or 'none'}")
        return cls.load(PRETRAINED_DIR / name)

    @staticmethod
    def available_pretrained() -> list[str]:
        """Names of the pretrained models shipped with the package."""
        if not PRETRAINED_DIR.is_dir():
            return []
        return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / MANIFEST).is_file())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LearnedSimulator":
        """Load and check a ``cgml export`` directory: the manifest is validated (format,
        required keys, types), every file it names must lie inside ``directory``, and its
        seq_len / step size must match the dynamics archive's, its vocabularies the
        embedding's (ValueError naming the file and the mismatch)."""
        import torch

        from openmm_cgml.models import ModelConfig, build_embedding_model

        directory = Path(directory)
        path = directory / MANIFEST
        manifest, files = read_manifest(directory)
        saved = load_embedding_state(files["embedding"], manifest, path)
        try:
            dynamics = torch.jit.load(str(files["dynamics"]), map_location="cpu")
        except Exception as err:
            raise ValueError(f"{files['dynamics']}: cannot load the TorchScript dynamics archive "
                             f"({type(err).__name__})") from None
        archive_seq_len = int(getattr(dynamics, "seq_len", -1))
        archive_step = float(getattr(dynamics, "step_size_ps", float("nan")))
        if archive_seq_len != manifest["seq_len"]:
            raise ValueError(f"{path}: seq_len {manifest['seq_len']} does not match {files['dynamics'].name} "
                             f"(seq_len {archive_seq_len})")
        if not abs(archive_step - manifest["step_size_ps"]) <= 1e-6 * abs(archive_step):
            raise ValueError(f"{path}: step_size_ps {manifest['step_size_ps']} does not match "
                             f"{files['dynamics'].name} (step_size_ps {archive_step})")
        del dynamics
        embedding = build_embedding_model(ModelConfig.from_dict(saved["model_config"]),
                                          saved["num_atom_types"], saved["num_bond_types"])
        embedding.load_state_dict(saved["state_dict"])
        embedding.eval()
        property_model = None
        if "property" in files:
            try:
                property_model = torch.jit.load(str(files["property"]), map_location="cpu").eval()
            except Exception as err:
                raise ValueError(f"{files['property']}: cannot load the TorchScript property archive "
                                 f"({type(err).__name__})") from None
            width = getattr(property_model, "num_features", None)
            if "num_features" in manifest and width != manifest["num_features"]:
                raise ValueError(f"{path}: num_features {manifest['num_features']} does not match "
                                 f"{files['property'].name} (num_features {width})")
        return cls(directory, manifest, embedding, property_model)

    # -- properties ------------------------------------------------------------------------
    @property
    def stepSize(self) -> unit.Quantity:
        return self.manifest["step_size_ps"] * unit.picosecond

    @property
    def seqLen(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def dilation(self) -> int:
        return int(self.manifest["dilation"])

    @property
    def periodic(self) -> bool:
        """Whether the model was trained on periodic systems (it then needs a box)."""
        return bool(self.manifest.get("periodic", False))

    def _file(self, key: str) -> Path | None:
        from openmm_cgml.files import contained_path

        name = self.manifest["files"].get(key)
        return contained_path(self.directory, name, f"files.{key}", "the model directory") if name else None

    @property
    def dynamicsPath(self) -> Path:
        return self._file("dynamics")

    @property
    def scorePath(self) -> Path | None:
        return self._file("score")

    @property
    def propertyPath(self) -> Path | None:
        """The property head archive, or None (models exported without one)."""
        return self._file("property")

    @property
    def hasPropertyHead(self) -> bool:
        return self.property_model is not None

    def fineRg2(self, cg: CGSystem, positions, chunk: int = 1024) -> np.ndarray:
        """Predicted fine-level (atomistic) mass-weighted Rg^2, nm^2, of every molecule of
        ``cg`` with >= 2 beads (in molecule order, as ``evaluate.molecule_groups``), from
        CG positions [F, N, 3] -> [F, M] or [N, 3] -> [M] (nm array or Quantity;
        unwrapped). Each molecule is centred in float64 before the (float32) head runs,
        so the result does not depend on where the molecule sits. ValueError if the
        model has no property head."""
        import torch

        from openmm_cgml.models.property import property_molecules

        if self.property_model is None:
            raise ValueError(f"{self.directory} has no property head (exported without one, or before "
                             "openmm-cgml had it); retrain with property_weight > 0 and re-export")
        x = _nm(positions)
        single = x.ndim == 2
        if single:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (cg.n_beads, 3):
            raise ValueError(f"positions of shape {x.shape} do not match [frames, {cg.n_beads} beads, 3]")
        bead_molecule = property_molecules(cg.mapping.molecule_of_bead, int(self.property_model.min_beads))
        beads = np.flatnonzero(bead_molecule >= 0)
        n_mol = int(bead_molecule.max()) + 1 if beads.size else 0
        out = np.zeros((x.shape[0], n_mol))
        if n_mol:
            molecule = bead_molecule[beads]
            masses = np.asarray(cg.mapping.bead_masses, dtype=np.float64)[beads]
            total = np.bincount(molecule, weights=masses, minlength=n_mol)
            fraction = np.zeros((len(beads), n_mol))
            fraction[np.arange(len(beads)), molecule] = masses / total[molecule]
            xs = x[:, beads]
            com = np.einsum("fnk,nm->fmk", xs, fraction)  # [F, M, 3] centres of mass
            centred = xs - com[:, molecule]
            features = torch.from_numpy(np.ascontiguousarray(cg.features[beads], dtype=np.float32))
            molecule_t = torch.from_numpy(molecule)
            with torch.no_grad():
                for start in range(0, len(centred), chunk):
                    frames = torch.from_numpy(np.ascontiguousarray(centred[start:start + chunk], dtype=np.float32))
                    out[start:start + chunk] = self.property_model(frames, features, molecule_t).double().numpy()
        return out[0] if single else out

    # -- coarse-graining ---------------------------------------------------------------------
    def _check_types(self, kind: str, types: Sequence[str], vocabulary: Sequence[str]) -> None:
        unknown = sorted(set(types) - set(vocabulary))
        if unknown:
            raise ValueError(f"{kind} types {unknown} were not seen in training (known: {list(vocabulary)}); "
                             f"pass {kind}_types= mapping your atoms onto known types")

    def defaultAtomTypes(self, atoms) -> list[str]:
        """The import-trajectory rule (:func:`openmm_cgml.topology.atom_types_from_topology`):
        element symbol, or the atom name when there is no element. PDB readers guess
        elements from names ("S1" -> sulfur), so when the symbol is not a known type but
        the name is, the name is used."""
        return self._default_atom_types(atoms)[0]

    def _default_atom_types(self, atoms) -> tuple[list[str], list[bool]]:
        from openmm_cgml.topology import atom_types_from_topology

        return atom_types_from_topology(atoms, known=self.atom_vocabulary)

    def _bond_types(self, atom_types: list[str], bonds: np.ndarray) -> list[str]:
        if len(self.bond_vocabulary) == 1:
            return [self.bond_vocabulary[0]] * len(bonds)
        out, unknown = [], set()
        for i, j in bonds.tolist():
            key = atom_pair_key(atom_types[i], atom_types[j])
            bond_type = self.bond_type_of_pair.get(key, "")
            if not bond_type:
                unknown.add(key.replace("|", "-"))
            out.append(bond_type)
        if unknown:
            raise ValueError(f"cannot tell the bond type of atom-type pairs {sorted(unknown)} (unseen in "
                             f"training or ambiguous); pass bond_types= (known: {self.bond_vocabulary})")
        return out

    def coarseGrain(self, topology, positions=None, atom_types: Sequence[str] | None = None,
                    masses=None, bond_types: Sequence[str] | None = None, box=None,
                    frame: int = -1) -> CGSystem:
        """Map a fine system onto beads and compute its bead features.

        ``topology``: an OpenMM ``app.Topology`` with bonds (or a ``TrajectoryRecord``,
        which supplies topology, types, masses, positions of ``frame`` and box).
        ``positions``: [n, 3] nm array or Quantity (a list of Vec3 works). ``masses``:
        amu per atom (default: element masses), ``box``: [3, 3] nm (default: the
        topology's periodic box vectors)."""
        if hasattr(topology, "metadata") and hasattr(topology, "topology"):  # TrajectoryRecord
            record = topology
            topology = record.topology
            atom_types = record.atom_types if atom_types is None else atom_types
            masses = record.masses if masses is None else masses
            bond_types = record.bond_types if bond_types is None else bond_types
            bonds = record.bonds
            if positions is None:
                positions = record.positions[frame]
            if box is None and record.box is not None:
                box = record.box[frame]
        else:
            bonds = bond_pairs(topology)
        atoms = list(topology.atoms())
        n = len(atoms)
        if positions is None:
            raise ValueError("coarseGrain needs positions")
        positions = _nm(positions)
        if positions.shape != (n, 3):
            raise ValueError(f"positions have shape {positions.shape}, the topology has {n} atoms")
        if n > 1 and len(bonds) == 0:
            raise ValueError("the topology has no bonds; the CG mapping and embedding need the chemical bonds")
        # an element guessed by a PDB reader from a name that is itself the type
        # (e.g. "B1" -> boron) says nothing about the mass: only element-typed atoms
        # take their element's mass
        rule_types, element_typed = self._default_atom_types(atoms)
        if atom_types is None:
            atom_types = rule_types
        atom_types = [str(t) for t in atom_types]
        if len(atom_types) != n:
            raise ValueError(f"{len(atom_types)} atom types for {n} atoms")
        self._check_types("atom", atom_types, self.atom_vocabulary)
        if masses is None:
            masses = []
            for a, atom_type, typed, rule in zip(atoms, atom_types, element_typed, rule_types):
                trusted = typed and atom_type == rule
                mass = a.element.mass.value_in_unit(unit.dalton) if trusted else 0.0
                if mass <= 0:
                    raise ValueError(f"atom {a} (type {atom_type}) has no trustworthy element mass; "
                                     "pass masses= (amu)")
                masses.append(mass)
        if unit.is_quantity(masses):
            masses = masses.value_in_unit(unit.dalton)
        masses = np.asarray(masses, dtype=np.float64)
        bond_types = self._bond_types(atom_types, bonds) if bond_types is None else [str(t) for t in bond_types]
        self._check_types("bond", bond_types, self.bond_vocabulary)
        cg = self.manifest["cg"]
        mapping = CGMapping.from_graph(n, bonds, masses, cg["cg_level"], atom_types=atom_types,
                                       bond_types=bond_types,
                                       small_molecules_as_beads=cg["small_molecules_as_beads"],
                                       small_molecule_max_atoms=cg["small_molecule_max_atoms"],
                                       seed=cg.get("seed", 0))
        if box is None and topology.getPeriodicBoxVectors() is not None:
            box = topology.getPeriodicBoxVectors()
        box = None if box is None else _nm(box).reshape(3, 3)
        if self.periodic and (box is None or not np.any(box)):
            raise ValueError("this model was trained on periodic systems, but the system has no periodic box: "
                             "pass box= ([3, 3] nm) or a topology with periodic box vectors")
        if not self.periodic and box is not None:
            raise ValueError("this model was trained on non-periodic systems, but the system has a periodic box "
                             "(box= or the topology's periodic box vectors); pass a topology without box "
                             "vectors (topology.setPeriodicBoxVectors(None)) to simulate it without one")
        features = self.beadFeatures(mapping)
        cg_positions = mapping.map_positions(positions) * unit.nanometer
        return CGSystem(mapping.to_openmm_topology(box), mapping.to_openmm_system(box), cg_positions, mapping,
                        features, mapping.cg_bonds.copy(), box is not None, box, self.dilation, self.seqLen)

    def beadFeatures(self, mapping: CGMapping) -> np.ndarray:
        """Embedding GNN bead features ++ bead mass, float32 [N, F]."""
        import torch

        fine = mapping.fine_graph(self.atom_vocabulary, self.bond_vocabulary)
        with torch.no_grad():
            features = self.embedding.bead_features(
                torch.from_numpy(fine["atom_type"]), torch.from_numpy(fine["atom_masses"]).float(),
                torch.from_numpy(fine["fine_bonds"]), torch.from_numpy(fine["bond_type"]),
                torch.from_numpy(fine["bead_of_atom"]), mapping.n_beads)
        return features.float().numpy()

    # -- integrator -------------------------------------------------------------------------
    def createIntegrator(self, cg: CGSystem, score: bool = True, deterministic: bool = False,
                         seed: int = 0, langevinSteps: int | None = None,
                         langevinStepSize: float | None = None, langevinSchedule: str | None = None,
                         exclusionDistance=None, bondLengthLimit=None, langevinLevels: int | None = None,
                         compiled: bool = False):
        """A :class:`~openmm_cgml.CGMLIntegrator` for ``cg`` (bead features, CG bonds and
        periodicity set). ``score=False`` runs without refinement; ``exclusionDistance``
        and ``bondLengthLimit`` (nm or length Quantities; 0 turns them off) override the
        model's distance limits (its ``exclusion_distance_nm`` / ``bond_length_limit_nm``,
        from the training data). ``compiled=True`` runs the dynamics and score networks
        compiled for this CPU and this system's size (:mod:`openmm_cgml.compiled`: ~1.5x
        faster refined steps; compiled once, ~10-15 s per network, then cached; at least
        2 beads)."""
        from openmm_cgml.integrator import CGMLIntegrator

        if bool(cg.periodic) != self.periodic or (cg.periodic and (cg.box is None or not np.any(cg.box))):
            raise ValueError(f"this model was trained on {'periodic' if self.periodic else 'non-periodic'} systems "
                             f"but the CG system is {'periodic' if cg.periodic else 'non-periodic'}; "
                             "coarse-grain it with this simulator's coarseGrain")
        score_path = self.scorePath if score else None
        integrator = CGMLIntegrator(self.dynamicsPath, score_path)
        integrator.setBeadFeatures(cg.features)
        integrator.setBonds(cg.bonds)
        integrator.setUsesPeriodicBoundaryConditions(cg.periodic)
        integrator.setDeterministic(deterministic)
        integrator.setRandomNumberSeed(seed)
        if langevinSteps is not None:
            integrator.setLangevinSteps(langevinSteps)
        if langevinStepSize is not None:
            integrator.setLangevinStepSize(langevinStepSize)
        if langevinSchedule is not None:
            integrator.setLangevinSchedule(langevinSchedule)
        if langevinLevels is not None:
            integrator.setLangevinLevels(langevinLevels)
        if exclusionDistance is not None:
            integrator.setExclusionDistance(exclusionDistance)
        if bondLengthLimit is not None:
            integrator.setBondLengthLimit(bondLengthLimit)
        if compiled:
            from openmm_cgml.compiled import compile_network

            system = (_nm(cg.positions), cg.box if cg.periodic else None, cg.features, cg.bonds)
            for kind, archive, attach in (("dynamics", self.dynamicsPath, integrator.setCompiledDynamicsModel),
                                          ("score", score_path, integrator.setCompiledScoreModel)):
                if archive is not None:
                    attach(compile_network(kind, archive, self.manifest["model_config"], system))
        return integrator

    def rollout(self, cg: CGSystem, history, n_steps: int, *, score: bool = True, seed: int = 1,
                limits: bool = True, label: str = "learned", platform: str = "CPU", progress: bool = False,
                reporters: Sequence[Any] = (), langevin: dict[str, Any] | None = None,
                compiled: bool = False) -> CGRun:
        """Run ``n_steps`` learned steps in an ordinary ``app.Simulation`` and keep every frame.

        ``history``: CG frames one model step apart (e.g. ``cg.map_trajectory(...)``; nm or
        a Quantity), the last ``seq_len`` are used. ``score=False``: no refinement;
        ``limits=False``: without the model's distance limits; ``langevin``: overrides of
        the score model's Langevin settings, keyword arguments of :meth:`createIntegrator`
        (``langevinSteps``, ``langevinStepSize``, ``langevinSchedule``, ``langevinLevels``); ``compiled``: the
        compiled networks (:meth:`createIntegrator`). ``reporters`` are added to
        the simulation (e.g. ``app.DCDReporter``). A failing step (NaN, ...) ends the
        rollout early: the frames before it are kept and the failure is recorded.
        """
        from tqdm.auto import tqdm

        langevin = dict(langevin or {})
        unknown = set(langevin) - {"langevinSteps", "langevinStepSize", "langevinSchedule", "langevinLevels"}
        if unknown:
            raise ValueError(f"unknown Langevin settings {sorted(unknown)}; "
                             "known: langevinSteps, langevinStepSize, langevinSchedule, langevinLevels")
        off = None if limits else 0.0
        integrator = self.createIntegrator(cg, score=score, seed=seed, exclusionDistance=off, bondLengthLimit=off,
                                           compiled=compiled, **(langevin if score else {}))
        simulation = app.Simulation(cg.topology, cg.system, integrator, openmm.Platform.getPlatformByName(platform))
        frames_in = _nm(history)
        if frames_in.ndim == 2:
            frames_in = frames_in[None]
        integrator.setHistory(frames_in[-integrator.getSequenceLength():])  # sets positions and velocities too
        simulation.reporters.extend(reporters)
        frames = np.empty((n_steps + 1, cg.n_beads, 3), dtype=np.float32)
        frames[0] = frames_in[-1]
        run = CGRun(label, frames, float(integrator.getStepSize().value_in_unit(unit.picosecond)), cg.box)
        start, done = time.perf_counter(), 0
        with tqdm(total=n_steps, desc=f"  {label} rollout", unit="step", disable=not progress, leave=False) as bar:
            for step in range(1, n_steps + 1):
                try:
                    simulation.step(1)
                except openmm.OpenMMException as error:
                    run.failed_at_step, run.failure = step, str(error)
                    break
                frames[step] = simulation.context.getState(getPositions=True).getPositions(
                    asNumpy=True).value_in_unit(unit.nanometer)
                done = step
                bar.update(1)
        run.wall_seconds = time.perf_counter() - start
        run.positions = frames[: done + 1]
        run.limit_corrections = int(integrator.getExclusionCorrections() + integrator.getBondLimitCorrections())
        return run

    def rollout_replicas(self, cg: CGSystem, histories, n_steps: int, *, score: bool = True, seed: int = 1,
                         limits: bool = True, platform: str = "CPU", progress: bool = False,
                         spacing: float | None = None, drift: float = 0.0,
                         langevin: dict[str, Any] | None = None, compiled: bool = False) -> list[CGRun]:
        """K independent rollouts of ``cg`` advanced together: one model call per step
        for all of them, as the paper batches many systems per GPU call.

        ``histories``: [K, T, N, 3] nm (K start histories, e.g. K reference windows, or
        one history repeated with K seeds' worth of noise). The K copies are laid out on
        a grid ``spacing`` nm apart (default: the largest history extent plus four model
        cutoffs plus 6 ``drift``, the expected rms displacement (nm) of a replica's centre
        over the rollout: two replicas drifting 3 rms towards each other), so no graph
        edge or distance limit joins two replicas; a warning says
        if replicas drifted within one cutoff of each other (their rollouts then
        interacted). ``langevin``, ``compiled``: as in :meth:`rollout`. Non-periodic systems only: a periodic system has one box and a
        replica's periodic image would be its neighbour. Returns one :class:`CGRun`
        per replica (positions in the replica's own frame).
        """
        import warnings

        histories = _nm(histories)
        if histories.ndim != 4 or histories.shape[2:] != (cg.n_beads, 3):
            raise ValueError(f"histories must be [K, T, {cg.n_beads}, 3] nm, got shape {histories.shape}")
        k, cutoff = histories.shape[0], float(self.manifest.get("model_config", {}).get("cutoff", 1.0))
        extent = float(np.max(histories.max(axis=2) - histories.min(axis=2))) if cg.n_beads else 0.0
        spacing = extent + 4 * cutoff + 6 * float(drift) if spacing is None else float(spacing)
        replicated, offsets = cg.replicate(k, spacing)
        stacked = (histories + offsets[:, None, None]).transpose(1, 0, 2, 3).reshape(histories.shape[1], -1, 3)
        run = self.rollout(replicated, stacked, n_steps, score=score, seed=seed, limits=limits,
                           label=f"{k} replicas", platform=platform, progress=progress, langevin=langevin,
                           compiled=compiled)
        frames = run.positions.astype(np.float64).reshape(len(run.positions), k, cg.n_beads, 3)
        low, high = frames.min(axis=2), frames.max(axis=2)  # [F, K, 3] bounding boxes
        gap = np.maximum(low[:, :, None] - high[:, None], low[:, None] - high[:, :, None]).max(axis=-1)  # [F,K,K]
        gap[:, np.arange(k), np.arange(k)] = np.inf
        close = np.flatnonzero((gap < cutoff).any(axis=(1, 2)))
        if close.size:
            warnings.warn(f"replicas came within the model cutoff ({cutoff:g} nm) of each other from step "
                          f"{close[0]} on, so their rollouts interacted; pass a larger spacing", stacklevel=2)
        runs = []
        for r in range(k):
            runs.append(CGRun(f"replica {r}", (frames[:, r] - offsets[r]).astype(np.float32), run.dt_ps, None,
                              run.wall_seconds, run.failed_at_step, run.failure, limit_corrections=None))
        return runs

    def __repr__(self):
        m = self.manifest
        return (f"<LearnedSimulator {self.directory} backbone={m.get('backbone')} seq_len={m['seq_len']} "
                f"step={m['step_size_ps']} ps cg_level={m['cg']['cg_level']} "
                f"score={'yes' if m['files'].get('score') else 'no'} "
                f"exclusion={m.get('exclusion_distance_nm', 0.0):.3g} nm "
                f"bond_limit={m.get('bond_length_limit_nm', 0.0):.3g} nm "
                f"property={'yes' if m['files'].get('property') else 'no'}>")
