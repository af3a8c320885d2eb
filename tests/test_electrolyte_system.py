"""Tests of the electrolyte reference system (PEO + LiTFSI, OPLS-AA / CL&P) on the tiny preset.

One tiny box (3 chains of 10 EO units + 2 LiTFSI, 269 atoms) is built, minimised and
equilibrated once per module (~15 s on 2 cores); the tests then inspect it.
"""
from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_cgml.systems import electrolyte as el

ION_SCALE = el.PARAMETERS.ion_charge_scale  # 0.8
KNOWN_TYPES = {"opls_180", "opls_181", "opls_182", "opls_185", "CBT", "F1", "SBT", "OBT", "NBT", "Li"}
# published per-type LJ parameters (sigma nm, epsilon kJ/mol): CL&P il.ff and OPLS-AA
LJ = {"Li": (0.2126, 0.07648), "OBT": (0.296, 0.87864), "opls_180": (0.290, 0.58576),
      "opls_185": (0.250, 0.12552), "SBT": (0.355, 1.046)}


def nonbonded(system: openmm.System) -> openmm.NonbondedForce:
    return next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))


def charges(system: openmm.System) -> np.ndarray:
    nb = nonbonded(system)
    return np.array([nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                     for i in range(system.getNumParticles())])


def kinetic_temperature(context: openmm.Context, system: openmm.System) -> float:
    dof = 3 * system.getNumParticles() - system.getNumConstraints() - 3  # CMMotionRemover
    kinetic = context.getState(getEnergy=True).getKineticEnergy()
    return (2 * kinetic / (dof * unit.MOLAR_GAS_CONSTANT_R)).value_in_unit(unit.kelvin)


@pytest.fixture(scope="module")
def tiny_spec():
    specs = el.make_specs("tiny", seed=3)
    return next(s for s in specs if s.split == "train")


@pytest.fixture(scope="module")
def prepared(tiny_spec):
    """Built, minimised and equilibrated tiny system plus what was observed on the way."""
    built = el.build(tiny_spec)
    # Reference platform: with the seeded integrator, velocities and barostat, every run
    # gives the same trajectory. On CPU (even one thread, DeterministicForces) PME and the
    # minimiser differ from run to run in the last digits, the 14 ps that follow amplify
    # that, and the NPT density was a random draw (~30 s here against ~12 s on CPU).
    platform = openmm.Platform.getPlatformByName("Reference")
    simulation = app.Simulation(built.topology, built.system, built.make_integrator(), platform)
    simulation.context.setPositions(built.positions)
    simulation.minimizeEnergy(maxIterations=300)
    energies_after_minimisation = el.energy_components(simulation.context, built.system)
    calls: list[tuple[float, str]] = []
    summary = built.equilibrate(simulation, lambda fraction, message: calls.append((fraction, message)))
    return {"built": built, "simulation": simulation, "progress": calls, "summary": summary,
            "energies_after_minimisation": energies_after_minimisation}


# ----------------------------------------------------------------------------- specs
def test_specs_vary_composition_and_hold_out_test_compositions():
    for preset in ("tiny", "demo", "full"):
        specs = el.make_specs(preset, seed=0)
        train = {(s.composition["n_eo"], s.composition["n_salt"], s.composition["n_chains"])
                 for s in specs if s.split == "train"}
        test = {(s.composition["n_eo"], s.composition["n_salt"], s.composition["n_chains"])
                for s in specs if s.split == "test"}
        assert train and test and not (train & test), preset
        assert len({s.name for s in specs}) == len(specs)
        for s in specs:
            assert s.kind == "electrolyte" and s.n_frames and s.n_frames > 0
            assert s.composition["cutoff_nm"] < 0.5 * s.composition["target_box_nm"]
    demo_atoms = [s.composition["n_atoms"] for s in el.make_specs("demo", seed=0)]
    assert all(1000 <= n <= 2500 for n in demo_atoms), demo_atoms


def test_bad_input_is_rejected(tiny_spec):
    with pytest.raises(ValueError, match="preset"):
        el.make_specs("huge", seed=0)
    with pytest.raises(ValueError, match="override"):
        el.make_specs("tiny", seed=0, n_chainz=3)
    with pytest.raises(ValueError, match="ion_charge_scale"):
        el.make_specs("tiny", seed=0, ion_charge_scale=1.5)
    with pytest.raises(ValueError, match="lj_combining_rule"):
        el.make_specs("tiny", seed=0, lj_combining_rule="arithmetic")
    bad = el.SystemSpec(kind="electrolyte", name="x", split="train", seed=1,
                        composition={**tiny_spec.composition, "n_eo": 0})
    with pytest.raises(ValueError, match="n_eo"):
        el.build(bad)
    with pytest.raises(ValueError, match="kind"):
        el.build(el.SystemSpec(kind="chain", name="x", split="train", seed=1))


# ----------------------------------------------------------------------------- force field
def test_forcefield_assigns_every_atom_and_charges_are_right(prepared, tiny_spec):
    built = prepared["built"]
    comp = tiny_spec.composition
    n_atoms = built.topology.getNumAtoms()
    assert n_atoms == comp["n_atoms"] == built.system.getNumParticles()
    assert el.load_forcefield().getUnmatchedResidues(built.topology) == []
    assert len(built.atom_types) == n_atoms and set(built.atom_types) == KNOWN_TYPES
    assert len(built.bond_types) == built.topology.getNumBonds()
    assert built.periodic

    q = charges(built.system)
    assert abs(q.sum()) < 1e-9
    molecule_charges = {"chain": [], "TFS": [], "LI": []}
    for chain in built.topology.chains():
        residues = [r.name for r in chain.residues()]
        kind = residues[0] if residues[0] in ("TFS", "LI") else "chain"
        if kind == "chain":
            assert residues == ["PEH"] + ["PEO"] * comp["n_eo"] + ["PET"]
        molecule_charges[kind].append(sum(q[a.index] for a in chain.atoms()))
    assert len(molecule_charges["chain"]) == comp["n_chains"]
    assert len(molecule_charges["TFS"]) == len(molecule_charges["LI"]) == comp["n_salt"]
    np.testing.assert_allclose(molecule_charges["chain"], 0.0, atol=1e-9)
    np.testing.assert_allclose(molecule_charges["LI"], +ION_SCALE, atol=1e-9)
    np.testing.assert_allclose(molecule_charges["TFS"], -ION_SCALE, atol=1e-9)


def test_tfsi_sulfurs_share_type_and_charge(prepared):
    built = prepared["built"]
    q = charges(built.system)
    tfsi = [r for r in built.topology.residues() if r.name == "TFS"]
    assert tfsi
    for residue in tfsi:
        sulfurs = [a.index for a in residue.atoms() if a.element.symbol == "S"]
        assert len(sulfurs) == 2
        assert built.atom_types[sulfurs[0]] == built.atom_types[sulfurs[1]] == "SBT"
        assert q[sulfurs[0]] == q[sulfurs[1]]
        assert q[sulfurs[0]] == pytest.approx(1.02 * ION_SCALE)  # il-0.8.ff: 0.816


def _pair_energy(custom_force: openmm.CustomNonbondedForce, n_particles: int, i: int, j: int,
                 distance_nm: float, box_nm: float) -> float:
    """Energy of the pair (i, j) alone under a copy of ``custom_force`` (Reference platform)."""
    force = openmm.XmlSerializer.clone(custom_force)
    force.setUseLongRangeCorrection(False)
    force.addInteractionGroup([i], [j])
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(1.0)
    system.setDefaultPeriodicBoxVectors(openmm.Vec3(box_nm, 0, 0), openmm.Vec3(0, box_nm, 0),
                                        openmm.Vec3(0, 0, box_nm))
    system.addForce(force)
    positions = np.zeros((n_particles, 3))
    positions[j] = [distance_nm, 0.0, 0.0]
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions * unit.nanometer)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_geometric_combining_rule_is_exact(prepared):
    built = prepared["built"]
    system, types = built.system, built.atom_types
    custom = [f for f in system.getForces() if isinstance(f, openmm.CustomNonbondedForce)]
    assert len(custom) == 1
    # NonbondedForce carries no LJ between non-bonded pairs any more
    nb = nonbonded(system)
    assert all(nb.getParticleParameters(i)[2].value_in_unit(unit.kilojoule_per_mole) == 0.0
               for i in range(system.getNumParticles()))

    lithium, oxygen = types.index("Li"), types.index("OBT")
    (s1, e1), (s2, e2) = LJ["Li"], LJ["OBT"]
    r = 0.25  # repulsive side, where the two combining rules differ most
    box = 3.0 * custom[0].getCutoffDistance().value_in_unit(unit.nanometer)
    energy = _pair_energy(custom[0], system.getNumParticles(), lithium, oxygen, r, box)
    sigma, epsilon = math.sqrt(s1 * s2), math.sqrt(e1 * e2)
    expected = 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)
    lorentz = 4 * epsilon * ((0.5 * (s1 + s2) / r) ** 12 - (0.5 * (s1 + s2) / r) ** 6)
    assert energy == pytest.approx(expected, rel=1e-9)
    assert abs(lorentz - expected) > 0.5 * abs(expected)  # the check can tell the rules apart

    # 1-4 pairs (H-C-C-O in a chain): exception with 0.5 q q, geometric sigma, 0.5 eps
    q = charges(system)
    found = False
    for k in range(nb.getNumExceptions()):
        i, j, qq, sig, eps = nb.getExceptionParameters(k)
        if {types[i], types[j]} == {"opls_185", "opls_180"} and eps.value_in_unit(unit.kilojoule_per_mole) > 0:
            (sa, ea), (sb, eb) = LJ["opls_185"], LJ["opls_180"]
            assert sig.value_in_unit(unit.nanometer) == pytest.approx(math.sqrt(sa * sb), rel=1e-12)
            assert eps.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(0.5 * math.sqrt(ea * eb), rel=1e-12)
            assert qq.value_in_unit(unit.elementary_charge**2) == pytest.approx(0.5 * q[i] * q[j], rel=1e-12)
            found = True
            break
    assert found


# ----------------------------------------------------------------------------- dynamics
def test_energy_components_finite_after_minimisation(prepared):
    energies = prepared["energies_after_minimisation"]
    expected = {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
                "RBTorsionForce", "NonbondedForce", "CustomNonbondedForce"}
    assert set(energies) == expected
    assert all(math.isfinite(v) for v in energies.values()), energies
    # a relaxed melt: cohesive LJ, no clashes left
    assert energies["CustomNonbondedForce"] < 0
    assert energies["HarmonicBondForce"] < 10.0 * prepared["built"].system.getNumParticles()


def test_equilibration_reports_progress_and_reaches_melt_density(prepared, tiny_spec):
    built, simulation, calls = prepared["built"], prepared["simulation"], prepared["progress"]
    fractions = [f for f, _ in calls]
    assert len(calls) >= 10
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == pytest.approx(1.0)
    stages = {m.split()[0] for _, m in calls}
    assert stages == {"heat", "compress", "NPT"}
    # the barostat is gone again: production is NVT
    assert not any(isinstance(f, openmm.MonteCarloBarostat) for f in built.system.getForces())

    volume = simulation.context.getState().getPeriodicBoxVolume().value_in_unit(unit.nanometer**3)
    density = el.density_g_cm3(built.system, volume)
    target = tiny_spec.composition["target_density_g_cm3"]
    packed = target * el.PARAMETERS.packing_density_fraction
    # Tolerance 15 %: the target is a partial-molar-volume estimate good to ~5 %; this
    # 269-atom box after 8 ps of NPT at 423 K measured 1.065 +- 0.038 g/cm3 over 11 seeds
    # (1.00 to 1.14), about 5 % below the estimate. 10 % failed ~1 run in 12 (seen in CI);
    # 15 % leaves ~2.8 sd. The box started at 60 % of the target, so a failed
    # compression cannot pass (next assertion).
    assert abs(density - target) < 0.15 * target, (density, target)
    assert density > packed + 0.5 * (target - packed)
    assert prepared["summary"]["density_g_cm3"] == pytest.approx(density, rel=1e-6)
    edge = volume ** (1 / 3)
    assert nonbonded(built.system).getCutoffDistance().value_in_unit(unit.nanometer) < 0.5 * edge


def test_short_nvt_keeps_composition_and_temperature(prepared, tiny_spec):
    built, simulation = prepared["built"], prepared["simulation"]
    context, system = simulation.context, built.system
    comp = tiny_spec.composition
    box_before = context.getState().getPeriodicBoxVolume()
    molecules_before = sorted(len(m) for m in context.getMolecules())

    temperatures = []
    for _ in range(24):          # 24 x 25 steps x 4 fs = 2.4 ps
        simulation.step(25)
        temperatures.append(kinetic_temperature(context, system))
    state = context.getState(getPositions=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)

    assert np.isfinite(positions).all()
    assert positions.shape == (comp["n_atoms"], 3) and system.getNumParticles() == comp["n_atoms"]
    molecules = sorted(len(m) for m in context.getMolecules())
    assert molecules == molecules_before
    assert molecules.count(el.chain_atom_count(comp["n_eo"])) == comp["n_chains"]
    assert molecules.count(1) == comp["n_salt"] and molecules.count(15) == comp["n_salt"]
    assert state.getPeriodicBoxVolume() == box_before  # NVT: the box does not change
    # ~500 degrees of freedom: one sample fluctuates by sqrt(2/500) ~ 6 % (25 K); the mean
    # of 24 (correlated) samples is within ~3 %; 8 % (34 K) tolerance.
    target = comp["temperature_K"]
    assert abs(np.mean(temperatures) - target) < 0.08 * target, temperatures
