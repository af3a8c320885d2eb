"""The property head (fine-level Rg^2 from the CG state): exact CG Rg^2 with a zero
residual, rotation/translation invariance, TorchScript, and the atomistic target."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_cgml.analysis import radius_of_gyration_squared
from openmm_cgml.coarse_grain import CGMapping
from openmm_cgml.models.losses import property_loss, random_rotation
from openmm_cgml.models.property import PropertyHead, cg_rg2, fine_rg2, property_molecules

torch.set_num_threads(1)


def _system(seed=0, frames=5):
    """Two chains of 4 and 3 beads and a lone bead (left out): positions, features, molecule ids."""
    gen = torch.Generator().manual_seed(seed)
    molecule_of_bead = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    bead_molecule = property_molecules(molecule_of_bead)
    beads = np.flatnonzero(bead_molecule >= 0)
    x = torch.randn(frames, len(molecule_of_bead), 3, generator=gen, dtype=torch.float64) * 0.7
    features = torch.randn(len(molecule_of_bead), 5, generator=gen)
    features[:, -1] = 20.0 + 30.0 * torch.rand(len(molecule_of_bead), generator=gen)
    return x, features, molecule_of_bead, bead_molecule, beads


def _randomised(head: PropertyHead, seed=1) -> PropertyHead:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return head


def test_property_molecules_numbers_multibead_molecules_only():
    np.testing.assert_array_equal(property_molecules([3, 3, 7, 5, 5, 5]), [0, 0, -1, 1, 1, 1])


def test_zero_residual_returns_exactly_the_cg_rg2():
    x, features, molecule_of_bead, bead_molecule, beads = _system()
    head = PropertyHead(features.size(1)).double()  # output layer starts at zero: zero residual
    head.set_normalization(torch.zeros(5), torch.ones(5), residual_scale=0.3, rg2_reference=0.5)
    assert torch.count_nonzero(head.out.weight) == 0 and torch.count_nonzero(head.out.bias) == 0
    with torch.no_grad():
        got = head(x[:, beads], features[beads].double(), torch.from_numpy(bead_molecule[beads])).numpy()
    masses = features[:, -1].double().numpy()
    groups = [np.flatnonzero(molecule_of_bead == m) for m in (0, 1)]
    expected = radius_of_gyration_squared(x.numpy(), masses, groups)
    assert got.shape == (5, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(cg_rg2(x.numpy(), masses, molecule_of_bead), expected, rtol=1e-12)
    # a non-zero head does add a residual (the check above is not vacuous)
    _randomised(head)
    with torch.no_grad():
        moved = head(x[:, beads], features[beads].double(), torch.from_numpy(bead_molecule[beads])).numpy()
    assert np.abs(moved - expected).max() > 1e-3


def test_head_is_rotation_and_translation_invariant():
    x, features, _, bead_molecule, beads = _system(seed=2)
    head = _randomised(PropertyHead(features.size(1))).double()
    molecule = torch.from_numpy(bead_molecule[beads])
    f = features[beads].double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        before = head(x[:, beads], f, molecule)
        rotation = random_rotation(gen)
        moved = x[:, beads] @ rotation.T + torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64)
        after = head(moved, f, molecule)
        single = head(moved[0], f, molecule)  # one frame [N, 3]
    assert not torch.allclose(before, x.new_zeros(before.shape))
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(single, before[0], rtol=1e-10, atol=1e-12)


def test_head_scripts_and_matches_eager():
    x, features, _, bead_molecule, beads = _system(seed=3)
    head = _randomised(PropertyHead(features.size(1), hidden_dim=8)).eval()
    scripted = torch.jit.script(head)
    args = (x[:, beads].float(), features[beads], torch.from_numpy(bead_molecule[beads]))
    with torch.no_grad():
        torch.testing.assert_close(scripted(*args), head(*args))
    assert scripted.min_beads == 2 and scripted.num_features == 5
    assert sum(p.numel() for p in PropertyHead(33).parameters()) < 5000  # small: a few thousand


def test_fine_rg2_is_cg_rg2_plus_mass_weighted_intra_bead_rg2():
    """The decomposition the head learns: exact for CG positions = bead centres of mass."""
    rng = np.random.default_rng(0)
    n = 12
    bonds = [(i, i + 1) for i in range(n - 1)]
    masses = rng.uniform(1, 3, n)
    mapping = CGMapping.from_graph(n, bonds, masses, cg_level=3, atom_types=["C"] * n,
                                   bond_types=["single"] * len(bonds))
    atoms = rng.normal(size=(4, n, 3))
    fine = fine_rg2(atoms, mapping)
    beads = mapping.map_positions(atoms)
    cg = cg_rg2(beads, mapping.bead_masses, mapping.molecule_of_bead)
    groups = [np.flatnonzero(mapping.bead_of_atom == b) for b in range(mapping.n_beads)]
    intra = radius_of_gyration_squared(atoms, masses, groups)  # [F, beads]
    expected = cg[:, 0] + (intra * mapping.bead_masses).sum(1) / masses.sum()
    assert fine.shape == (4, 1)
    np.testing.assert_allclose(fine[:, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(fine[:, 0], radius_of_gyration_squared(atoms, masses), rtol=1e-10)


def test_property_loss_is_relative_error_and_skips_missing_targets():
    x, features, _, bead_molecule, beads = _system(seed=4, frames=1)
    head = PropertyHead(features.size(1)).double()
    molecule = torch.from_numpy(bead_molecule[beads])
    with torch.no_grad():
        cg = head(x[0, beads], features[beads].double(), molecule)
        target = torch.stack([cg[0] * 1.25, torch.tensor(float("nan"), dtype=torch.float64)])
        loss = property_loss(head, x[0, beads], features[beads].double(), molecule, target)
    assert float(loss) == pytest.approx((1 / 1.25 - 1) ** 2)
