"""The integrator's excluded-volume correction (CGMLIntegrator.setExclusionDistance):
non-bonded beads closer than the exclusion distance are pushed apart after each step."""
from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_cgml import CGMLIntegrator
from toy_models import ExcludingDynamics, HarmonicDynamics, LimitedDynamics, save


def still_model(tmp_path, **kwargs):
    """mean 0, std 0, seq_len 2: with zero velocity the learned step alone moves nothing,
    so every displacement comes from the correction."""
    return save(HarmonicDynamics(k=0.0, std=0.0, seq_len=2, **kwargs), tmp_path / "still.pt")


def run_one_step(integrator, positions, masses=None, box_nm=None, bonds=None, platform="Reference"):
    n = len(positions)
    system, topology = openmm.System(), app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for i in range(n):
        system.addParticle(1.0 if masses is None else masses[i])
        topology.addAtom("B", None, residue)
    if box_nm is not None:
        vectors = [openmm.Vec3(box_nm, 0, 0), openmm.Vec3(0, box_nm, 0), openmm.Vec3(0, 0, box_nm)]
        system.setDefaultPeriodicBoxVectors(*vectors)
        integrator.setUsesPeriodicBoundaryConditions(True)
    if bonds is not None:
        integrator.setBonds(bonds)
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(platform))
    sim.context.setPositions(np.asarray(positions, dtype=float))
    sim.context.setVelocitiesToTemperature(0)
    sim.step(1)
    state = sim.context.getState(getPositions=True, getVelocities=True)
    return (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))


def pair_distances(x, box_nm=None):
    d = x[:, None, :] - x[None, :, :]
    if box_nm is not None:
        d -= box_nm * np.round(d / box_nm)
    return np.linalg.norm(d, axis=-1)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_one_pair_is_pushed_to_the_distance_mass_weighted(tmp_path, platform):
    integrator = CGMLIntegrator(still_model(tmp_path))
    integrator.setExclusionDistance(1.0 * unit.nanometer)
    x0 = np.array([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [5.0, 0.0, 0.0]])
    masses = [3.0, 1.0, 1.0]
    x, v = run_one_step(integrator, x0, masses, platform=platform)
    # overlap 0.6 nm shared inversely to mass: the heavy bead moves 0.15, the light one 0.45
    np.testing.assert_allclose(x[0], [-0.15, 0, 0], atol=1e-12)
    np.testing.assert_allclose(x[1], [0.85, 0, 0], atol=1e-12)
    np.testing.assert_allclose(x[2], x0[2], atol=0)
    np.testing.assert_allclose(np.dot(masses, x), np.dot(masses, x0), atol=1e-12)  # centre of mass fixed
    # the velocities are the displacement over the step, so the history carries the correction
    np.testing.assert_allclose(v, (x - x0) / integrator.getStepSize().value_in_unit(unit.picosecond), atol=1e-12)
    assert integrator.getExclusionCorrections() == 1


def test_off_by_default_and_bonded_pairs_are_exempt(tmp_path):
    x0 = np.array([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.0, 0.5, 0.0]])
    off = CGMLIntegrator(still_model(tmp_path))
    assert off.getExclusionDistance() == 0 * unit.nanometer
    x, _ = run_one_step(off, x0)
    np.testing.assert_array_equal(x, x0)
    assert off.getExclusionCorrections() == 0
    on = CGMLIntegrator(still_model(tmp_path))
    on.setExclusionDistance(0.3)
    x, _ = run_one_step(on, x0, bonds=[[0, 1], [0, 2]])  # every close pair is bonded
    np.testing.assert_array_equal(x, x0)
    on = CGMLIntegrator(still_model(tmp_path))
    on.setExclusionDistance(0.3)
    x, _ = run_one_step(on, x0, bonds=[[0, 2]])  # only 0-1 (0.4 nm) is close and not bonded: > 0.3, untouched
    np.testing.assert_array_equal(x, x0)


def test_periodic_pair_is_separated_through_the_nearest_image(tmp_path):
    integrator = CGMLIntegrator(still_model(tmp_path))
    integrator.setExclusionDistance(0.5)
    box = 4.0
    x0 = np.array([[0.1, 1.0, 1.0], [3.9, 1.0, 1.0]])  # 0.2 nm apart across the boundary
    x, _ = run_one_step(integrator, x0, box_nm=box)
    np.testing.assert_allclose(x[0], [0.25, 1, 1], atol=1e-12)
    np.testing.assert_allclose(x[1], [3.75, 1, 1], atol=1e-12)
    assert pair_distances(x, box)[0, 1] == pytest.approx(0.5)


def test_dense_random_beads_end_no_closer_than_the_distance(tmp_path):
    rng = np.random.default_rng(3)
    n, box = 60, 6.0
    x0 = rng.uniform(0, box, (n, 3))
    integrator = CGMLIntegrator(still_model(tmp_path))
    integrator.setExclusionDistance(0.8)
    before = pair_distances(x0, box)[np.triu_indices(n, 1)]
    assert (before < 0.8).sum() > 10
    x, _ = run_one_step(integrator, x0, masses=rng.uniform(1, 5, n), box_nm=box)
    after = pair_distances(x, box)[np.triu_indices(n, 1)]
    assert after.min() >= 0.8 * (1 - 1e-6)
    assert integrator.getExclusionCorrections() >= (before < 0.8).sum()


def test_default_from_the_model_attribute_and_configuration_round_trips(tmp_path):
    model = save(ExcludingDynamics(0.7, k=0.0, seq_len=2), tmp_path / "excl.pt")
    integrator = CGMLIntegrator(model)
    assert integrator.getExclusionDistance().value_in_unit(unit.nanometer) == pytest.approx(0.7)
    x, _ = run_one_step(integrator, np.array([[0.0, 0, 0], [0.5, 0, 0]]))
    assert np.linalg.norm(x[1] - x[0]) == pytest.approx(0.7)
    integrator.setExclusionDistance(0.25 * unit.angstrom * 10)
    xml = openmm.XmlSerializer.serialize(integrator)
    assert re.search(r'exclusionDistance="0?\.25', xml)
    for clone in (CGMLIntegrator.deserialize(xml), copy.deepcopy(integrator), pickle.loads(pickle.dumps(integrator))):
        assert clone.getExclusionDistance().value_in_unit(unit.nanometer) == pytest.approx(0.25)
    # XML written before version 3 has no exclusionDistance: the model's default applies
    old = re.sub(r' exclusionDistance="[^"]*"', "", xml, count=1)
    old = re.sub(r'(<Integrator [^>]*)version="4"', r'\1version="2"', old, count=1)
    assert CGMLIntegrator.deserialize(old).getExclusionDistance().value_in_unit(unit.nanometer) == pytest.approx(0.7)


def test_bad_distances_are_refused(tmp_path):
    integrator = CGMLIntegrator(still_model(tmp_path))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="exclusion distance must be >= 0"):
            integrator.setExclusionDistance(bad)
    with pytest.raises(TypeError, match="compatible with nanometer"):
        integrator.setExclusionDistance(1.0 * unit.picosecond)
    with pytest.raises(ValueError, match="'exclusion_distance' must be >= 0"):
        CGMLIntegrator(save(ExcludingDynamics(-1.0, seq_len=2), tmp_path / "neg.pt"))
    integrator.setExclusionDistance(2.5)
    with pytest.raises(openmm.OpenMMException, match="more than half the periodic box"):
        run_one_step(integrator, np.array([[0.0, 0, 0], [1.0, 0, 0]]), box_nm=4.0)


def test_training_learns_the_distance_from_data_and_the_export_carries_it(exported_tiny_model, chain_data_dir):
    from openmm_cgml import analysis
    from openmm_cgml.trajectories import list_trajectories, load_trajectory
    from openmm_cgml.simulator import LearnedSimulator
    from openmm_cgml.training import build_datasets, exclusion_distance, load_config

    learned = LearnedSimulator.load(exported_tiny_model)
    distance = learned.manifest["exclusion_distance_nm"]
    train_set, _ = build_datasets(load_config("chain-tiny", {"data_dir": str(chain_data_dir)}))
    assert distance > 0
    assert distance == pytest.approx(exclusion_distance(train_set, 1e-3))
    assert exclusion_distance(train_set, None) == 0.0
    # it is the training data's closest approach: (almost) no training frame comes closer
    pooled = np.concatenate([analysis.nearest_nonbonded_distances(t.positions, None, g.cg_bonds).ravel()
                             for t, g in zip(train_set.trajectories, train_set.systems)])
    assert np.mean(pooled < distance) < 0.01
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = learned.coarseGrain(record)
    assert learned.createIntegrator(cg).getExclusionDistance().value_in_unit(unit.nanometer) == pytest.approx(distance)
    assert learned.createIntegrator(cg, exclusionDistance=0).getExclusionDistance() == 0 * unit.nanometer


def test_bond_length_limit_pulls_stretched_bonds_in_mass_weighted(tmp_path):
    integrator = CGMLIntegrator(still_model(tmp_path))
    assert integrator.getBondLengthLimit() == 0 * unit.nanometer
    integrator.setBondLengthLimit(1.0 * unit.nanometer)
    x0 = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    masses = [3.0, 1.0, 1.0]
    x, _ = run_one_step(integrator, x0, masses, bonds=[[0, 1]])  # bead 2 is not bonded: left alone
    np.testing.assert_allclose(x[0], [0.25, 0, 0], atol=1e-12)  # the heavy bead moves a quarter of 1.0
    np.testing.assert_allclose(x[1], [1.25, 0, 0], atol=1e-12)
    np.testing.assert_array_equal(x[2], x0[2])
    assert integrator.getBondLimitCorrections() == 1 and integrator.getExclusionCorrections() == 0
    with pytest.raises(ValueError, match="bond-length limit must be >= 0"):
        integrator.setBondLengthLimit(-1.0)


def test_bond_length_limit_default_from_the_model_and_xml(tmp_path):
    integrator = CGMLIntegrator(save(LimitedDynamics(4.5, k=0.0, seq_len=2), tmp_path / "limited.pt"))
    assert integrator.getBondLengthLimit().value_in_unit(unit.nanometer) == pytest.approx(4.5)
    integrator.setBondLengthLimit(3.0)
    xml = openmm.XmlSerializer.serialize(integrator)
    assert CGMLIntegrator.deserialize(xml).getBondLengthLimit().value_in_unit(unit.nanometer) == pytest.approx(3.0)
    old = re.sub(r' (bondLengthLimit|exclusionDistance)="[^"]*"', "", xml, count=2)
    old = re.sub(r'(<Integrator [^>]*)version="4"', r'\1version="2"', old, count=1)
    assert CGMLIntegrator.deserialize(old).getBondLengthLimit().value_in_unit(unit.nanometer) == pytest.approx(4.5)
