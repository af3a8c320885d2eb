"""Training windows: exact indices, batching offsets, split by system, CG cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_cgml.coarse_grain import CGMapping
from openmm_cgml.dataset import (CGTrajectory, WindowDataset, load_cg_trajectory,
                                 make_train_val_datasets, split_by_system, window_indices)
from openmm_cgml.trajectories import list_trajectories, load_trajectory


def test_window_indices_are_exact():
    windows = window_indices(n_frames=10, seq_len=3, dilation=2)
    # last start s satisfies s + 3*2 <= 9
    np.testing.assert_array_equal(windows, [[0, 2, 4, 6], [1, 3, 5, 7], [2, 4, 6, 8], [3, 5, 7, 9]])
    np.testing.assert_array_equal(window_indices(10, 3, 2, stride=2), [[0, 2, 4, 6], [2, 4, 6, 8]])
    np.testing.assert_array_equal(window_indices(4, 2, 1), [[0, 1, 2], [1, 2, 3]])
    assert window_indices(6, 3, 2).shape == (0, 4)   # too short for one window
    with pytest.raises(ValueError, match=">= 1"):
        window_indices(10, 0, 1)


def _synthetic(name, n_molecule_atoms, n_ions, n_frames, periodic, seed):
    rng = np.random.default_rng(seed)
    n = n_molecule_atoms + n_ions
    bonds = [(i, i + 1) for i in range(n_molecule_atoms - 1)]
    types = ["C"] * n_molecule_atoms + ["Li"] * n_ions
    mapping = CGMapping.from_graph(n, bonds, rng.uniform(1, 3, n), cg_level=3, atom_types=types,
                                   bond_types=["single"] * len(bonds))
    positions = rng.normal(size=(n_frames, mapping.n_beads, 3)).astype(np.float32)
    box = np.tile(np.diag([2.0, 3.0, 4.0]), (n_frames, 1, 1)) * (1 + np.arange(n_frames))[:, None, None] \
        if periodic else None
    return CGTrajectory(name, "train", "test", None, positions, box, mapping, 0.5)


def test_samples_and_two_system_batch_offsets():
    first = _synthetic("a", 9, 2, 12, periodic=False, seed=0)    # 3 + 2 beads
    second = _synthetic("b", 12, 1, 12, periodic=True, seed=1)   # 4 + 1 beads
    dataset = WindowDataset([first, second], seq_len=3, dilation=2)
    per_system = len(window_indices(12, 3, 2))
    assert len(dataset) == 2 * per_system
    assert dataset.atom_vocabulary == ["C", "Li"] and dataset.bond_vocabulary == ["single"]

    sample = dataset[per_system + 1]      # system 1, start frame 1
    assert sample["system"] == 1 and sample["start_frame"] == 1
    np.testing.assert_array_equal(sample["history"], second.positions[[1, 3, 5]])
    np.testing.assert_array_equal(sample["target"], second.positions[7])
    np.testing.assert_allclose(sample["box"], second.box[5])   # newest input frame

    batch = dataset.collate([dataset[0], dataset[per_system + 1]])
    n_a, n_b = first.n_beads, second.n_beads
    atoms_a = first.mapping.n_atoms
    assert batch["history"].shape == (3, n_a + n_b, 3) and batch["history"].dtype == torch.float32
    assert batch["target"].shape == (n_a + n_b, 3)
    assert batch["batch"].tolist() == [0] * n_a + [1] * n_b
    assert batch["n_beads"].tolist() == [n_a, n_b]
    expected_bonds = np.concatenate([first.mapping.cg_bonds, second.mapping.cg_bonds + n_a])
    np.testing.assert_array_equal(batch["cg_bonds"].numpy(), expected_bonds)
    np.testing.assert_array_equal(batch["fine_bonds"].numpy(),
                                  np.concatenate([first.mapping.fine_bonds, second.mapping.fine_bonds + atoms_a]))
    np.testing.assert_array_equal(batch["bead_of_atom"].numpy(),
                                  np.concatenate([first.mapping.bead_of_atom, second.mapping.bead_of_atom + n_a]))
    assert batch["atom_batch"].tolist() == [0] * atoms_a + [1] * second.mapping.n_atoms
    assert batch["atom_type"].tolist() == [0] * 9 + [1] * 2 + [0] * 12 + [1]
    np.testing.assert_allclose(batch["bead_masses"].numpy(),
                               np.concatenate([first.mapping.bead_masses, second.mapping.bead_masses]), rtol=1e-6)
    assert batch["box"].shape == (2, 3, 3)
    assert torch.all(batch["box"][0] == 0) and batch["box"][1, 2, 2] == pytest.approx(4.0 * 6)
    assert batch["periodic"].tolist() == [False, True]
    np.testing.assert_allclose(batch["history"][:, n_a:].numpy(), second.positions[[1, 3, 5]])
    assert batch["step_ps"].tolist() == [1.0, 1.0]
    # every bead of the batch has atoms, and atoms map into their own graph's beads
    assert torch.equal(batch["batch"][batch["bead_of_atom"]], batch["atom_batch"])


def test_split_is_by_system():
    names = [f"s{i}" for i in range(10)]
    train, val = split_by_system(names, 0.3, seed=4)
    assert len(val) == 3 and len(train) == 7
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(names)
    assert (train, val) == split_by_system(list(reversed(names)), 0.3, seed=4)
    assert split_by_system(["only"], 0.5) == (["only"], [])


def test_cg_cache_and_train_val_datasets(chain_data_dir):
    directory = list_trajectories(chain_data_dir, split="train")[0]
    record = load_trajectory(directory)
    first = load_cg_trajectory(directory, cg_level=4)
    caches = sorted(p.name for p in directory.glob("cg_*"))
    assert len(caches) == 2 and caches[0].endswith(".mapping.json") and caches[1].endswith(".npz")
    np.testing.assert_allclose(first.positions, first.mapping.map_positions(record.positions.astype(np.float64)),
                               atol=1e-6)
    assert first.mapping.n_beads == round(record.n_atoms / 4)
    again = load_cg_trajectory(directory, cg_level=4)
    np.testing.assert_array_equal(again.positions, first.positions)
    assert first.record_interval_ps == pytest.approx(5.0) and first.box is None
    # the cache carries the true fine Rg^2 per frame (one chain), from the atoms
    from openmm_cgml.analysis import radius_of_gyration_squared

    assert first.fine_rg2.shape == (record.n_frames, 1)
    np.testing.assert_allclose(first.fine_rg2[:, 0], radius_of_gyration_squared(record.positions, record.masses),
                               rtol=1e-5)
    np.testing.assert_array_equal(again.fine_rg2, first.fine_rg2)

    train, val = make_train_val_datasets(chain_data_dir, cg_level=4, seq_len=4, dilation=2, val_fraction=0.5)
    train_names = {s.name for s in train.systems}
    val_names = {s.name for s in val.systems}
    assert len(train_names) == 1 and len(val_names) == 1 and train_names.isdisjoint(val_names)
    assert all(name.startswith("chain_train") for name in train_names | val_names)
    assert len(train) == len(window_indices(record.n_frames, 4, 2))
    assert train.atom_vocabulary == val.atom_vocabulary
    loader = torch.utils.data.DataLoader(train, batch_size=3, shuffle=True, collate_fn=train.collate)
    batch = next(iter(loader))
    assert batch["history"].shape == (4, 3 * train.systems[0].n_beads, 3)
    assert batch["step_ps"][0].item() == pytest.approx(10.0)


def test_samples_carry_the_fine_rg2_of_the_target_frame(chain_data_dir):
    train, _ = make_train_val_datasets(chain_data_dir, cg_level=4, seq_len=3, dilation=2, val_fraction=0.5)
    trajectory = train.trajectories[0]
    sample = train[4]
    np.testing.assert_array_equal(sample["fine_rg2"], trajectory.fine_rg2[4 + 3 * 2])  # the target frame
    batch = train.collate([train[0], train[4]])
    n = train.systems[0].n_beads
    assert batch["property_bead"].tolist() == list(range(2 * n))  # one chain: every bead
    assert batch["property_molecule"].tolist() == [0] * n + [1] * n
    np.testing.assert_array_equal(batch["fine_rg2"].numpy(), trajectory.fine_rg2[[6, 10], 0])
    cg, fine = train.rg2_pairs([0, 4])
    np.testing.assert_allclose(fine, trajectory.fine_rg2[[6, 10], 0])
    assert np.all(fine > cg)  # parallel axis: the atoms inside the beads add to Rg^2


def test_old_cache_without_fine_rg2_is_upgraded(chain_data_dir, tmp_path):
    import shutil
    import warnings

    directory = tmp_path / "traj"
    shutil.copytree(list_trajectories(chain_data_dir, split="train")[0], directory,
                    ignore=shutil.ignore_patterns("cg_*"))
    first = load_cg_trajectory(directory, cg_level=4)
    (cache,) = directory.glob("cg_*.npz")
    with np.load(cache) as data:  # rewrite it as a cache from before the property head
        old = {k: data[k] for k in data.files if k != "fine_rg2"}
    np.savez(cache, **old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently rebuilt: not a damaged cache
        again = load_cg_trajectory(directory, cg_level=4)
    np.testing.assert_array_equal(again.fine_rg2, first.fine_rg2)
    with np.load(cache) as data:
        assert "fine_rg2" in data.files
