"""`cgml export`: the package loads in a fresh process that imports only torch, its
archives reproduce the in-process models, and models needing custom ops are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from openmm_cgml.cli import main as cgml_main
from openmm_cgml.manifest import MANIFEST
from openmm_cgml.packaging import export_simulator
from openmm_cgml.models import ExportError
from openmm_cgml.models.gns import GNSDynamics
from openmm_cgml.training import build_models_from_checkpoint, load_checkpoint, load_config, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(chain_data_dir, tmp_path_factory):
    """A tiny run (10 steps) exported with the CLI: (checkpoint path, export dir)."""
    run = tmp_path_factory.mktemp("export_run")
    config = load_config("chain-tiny", {"data_dir": str(chain_data_dir), "steps": 10, "val_every": 0,
                                        "checkpoint_every": 10, "num_threads": 1})
    train(config, run, progress=False)
    out = run / "exported"
    assert cgml_main(["export", str(run / "checkpoints" / "last.pt"), "-o", str(out)]) == 0
    return run / "checkpoints" / "last.pt", out


def test_package_contents(trained):
    _, out = trained
    assert {p.name for p in out.iterdir()} == {"dynamics.pt", "score.pt", "property.pt", "embedding.pt", MANIFEST}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"]["property"] == "property.pt" and manifest["property"]["min_beads"] == 2
    assert set(manifest["property"]["baselines"]["train"]) >= {"zero_residual", "constant_ratio", "ratio"}
    assert manifest["format"] == "openmm-cgml-simulator/1"
    assert manifest["seq_len"] == 3 and manifest["dilation"] == 1
    assert manifest["step_size_ps"] == pytest.approx(5.0) and manifest["record_interval_ps"] == pytest.approx(5.0)
    assert manifest["cg"]["cg_level"] == 4 and manifest["kind"] == "chain" and manifest["periodic"] is False
    assert manifest["atom_vocabulary"] == ["B1", "B2", "S1", "S2"]
    assert manifest["bond_vocabulary"] == ["backbone", "side"]
    assert manifest["bond_type_of_pair"]["B1|S1"] == "side"
    for key in ("openmm_cgml", "torch", "openmm"):
        assert key in manifest["versions"]
    assert manifest["training_config"]["model"]["backbone"] == "gns"
    saved = torch.load(out / "embedding.pt", weights_only=True)
    assert saved["num_atom_types"] == 4 and "state_dict" in saved


_CHILD = r"""
import sys, torch
d = torch.jit.load(sys.argv[1]); s = torch.jit.load(sys.argv[2])
h, box, f, b, sig = torch.load(sys.argv[3])
mean, std, latent = d(h, box, f, b)
score = s(h[-1], latent, box, f, b, sig)
bad = [k for k in sys.modules if k.split(".")[0] in ("openmm_cgml", "torchmdnet", "warp", "openmm")]
assert not bad, bad
torch.save({"out": (mean, std, latent, score), "seq_len": d.seq_len, "step": d.step_size_ps,
            "K": s.langevin_steps, "sigmas": s.sigmas}, sys.argv[4])
"""


def test_archives_load_in_fresh_process_and_match(trained, chain_data_dir, tmp_path):
    checkpoint, out = trained
    net = build_models_from_checkpoint(load_checkpoint(checkpoint)).eval()
    from openmm_cgml.training import build_datasets

    config = load_config("chain-tiny", {"data_dir": str(chain_data_dir)})
    train_set, _ = build_datasets(config)
    batch = train_set.collate([train_set[4]])
    with torch.no_grad():
        features = net.bead_features(batch)
        inputs = (batch["history"], batch["box"][0], features, batch["cg_bonds"], net.score.sigmas[3].clone())
        mean, std, latent = net.dynamics(*inputs[:4])
        score = net.score(inputs[0][-1], latent, inputs[1], features, inputs[3], inputs[4])
    torch.save(inputs, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(out / "dynamics.pt"), str(out / "score.pt"),
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "out.pt")
    for a, b in zip(got["out"], (mean, std, latent, score)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got["seq_len"] == 3 and got["step"] == 5.0 and got["K"] == 2
    torch.testing.assert_close(got["sigmas"], net.score.sigmas)
    # and LearnedSimulator's features (from embedding.pt) equal the training-time ones
    import openmm_cgml

    sim = openmm_cgml.LearnedSimulator.load(out)
    mapped = sim.beadFeatures(train_set.systems[train_set[4]["system"]].mapping)
    torch.testing.assert_close(torch.from_numpy(mapped), features, rtol=1e-5, atol=1e-6)


_lib = torch.library.Library("cgml_export_test", "DEF")
_lib.define("twice(Tensor x) -> Tensor")
_lib.impl("twice", lambda x: 2.0 * x, "CPU")


class CustomOpDynamics(GNSDynamics):
    def normalized_features(self, features: torch.Tensor) -> torch.Tensor:
        return torch.ops.cgml_export_test.twice((features - self.feature_shift) / self.feature_scale)


def test_export_refuses_custom_ops(trained, tmp_path):
    checkpoint, out = trained
    ckpt = load_checkpoint(checkpoint)
    net = build_models_from_checkpoint(ckpt)
    d = net.dynamics
    bad = CustomOpDynamics(d.num_features, seq_len=d.seq_len, cutoff=ckpt["model_config"]["cutoff"], latent_dim=16, hidden_dim=16,
                           hidden_layers=1, rounds=2, edge_type_dim=4)
    target = tmp_path / "bad"
    target.mkdir()
    (target / "dynamics.pt").write_bytes(b"old")  # a failed export leaves the directory as it was
    with pytest.raises(ExportError, match="custom ops.*cgml_export_test"):
        export_simulator(net.embedding, bad, net.score, ckpt, target)
    assert (target / "dynamics.pt").read_bytes() == b"old" and not (target / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temporary directory left
    # the same models without the custom op export fine
    export_simulator(net.embedding, net.dynamics, net.score, ckpt, tmp_path / "good")
    assert (tmp_path / "good" / MANIFEST).exists()


def test_cli_reports_export_errors(trained, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained
    import openmm_cgml.packaging as export_module

    def refuse(*args, **kwargs):
        raise ExportError("dynamics module uses custom ops ['ops.warp.x']")

    monkeypatch.setattr(export_module, "export_simulator", refuse)
    assert cgml_main(["export", str(checkpoint), "-o", str(tmp_path / "x")]) == 2
    assert "custom ops" in capsys.readouterr().err


def test_model_dir_without_property_head_still_loads(trained, tmp_path):
    """A model exported before the property head (no property.pt, no files.property)."""
    import shutil

    from openmm_cgml.simulator import LearnedSimulator

    _, out = trained
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "property.pt").unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["files"]["property"], manifest["property"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    sim = LearnedSimulator.load(old)
    assert not sim.hasPropertyHead and sim.propertyPath is None
    with pytest.raises(ValueError, match="no property head"):
        sim.fineRg2(None, torch.zeros(4, 3).numpy())
    assert LearnedSimulator.load(out).hasPropertyHead


def test_export_sets_langevin_defaults(trained, chain_data_dir, tmp_path, capsys):
    """Inference settings chosen after training reach the score archive (what the
    integrator starts from) and the manifest; bad values are refused before writing."""
    from openmm_cgml.simulator import LearnedSimulator

    checkpoint, default_dir = trained
    default = json.loads((default_dir / MANIFEST).read_text())
    out = tmp_path / "k1"
    assert cgml_main(["export", str(checkpoint), "-o", str(out), "--langevin-steps", "1",
                      "--langevin-step-size", "2.5e-3", "--langevin-schedule", "ncsn"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert default["langevin_steps"] != 1
    assert manifest["langevin_steps"] == 1 and manifest["langevin_step_size_nm2"] == pytest.approx(2.5e-3)
    assert manifest["model_config"]["langevin_schedule"] == "ncsn"
    score = torch.jit.load(str(out / "score.pt"))
    assert (score.langevin_steps, score.langevin_schedule) == (1, "ncsn")
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    learned = LearnedSimulator.load(out)
    integrator = learned.createIntegrator(learned.coarseGrain(
        load_trajectory(list_trajectories(chain_data_dir, split="test")[0])), seed=1)
    assert integrator.getLangevinSteps() == 1 and integrator.getLangevinSchedule() == "ncsn"
    assert integrator.getLangevinStepSize() == pytest.approx(2.5e-3)
    # a shortened ladder: the smallest levels, and the network reads sigma as trained
    short = tmp_path / "short"
    assert cgml_main(["export", str(checkpoint), "-o", str(short), "--langevin-levels", "2"]) == 0
    full_ladder = torch.jit.load(str(default_dir / "score.pt"))
    cut = torch.jit.load(str(short / "score.pt"))
    assert torch.equal(cut.sigmas, full_ladder.sigmas[-2:])
    assert json.loads((short / MANIFEST).read_text())["sigmas_nm"] == pytest.approx(full_ladder.sigmas[-2:].tolist())
    n, latent_dim = 6, full_ladder.latent_dim
    inputs = (torch.randn(n, 3), torch.randn(n, latent_dim), torch.zeros(3, 3),
              torch.randn(n, full_ladder.num_features), torch.zeros(0, 2, dtype=torch.long), full_ladder.sigmas[-1])
    torch.testing.assert_close(cut(*inputs), full_ladder(*inputs))
    # ... which the integrator does at run time too: the whole ladder told to refine over its
    # 2 smallest levels rolls out what the shortened archive does, noise and all
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    runs = []
    for directory, langevin in ((default_dir, {"langevinLevels": 2}), (short, {})):
        model = LearnedSimulator.load(directory)
        cg = model.coarseGrain(record)
        runs.append(model.rollout(cg, cg.map_trajectory(record)[: model.seqLen], 5, seed=3, langevin=langevin))
    np.testing.assert_allclose(runs[0].positions, runs[1].positions, rtol=0, atol=1e-5)
    plain = LearnedSimulator.load(default_dir)
    cg = plain.coarseGrain(record)
    assert not np.allclose(plain.rollout(cg, cg.map_trajectory(record)[: plain.seqLen], 5, seed=3).positions,
                           runs[0].positions, atol=1e-5)
    for bad, message in ((["--langevin-steps", "-1"], "model.langevin_steps: must be >= 0"),
                         (["--langevin-step-size", "0"], "model.langevin_step_size: must be a positive finite number"),
                         (["--langevin-schedule", "linear"], "model.langevin_schedule: must be 'constant' or 'ncsn'"),
                         (["--langevin-levels", "0"], "integer from 1 to the ladder's")):
        assert cgml_main(["export", str(checkpoint), "-o", str(tmp_path / "bad")] + bad) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()

