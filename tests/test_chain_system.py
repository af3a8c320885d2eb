"""The chain reference system: parameters, potentials, sequence classes, generated data."""
from __future__ import annotations


import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_cgml.systems import chain, get_system_module
from openmm_cgml.systems.base import SystemSpec


def test_reduced_units_map_to_openmm_units():
    params = chain.PARAMETERS
    assert params.temperature.value_in_unit(unit.kelvin) == pytest.approx(120.272, abs=1e-3)
    assert params.tau.value_in_unit(unit.picosecond) == pytest.approx(1.0)
    assert params.wca_cutoff == pytest.approx(2 ** (1 / 6))
    assert get_system_module("chain") is chain


def _energy(built, positions_nm):
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(built.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.asarray(positions_nm) * unit.nanometer)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def lj(r):
    return 4 * (r ** -12 - r ** -6)


def wca(r):
    return np.where(r < 2 ** (1 / 6), lj(r) + 1, 0.0)


def fene(r):
    return -0.5 * 30 * 1.5 ** 2 * np.log(1 - (r / 1.5) ** 2)


@pytest.mark.parametrize("sequence", ["AA", "AB", "BB"])
def test_pair_potentials_match_the_model(sequence):
    """Two monomers: beads 0(B) 1(S) 2(B) 3(S); bonds 0-1, 0-2, 2-3. Put the side chains
    at distance d and compare the energy with FENE+WCA bonds and the S-S pair term."""
    spec = SystemSpec("chain", "t", "train", 1, {"sequence": sequence})
    built = chain.build(spec)
    assert built.topology.getNumBonds() == 3
    for d in (0.95, 1.05, 1.3, 2.0, 2.4, 2.6):
        # backbones 0.97 apart on x; side chains at height 0.9, symmetric, d apart
        positions = np.array([[0, 0, 0], [0.485 - d / 2, 0.9, 0], [0.97, 0, 0], [0.485 + d / 2, 0.9, 0]])
        bonded = 0.0
        for i, j in ((0, 1), (0, 2), (2, 3)):
            r = np.linalg.norm(positions[i] - positions[j])
            assert r < 1.5
            bonded += fene(r) + wca(r)
        nonbonded = 0.0
        for i, j in ((1, 2), (0, 3), (1, 3)):
            r = np.linalg.norm(positions[i] - positions[j])
            if (i, j) == (1, 3) and sequence == "AA":
                nonbonded += np.where(r < 2.5, lj(r) - lj(2.5), 0.0)
            else:
                nonbonded += wca(r)
        expected = bonded + nonbonded
        assert _energy(built, positions) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_sequence_classes_differ_and_specs_are_reproducible():
    specs = chain.make_specs("tiny", seed=5, n_train=30, n_test=30, n_monomers=100)
    assert specs == chain.make_specs("tiny", seed=5, n_train=30, n_test=30, n_monomers=100)
    assert len({s.name for s in specs}) == 60
    assert {s.split for s in specs} == {"train", "test"}

    def mean_block_length(text):
        return len(text) / (1 + sum(a != b for a, b in zip(text, text[1:])))

    train = [s.composition for s in specs if s.split == "train"]
    test = [s.composition for s in specs if s.split == "test"]
    assert all(c["sequence_class"] == "I" and 0.3 <= c["target_s1_fraction"] <= 0.5 for c in train)
    assert all(c["sequence_class"] == "II" for c in test)
    # class I: i.i.d. with short blocks; class II: long blocks, no overlap between classes
    assert max(mean_block_length(c["sequence"]) for c in train) < 3
    assert min(mean_block_length(c["sequence"]) for c in test) > 8
    assert all(len(c["sequence"]) == 100 for c in train + test)


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown chain override"):
        chain.make_specs("tiny", 0, n_beads=3)
    with pytest.raises(ValueError, match="unknown chain preset"):
        chain.make_specs("huge", 0)
    with pytest.raises(ValueError, match="'A'/'B'"):
        chain.build(SystemSpec("chain", "x", "train", 0, {"sequence": "ABC"}))


def test_generated_chains_stay_bonded_and_thermalised(chain_data_dir, chain_settings):
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    directories = list_trajectories(chain_data_dir)
    assert len(directories) == chain_settings["n_train"] + chain_settings["n_test"]
    temperatures = []
    for directory in directories:
        record = load_trajectory(directory)
        assert record.n_frames == chain_settings["n_frames"]
        assert record.n_atoms == 2 * chain_settings["n_monomers"]
        bonds = record.bonds
        lengths = np.linalg.norm(record.positions[:, bonds[:, 0]] - record.positions[:, bonds[:, 1]], axis=-1)
        assert lengths.max() < 1.5 and lengths.min() > 0.7   # FENE range, WCA core
        # non-bonded beads never overlap
        distances = np.linalg.norm(record.positions[:, :, None] - record.positions[:, None], axis=-1)
        bonded = np.zeros((record.n_atoms, record.n_atoms), bool)
        bonded[bonds[:, 0], bonds[:, 1]] = bonded[bonds[:, 1], bonds[:, 0]] = True
        np.fill_diagonal(bonded, True)
        assert distances[:, ~bonded].min() > 0.75
        thermo = np.loadtxt(directory / "thermo.csv", delimiter=",", skiprows=1)
        temperatures.append(thermo[:, 3] / record.metadata["temperature_K"])
    # 3 chains x 30 frames x 16 beads: the mean of kT_kin/kT has a std of ~0.02
    assert np.mean(np.concatenate(temperatures)) == pytest.approx(1.0, abs=0.08)


def test_several_chain_lengths_cycle_through_each_split():
    from openmm_cgml.systems.chain import make_specs

    specs = make_specs("tiny", 5, n_train=5, n_test=2, n_monomers=[10, 20])
    lengths = {s.name: s.composition["n_monomers"] for s in specs}
    assert [lengths[f"chain_train_{i:03d}"] for i in range(5)] == [10, 20, 10, 20, 10]
    assert [lengths[f"chain_test_{i:03d}"] for i in range(2)] == [10, 20]
    assert all(len(s.composition["sequence"]) == s.composition["n_monomers"] for s in specs)
    # one length as before: the same specs as an int
    assert make_specs("tiny", 5, n_monomers=[16]) == make_specs("tiny", 5, n_monomers=16)
