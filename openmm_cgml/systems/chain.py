"""Single-chain sequence-defined polymers in implicit solvent (bead-spring model).

In the spirit of Webb et al., Sci. Adv. 2020 and of the single-chain system of Fu et al.
Each monomer is a backbone bead plus a side-chain bead. Two monomer kinds:

* kind 1, solvophobic: backbone ``B1`` + side chain ``S1``
* kind 2, solvophilic: backbone ``B2`` + side chain ``S2``

Interactions (all parameters live in :class:`ChainParameters`):

* bonds (backbone i--i+1 and backbone i--side chain i): FENE + WCA (Kremer-Grest);
* all non-bonded pairs: WCA repulsion, except S1-S1 pairs, which get the full
  Lennard-Jones potential cut and shifted at 2.5 sigma (the solvophobic attraction);
* bonded pairs are excluded from the non-bonded force (their WCA is in the bond force);
* implicit solvent: Langevin thermostat (LangevinMiddleIntegrator), no periodic box.

Reduced units map exactly onto OpenMM units: sigma = 1 nm, epsilon = 1 kJ/mol,
m = 1 amu, hence tau = sigma sqrt(m/epsilon) = 1 ps, and kT = 1 epsilon is
T = epsilon / R = 120.27 K.

Sequence classes (the learned simulator trains on class I and is tested on class II):

* class I ("train"): i.i.d. random sequences; each chain draws its S1 (kind 1) fraction
  uniformly from [0.3, 0.5]; blocks are short (mean block length < 2).
* class II ("test"): blocky multiblock sequences: alternating blocks of one kind, block
  lengths drawn uniformly from [max(3, L/10), max(4, L/4)] monomers, so the mean block
  length is several times that of class I and the S1 fraction varies around 0.5
  (often outside [0.3, 0.5]).

Presets (production lengths in recorded frames; one frame every 5 tau = 500 steps):

* ``tiny``: 2 train + 1 test chains of 16 monomers, 50 tau equilibration, 60 frames
  (300 tau). Seconds.
* ``demo``: 4 train + 2 test chains of 50 monomers, 500 tau equilibration, 400 frames
  (2,000 tau). A few minutes on 2 cores.
* ``full``: 20 train chains of 100 monomers with 10,000 frames (50,000 tau, the paper's
  training length) and 10 test chains with 20,000 frames (100,000 tau, reference
  statistics for the long learned rollouts), 5,000 tau equilibration each. Measured here
  ~5,400 MD steps/s for 100 monomers (CPU platform, 1 thread, idle machine; ~4,000-6,000
  depending on load): ~5.5 M steps = ~17-23 min per train chain, ~35-45 min per test
  chain, ~13-15 h for all 30 chains on one core (two ``--only`` runs use both cores).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import openmm
from openmm import app, unit

from openmm_cgml.runtime import openmm_seed
from openmm_cgml.systems.base import PRESETS, BuiltSystem, Equilibration, SystemSpec


@dataclass(frozen=True)
class ChainParameters:
    """Every physical and protocol parameter of the chain model, in reduced units.

    Reduced units: sigma = 1 nm, epsilon = 1 kJ/mol, bead mass = 1 amu, tau = 1 ps.
    """

    sigma_nm: float = 1.0                 # bead diameter (LJ sigma)
    epsilon_kj_mol: float = 1.0           # LJ well depth
    bead_mass_amu: float = 1.0            # every bead
    fene_k: float = 30.0                  # FENE spring constant, epsilon / sigma^2
    fene_r0: float = 1.5                  # FENE maximum extension, sigma
    lj_cutoff: float = 2.5                # S1-S1 Lennard-Jones cutoff (shifted), sigma
    kT: float = 1.0                       # thermal energy, epsilon
    friction_per_tau: float = 1.0         # Langevin friction, 1/tau
    timestep_tau: float = 0.01            # MD step (0.02 blows up)
    record_interval_tau: float = 5.0      # one recorded frame every 500 steps
    initial_bond_length: float = 0.97     # sigma, for the initial self-avoiding walk

    @property
    def wca_cutoff(self) -> float:
        """2^(1/6) sigma: where the WCA potential reaches zero."""
        return 2.0 ** (1.0 / 6.0) * self.sigma_nm

    @property
    def temperature(self) -> unit.Quantity:
        """kT expressed as a temperature: kT / R (120.27 K for kT = 1 kJ/mol)."""
        kt = self.kT * self.epsilon_kj_mol * unit.kilojoule_per_mole
        return (kt / unit.MOLAR_GAS_CONSTANT_R).in_units_of(unit.kelvin)

    @property
    def tau(self) -> unit.Quantity:
        """sigma sqrt(m / epsilon): 1 ps with the default unit mapping."""
        tau_ps = self.sigma_nm * math.sqrt(self.bead_mass_amu / self.epsilon_kj_mol)
        return tau_ps * unit.picosecond


PARAMETERS = ChainParameters()

# monomer kind -> (backbone type, side-chain type); kind 1 is the solvophobic one
MONOMER_TYPES = {1: ("B1", "S1"), 2: ("B2", "S2")}
RESIDUE_NAMES = {1: "MPH", 2: "MPL"}  # solvophobic / solvophilic monomer
ATTRACTIVE_TYPE = "S1"

# n_frames: production frames of train chains; n_frames_test: of test chains (None: same)
PRESET_SETTINGS = {
    "tiny": dict(n_train=2, n_test=1, n_monomers=16, n_frames=60, n_frames_test=None,
                 equilibration_tau=50.0),
    # `cgml demo`'s data (the one place its sizes live): 4 training chains of 40 monomers,
    # 1,500 tau each (300 frames), and 2 held-out chains whose reference runs 5x longer
    # (7,500 tau), so that "long reference MD" and "MD as long as the training data"
    # differ. Minutes on 2 cores. configs/chain-demo.yaml trains on it.
    "demo": dict(n_train=4, n_test=2, n_monomers=40, n_frames=300, n_frames_test=1500,
                 equilibration_tau=250.0),
    "full": dict(n_train=20, n_test=10, n_monomers=100, n_frames=10_000, n_frames_test=20_000,
                 equilibration_tau=5_000.0),
}


# ----------------------------------------------------------------------------- sequences
def random_sequence(n_monomers: int, rng: np.random.Generator) -> tuple[list[int], float]:
    """Class I: i.i.d. monomers with an S1 fraction drawn uniformly in [0.3, 0.5]."""
    fraction = float(rng.uniform(0.3, 0.5))
    sequence = np.where(rng.random(n_monomers) < fraction, 1, 2)
    return [int(k) for k in sequence], fraction


def blocky_sequence(n_monomers: int, rng: np.random.Generator) -> list[int]:
    """Class II: alternating blocks, lengths uniform in [max(3, L/10), max(4, L/4)]."""
    low = max(3, n_monomers // 10)
    high = max(low + 1, n_monomers // 4)
    kind = int(rng.integers(1, 3))
    sequence: list[int] = []
    while len(sequence) < n_monomers:
        sequence += [kind] * int(rng.integers(low, high + 1))
        kind = 3 - kind
    return sequence[:n_monomers]


def sequence_to_string(sequence: list[int]) -> str:
    return "".join("A" if k == 1 else "B" for k in sequence)


def sequence_from_string(text: str) -> list[int]:
    """'A' = kind 1 (solvophobic), 'B' = kind 2 (solvophilic)."""
    bad = set(text) - {"A", "B"}
    if bad or not text:
        raise ValueError(f"a chain sequence is a non-empty string of 'A'/'B', got {text!r}")
    return [1 if c == "A" else 2 for c in text]


def make_specs(preset: str, seed: int, **overrides) -> list[SystemSpec]:
    """Train (class I) and test (class II) chain specs for ``preset``.

    Overrides: n_train, n_test, n_monomers, n_frames, n_frames_test, equilibration_tau.
    ``n_monomers`` may be a list of lengths: the chains of each split cycle through it
    (e.g. ``--set n_monomers=[30,50,70,100]``).
    """
    if preset not in PRESET_SETTINGS:
        raise ValueError(f"unknown chain preset {preset!r}; choose one of {PRESETS}")
    settings = dict(PRESET_SETTINGS[preset])
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(
            f"unknown chain override(s) {sorted(unknown)}; allowed: {sorted(settings)}"
        )
    settings.update({k: v for k, v in overrides.items() if v is not None})
    lengths = settings["n_monomers"]
    lengths = [int(n) for n in lengths] if isinstance(lengths, (list, tuple)) else [int(lengths)]
    if not lengths or min(lengths) < 2:
        raise ValueError(f"a chain needs at least 2 monomers, got n_monomers={settings['n_monomers']}")
    rng = np.random.default_rng(seed)
    specs = []
    for split, count in (("train", settings["n_train"]), ("test", settings["n_test"])):
        for i in range(int(count)):
            n_monomers = lengths[i % len(lengths)]
            if split == "train":
                sequence, target_fraction = random_sequence(n_monomers, rng)
                sequence_class = "I"
            else:
                sequence, target_fraction = blocky_sequence(n_monomers, rng), None
                sequence_class = "II"
            composition = {
                "sequence": sequence_to_string(sequence),
                "n_monomers": n_monomers,
                "sequence_class": sequence_class,
                "s1_fraction": sum(k == 1 for k in sequence) / n_monomers,
                "target_s1_fraction": target_fraction,
                "equilibration_tau": float(settings["equilibration_tau"]),
                "model_parameters": parameters_dict(),
            }
            specs.append(
                SystemSpec(
                    kind="chain",
                    name=f"chain_{split}_{i:03d}",
                    split=split,
                    seed=int(rng.integers(1, 2**31 - 1)),
                    composition=composition,
                    n_frames=int(settings["n_frames"] if split == "train" or settings["n_frames_test"] is None
                                 else settings["n_frames_test"]),
                )
            )
    return specs


# ----------------------------------------------------------------------------- model
def _self_avoiding_positions(n_beads_backbone: int, rng: np.random.Generator,
                             params: ChainParameters) -> np.ndarray:
    """Backbone as a self-avoiding random walk, side chains as short branches (nm)."""
    bond = params.initial_bond_length * params.sigma_nm
    min_distance = 0.9 * params.sigma_nm
    placed: list[np.ndarray] = []

    def place_next_to(anchor: np.ndarray) -> np.ndarray:
        for _ in range(1000):
            direction = rng.normal(size=3)
            candidate = anchor + bond * direction / np.linalg.norm(direction)
            if not placed or np.min(np.linalg.norm(np.asarray(placed) - candidate, axis=1)) > min_distance:
                return candidate
        raise RuntimeError("could not grow a self-avoiding chain; try another seed")

    backbone, side = [], []
    position = np.zeros(3)
    for i in range(n_beads_backbone):
        if i > 0:
            position = place_next_to(backbone[-1])
        backbone.append(position)
        placed.append(position)
        side_position = place_next_to(position)
        side.append(side_position)
        placed.append(side_position)
    # bead order: backbone_0, side_0, backbone_1, side_1, ...
    return np.asarray([p for pair in zip(backbone, side) for p in pair])


def build(spec: SystemSpec, params: ChainParameters | None = None) -> BuiltSystem:
    """OpenMM model of one chain spec. Bead order: backbone_i, side_i for i = 0..L-1.

    ``params`` default: the spec's ``composition["model_parameters"]`` if present, else
    :data:`PARAMETERS`."""
    if spec.kind != "chain":
        raise ValueError(f"chain.build got a spec of kind {spec.kind!r}")
    if params is None:
        stored = spec.composition.get("model_parameters") or {}
        names = {f.name for f in fields(ChainParameters)}
        params = ChainParameters(**{k: v for k, v in stored.items() if k in names})
    sequence = sequence_from_string(spec.composition["sequence"])
    n_monomers = len(sequence)

    topology = app.Topology()
    chain = topology.addChain("A")
    system = openmm.System()
    atom_types: list[str] = []
    atoms = []
    for kind in sequence:
        residue = topology.addResidue(RESIDUE_NAMES[kind], chain)
        for bead_type in MONOMER_TYPES[kind]:
            atoms.append(topology.addAtom(bead_type, None, residue))
            atom_types.append(bead_type)
            system.addParticle(params.bead_mass_amu)

    bonds: list[tuple[int, int]] = []
    bond_types: list[str] = []
    for i in range(n_monomers):
        if i > 0:
            bonds.append((2 * (i - 1), 2 * i))
            bond_types.append("backbone")
        bonds.append((2 * i, 2 * i + 1))
        bond_types.append("side")
    for a, b in bonds:
        topology.addBond(atoms[a], atoms[b])

    sigma, epsilon = params.sigma_nm, params.epsilon_kj_mol
    # FENE + WCA on bonds (Kremer-Grest)
    bond_force = openmm.CustomBondForce(
        "-0.5*fene_k*fene_r0^2*log(1-(r/fene_r0)^2)"
        " + step(wca_cut-r)*(4*epsilon*((sigma/r)^12-(sigma/r)^6)+epsilon)"
    )
    for name, value in (
        ("fene_k", params.fene_k * epsilon / sigma**2),
        ("fene_r0", params.fene_r0 * sigma),
        ("wca_cut", params.wca_cutoff),
        ("epsilon", epsilon),
        ("sigma", sigma),
    ):
        bond_force.addGlobalParameter(name, value)
    for a, b in bonds:
        bond_force.addBond(a, b, [])
    system.addForce(bond_force)

    # Non-bonded: one per-particle flag and a combining expression (a per-type-pair table
    # was measured 4.6x slower on CPU): attractive1*attractive2 = 1 only for S1-S1.
    lj_shift = 4 * epsilon * ((sigma / params.lj_cutoff) ** 12 - (sigma / params.lj_cutoff) ** 6)
    nonbonded = openmm.CustomNonbondedForce(
        "select(attractive1*attractive2, lj - lj_shift, step(wca_cut-r)*(lj + epsilon));"
        " lj = 4*epsilon*((sigma/r)^12-(sigma/r)^6)"
    )
    nonbonded.addPerParticleParameter("attractive")
    for name, value in (
        ("lj_shift", lj_shift),
        ("wca_cut", params.wca_cutoff),
        ("epsilon", epsilon),
        ("sigma", sigma),
    ):
        nonbonded.addGlobalParameter(name, value)
    nonbonded.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
    nonbonded.setCutoffDistance(params.lj_cutoff * sigma)
    for bead_type in atom_types:
        nonbonded.addParticle([1.0 if bead_type == ATTRACTIVE_TYPE else 0.0])
    nonbonded.createExclusionsFromBonds(bonds, 1)
    system.addForce(nonbonded)

    rng = np.random.default_rng(spec.seed)
    positions = _self_avoiding_positions(n_monomers, rng, params) * unit.nanometer

    tau = params.tau
    temperature = params.temperature
    timestep = params.timestep_tau * tau
    friction = params.friction_per_tau / tau
    integrator_seed = openmm_seed(spec.seed)

    def make_integrator() -> openmm.Integrator:
        integrator = openmm.LangevinMiddleIntegrator(temperature, friction, timestep)
        integrator.setRandomNumberSeed(integrator_seed)
        return integrator

    equilibration_steps = int(round(float(spec.composition.get("equilibration_tau", 0.0))
                                    / params.timestep_tau))

    def equilibrate(simulation: app.Simulation, report) -> dict:
        """Langevin NVT at kT = 1 from the minimised structure (same as production)."""
        done = 0
        chunk = max(1, equilibration_steps // 20)
        while done < equilibration_steps:
            steps = min(chunk, equilibration_steps - done)
            simulation.step(steps)
            done += steps
            report(steps, "NVT")
        return {}

    return BuiltSystem(
        spec=spec,
        topology=topology,
        system=system,
        positions=positions,
        temperature=temperature,
        timestep=timestep,
        record_interval=params.record_interval_tau * tau,
        atom_types=atom_types,
        bond_types=bond_types,
        make_integrator=make_integrator,
        equilibrate=Equilibration(equilibration_steps, equilibrate),
        periodic=False,
    )


def parameters_dict(params: ChainParameters = PARAMETERS) -> dict:
    """Plain-data view of the parameters (stored in trajectory metadata)."""
    data = asdict(params)
    data["temperature_K"] = params.temperature.value_in_unit(unit.kelvin)
    return data
