"""Trajectory generation: format, metadata, resumption, unwrapping, users' own data."""
from __future__ import annotations

import json

import mdtraj
import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_cgml import generate, trajectories, trajectory_import
from openmm_cgml.systems.base import BuiltSystem, Equilibration, SystemSpec


def test_generated_data_set_layout_and_metadata(chain_data_dir, chain_settings):
    index = json.loads((chain_data_dir / "dataset.json").read_text())
    names = sorted(e["name"] for e in index["trajectories"])
    assert names == ["chain_test_000", "chain_train_000", "chain_train_001"]
    assert all(e["complete"] and e["n_frames"] == chain_settings["n_frames"] for e in index["trajectories"])
    directory = chain_data_dir / "chain_train_000"
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["record_interval_ps"] == pytest.approx(5.0)
    assert metadata["timestep_ps"] == pytest.approx(0.01)
    assert metadata["record_interval_steps"] == 500
    assert metadata["temperature_K"] == pytest.approx(120.272, abs=1e-3)
    assert metadata["periodic"] is False and metadata["box"] is None
    assert metadata["openmm_version"] == openmm.__version__
    assert metadata["split"] == "train" and metadata["kind"] == "chain"
    n = 2 * chain_settings["n_monomers"]
    assert len(metadata["atom_types"]) == n and set(metadata["atom_types"]) <= {"B1", "B2", "S1", "S2"}
    assert len(metadata["bond_types"]) == len(metadata["bonds"]) == 2 * chain_settings["n_monomers"] - 1
    assert not (directory / "production").exists()  # work files are cleaned up
    # plain mdtraj reads it, bonds included (CONECT)
    traj = mdtraj.load(str(directory / "trajectory.dcd"), top=str(directory / "topology.pdb"))
    assert traj.n_frames == chain_settings["n_frames"] and traj.n_atoms == n
    assert traj.unitcell_vectors is None
    mdtraj_bonds = sorted(tuple(sorted((a.index, b.index))) for a, b in traj.topology.bonds)
    assert mdtraj_bonds == sorted(tuple(sorted(b)) for b in metadata["bonds"])
    thermo = np.loadtxt(directory / "thermo.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(np.diff(thermo[:, 0]), 5.0, rtol=1e-9)
    assert thermo.shape == (chain_settings["n_frames"], 4)


def _periodic_dimers(box_nm=2.0, n_molecules=4):
    """Diatomic molecules (harmonic bonds), no non-bonded forces, periodic box: they
    diffuse across the box boundaries quickly."""
    topology = app.Topology()
    chain_ = topology.addChain()
    system = openmm.System()
    bonds = openmm.HarmonicBondForce()
    atoms = []
    for m in range(n_molecules):
        residue = topology.addResidue("DIM", chain_)
        for element in (app.element.carbon, app.element.oxygen):
            atoms.append(topology.addAtom(element.symbol, element, residue))
            system.addParticle(4.0)
        topology.addBond(atoms[-2], atoms[-1])
        bonds.addBond(2 * m, 2 * m + 1, 0.12, 5000.0)
    bonds.setUsesPeriodicBoundaryConditions(True)
    system.addForce(bonds)
    vectors = [openmm.Vec3(box_nm, 0, 0), openmm.Vec3(0, box_nm, 0), openmm.Vec3(0, 0, box_nm)] * unit.nanometer
    system.setDefaultPeriodicBoxVectors(*vectors)
    topology.setPeriodicBoxVectors(vectors)
    rng = np.random.default_rng(0)
    positions = []
    for m in range(n_molecules):
        centre = rng.uniform(0.3, box_nm - 0.3, size=3)
        positions += [centre, centre + [0.12, 0, 0]]
    temperature = 300 * unit.kelvin
    timestep = 0.002 * unit.picosecond

    def make_integrator():
        integrator = openmm.LangevinMiddleIntegrator(temperature, 1 / unit.picosecond, timestep)
        integrator.setRandomNumberSeed(7)
        return integrator

    spec = SystemSpec("test", "dimers", "train", 3, {"n_molecules": n_molecules}, n_frames=150)
    return BuiltSystem(spec, topology, system, np.asarray(positions) * unit.nanometer, temperature,
                       timestep, 0.04 * unit.picosecond, [a.element.symbol for a in topology.atoms()],
                       ["C-O"] * n_molecules, make_integrator, Equilibration(0, lambda simulation, report: {}), True)


class _Killed(Exception):
    pass


def _kill_after(n):
    def hook(chunks_done):
        if chunks_done == n:
            raise _Killed
    return hook


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, platform):
    kwargs = dict(n_frames=10, chunk_frames=3, platform=platform, threads=1, progress=False)
    reference_dir = generate.generate_trajectory(_periodic_dimers(), tmp_path / "a", **kwargs)
    reference = trajectories.load_trajectory(reference_dir)

    out = tmp_path / "b"
    for kill_at in (1, 3):  # killed twice, after chunks 1 and 3 (of 4)
        with pytest.raises(_Killed):
            generate.generate_trajectory(_periodic_dimers(), out, after_chunk=_kill_after(kill_at), **kwargs)
        assert not json.loads((out / reference.name / "metadata.json").read_text())["complete"]
        progress = json.loads((out / reference.name / "production" / "progress.json").read_text())
        assert progress["frames_done"] == 3 * kill_at
    # a stray chunk from a run killed before it updated progress.json must be ignored
    np.savez(out / reference.name / "production" / "chunk_00004.npz", positions=np.zeros(1))
    resumed_dir = generate.generate_trajectory(_periodic_dimers(), out, **kwargs)
    resumed = trajectories.load_trajectory(resumed_dir)
    assert resumed.n_frames == 10
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    np.testing.assert_array_equal(resumed.box, reference.box)
    np.testing.assert_array_equal(
        np.loadtxt(resumed_dir / "thermo.csv", delimiter=",", skiprows=1),
        np.loadtxt(reference_dir / "thermo.csv", delimiter=",", skiprows=1))
    # and the run really moved: frames differ
    assert np.abs(reference.positions[-1] - reference.positions[0]).max() > 0.01

    # complete trajectories are not recomputed
    stamp = (resumed_dir / "trajectory.dcd").stat().st_mtime_ns
    generate.generate_trajectory(_periodic_dimers(), out, after_chunk=_kill_after(1), **kwargs)
    assert (resumed_dir / "trajectory.dcd").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="already holds a complete trajectory"):
        generate.generate_trajectory(_periodic_dimers(), out, **{**kwargs, "n_frames": 12})


def test_periodic_trajectory_is_stored_unwrapped_and_imports_back(tmp_path):
    box = 2.0
    directory = generate.generate_trajectory(_periodic_dimers(box), tmp_path / "data", platform="Reference",
                                             progress=False)
    record = trajectories.load_trajectory(directory)
    assert record.periodic and record.box.shape == (150, 3, 3)
    np.testing.assert_allclose(record.box[:, 0, 0], box, rtol=1e-6)
    np.testing.assert_allclose(record.metadata["box"], record.box[0], rtol=1e-6)  # the production box
    positions = record.positions.astype(np.float64)
    # some atoms left the primary box: a wrapped trajectory would have jumped...
    assert positions.min() < 0 or positions.max() > box
    # ...but the stored one never jumps and molecules stay whole
    assert np.abs(np.diff(positions, axis=0)).max() < 0.3 * box
    lengths = np.linalg.norm(positions[:, 0::2] - positions[:, 1::2], axis=-1)
    assert lengths.max() < 0.2

    # users' own data: wrap every atom into the box (like a DCDReporter with
    # enforcePeriodicBox), write PDB + DCD, import: the unwrapped result must match
    wrapped = positions - box * np.floor(positions / box)
    assert np.abs(np.diff(wrapped, axis=0)).max() > 0.5 * box  # it really jumps
    pdb_path, dcd_path = tmp_path / "user.pdb", tmp_path / "user.dcd"
    top = record.topology
    top.setPeriodicBoxVectors(record.box[0] * unit.nanometer)
    trajectories.write_topology_pdb(pdb_path, top, wrapped[0])
    with mdtraj.formats.DCDTrajectoryFile(str(dcd_path), "w") as handle:
        handle.write((wrapped * 10).astype(np.float32), cell_lengths=np.full((150, 3), box * 10), cell_angles=np.full((150, 3), 90.0))
    imported = trajectory_import.import_trajectory(dcd_path, pdb_path, 0.04 * unit.picosecond, tmp_path / "user_data",
                                          name="mine")
    assert imported.atom_types == ["C", "O"] * 4
    np.testing.assert_allclose(imported.masses, [12.01, 16.00] * 4, atol=0.01)
    assert imported.metadata["record_interval_ps"] == pytest.approx(0.04)
    assert imported.bonds.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shift = imported.positions.astype(np.float64) - positions
    # equal up to one lattice translation per molecule, constant in time
    np.testing.assert_allclose(shift, shift[:1].repeat(150, axis=0), atol=2e-4)
    np.testing.assert_allclose(shift[0, 0::2], shift[0, 1::2], atol=2e-4)
    np.testing.assert_allclose(shift / box, np.round(shift / box), atol=2e-4)
    assert [p.name for p in trajectories.list_trajectories(tmp_path / "user_data")] == ["mine"]
    np.testing.assert_allclose(imported.metadata["box"], imported.box[0], rtol=1e-6)


def test_import_rejects_topology_without_bonds(tmp_path):
    topology = app.Topology()
    residue = topology.addResidue("AR", topology.addChain())
    for _ in range(2):
        topology.addAtom("Ar", app.element.argon, residue)
    pdb = tmp_path / "ar.pdb"
    trajectories.write_topology_pdb(pdb, topology, np.array([[0, 0, 0], [0.5, 0, 0]]))
    with pytest.raises(ValueError, match="has no bonds"):
        trajectory_import.import_trajectory(pdb, pdb, 1.0, tmp_path / "out")


def test_cli_generates_a_small_data_set(tmp_path):
    from openmm_cgml.cli import main

    out = tmp_path / "cli"
    assert main(["generate", "chain", "--preset", "tiny", "--out", str(out), "--seed", "2",
                 "--n-train", "1", "--n-test", "0", "--n-monomers", "4", "--n-frames", "3",
                 "--set", "equilibration_tau=1", "--platform", "Reference", "--no-progress"]) == 0
    record = trajectories.load_trajectory(out / "chain_train_000")
    assert record.n_frames == 3 and record.n_atoms == 8
