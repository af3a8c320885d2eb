"""METIS coarse-graining: connected balanced parts, COM mapping, CG bonds, persistence."""
from __future__ import annotations

import numpy as np
import openmm
import pytest
from openmm import unit
from scipy.sparse.csgraph import connected_components

from openmm_cgml.coarse_grain import CGMapping, _make_parts_connected, _adjacency, build_vocabulary


def branched_molecule_with_ions():
    """30-atom branched molecule (backbone 0-19, two 5-atom branches at 5 and 12) + 3 ions."""
    bonds = [(i, i + 1) for i in range(19)]
    bonds += [(5, 20)] + [(20 + i, 21 + i) for i in range(4)]
    bonds += [(12, 25)] + [(25 + i, 26 + i) for i in range(4)]
    rng = np.random.default_rng(1)
    masses = np.concatenate([rng.uniform(1, 16, 30), [6.94, 6.94, 22.99]])
    return 33, np.array(bonds), masses


def assert_parts_connected(mapping):
    adjacency = _adjacency(mapping.n_atoms, mapping.fine_bonds)
    for bead in range(mapping.n_beads):
        atoms = mapping.atoms_of_bead(bead)
        n_components, _ = connected_components(adjacency[atoms][:, atoms], directed=False)
        assert n_components == 1, f"bead {bead} (atoms {atoms}) is not connected"
        # all atoms of a bead belong to one molecule
        assert len(set(mapping.molecule_of_atom[atoms])) == 1


def test_metis_parts_are_connected_balanced_and_ions_stay_single():
    n, bonds, masses = branched_molecule_with_ions()
    mapping = CGMapping.from_graph(n, bonds, masses, cg_level=5)
    sizes = np.bincount(mapping.bead_of_atom)
    assert mapping.n_beads == 6 + 3        # round(30/5) parts + 3 single ions
    assert_parts_connected(mapping)
    assert sizes[:6].min() >= 3 and sizes[:6].max() <= 7   # balanced around 5
    assert sizes[6:].tolist() == [1, 1, 1]
    np.testing.assert_array_equal(mapping.bead_of_atom[30:], [6, 7, 8])
    np.testing.assert_allclose(mapping.bead_masses.sum(), masses.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_trees_always_give_connected_parts(seed):
    rng = np.random.default_rng(seed)
    n = 300
    bonds = np.array([(i, int(rng.integers(0, i))) for i in range(1, n)])
    mapping = CGMapping.from_graph(n, bonds, np.ones(n), cg_level=7, seed=seed)
    assert_parts_connected(mapping)
    assert abs(mapping.n_beads - round(n / 7)) <= 3
    assert np.bincount(mapping.bead_of_atom).max() <= 3 * 7


def test_disconnected_parts_are_repaired_deterministically():
    # path 0-1-2-3-4-5-6; part 0 = {0,1} and {5,6} (disconnected), part 1 = {2,3,4}
    bonds = np.array([(i, i + 1) for i in range(6)])
    labels = np.array([0, 0, 1, 1, 1, 0, 0])
    fixed = _make_parts_connected(labels, _adjacency(7, bonds))
    # stray {5,6} (tie on size, higher first atom) joins its only neighbouring part, 1
    assert fixed.tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_centre_of_mass_mapping_equals_a_direct_loop():
    n, bonds, masses = branched_molecule_with_ions()
    mapping = CGMapping.from_graph(n, bonds, masses, cg_level=4)
    rng = np.random.default_rng(2)
    trajectory = rng.normal(scale=3.0, size=(7, n, 3))
    expected = np.zeros((7, mapping.n_beads, 3))
    for f in range(7):
        for bead in range(mapping.n_beads):
            atoms = [i for i in range(n) if mapping.bead_of_atom[i] == bead]
            expected[f, bead] = sum(masses[i] * trajectory[f, i] for i in atoms) / sum(masses[i] for i in atoms)
    np.testing.assert_allclose(mapping.map_positions(trajectory), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mapping.map_positions(trajectory[3]), expected[3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mapping.map_positions(trajectory[3] * unit.nanometer), expected[3], atol=1e-12)
    assert mapping.map_positions(trajectory.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match="do not match"):
        mapping.map_positions(trajectory[:, :5])


def test_cg_bonds_are_exact_on_a_hand_made_mapping():
    # ring of 6 atoms + tail 6-7-8; beads {0,1,2} {3,4,5} {6,7} {8} and an ion 9
    bonds = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (5, 6), (6, 7), (7, 8)]
    mapping = CGMapping([0, 0, 0, 1, 1, 1, 2, 2, 3, 4], np.ones(10), bonds, ["C"] * 10,
                        ["single"] * 9, [0] * 9 + [1], cg_level=3)
    # 2-3 and 5-0 both join beads 0 and 1 (listed once); 5-6 joins 1-2; 7-8 joins 2-3
    assert mapping.cg_bonds.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert mapping.cg_bonds.dtype == np.int64
    assert mapping.molecule_of_bead.tolist() == [0, 0, 0, 0, 1]

    # the METIS path: CG bonds equal a brute-force set over chemical bonds
    n, bonds, masses = branched_molecule_with_ions()
    metis = CGMapping.from_graph(n, bonds, masses, cg_level=5)
    expected = sorted({tuple(sorted((int(metis.bead_of_atom[a]), int(metis.bead_of_atom[b]))))
                       for a, b in bonds if metis.bead_of_atom[a] != metis.bead_of_atom[b]})
    assert [tuple(b) for b in metis.cg_bonds.tolist()] == expected


def test_small_molecules_option():
    # a 15-atom "anion" (branched), a 40-atom chain and two ions
    anion = [(0, i) for i in range(1, 5)] + [(i, i + 4) for i in range(1, 5)] + [(5, 9), (6, 10), (7, 11), (8, 12), (9, 13), (10, 14)]
    chain = [(15 + i, 16 + i) for i in range(39)]
    bonds = np.array(anion + chain)
    n = 57
    default = CGMapping.from_graph(n, bonds, np.ones(n), cg_level=5)
    assert len(np.unique(default.bead_of_atom[:15])) == 3
    merged = CGMapping.from_graph(n, bonds, np.ones(n), cg_level=5, small_molecules_as_beads=True,
                                  small_molecule_max_atoms=20)
    assert len(np.unique(merged.bead_of_atom[:15])) == 1     # the anion is one bead
    assert len(np.unique(merged.bead_of_atom[15:55])) == 8   # the chain is still split
    assert merged.n_beads == 1 + 8 + 2
    assert_parts_connected(merged)


def test_reproducible_and_persistent(tmp_path):
    n, bonds, masses = branched_molecule_with_ions()
    types = ["C"] * 20 + ["O"] * 10 + ["Li", "Li", "Na"]
    first = CGMapping.from_graph(n, bonds, masses, cg_level=4, atom_types=types, seed=3)
    second = CGMapping.from_graph(n, bonds, masses, cg_level=4, atom_types=types, seed=3)
    np.testing.assert_array_equal(first.bead_of_atom, second.bead_of_atom)
    assert first.fingerprint() == second.fingerprint()
    first.save(tmp_path / "mapping.json")
    loaded = CGMapping.load(tmp_path / "mapping.json")
    np.testing.assert_array_equal(loaded.bead_of_atom, first.bead_of_atom)
    np.testing.assert_array_equal(loaded.cg_bonds, first.cg_bonds)
    np.testing.assert_allclose(loaded.bead_masses, first.bead_masses)
    assert loaded.fingerprint() == first.fingerprint()
    other = CGMapping.from_graph(n, bonds, masses, cg_level=6, atom_types=types)
    assert other.fingerprint() != first.fingerprint()

    vocabulary = build_vocabulary([types])
    assert vocabulary == ["C", "Li", "Na", "O"]
    graph = first.fine_graph(vocabulary, ["bond"])
    assert graph["atom_type"].tolist() == [0] * 20 + [3] * 10 + [1, 1, 2]
    assert graph["bond_type"].tolist() == [0] * len(bonds)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        first.atom_type_index(["C", "O"])


def test_openmm_topology_and_system():
    n, bonds, masses = branched_molecule_with_ions()
    mapping = CGMapping.from_graph(n, bonds, masses, cg_level=5)
    topology = mapping.to_openmm_topology()
    assert topology.getNumAtoms() == mapping.n_beads
    assert topology.getNumChains() == 4  # the molecule and three ions
    assert sorted((a.index, b.index) for a, b in topology.bonds()) == [tuple(b) for b in mapping.cg_bonds.tolist()]
    assert all(atom.element is None for atom in topology.atoms())
    box = np.diag([3.0, 3.5, 4.0])
    system = mapping.to_openmm_system(box)
    assert system.getNumParticles() == mapping.n_beads and system.getNumForces() == 0
    np.testing.assert_allclose([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(mapping.n_beads)],
                               mapping.bead_masses)
    vectors = system.getDefaultPeriodicBoxVectors()
    np.testing.assert_allclose([v.value_in_unit(unit.nanometer) for v in vectors], box)
    assert mapping.to_openmm_topology(box).getPeriodicBoxVectors() is not None
    # a context accepts it (e.g. for the learned integrator)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(mapping.map_positions(np.random.default_rng(0).normal(size=(n, 3))))


def test_bad_input():
    with pytest.raises(ValueError, match="cg_level must be positive"):
        CGMapping.from_graph(3, [(0, 1)], np.ones(3), cg_level=0)
    with pytest.raises(ValueError, match="out of range"):
        CGMapping.from_graph(3, [(0, 3)], np.ones(3), cg_level=2)
    with pytest.raises(ValueError, match="positive mass"):
        CGMapping.from_graph(3, [(0, 1)], [1.0, 0.0, 1.0], cg_level=2)


def test_from_openmm_and_mdtraj_topologies_of_a_chain():
    import mdtraj

    from openmm_cgml.systems import chain

    spec = chain.make_specs("tiny", seed=0, n_train=1, n_test=0, n_monomers=100)[0]
    built = chain.build(spec)
    masses = [built.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(200)]
    mapping = CGMapping.from_topology(built.topology, masses, cg_level=100, atom_types=built.atom_types,
                                      bond_types=built.bond_types)
    assert mapping.n_beads == 2 and mapping.cg_bonds.tolist() == [[0, 1]]
    assert np.bincount(mapping.bead_of_atom).tolist() == [100, 100]
    assert_parts_connected(mapping)
    from_mdtraj = CGMapping.from_topology(mdtraj.Topology.from_openmm(built.topology), masses, cg_level=100,
                                          atom_types=built.atom_types, bond_types=built.bond_types)
    assert from_mdtraj.fingerprint() == mapping.fingerprint()
