"""Issue 10, reliability: no silent wrong results and no data loss.

Resumed generation with another spec, export killed/failing midway, import of the
project's own chain data (types, masses), truncated DCDs, untrusted model manifests and
data set indexes, corrupt training checkpoints and CG caches."""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_cgml import generate, topology, trajectories, trajectory_import
from openmm_cgml.cli import main as cgml_main

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers
from test_generate import _Killed, _kill_after  # noqa: E402  (the interrupted-generation helpers)


def _dimers(seed=3):
    from test_generate import _periodic_dimers

    built = _periodic_dimers()
    return replace(built, spec=replace(built.spec, seed=seed))


def _copy_model(exported, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    return model


def _edit_manifest(model: Path, **changes) -> None:
    path = model / "simulator.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del manifest[key]
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


_DELETE = object()


def _train_run_dir(exported) -> Path:
    """The training run that ``exported_tiny_model`` was exported from."""
    return Path(exported).parent


# ----------------------------------------------------------------------------- 3: generate
def test_resumed_generation_refuses_another_spec(tmp_path):
    kwargs = dict(n_frames=6, chunk_frames=3, platform="Reference", progress=False)
    out = tmp_path / "data"
    with pytest.raises(_Killed):
        generate.generate_trajectory(_dimers(seed=3), out, after_chunk=_kill_after(1), **kwargs)
    directory = out / "dimers"
    stored = json.loads((directory / "metadata.json").read_text())
    assert stored["seed"] == 3 and stored["spec_fingerprint"]

    # another seed: refused, naming the field; nothing on disk changes
    with pytest.raises(generate.SpecMismatchError, match=r"seed: 3 on disk, 4 requested") as err:
        generate.generate_trajectory(_dimers(seed=4), out, **kwargs)
    assert str(directory) in str(err.value)
    assert json.loads((directory / "metadata.json").read_text()) == stored
    # another frame count / composition: refused too, naming those fields
    with pytest.raises(generate.SpecMismatchError, match="n_frames: 6 on disk, 9 requested"):
        generate.generate_trajectory(_dimers(seed=3), out, **{**kwargs, "n_frames": 9})
    other = _dimers(seed=3)
    other = replace(other, spec=replace(other.spec, composition={"n_molecules": 5}))
    with pytest.raises(generate.SpecMismatchError, match=r"composition\.n_molecules: 4 on disk, 5 requested"):
        generate.generate_trajectory(other, out, **kwargs)

    # the same spec resumes and completes
    generate.generate_trajectory(_dimers(seed=3), out, **kwargs)
    assert trajectories.load_trajectory(directory).n_frames == 6
    # a complete trajectory is not silently kept for another spec either
    with pytest.raises(generate.SpecMismatchError, match="seed: 3 on disk, 4 requested"):
        generate.generate_trajectory(_dimers(seed=4), out, **kwargs)


def test_cli_generate_names_the_differing_fields(tmp_path, capsys):
    out = tmp_path / "cli"
    common = ["generate", "chain", "--preset", "tiny", "--out", str(out), "--n-train", "1", "--n-test", "0",
              "--n-monomers", "4", "--n-frames", "2", "--set", "equilibration_tau=1", "--platform", "Reference",
              "--no-progress"]
    assert cgml_main(common + ["--seed", "2"]) == 0
    before = (out / "chain_train_000" / "metadata.json").read_text()
    capsys.readouterr()
    assert cgml_main(common + ["--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "chain_train_000" in err and "seed:" in err and "composition.sequence" in err
    assert (out / "chain_train_000" / "metadata.json").read_text() == before


# ----------------------------------------------------------------------------- 4: export
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_export_keeps_the_old_model(exported_tiny_model, tmp_path, monkeypatch):
    import openmm_cgml.models.torchscript as models_export
    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.models import ExportError

    model = _copy_model(exported_tiny_model, tmp_path)
    before = _snapshot(model)
    checkpoint = _train_run_dir(exported_tiny_model) / "checkpoints" / "last.pt"

    def fail(*args, **kwargs):
        raise ExportError("fresh-process verification failed (simulated)")

    monkeypatch.setattr(models_export, "verify_archives", fail)
    with pytest.raises(ExportError, match="simulated"):
        export_checkpoint(checkpoint, model)
    assert _snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left behind

    # a failure after the archives were written (the final load of the new package)
    monkeypatch.undo()
    import openmm_cgml.simulator as simulator_module

    def broken_load(cls, directory):
        raise RuntimeError("cannot load the new package (simulated)")

    monkeypatch.setattr(simulator_module.LearnedSimulator, "load", classmethod(broken_load))
    with pytest.raises(RuntimeError, match="simulated"):
        export_checkpoint(checkpoint, model, verify=False)
    assert _snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_replaces_a_model_in_place_and_keeps_other_files(exported_tiny_model, tmp_path):
    from openmm_cgml.manifest import MANIFEST
    from openmm_cgml.packaging import export_checkpoint

    model = _copy_model(exported_tiny_model, tmp_path)
    (model / "NOTES.txt").write_text("mine")
    (model / "dynamics.pt").write_bytes(b"old")
    checkpoint = _train_run_dir(exported_tiny_model) / "checkpoints" / "last.pt"
    export_checkpoint(checkpoint, model, verify=False)
    assert (model / "dynamics.pt").read_bytes() != b"old"
    assert (model / "NOTES.txt").read_text() == "mine"
    assert json.loads((model / MANIFEST).read_text())["seq_len"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a directory that is not a model is never replaced
    other = tmp_path / "not_a_model"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_checkpoint(checkpoint, other, verify=False)
    assert (other / "data.csv").read_text() == "1,2"


def test_export_of_a_non_checkpoint_says_what_it_expected(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file at all")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path in (garbage, other):
        assert cgml_main(["export", str(path), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "not an openmm-cgml checkpoint" in err
        assert "openmm-cgml-checkpoint/1" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 6: import
def _chain_source(chain_data_dir):
    directory = chain_data_dir / "chain_train_000"
    return directory, json.loads((directory / "metadata.json").read_text())


def test_import_of_own_chain_data_keeps_types_and_needs_masses(chain_data_dir, tmp_path):
    directory, metadata = _chain_source(chain_data_dir)
    dcd, pdb = directory / "trajectory.dcd", directory / "topology.pdb"
    # the PDB has no element column (OpenMM writes "EP"): elements are guessed from names,
    # so types come from the names and the guessed element masses (B, S) are not used
    with pytest.warns(UserWarning, match="guessed"):
        with pytest.raises(ValueError, match="--masses"):
            trajectory_import.import_trajectory(dcd, pdb, 5.0, tmp_path / "a", name="x")
    with pytest.warns(UserWarning, match="guessed"):
        record = trajectory_import.import_trajectory(dcd, pdb, 5.0, tmp_path / "a", name="x",
                                            masses={"B1": 1.0, "B2": 1.0, "S1": 1.0, "S2": 1.0})
    assert record.atom_types == metadata["atom_types"]  # B1/B2 stay apart
    np.testing.assert_allclose(record.masses, metadata["masses_amu"])


def test_cli_import_atom_types_and_masses_options(chain_data_dir, tmp_path):
    directory, metadata = _chain_source(chain_data_dir)
    out = tmp_path / "cli"
    types_file = tmp_path / "types.json"
    types_file.write_text(json.dumps(metadata["atom_types"]))
    args = ["import-trajectory", str(directory / "trajectory.dcd"), "--topology", str(directory / "topology.pdb"),
            "--record-interval-ps", "5", "--out", str(out)]
    with pytest.warns(UserWarning, match="guessed"):
        assert cgml_main(args + ["--name", "a", "--masses", "B1=1,B2=1,S1=1,S2=2.5"]) == 0
    record = trajectories.load_trajectory(out / "a")
    assert record.atom_types == metadata["atom_types"]
    assert record.masses.tolist() == [2.5 if t == "S2" else 1.0 for t in metadata["atom_types"]]
    n = len(metadata["atom_types"])
    assert cgml_main(args + ["--name", "b", "--atom-types", str(types_file),
                             "--masses", ",".join(["3"] * n)]) == 0
    record = trajectories.load_trajectory(out / "b")
    assert record.atom_types == metadata["atom_types"] and record.masses.tolist() == [3.0] * n


def test_simulator_and_import_share_the_type_rule(exported_tiny_model, chain_data_dir):
    import mdtraj

    import openmm_cgml

    directory, metadata = _chain_source(chain_data_dir)
    top = mdtraj.load_topology(str(directory / "topology.pdb"))
    sim = openmm_cgml.LearnedSimulator.load(exported_tiny_model)
    atoms = list(top.to_openmm().atoms())
    assert sim.defaultAtomTypes(atoms) == metadata["atom_types"]
    types, trusted = topology.atom_types_from_topology(atoms, known=sim.atom_vocabulary)
    assert types == metadata["atom_types"] and not any(trusted)


def test_truncated_dcd_import_warns(chain_data_dir, tmp_path):
    directory, metadata = _chain_source(chain_data_dir)
    masses = metadata["masses_amu"]  # explicit types and masses: no guessed-element warning
    kwargs = {"atom_types": metadata["atom_types"], "masses": masses}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajectory_import.import_trajectory(directory / "trajectory.dcd", directory / "topology.pdb", 5.0,
                                   tmp_path / "ok", **kwargs)
    assert not caught, [str(w.message) for w in caught]
    cut = tmp_path / "cut.dcd"
    data = (directory / "trajectory.dcd").read_bytes()
    cut.write_bytes(data[:-100])  # killed while writing the last frame
    with pytest.warns(UserWarning, match=r"cut\.dcd.*truncated.*30 frames.*29"):
        imported = trajectory_import.import_trajectory(cut, directory / "topology.pdb", 5.0, tmp_path / "cut", **kwargs)
    assert imported.n_frames == metadata["n_frames"] - 1


# ----------------------------------------------------------------------------- 7: untrusted paths
def test_manifest_paths_stay_inside_the_model(exported_tiny_model, tmp_path):
    import openmm_cgml

    model = _copy_model(exported_tiny_model, tmp_path)
    shutil.copy(model / "embedding.pt", tmp_path / "outside.pt")
    manifest = json.loads((model / "simulator.json").read_text())
    for bad in ("../outside.pt", str(tmp_path / "outside.pt")):
        _edit_manifest(model, files={**manifest["files"], "embedding": bad})
        with pytest.raises(ValueError, match="outside the model directory"):
            openmm_cgml.LearnedSimulator.load(model)
        _edit_manifest(model, files={**manifest["files"], "dynamics": bad})
        with pytest.raises(ValueError, match="outside the model directory"):
            openmm_cgml.LearnedSimulator.load(model)


def test_manifest_is_validated(exported_tiny_model, tmp_path):
    import openmm_cgml

    model = _copy_model(exported_tiny_model, tmp_path)
    original = (model / "simulator.json").read_text()
    cases = [({"format": "openmm-cgml-simulator/9"}, "format"),
             ({"seq_len": _DELETE}, "missing.*seq_len"),
             ({"seq_len": "3"}, "seq_len.*int"),
             ({"periodic": "no"}, "periodic.*bool"),
             ({"seq_len": 5}, "seq_len 5.*dynamics.pt.*3"),
             ({"step_size_ps": 2.0}, r"step_size_ps 2.0 is not dilation x record_interval_ps"),
             ({"step_size_ps": 2.0, "record_interval_ps": 2.0}, "step_size_ps 2.0.*dynamics.pt.*5.0"),
             ({"files": {"dynamics": "dynamics.pt", "score": None, "embedding": 7}}, "files.embedding"),
             ({"atom_vocabulary": ["B1", "B2"]}, "atom_vocabulary has 2 types.*embedding.pt.*4")]
    for change, message in cases:
        (model / "simulator.json").write_text(original)
        _edit_manifest(model, **change)
        with pytest.raises(ValueError, match=message):
            openmm_cgml.LearnedSimulator.load(model)
    (model / "simulator.json").write_text("{not json")
    with pytest.raises(ValueError, match="simulator.json"):
        openmm_cgml.LearnedSimulator.load(model)


def test_periodicity_must_match_the_model(exported_tiny_model, chain_data_dir, tmp_path):
    import openmm_cgml

    record = trajectories.load_trajectory(trajectories.list_trajectories(chain_data_dir, split="test")[0])
    sim = openmm_cgml.LearnedSimulator.load(exported_tiny_model)  # trained on non-periodic chains
    with pytest.raises(ValueError, match="non-periodic.*box"):
        sim.coarseGrain(record, box=np.eye(3) * 5.0)
    model = _copy_model(exported_tiny_model, tmp_path)
    _edit_manifest(model, periodic=True)
    periodic = openmm_cgml.LearnedSimulator.load(model)
    with pytest.raises(ValueError, match="periodic.*no periodic box"):
        periodic.coarseGrain(record)
    cg = sim.coarseGrain(record)
    with pytest.raises(ValueError, match="periodic"):
        periodic.createIntegrator(cg)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "/tmp/abs", ""])
def test_import_name_must_be_one_plain_component(chain_data_dir, tmp_path, name):
    directory, _ = _chain_source(chain_data_dir)
    out = tmp_path / "deep" / "out"
    with pytest.raises(ValueError, match="name"):
        trajectory_import.import_trajectory(directory / "trajectory.dcd", directory / "topology.pdb", 5.0, out,
                                   name=name, masses=[1.0] * 16)
    assert not (tmp_path / "deep" / "escape").exists()
    assert not out.exists() or not any(out.iterdir())


def test_dataset_index_paths_stay_inside_the_data_set(chain_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(chain_data_dir, data, ignore=shutil.ignore_patterns("cg_*"))
    index = json.loads((data / "dataset.json").read_text())
    for bad in ("../elsewhere", str(tmp_path / "elsewhere"), "chain_train_000/../../elsewhere"):
        index["trajectories"][0]["path"] = bad
        (data / "dataset.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="outside the data set"):
            trajectories.list_trajectories(data)


# ----------------------------------------------------------------------------- 9: corrupt files
def _copy_run(exported, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(_train_run_dir(exported), run, ignore=shutil.ignore_patterns("exported"))
    return run


def _tiny_config(chain_data_dir):
    from openmm_cgml.training import load_config

    return load_config("chain-tiny", {"data_dir": str(chain_data_dir), "steps": 20, "val_every": 0,
                                      "checkpoint_every": 20, "num_threads": 1})


def test_resume_falls_back_from_a_corrupt_last_checkpoint(exported_tiny_model, chain_data_dir, tmp_path):
    from openmm_cgml.training import Trainer, load_checkpoint

    run = _copy_run(exported_tiny_model, tmp_path)
    checkpoints = run / "checkpoints"
    good = checkpoints / "step_0000020.pt"
    assert good.exists()
    (checkpoints / "last.pt").write_bytes(b"truncated")
    (checkpoints / "step_0000030.pt").write_bytes(good.read_bytes()[:500])  # newer but corrupt
    with pytest.raises(ValueError, match=r"last\.pt.*not an openmm-cgml checkpoint"):
        load_checkpoint(checkpoints / "last.pt")
    with pytest.warns(UserWarning) as caught:
        result = Trainer(_tiny_config(chain_data_dir), run, resume=True, progress=False).run()
    messages = " | ".join(str(w.message) for w in caught)
    assert str(checkpoints / "last.pt") in messages and "step_0000020.pt" in messages
    assert "step_0000030.pt" in messages  # skipped, said so
    assert result["step"] == 20

    # nothing readable at all: an error naming last.pt
    for path in checkpoints.glob("*.pt"):
        path.write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match=r"last\.pt"):
        with pytest.warns(UserWarning):
            Trainer(_tiny_config(chain_data_dir), run, resume=True, progress=False).run()


def test_corrupt_cg_cache_is_rebuilt(chain_data_dir, tmp_path):
    from openmm_cgml.dataset import load_cg_trajectory

    directory = tmp_path / "traj"
    shutil.copytree(chain_data_dir / "chain_train_001", directory, ignore=shutil.ignore_patterns("cg_*"))
    first = load_cg_trajectory(directory, cg_level=4)
    (cache,) = directory.glob("cg_*.npz")
    cache.write_bytes(b"PK\x03\x04 garbage")
    with pytest.warns(UserWarning, match=rf"{cache.name}.*rebuil"):
        again = load_cg_trajectory(directory, cg_level=4)
    np.testing.assert_array_equal(again.positions, first.positions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is good again
        np.testing.assert_array_equal(load_cg_trajectory(directory, cg_level=4).positions, first.positions)


def test_corrupt_mapping_file_names_its_path(tmp_path):
    from openmm_cgml.coarse_grain import CGMapping

    path = tmp_path / "cg_x.mapping.json"
    path.write_text('{"format": "openmm-cgml-cgmapping/1", "bead_of')
    with pytest.raises(ValueError, match=str(path)):
        CGMapping.load(path)
