"""LearnedSimulator: the five-line OpenMM flow, and parity of the C++ integrator with a
Python rollout written from docs/method.md on the same exported models."""
from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

import openmm_cgml
from openmm_cgml.trajectories import list_trajectories, load_trajectory

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(exported_tiny_model):
    return exported_tiny_model  # trained and exported once per session (conftest.py)


@pytest.fixture(scope="module")
def test_record(chain_data_dir):
    return load_trajectory(list_trajectories(chain_data_dir, split="test")[0])


def positions_nm(simulation):
    state = simulation.context.getState(getPositions=True)
    return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def test_five_line_flow(exported, test_record):
    record = test_record
    sim = openmm_cgml.LearnedSimulator.load(exported)
    # a user topology: OpenMM Topology with bonds + positions as a Quantity (types from atom names)
    cg = sim.coarseGrain(record.topology, record.positions[-1] * unit.nanometer, masses=record.masses)
    integrator = sim.createIntegrator(cg)
    simulation = app.Simulation(cg.topology, cg.system, integrator)
    simulation.context.setPositions(cg.positions)
    integrator.setHistory(cg.map_trajectory(record.positions))

    assert cg.n_beads == 4 and cg.features.shape == (4, sim.manifest["num_features"])
    assert cg.periodic is False and cg.box is None
    assert isinstance(integrator, openmm.Integrator) and integrator.hasScoreModel()
    np.testing.assert_allclose(integrator.getBeadFeatures(), cg.features)
    np.testing.assert_array_equal(integrator.getBonds(), cg.bonds)
    assert integrator.getStepSize().value_in_unit(unit.picosecond) == pytest.approx(5.0)
    start = positions_nm(simulation)
    simulation.step(20)
    x = positions_nm(simulation)
    assert np.isfinite(x).all() and not np.allclose(x, start)
    assert simulation.currentStep == 20
    # the same system from the TrajectoryRecord itself (metadata types, masses, bond types)
    cg_record = sim.coarseGrain(record)
    np.testing.assert_allclose(cg_record.features, cg.features, rtol=1e-6)
    np.testing.assert_array_equal(cg_record.mapping.bead_of_atom, cg.mapping.bead_of_atom)


def test_map_trajectory_applies_dilation(exported, test_record):
    sim = openmm_cgml.LearnedSimulator.load(exported)
    cg = sim.coarseGrain(test_record)
    frames = test_record.positions
    full = cg.map_trajectory(frames).value_in_unit(unit.nanometer)
    assert full.shape == (len(frames), 4, 3)
    every3 = cg.map_trajectory(frames, dilation=3).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(every3, full[::-1][::3][::-1], atol=1e-6)
    np.testing.assert_allclose(every3[-1], cg.mapping.map_positions(frames[-1]), atol=1e-6)


def test_unknown_types_are_named(exported, test_record):
    sim = openmm_cgml.LearnedSimulator.load(exported)
    types = list(test_record.atom_types)
    types[0] = "Xx"
    with pytest.raises(ValueError, match=r"atom types \['Xx'\] were not seen in training"):
        sim.coarseGrain(test_record, atom_types=types)
    with pytest.raises(ValueError, match="has no trustworthy element mass"):
        sim.coarseGrain(test_record.topology, test_record.positions[-1])


def python_rollout(dynamics, score, history, features, bonds, steps):
    """docs/method.md steps 4-5, deterministic: float64 state, float32 models;
    x_{t+1} = x_t + (x_t - x_{t-1}) + mean, then for each sigma, K times x += eps * score(x)."""
    box = torch.zeros(3, 3)
    features = torch.as_tensor(features, dtype=torch.float32)
    bonds = torch.as_tensor(bonds, dtype=torch.int64).reshape(-1, 2)
    history = torch.as_tensor(history, dtype=torch.float64)
    eps, K = score.langevin_step_size, score.langevin_steps
    out = []
    with torch.no_grad():
        for _ in range(steps):
            mean, _, latent = dynamics(history.float(), box, features, bonds)
            x = history[-1] + (history[-1] - history[-2]) + mean.double()
            for sigma in score.sigmas:
                for _ in range(K):
                    x = x + eps * score(x.float(), latent, box, features, bonds, sigma).double()
            history = torch.cat([history[1:], x.unsqueeze(0)])
            out.append(x.numpy().copy())
    return np.array(out)


def test_integrator_matches_python_rollout(exported, test_record):
    sim = openmm_cgml.LearnedSimulator.load(exported)
    cg = sim.coarseGrain(test_record)
    history = cg.map_trajectory(test_record.positions[-sim.seqLen:]).value_in_unit(unit.nanometer)
    # the distance limits resolve pairs in the neighbour list's order: they have their own
    # tests (test_excluded_volume.py); this compares the model calls and the step formula
    integrator = sim.createIntegrator(cg, deterministic=True, exclusionDistance=0, bondLengthLimit=0)
    assert integrator.getLangevinSteps() == 2 and len(integrator.getSigmas()) == 6
    simulation = app.Simulation(cg.topology, cg.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(cg.positions)
    integrator.setHistory(history)
    dynamics = torch.jit.load(str(sim.dynamicsPath))
    score = torch.jit.load(str(sim.scorePath))
    expected = python_rollout(dynamics, score, history, cg.features, cg.bonds, 50)
    got = []
    for _ in range(50):
        simulation.step(1)
        got.append(positions_nm(simulation))
    got = np.array(got)
    assert np.isfinite(expected).all()
    # the refinement is active: without it the first step differs
    first_without_score = history[-1] + (history[-1] - history[-2]) + dynamics(
        torch.tensor(history, dtype=torch.float32), torch.zeros(3, 3), torch.from_numpy(cg.features),
        torch.from_numpy(cg.bonds))[0].detach().double().numpy()
    assert np.abs(first_without_score - expected[0]).max() > 1e-4
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_fine_rg2_round_trip_matches_the_eager_head(exported, test_record):
    """LearnedSimulator.fineRg2 (TorchScript property.pt) == the trained eager head."""
    from openmm_cgml.analysis import radius_of_gyration_squared
    from openmm_cgml.packaging import run_checkpoint
    from openmm_cgml.models.property import property_molecules
    from openmm_cgml.training import build_models_from_checkpoint, load_checkpoint

    sim = openmm_cgml.LearnedSimulator.load(exported)
    assert sim.hasPropertyHead and sim.propertyPath.name == "property.pt"
    cg = sim.coarseGrain(test_record)
    frames = cg.mapping.map_positions(test_record.positions)
    predicted = sim.fineRg2(cg, frames)
    assert predicted.shape == (len(frames), 1)  # one chain
    np.testing.assert_allclose(sim.fineRg2(cg, frames[3] * unit.nanometer), predicted[3], rtol=1e-6)

    net = build_models_from_checkpoint(load_checkpoint(run_checkpoint(exported.parent))).eval()
    molecule = property_molecules(cg.mapping.molecule_of_bead)
    beads = np.flatnonzero(molecule >= 0)
    with torch.no_grad():
        eager = net.property(torch.from_numpy(frames[:, beads]).double(), torch.from_numpy(cg.features[beads]),
                             torch.from_numpy(molecule[beads])).numpy()
    np.testing.assert_allclose(predicted, eager, rtol=1e-5)
    # not vacuous: the trained head adds a residual to the CG Rg^2
    cg_rg2 = radius_of_gyration_squared(frames, cg.mapping.bead_masses)
    assert np.min(np.abs(predicted[:, 0] - cg_rg2)) > 1e-3


def test_user_pdb_and_dcd_of_an_unseen_chain(exported, tmp_path):
    """The path a user takes with a chain of their own: a PDB with bonds (CONECT) and a
    short DCD, of another length (12 monomers; training had 8) and another sequence
    class (blocky), read back with OpenMM and mdtraj, coarse-grained and simulated."""
    import mdtraj

    from openmm_cgml.systems import chain

    spec = chain.make_specs("tiny", 11, n_train=0, n_test=1, n_monomers=12)[0]
    assert spec.composition["sequence_class"] == "II"
    built = chain.build(spec)
    simulation = app.Simulation(built.topology, built.system, built.make_integrator(),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(built.positions)
    simulation.minimizeEnergy(maxIterations=200)
    pdb, dcd = tmp_path / "mine.pdb", tmp_path / "mine.dcd"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(built.topology, simulation.context.getState(getPositions=True).getPositions(), handle)
    simulation.reporters.append(app.DCDReporter(str(dcd), 500))
    simulation.step(500 * 6)  # 6 frames, 5 tau apart (= the model's step)

    user_pdb = app.PDBFile(str(pdb))
    assert user_pdb.topology.getNumBonds() == built.topology.getNumBonds()
    trajectory = mdtraj.load(str(dcd), top=str(pdb))
    masses = [built.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(built.system.getNumParticles())]
    sim = openmm_cgml.LearnedSimulator.load(exported)
    cg = sim.coarseGrain(user_pdb.topology, trajectory.xyz[-1], masses=masses)
    assert cg.n_beads == 6  # 24 atoms at 4 atoms per bead
    integrator = sim.createIntegrator(cg, seed=4)
    cg_simulation = app.Simulation(cg.topology, cg.system, integrator)
    integrator.setHistory(cg.map_trajectory(trajectory))
    cg_simulation.step(30)
    x = positions_nm(cg_simulation)
    assert np.isfinite(x).all() and cg_simulation.currentStep == 30
    history = integrator.getHistory().value_in_unit(unit.nanometer)
    assert history.shape == (sim.seqLen, 6, 3) and np.allclose(history[-1], x)


def test_rollout_applies_langevin_overrides(exported, test_record):
    """Zero Langevin steps make a refined rollout draw exactly the unrefined one's noise
    (the overrides reach the integrator); an unknown setting is refused by name."""
    learned = openmm_cgml.LearnedSimulator.load(exported)
    assert learned.scorePath is not None
    cg = learned.coarseGrain(test_record)
    history = cg.map_trajectory(test_record)[: learned.seqLen]
    plain = learned.rollout(cg, history, 4, score=False, seed=5)
    no_steps = learned.rollout(cg, history, 4, seed=5, langevin={"langevinSteps": 0})
    refined = learned.rollout(cg, history, 4, seed=5)
    np.testing.assert_array_equal(no_steps.positions, plain.positions)
    assert not np.allclose(refined.positions[1:], plain.positions[1:])
    with pytest.raises(ValueError, match="unknown Langevin settings.*langevinSigma"):
        learned.rollout(cg, history, 1, langevin={"langevinSigma": 1.0})
