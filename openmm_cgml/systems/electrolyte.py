"""Li-salt solid polymer electrolyte: methyl-capped PEO chains + LiTFSI, all-atom, periodic.

The second reference system of Fu et al. (TMLR 2023): polymer + LiTFSI melts whose Li+,
TFSI- and polymer diffusivities and RDFs the learned simulator must reproduce.

Model
-----
* Molecules: CH3-O-(CH2-CH2-O)n-CH3 chains ("n_eo" = n repeat units, n + 1 ether O),
  Li+ and TFSI- = N(SO2CF3)2-.
* Force field (``data/electrolyte.xml``, sources cited there): OPLS-AA for the ether
  chains, CL&P (Canongia Lopes & Padua) for TFSI- and Li+. OPLS combining rules: LJ
  sigma_ij = sqrt(sigma_i sigma_j), epsilon_ij = sqrt(epsilon_i epsilon_j), 1-4 pairs
  scaled by 0.5 (Coulomb) and 0.5 (LJ), 1-2 and 1-3 pairs excluded.
* Ion charges are scaled by ``ion_charge_scale`` = 0.8 (Li+ +0.8 e, TFSI- -0.8 e; for
  TFSI these are exactly the il-0.8.ff values of CL&P). Non-polarisable full charges
  are known to over-bind Li+ to the ether oxygens and TFSI- and to slow ion dynamics;
  scaling by 0.7-0.8 is the usual mean-field account of electronic polarisation for
  ionic liquids and polymer electrolytes (not re-validated here). Pass
  ``ion_charge_scale=1.0`` for full charges.
* Exact geometric LJ: the NonbondedForce keeps the charges (PME) with epsilon = 0; a
  CustomNonbondedForce with per-particle sqrt(sigma) and sqrt(epsilon) computes LJ for
  every non-excluded pair (cut at the same cutoff, long-range dispersion correction on);
  the NonbondedForce's exceptions carry the 1-4 terms (0.5 q_i q_j, geometric sigma,
  0.5 sqrt(eps_i eps_j)) and exclude 1-2/1-3 pairs. ``lj_combining_rule=
  "lorentz-berthelot"`` keeps a single NonbondedForce (not OPLS; ~1.6x faster, for speed
  comparison; measurements in docs/benchmarks.md).
* Hydrogen mass repartitioning (H = 3 amu, taken from the bonded heavy atom) and
  constrained X-H bonds allow a 4 fs LangevinMiddle step (friction 1/ps).
* PME (error tolerance 5e-4). Cutoff 1.0 nm, shortened to 0.45 x the estimated box edge
  for very small boxes (the tiny preset), so that it stays below half the box under NPT.

Why 423 K, short chains and EO:Li 8-24
--------------------------------------
The paper simulates polymer + LiTFSI at 353 K for 5 ns (training) and 50 ns (test).
On this machine nanoseconds are the budget (MD speeds: docs/benchmarks.md), and at 353 K
Li+ in high-molecular-weight PEO moves < 1 nm in a few ns (D ~ 1e-8 cm^2/s). We
therefore simulate at 423 K (PEO melts at ~338 K and is stable well above 423 K), with
oligomeric chains of 6-32 EO units (molecular weights ~300-1,450 g/mol, between glymes
and PEO): the polymer relaxes on the ns scale and Li+, TFSI- and chain diffusivities
become measurable from the mean-squared displacement of ns-long trajectories. EO:Li from
8 (salt-rich) to 24 (salt-poor) spans the range where PEO/LiTFSI conductivity peaks
(EO:Li ~ 10-20); EO:Li counts all ether oxygens, (n_eo + 1) per chain.

Compositions and splits (chain length and salt concentration vary; some held out)
---------------------------------------------------------------------------------
* tiny (tests, seconds): train (n_eo = 10, 3 chains, 2 LiTFSI, 269 atoms) and test
  (n_eo = 6, 4 chains, 2 LiTFSI, 236 atoms); 1 ps heating, 5 ps compression, 8 ps NPT;
  5 frames (10 ps).
* demo (minutes): ~1,300-1,400 atoms each; train (n_eo, EO:Li) = (8, 12) and (16, 20),
  test (12, 16) (held out in both chain length and salt concentration); 20 ps
  compression + 60 ps NPT, 100 frames (200 ps).
* full (closest to the paper): ~2,500 atoms each; train = chain lengths {8, 16, 24} x
  EO:Li {8, 20}; test = (12, 14) (interpolation) and (32, 14) (longer chains than any
  training system); 100 ps compression + 900 ps NPT; train 2,500 frames (5 ns), test
  25,000 frames (50 ns), as in the paper: 138 ns of MD, days on this machine.

Costs and measured MD speeds of each preset: docs/benchmarks.md.

Protocol (see :func:`build` and the ``equilibrate`` it returns)
-------------------------------------------------------------
build: RDKit 3-D conformers (ETKDG) of the chains (several per chain length) and of
TFSI-, packmol packs them at ``packing_density_fraction`` (0.3) of the estimated melt
density (at 0.6 packmol needed minutes and failed for 10 chains of 16 EO units; at 0.3 it
took 6 s), whole molecules inside the box with a 2 A margin (no overlaps through the
periodic boundary). generate.py then minimises and calls ``equilibrate(simulation,
progress)``:

1. heating: velocities at T, Langevin NVT at 1 fs;
2. compression: NVT at 2 fs while the box and the molecular centres of mass are scaled
   in 25 equal steps to the estimated melt density;
3. NPT: MonteCarloBarostat at 1 bar and T, 4 fs; the box is finally set to the mean
   volume of the second half of this stage and the barostat is removed.

Production is Langevin NVT at T (PME), 4 fs, one frame every 2 ps.

Progress and summary
--------------------
``built.equilibrate`` is an :class:`~openmm_cgml.systems.base.Equilibration`:
``built.equilibrate(simulation, progress)`` reports after every chunk (~2 % of the
steps) to ``progress`` (None, a tqdm bar, or ``progress(fraction_done, stage)``, e.g.
``progress(0.35, "compress 1.02 g/cm3")``); ``built.equilibrate.total_steps`` is the
number of MD steps. It returns the summary (final density, box edge, estimated density,
NPT density trace) that the generator stores in the trajectory metadata.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.runtime import openmm_seed
from openmm_cgml.systems.base import PRESETS, BuiltSystem, Equilibration, SystemSpec

FORCEFIELD_XML = Path(__file__).with_name("data") / "electrolyte.xml"

AVOGADRO = 6.02214076e23


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ElectrolyteParameters:
    """Every physical and protocol constant of the electrolyte model, in one place.

    Units: K, bar, ps, fs, nm, amu, g/cm^3, cm^3/mol as the names say.
    """

    temperature_K: float = 423.0            # see module docstring for why not 353 K
    pressure_bar: float = 1.0
    ion_charge_scale: float = 0.8           # Li+ -> +0.8 e, TFSI- -> -0.8 e
    lj_combining_rule: str = "geometric"    # OPLS; "lorentz-berthelot" only for benchmarks
    coulomb14_scale: float = 0.5            # OPLS fudge factors
    lj14_scale: float = 0.5
    max_cutoff_nm: float = 1.0
    cutoff_box_fraction: float = 0.45       # cutoff <= this x estimated box edge
    ewald_error_tolerance: float = 5e-4
    hydrogen_mass_amu: float = 3.0          # hydrogen mass repartitioning
    timestep_fs: float = 4.0                # production and NPT step (HMR + HBonds)
    heating_timestep_fs: float = 1.0
    compression_timestep_fs: float = 2.0
    compression_increments: int = 25
    friction_per_ps: float = 1.0
    barostat_interval_steps: int = 25
    record_interval_ps: float = 2.0
    packing_density_fraction: float = 0.3   # packmol box: this fraction of the melt density (dilute packs fast)
    packmol_tolerance_angstrom: float = 2.0
    conformers_per_chain_length: int = 4
    # Density estimate (ideal mixing of partial molar volumes at 293 K, then thermal
    # expansion). EO unit in amorphous PEO: 44.05 g/mol / 1.124 g/cm^3 = 39.2 cm^3/mol;
    # CH3-O- + -CH3 end groups: 63.2 cm^3/mol (tetraglyme, 1.009 g/cm^3 at 293 K, minus
    # 4 EO units); LiTFSI: ~140 cm^3/mol (the equimolar Li(G4) TFSI solvate ionic liquid,
    # ~1.40 g/cm^3, minus tetraglyme); volumetric expansion 7.5e-4 /K. Good to ~5 %.
    eo_unit_volume_cm3_mol: float = 39.2
    end_groups_volume_cm3_mol: float = 63.2
    litfsi_volume_cm3_mol: float = 140.0
    reference_temperature_K: float = 293.0
    thermal_expansion_per_K: float = 7.5e-4


PARAMETERS = ElectrolyteParameters()

# atoms and masses of the building blocks (standard atomic masses)
MASS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "F": 18.998, "S": 32.066, "Li": 6.941}
ATOMS_PER_LITFSI = 16
LITFSI_MASS = MASS["Li"] + MASS["N"] + 2 * MASS["S"] + 4 * MASS["O"] + 2 * MASS["C"] + 6 * MASS["F"]


def chain_atom_count(n_eo: int) -> int:
    """Atoms of CH3-O-(CH2-CH2-O)n-CH3: 2 CH3 + (n + 1) O + n CH2-CH2 (6 per unit)."""
    return 9 + 7 * n_eo


def chain_mass(n_eo: int) -> float:
    """Molar mass (g/mol) of CH3-O-(CH2-CH2-O)n-CH3."""
    eo_unit = 2 * MASS["C"] + 4 * MASS["H"] + MASS["O"]
    ends = 2 * (MASS["C"] + 3 * MASS["H"]) + MASS["O"]
    return n_eo * eo_unit + ends


def estimate_density_g_cm3(n_eo: int, n_chains: int, n_salt: int, temperature_K: float,
                           params: ElectrolyteParameters = PARAMETERS) -> float:
    """Melt density estimate from partial molar volumes (see ElectrolyteParameters)."""
    volume = (n_chains * (n_eo * params.eo_unit_volume_cm3_mol + params.end_groups_volume_cm3_mol)
              + n_salt * params.litfsi_volume_cm3_mol)
    volume *= 1.0 + params.thermal_expansion_per_K * (temperature_K - params.reference_temperature_K)
    mass = n_chains * chain_mass(n_eo) + n_salt * LITFSI_MASS
    return mass / volume


def box_edge_nm(mass_g_mol: float, density_g_cm3: float) -> float:
    """Edge of the cubic box holding ``mass_g_mol`` at ``density_g_cm3``."""
    volume_nm3 = mass_g_mol / AVOGADRO / density_g_cm3 * 1e21
    return volume_nm3 ** (1.0 / 3.0)


# ----------------------------------------------------------------------------- specs
# (n_eo, EO:Li, split) per preset; tiny gives explicit molecule counts instead.
PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "compositions": [
            {"n_eo": 10, "n_chains": 3, "n_salt": 2, "split": "train"},
            {"n_eo": 6, "n_chains": 4, "n_salt": 2, "split": "test"},
        ],
        "target_atoms": None,
        "heat_ps": 1.0, "compress_ps": 5.0, "npt_ps": 8.0,
        "n_frames_train": 5, "n_frames_test": 5,
    },
    "demo": {
        "compositions": [
            {"n_eo": 8, "eo_per_li": 12, "split": "train"},
            {"n_eo": 16, "eo_per_li": 20, "split": "train"},
            {"n_eo": 12, "eo_per_li": 16, "split": "test"},
        ],
        "target_atoms": 1350,
        "heat_ps": 2.0, "compress_ps": 20.0, "npt_ps": 60.0,
        "n_frames_train": 100, "n_frames_test": 100,
    },
    "full": {
        "compositions": [
            {"n_eo": 8, "eo_per_li": 8, "split": "train"},
            {"n_eo": 8, "eo_per_li": 20, "split": "train"},
            {"n_eo": 16, "eo_per_li": 8, "split": "train"},
            {"n_eo": 16, "eo_per_li": 20, "split": "train"},
            {"n_eo": 24, "eo_per_li": 8, "split": "train"},
            {"n_eo": 24, "eo_per_li": 20, "split": "train"},
            {"n_eo": 12, "eo_per_li": 14, "split": "test"},
            {"n_eo": 32, "eo_per_li": 14, "split": "test"},
        ],
        "target_atoms": 2500,
        "heat_ps": 5.0, "compress_ps": 100.0, "npt_ps": 900.0,
        "n_frames_train": 2500, "n_frames_test": 25000,
    },
}

# overrides accepted by make_specs (besides the preset settings above)
PHYSICS_OVERRIDES = ("temperature_K", "ion_charge_scale", "lj_combining_rule")


def molecule_counts(n_eo: int, eo_per_li: float, target_atoms: int) -> tuple[int, int]:
    """(n_chains, n_salt) closest to ``target_atoms`` at the given EO:Li ratio."""
    atoms_per_chain_with_salt = chain_atom_count(n_eo) + ATOMS_PER_LITFSI * (n_eo + 1) / eo_per_li
    n_chains = max(1, int(round(target_atoms / atoms_per_chain_with_salt)))
    n_salt = max(1, int(round(n_chains * (n_eo + 1) / eo_per_li)))
    return n_chains, n_salt


def _check_composition(n_eo: int, n_chains: int, n_salt: int) -> None:
    if n_eo < 1:
        raise ValueError(f"n_eo (EO repeat units per chain) must be >= 1, got {n_eo}")
    if n_chains < 1:
        raise ValueError(f"n_chains must be >= 1, got {n_chains}")
    if n_salt < 0:
        raise ValueError(f"n_salt must be >= 0, got {n_salt}")


def make_specs(preset: str, seed: int, **overrides) -> list[SystemSpec]:
    """Electrolyte specs (train and held-out test compositions) for ``preset``.

    Overrides (None values are ignored): any key of the preset settings
    (``heat_ps``, ``compress_ps``, ``npt_ps``, ``n_frames_train``, ``n_frames_test``,
    ``target_atoms``, ``compositions``) and ``temperature_K``, ``ion_charge_scale``,
    ``lj_combining_rule``.
    """
    if preset not in PRESET_SETTINGS:
        raise ValueError(f"unknown electrolyte preset {preset!r}; choose one of {PRESETS}")
    settings = dict(PRESET_SETTINGS[preset])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(settings) - set(PHYSICS_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown electrolyte override(s) {sorted(unknown)}; allowed: "
                         f"{sorted(set(settings) | set(PHYSICS_OVERRIDES))}")
    settings.update({k: v for k, v in overrides.items() if k in settings})

    temperature_K = float(overrides.get("temperature_K", PARAMETERS.temperature_K))
    ion_charge_scale = float(overrides.get("ion_charge_scale", PARAMETERS.ion_charge_scale))
    lj_rule = str(overrides.get("lj_combining_rule", PARAMETERS.lj_combining_rule))
    if temperature_K <= 0:
        raise ValueError(f"temperature_K must be positive, got {temperature_K}")
    if not 0.0 < ion_charge_scale <= 1.0:
        raise ValueError(f"ion_charge_scale must be in (0, 1], got {ion_charge_scale}")
    if lj_rule not in ("geometric", "lorentz-berthelot"):
        raise ValueError(f"lj_combining_rule must be 'geometric' or 'lorentz-berthelot', got {lj_rule!r}")
    for key in ("heat_ps", "compress_ps", "npt_ps"):
        if float(settings[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {settings[key]}")

    rng = np.random.default_rng(seed)
    specs: list[SystemSpec] = []
    counters = {"train": 0, "test": 0}
    for entry in settings["compositions"]:
        split = entry.get("split", "train")
        if split not in counters:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n_eo = int(entry["n_eo"])
        if "n_chains" in entry:
            n_chains, n_salt = int(entry["n_chains"]), int(entry["n_salt"])
        else:
            eo_per_li = float(entry["eo_per_li"])
            if eo_per_li <= 0:
                raise ValueError(f"eo_per_li must be positive, got {eo_per_li}")
            if not settings["target_atoms"]:
                raise ValueError("compositions given as eo_per_li need target_atoms")
            n_chains, n_salt = molecule_counts(n_eo, eo_per_li, int(settings["target_atoms"]))
        _check_composition(n_eo, n_chains, n_salt)
        density = estimate_density_g_cm3(n_eo, n_chains, n_salt, temperature_K)
        mass = n_chains * chain_mass(n_eo) + n_salt * LITFSI_MASS
        edge = box_edge_nm(mass, density)
        cutoff = min(PARAMETERS.max_cutoff_nm, round(PARAMETERS.cutoff_box_fraction * edge, 3))
        composition = {
            "n_eo": n_eo,
            "n_chains": n_chains,
            "n_salt": n_salt,
            "eo_per_li": (n_chains * (n_eo + 1) / n_salt) if n_salt else None,
            "n_atoms": n_chains * chain_atom_count(n_eo) + n_salt * ATOMS_PER_LITFSI,
            "temperature_K": temperature_K,
            "pressure_bar": PARAMETERS.pressure_bar,
            "ion_charge_scale": ion_charge_scale,
            "lj_combining_rule": lj_rule,
            "target_density_g_cm3": round(density, 4),
            "target_box_nm": round(edge, 4),
            "cutoff_nm": cutoff,
            "heat_ps": float(settings["heat_ps"]),
            "compress_ps": float(settings["compress_ps"]),
            "npt_ps": float(settings["npt_ps"]),
        }
        n_frames = int(settings["n_frames_train" if split == "train" else "n_frames_test"])
        composition["n_frames"] = n_frames
        specs.append(SystemSpec(
            kind="electrolyte",
            name=f"electrolyte_{split}_{counters[split]:03d}_eo{n_eo}_li{n_salt}",
            split=split,
            seed=int(rng.integers(1, 2**31 - 1)),
            composition=composition,
            n_frames=n_frames,
        ))
        counters[split] += 1
    return specs


# ----------------------------------------------------------------------------- molecules
@dataclass
class MoleculeTemplate:
    """One molecule: residues (name, [atom indices]), atom names/elements, bonds, conformers."""

    residues: list[tuple[str, list[int]]]
    names: list[str]
    elements: list[str]
    bonds: list[tuple[int, int]]
    conformers: list[np.ndarray]     # each (n_atoms, 3) in Angstrom, in template atom order


def _rdkit():
    try:
        from rdkit import Chem
        from rdkit.Chem import AllChem
    except ImportError as exc:  # pragma: no cover - dependency message
        raise ImportError("the electrolyte system needs RDKit: pip install rdkit") from exc
    return Chem, AllChem


def _embed(mol, n_conformers: int, seed: int) -> list[np.ndarray]:
    """ETKDG conformers of ``mol`` (with hydrogens) as arrays in RDKit atom order."""
    Chem, AllChem = _rdkit()
    embed_params = AllChem.ETKDGv3()
    embed_params.randomSeed = int(seed) % (2**31 - 1)
    embed_params.useRandomCoords = True  # robust and fast for long flexible chains
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n_conformers, params=embed_params))
    if not ids:
        raise RuntimeError(f"RDKit could not embed {Chem.MolToSmiles(Chem.RemoveHs(mol))}")
    return [np.asarray(mol.GetConformer(i).GetPositions(), dtype=float) for i in ids]


def _template_from_rdkit(mol, order: list[int], residues: list[tuple[str, list[int]]],
                         names: list[str], n_conformers: int, seed: int) -> MoleculeTemplate:
    """Re-index an RDKit molecule into template order ``order`` (template i = rdkit order[i])."""
    position_of = {rd: i for i, rd in enumerate(order)}
    bonds = [(position_of[b.GetBeginAtomIdx()], position_of[b.GetEndAtomIdx()]) for b in mol.GetBonds()]
    elements = [mol.GetAtomWithIdx(rd).GetSymbol() for rd in order]
    conformers = [xyz[order] for xyz in _embed(mol, n_conformers, seed)]
    return MoleculeTemplate(residues, names, elements, bonds, conformers)


def peo_chain_template(n_eo: int, n_conformers: int, seed: int) -> MoleculeTemplate:
    """CH3-O-(CH2-CH2-O)n-CH3 split into residues PEH (CH3), n x PEO (O-CH2-CH2), PET (O-CH3)."""
    Chem, _ = _rdkit()
    if n_eo < 1:
        raise ValueError(f"n_eo must be >= 1, got {n_eo}")
    mol = Chem.AddHs(Chem.MolFromSmiles("CO" + "CCO" * n_eo + "C"))
    # heavy atoms in SMILES order: C(0) O(1) [C C O] x n ... C(last)
    hydrogens_of = {a.GetIdx(): [n.GetIdx() for n in a.GetNeighbors() if n.GetSymbol() == "H"]
                    for a in mol.GetAtoms() if a.GetSymbol() != "H"}
    order: list[int] = []
    names: list[str] = []
    residues: list[tuple[str, list[int]]] = []

    def add_residue(name: str, heavy: list[tuple[int, str]], h_prefix: dict[int, str]) -> None:
        start = len(order)
        for rd, atom_name in heavy:
            order.append(rd)
            names.append(atom_name)
        for rd, _ in heavy:
            for k, h in enumerate(hydrogens_of[rd]):
                order.append(h)
                names.append(f"{h_prefix[rd]}{k + 1}")
        residues.append((name, list(range(start, len(order)))))

    add_residue("PEH", [(0, "C")], {0: "H"})
    for k in range(n_eo):
        o, c1, c2 = 1 + 3 * k, 2 + 3 * k, 3 + 3 * k
        add_residue("PEO", [(o, "O"), (c1, "C1"), (c2, "C2")], {o: "", c1: "H1", c2: "H2"})
    o, c = 1 + 3 * n_eo, 2 + 3 * n_eo
    add_residue("PET", [(o, "O"), (c, "C")], {o: "", c: "H"})
    if sorted(order) != list(range(mol.GetNumAtoms())):
        raise AssertionError("PEO residue split does not cover every atom once")
    return _template_from_rdkit(mol, order, residues, names, n_conformers, seed)


TFSI_SMILES = "FC(F)(F)S(=O)(=O)[N-]S(=O)(=O)C(F)(F)F"
# template atom names for the heavy atoms of TFSI_SMILES, in SMILES order
TFSI_NAMES_IN_SMILES_ORDER = ["F1", "C1", "F2", "F3", "S1", "O1", "O2", "N",
                              "S2", "O3", "O4", "C2", "F4", "F5", "F6"]
TFSI_TEMPLATE_ORDER = ["C1", "F1", "F2", "F3", "S1", "O1", "O2", "N",
                       "S2", "O3", "O4", "C2", "F4", "F5", "F6"]


def tfsi_template(seed: int) -> MoleculeTemplate:
    Chem, _ = _rdkit()
    mol = Chem.MolFromSmiles(TFSI_SMILES)
    rd_index = {name: i for i, name in enumerate(TFSI_NAMES_IN_SMILES_ORDER)}
    order = [rd_index[name] for name in TFSI_TEMPLATE_ORDER]
    residues = [("TFS", list(range(len(order))))]
    return _template_from_rdkit(mol, order, residues, list(TFSI_TEMPLATE_ORDER), 1, seed)


def lithium_template() -> MoleculeTemplate:
    return MoleculeTemplate([("LI", [0])], ["LI"], ["Li"], [], [np.zeros((1, 3))])


# ----------------------------------------------------------------------------- packing
def _write_pdb(path: Path, template: MoleculeTemplate, xyz: np.ndarray) -> None:
    lines = []
    for i, (name, element, (x, y, z)) in enumerate(zip(template.names, template.elements, xyz)):
        lines.append(f"HETATM{i + 1:5d} {name:<4s} MOL A   1    {x:8.3f}{y:8.3f}{z:8.3f}"
                     f"  1.00  0.00          {element:>2s}")
    path.write_text("\n".join(lines) + "\nEND\n")


def _packmol_executable() -> str:
    candidates = [Path(sys.executable).with_name("packmol"), shutil.which("packmol")]
    for candidate in candidates:
        if candidate and os.access(str(candidate), os.X_OK):
            return str(candidate)
    raise RuntimeError("packmol not found: pip install packmol (the PyPI package ships the binary)")


def pack_box(items: list[tuple[MoleculeTemplate, np.ndarray, int]], edge_angstrom: float,
             seed: int, tolerance_angstrom: float) -> np.ndarray:
    """Pack ``count`` copies of each (template, conformer xyz) into a cube with packmol.

    Molecules are kept whole and at least ``tolerance`` from the faces, so no two atoms
    come closer than the tolerance through the periodic boundary either. Returns the
    coordinates (Angstrom) in input order: all copies of item 0, then item 1, ...
    """
    margin = tolerance_angstrom / 2.0
    hi = edge_angstrom - margin
    with tempfile.TemporaryDirectory(prefix="cgml_packmol_") as tmp:
        tmpdir = Path(tmp)
        blocks = [f"tolerance {tolerance_angstrom}", "filetype pdb", "output packed.pdb",
                  f"seed {int(seed) % 1000000 + 1}", ""]
        for k, (template, xyz, count) in enumerate(items):
            if count <= 0:
                continue
            _write_pdb(tmpdir / f"mol{k}.pdb", template, xyz)
            blocks += [f"structure mol{k}.pdb", f"  number {count}",
                       f"  inside box {margin:.3f} {margin:.3f} {margin:.3f} {hi:.3f} {hi:.3f} {hi:.3f}",
                       "end structure", ""]
        (tmpdir / "pack.inp").write_text("\n".join(blocks))
        with open(tmpdir / "pack.inp") as stdin:
            result = subprocess.run([_packmol_executable()], stdin=stdin, cwd=tmpdir,
                                    capture_output=True, text=True, timeout=600)
        output = tmpdir / "packed.pdb"
        if result.returncode != 0 or "Success!" not in result.stdout or not output.exists():
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            raise RuntimeError(f"packmol failed (exit {result.returncode}):\n{tail}")
        coords = [(float(l[30:38]), float(l[38:46]), float(l[46:54]))
                  for l in output.read_text().splitlines() if l.startswith(("ATOM", "HETATM"))]
    expected = sum(len(t.names) * c for t, _, c in items if c > 0)
    if len(coords) != expected:
        raise RuntimeError(f"packmol wrote {len(coords)} atoms, expected {expected}")
    return np.asarray(coords)


# ----------------------------------------------------------------------------- force field
@functools.lru_cache(maxsize=1)
def load_forcefield() -> app.ForceField:
    """The OPLS-AA/CL&P ForceField of this system (data/electrolyte.xml)."""
    return app.ForceField(str(FORCEFIELD_XML))


def _bonded_pair_sets(topology: app.Topology) -> tuple[set, set]:
    """(pairs 1-2 or 1-3 apart, pairs exactly 1-4 apart) as sorted index tuples."""
    neighbours: dict[int, set[int]] = {a.index: set() for a in topology.atoms()}
    for a, b in topology.bonds():
        neighbours[a.index].add(b.index)
        neighbours[b.index].add(a.index)
    close, one_four = set(), set()
    for i, first in neighbours.items():
        for j in first:
            close.add((min(i, j), max(i, j)))
            for k in neighbours[j]:
                if k != i:
                    close.add((min(i, k), max(i, k)))
    for i, first in neighbours.items():
        for j in first:
            for k in neighbours[j] - {i}:
                for m in neighbours[k] - {j, i}:
                    pair = (min(i, m), max(i, m))
                    if pair not in close:
                        one_four.add(pair)
    return close, one_four


def apply_opls_nonbonded(system: openmm.System, topology: app.Topology, charge_scale: list[float],
                         combining_rule: str = "geometric",
                         coulomb14_scale: float = PARAMETERS.coulomb14_scale,
                         lj14_scale: float = PARAMETERS.lj14_scale) -> None:
    """Scale charges, rewrite 1-4 exceptions and (geometric rule) move LJ to a custom force.

    ``charge_scale[i]`` multiplies atom i's charge (1 for the polymer, ion_charge_scale
    for Li+ and TFSI- atoms). Afterwards the NonbondedForce holds Coulomb (PME) for all
    pairs and the complete 1-4 terms; with the geometric rule a CustomNonbondedForce
    holds LJ for all non-excluded pairs.
    """
    if combining_rule not in ("geometric", "lorentz-berthelot"):
        raise ValueError(f"unknown combining rule {combining_rule!r}")
    nonbonded = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    if len(nonbonded) != 1:
        raise ValueError(f"expected one NonbondedForce, found {len(nonbonded)}")
    nb = nonbonded[0]
    n = system.getNumParticles()
    if len(charge_scale) != n:
        raise ValueError(f"charge_scale has {len(charge_scale)} entries for {n} particles")
    charges, sigmas, epsilons = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        q, s, e = nb.getParticleParameters(i)
        charges[i] = q.value_in_unit(unit.elementary_charge) * charge_scale[i]
        sigmas[i] = s.value_in_unit(unit.nanometer)
        epsilons[i] = e.value_in_unit(unit.kilojoule_per_mole)

    close, one_four = _bonded_pair_sets(topology)
    seen = set()
    for k in range(nb.getNumExceptions()):
        i, j, _, _, _ = nb.getExceptionParameters(k)
        pair = (min(i, j), max(i, j))
        seen.add(pair)
        if pair in one_four:
            if combining_rule == "geometric":
                sigma14 = math.sqrt(sigmas[i] * sigmas[j])
            else:
                sigma14 = 0.5 * (sigmas[i] + sigmas[j])
            nb.setExceptionParameters(k, i, j, coulomb14_scale * charges[i] * charges[j],
                                      sigma14, lj14_scale * math.sqrt(epsilons[i] * epsilons[j]))
        elif pair in close:
            nb.setExceptionParameters(k, i, j, 0.0, 1.0, 0.0)
        else:
            raise ValueError(f"exception between atoms {i} and {j} that are not 1-2/1-3/1-4")
    missing = (close | one_four) - seen
    if missing:
        raise ValueError(f"{len(missing)} bonded pairs have no exception, e.g. {sorted(missing)[:3]}")

    for i in range(n):
        lj_epsilon = epsilons[i] if combining_rule == "lorentz-berthelot" else 0.0
        nb.setParticleParameters(i, charges[i], sigmas[i], lj_epsilon)
    if combining_rule == "lorentz-berthelot":
        return

    lj = openmm.CustomNonbondedForce(
        "4*epsilon*(sr6*sr6 - sr6); sr6 = (sigma/r)^6; "
        "sigma = sqrt_sigma1*sqrt_sigma2; epsilon = sqrt_epsilon1*sqrt_epsilon2")
    lj.addPerParticleParameter("sqrt_sigma")
    lj.addPerParticleParameter("sqrt_epsilon")
    lj.setName("LennardJonesGeometric")
    if nb.getNonbondedMethod() in (openmm.NonbondedForce.NoCutoff,):
        lj.setNonbondedMethod(openmm.CustomNonbondedForce.NoCutoff)
    elif nb.getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic:
        lj.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
    else:
        lj.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    lj.setCutoffDistance(nb.getCutoffDistance())
    lj.setUseSwitchingFunction(nb.getUseSwitchingFunction())
    lj.setSwitchingDistance(nb.getSwitchingDistance())
    lj.setUseLongRangeCorrection(nb.getUseDispersionCorrection())
    nb.setUseDispersionCorrection(False)  # every NonbondedForce epsilon is 0 now
    for i in range(n):
        lj.addParticle([math.sqrt(sigmas[i]), math.sqrt(epsilons[i])])
    for pair in sorted(seen):
        lj.addExclusion(*pair)
    system.addForce(lj)


# force groups, for per-component energies
FORCE_GROUPS = {
    "HarmonicBondForce": 0,
    "HarmonicAngleForce": 1,
    "PeriodicTorsionForce": 2,
    "RBTorsionForce": 3,
    "NonbondedForce": 4,
    "CustomNonbondedForce": 5,
    "CMMotionRemover": 6,
    "MonteCarloBarostat": 7,
}


def energy_components(context: openmm.Context, system: openmm.System) -> dict[str, float]:
    """Potential energy (kJ/mol) per force class name."""
    result = {}
    for force in system.getForces():
        name = type(force).__name__
        if name in ("CMMotionRemover", "MonteCarloBarostat"):
            continue
        group = force.getForceGroup()
        energy = context.getState(getEnergy=True, groups={group}).getPotentialEnergy()
        result[name] = energy.value_in_unit(unit.kilojoule_per_mole)
    return result


def density_g_cm3(system: openmm.System, box_volume_nm3: float) -> float:
    """Mass density of ``system`` in a box of the given volume."""
    mass = sum(system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles()))
    return mass / AVOGADRO / (box_volume_nm3 * 1e-21)


def _volume_nm3(state_or_vectors) -> float:
    vectors = state_or_vectors.getPeriodicBoxVectors() if hasattr(state_or_vectors, "getPeriodicBoxVectors") \
        else state_or_vectors
    a, b, c = (np.asarray(v.value_in_unit(unit.nanometer)) for v in vectors)
    return float(abs(np.dot(a, np.cross(b, c))))


def _scale_box(context: openmm.Context, system: openmm.System, factor: float) -> None:
    """Scale box edges by ``factor`` and move every molecule's centre of mass with it."""
    state = context.getState(getPositions=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                       for i in range(system.getNumParticles())])
    for molecule in context.getMolecules():
        idx = np.asarray(molecule)
        m = masses[idx]
        centre = (positions[idx] * m[:, None]).sum(axis=0) / m.sum()
        positions[idx] += (factor - 1.0) * centre
    a, b, c = state.getPeriodicBoxVectors()
    context.setPeriodicBoxVectors(a * factor, b * factor, c * factor)
    context.setPositions(positions * unit.nanometer)


# ----------------------------------------------------------------------------- build
def build(spec: SystemSpec, params: ElectrolyteParameters = PARAMETERS) -> BuiltSystem:
    """Build the packed, parametrised (not yet minimised) electrolyte box of ``spec``."""
    if spec.kind != "electrolyte":
        raise ValueError(f"electrolyte.build got a spec of kind {spec.kind!r}")
    comp = spec.composition
    try:
        n_eo, n_chains, n_salt = int(comp["n_eo"]), int(comp["n_chains"]), int(comp["n_salt"])
    except KeyError as exc:
        raise ValueError(f"electrolyte spec {spec.name!r} lacks composition[{exc.args[0]!r}]") from None
    _check_composition(n_eo, n_chains, n_salt)
    temperature_K = float(comp.get("temperature_K", params.temperature_K))
    ion_charge_scale = float(comp.get("ion_charge_scale", params.ion_charge_scale))
    combining_rule = str(comp.get("lj_combining_rule", params.lj_combining_rule))
    target_density = float(comp.get("target_density_g_cm3")
                           or estimate_density_g_cm3(n_eo, n_chains, n_salt, temperature_K, params))
    rng = np.random.default_rng(spec.seed)

    # --- molecules and packing
    n_conformers = max(1, min(n_chains, params.conformers_per_chain_length))
    chain = peo_chain_template(n_eo, n_conformers, seed=int(rng.integers(1, 2**31 - 1)))
    tfsi = tfsi_template(seed=int(rng.integers(1, 2**31 - 1)))
    lithium = lithium_template()
    per_conformer = np.full(len(chain.conformers), n_chains // len(chain.conformers))
    per_conformer[: n_chains % len(chain.conformers)] += 1
    items = [(chain, xyz, int(c)) for xyz, c in zip(chain.conformers, per_conformer)]
    items += [(tfsi, tfsi.conformers[0], n_salt), (lithium, lithium.conformers[0], n_salt)]
    mass = n_chains * chain_mass(n_eo) + n_salt * LITFSI_MASS
    pack_edge_nm = box_edge_nm(mass, target_density * params.packing_density_fraction)
    coords = pack_box(items, pack_edge_nm * 10.0, seed=int(rng.integers(1, 2**31 - 1)),
                      tolerance_angstrom=params.packmol_tolerance_angstrom)

    # --- topology (one OpenMM chain per molecule, same order as the packed coordinates)
    topology = app.Topology()
    ion_atom = []
    for template, _, count in items:
        for _ in range(count):
            omm_chain = topology.addChain()
            atoms = [None] * len(template.names)
            for res_name, members in template.residues:
                residue = topology.addResidue(res_name, omm_chain)
                for i in members:
                    atoms[i] = topology.addAtom(template.names[i],
                                                app.Element.getBySymbol(template.elements[i]), residue)
                    ion_atom.append(template is not chain)
            for i, j in template.bonds:
                topology.addBond(atoms[i], atoms[j])
    box = openmm.Vec3(pack_edge_nm, 0, 0), openmm.Vec3(0, pack_edge_nm, 0), openmm.Vec3(0, 0, pack_edge_nm)
    topology.setPeriodicBoxVectors(unit.Quantity(list(box), unit.nanometer))
    positions = (coords / 10.0) * unit.nanometer

    # --- system
    forcefield = load_forcefield()
    cutoff = float(comp.get("cutoff_nm") or min(params.max_cutoff_nm,
                                                 params.cutoff_box_fraction * box_edge_nm(mass, target_density)))
    system = forcefield.createSystem(
        topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
        ewaldErrorTolerance=params.ewald_error_tolerance, constraints=app.HBonds,
        hydrogenMass=params.hydrogen_mass_amu * unit.amu, removeCMMotion=True)
    apply_opls_nonbonded(system, topology,
                         [ion_charge_scale if is_ion else 1.0 for is_ion in ion_atom],
                         combining_rule, params.coulomb14_scale, params.lj14_scale)
    for force in system.getForces():
        force.setForceGroup(FORCE_GROUPS.get(type(force).__name__, 8))

    # --- graph labels: force-field atom types and type-pair bond labels
    templates = forcefield.getMatchingTemplates(topology)
    atom_types: list[str] = []
    for residue, template in zip(topology.residues(), templates):
        type_of = {atom.name: atom.type for atom in template.atoms}
        atom_types.extend(type_of[atom.name] for atom in residue.atoms())
    bond_types = ["-".join(sorted((atom_types[a.index], atom_types[b.index]))) for a, b in topology.bonds()]

    # --- protocol
    temperature = temperature_K * unit.kelvin
    timestep = params.timestep_fs * unit.femtosecond
    friction = params.friction_per_ps / unit.picosecond
    integrator_seed = openmm_seed(spec.seed)

    def make_integrator() -> openmm.Integrator:
        integrator = openmm.LangevinMiddleIntegrator(temperature, friction, timestep)
        integrator.setRandomNumberSeed(integrator_seed)
        return integrator

    equilibrate = _make_equilibrate(
        temperature=temperature,
        pressure_bar=float(comp.get("pressure_bar", params.pressure_bar)),
        target_density=target_density,
        heat_ps=float(comp.get("heat_ps", 0.0)),
        compress_ps=float(comp.get("compress_ps", 0.0)),
        npt_ps=float(comp.get("npt_ps", 0.0)),
        seed=integrator_seed,
        params=params,
    )

    return BuiltSystem(
        spec=spec,
        topology=topology,
        system=system,
        positions=positions,
        temperature=temperature,
        timestep=timestep,
        record_interval=params.record_interval_ps * unit.picosecond,
        atom_types=atom_types,
        bond_types=bond_types,
        make_integrator=make_integrator,
        equilibrate=equilibrate,
        periodic=True,
    )


# ----------------------------------------------------------------------------- equilibration
def _make_equilibrate(temperature: unit.Quantity, pressure_bar: float, target_density: float,
                      heat_ps: float, compress_ps: float, npt_ps: float, seed: int,
                      params: ElectrolyteParameters) -> Equilibration:
    heat_steps = int(round(heat_ps * 1000.0 / params.heating_timestep_fs))
    compress_steps = int(round(compress_ps * 1000.0 / params.compression_timestep_fs))
    npt_steps = int(round(npt_ps * 1000.0 / params.timestep_fs))
    total_steps = heat_steps + compress_steps + npt_steps
    chunk = max(params.barostat_interval_steps, total_steps // 50)

    def run(simulation: app.Simulation, steps: int, stage: str, report, after_chunk=None) -> None:
        remaining = steps
        while remaining > 0:
            n = min(chunk, remaining)
            simulation.step(n)
            remaining -= n
            if after_chunk is not None:
                after_chunk()
            report(n, stage)

    def equilibrate(simulation: app.Simulation, report) -> dict[str, Any]:
        """Heat (NVT), compress to the melt density (NVT), relax at 1 bar (NPT); see module doc."""
        context, system, integrator = simulation.context, simulation.system, simulation.integrator
        can_change_step = hasattr(integrator, "setStepSize")
        production_step = integrator.getStepSize()
        context.setVelocitiesToTemperature(temperature, seed)

        if heat_steps:
            if can_change_step:
                integrator.setStepSize(params.heating_timestep_fs * unit.femtosecond)
            run(simulation, heat_steps, "heat", report)

        if compress_steps:
            if can_change_step:
                integrator.setStepSize(params.compression_timestep_fs * unit.femtosecond)
            start_density = density_g_cm3(system, _volume_nm3(context.getState()))
            increments = max(1, min(params.compression_increments, compress_steps))
            total_factor = (start_density / target_density) ** (1.0 / 3.0)  # edge scale
            per_increment = total_factor ** (1.0 / increments)
            steps_each = compress_steps // increments
            for k in range(increments):
                _scale_box(context, system, per_increment)
                steps = steps_each if k < increments - 1 else compress_steps - steps_each * (increments - 1)
                current = density_g_cm3(system, _volume_nm3(context.getState()))
                run(simulation, steps, f"compress {current:.3f} g/cm3", report)

        if can_change_step:
            integrator.setStepSize(production_step)
        volumes: list[float] = []
        if npt_steps:
            barostat = openmm.MonteCarloBarostat(pressure_bar * unit.bar, temperature,
                                                 params.barostat_interval_steps)
            barostat.setRandomNumberSeed(seed)
            barostat.setForceGroup(FORCE_GROUPS["MonteCarloBarostat"])
            barostat_index = system.addForce(barostat)
            context.reinitialize(preserveState=True)
            try:
                def record_volume() -> None:
                    volumes.append(_volume_nm3(context.getState()))

                run(simulation, npt_steps, f"NPT {pressure_bar:g} bar", report, record_volume)
            finally:
                system.removeForce(barostat_index)
                context.reinitialize(preserveState=True)
            # production (NVT) at the mean volume of the second half of the NPT stage
            mean_volume = float(np.mean(volumes[len(volumes) // 2:]))
            _scale_box(context, system, (mean_volume / _volume_nm3(context.getState())) ** (1.0 / 3.0))

        final_volume = _volume_nm3(context.getState())
        return {
            "density_g_cm3": density_g_cm3(system, final_volume),
            "box_edge_nm": final_volume ** (1.0 / 3.0),
            "target_density_g_cm3": target_density,
            "npt_density_trace_g_cm3": [density_g_cm3(system, v) for v in volumes],
        }

    return Equilibration(total_steps, equilibrate)
