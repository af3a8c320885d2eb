"""Rollout validation: its metrics against known answers, the trainer choosing best.pt
by them, and export taking best.pt unless --last."""
import csv

import numpy as np
import pytest
import torch

from openmm_cgml.training import build_datasets, load_checkpoint, load_config, train
from openmm_cgml.validation import RolloutValidator, _script_bytes

torch.set_num_threads(1)


def tiny_config(data_dir, **overrides):
    return load_config("chain-tiny", {"data_dir": str(data_dir), "num_threads": 1, **overrides})


@pytest.fixture(scope="module")
def validator(chain_data_dir):
    _, val_set = build_datasets(tiny_config(chain_data_dir))
    return RolloutValidator(val_set, dilation=1, n_steps=10, n_starts=2), val_set


def reference_frames(val_set):
    return [t.positions.astype(np.float64) for t in val_set.trajectories]


def test_reference_as_rollout_scores_zero(validator):
    validator, val_set = validator
    assert len(validator.systems) == 1 and len(validator.systems[0].starts) == 2
    metrics = validator.compare([[x] for x in reference_frames(val_set)])
    assert metrics["rollout_rg2_bias"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["reference_collisions"] > 0  # 1 % quantile threshold: a few close pairs
    assert metrics["rollout_collisions"] == pytest.approx(metrics["reference_collisions"])
    # the reference segments that follow each start, as rollouts: same relaxation
    (system,) = validator.systems
    segments = [[x[first:] for first in system.start_frames] for x in reference_frames(val_set)]
    assert validator.compare(segments)["rollout_relaxation_error"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["rollout_score"] == pytest.approx(abs(metrics["rollout_relaxation_error"]), abs=1e-9)


def test_shrunken_chains_show_negative_bias_and_collisions(validator):
    validator, val_set = validator
    shrunk = []
    for x in reference_frames(val_set):
        centre = x.mean(axis=1, keepdims=True)
        shrunk.append([centre + 0.7 * (x - centre)])
    metrics = validator.compare(shrunk)
    assert metrics["rollout_rg2_bias"] == pytest.approx(0.7 ** 2 - 1, rel=1e-6)  # Rg^2 scales as s^2
    assert metrics["rollout_collisions"] > 3 * metrics["reference_collisions"]
    unscaled = validator.compare([[x] for x in reference_frames(val_set)])
    # scaling leaves the normalised ACF alone: the score grows by exactly the bias
    assert metrics["rollout_relaxation_error"] == pytest.approx(unscaled["rollout_relaxation_error"], abs=1e-9)
    assert metrics["rollout_score"] == pytest.approx(0.51 + unscaled["rollout_score"], rel=1e-6)
    assert validator.compare(shrunk, failures=1)["rollout_score"] == float("inf")


def test_rollouts_run_through_the_integrator(validator, chain_data_dir):
    """An untrained network rolls out for n_steps from each start (no failure), with
    finite metrics; a zeroed decoder (mean acceleration 0: ballistic drift at the start
    velocities) makes the chain grow."""
    from openmm_cgml.models.net import CGMLNet

    validator, val_set = validator
    config = tiny_config(chain_data_dir)
    net = CGMLNet(config.model_config(5.0), len(val_set.atom_vocabulary), len(val_set.bond_vocabulary)).eval()
    system = validator.systems[0]
    features = torch.ones(len(system.masses), net.embedding.num_features)
    frames, failed = validator._rollout(system, _script_bytes(net.dynamics, "dynamics"), None, features,
                                        system.starts[0], seed=3)
    assert not failed and frames.shape == (11, len(system.masses), 3)
    np.testing.assert_allclose(frames[0], system.starts[0][-1])
    assert np.abs(frames[-1] - frames[0]).max() > 1e-3  # it moved
    metrics = validator.evaluate(net)
    assert metrics["rollout_failures"] == 0 and np.isfinite(metrics["rollout_score"])
    with torch.no_grad():
        for p in net.dynamics.parameters():
            p.zero_()
        net.dynamics.set_normalization(1.0, 1e-6, torch.zeros(net.embedding.num_features),
                                       torch.ones(net.embedding.num_features))
    drifting = validator.evaluate(net)
    assert drifting["rollout_rg2_bias"] > 0.5, drifting


def test_trainer_picks_best_by_rollout_and_export_takes_it(chain_data_dir, tmp_path):
    from openmm_cgml.packaging import export_checkpoint, run_checkpoint

    config = tiny_config(chain_data_dir, steps=30, val_every=10, checkpoint_every=30,
                         rollout={"steps": 5, "starts": 1})
    train(config, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["val_rollout_score"]]
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30]
    best_step = min((float(r["val_rollout_score"]), int(r["step"])) for r in rows if int(r["step"]) > 0)[1]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["selected_by"] == "val_rollout_score" and best["step"] == best_step
    assert run_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "best.pt"
    assert run_checkpoint(tmp_path / "run", last=True) == tmp_path / "run" / "checkpoints" / "last.pt"
    model = export_checkpoint(tmp_path / "run", tmp_path / "model", verify=False)
    import json

    assert json.loads((model / "simulator.json").read_text())["checkpoint"]["step"] == best_step
    # rollouts off: selection by the validation NLL, as before
    config = tiny_config(chain_data_dir, steps=10, val_every=5, checkpoint_every=10, rollout={"enabled": False})
    train(config, tmp_path / "nll", progress=False)
    assert load_checkpoint(tmp_path / "nll" / "checkpoints" / "best.pt")["selected_by"] == "val_dynamics"


def test_checkpoint_and_distance_limits_are_chosen_by_rollouts_after_training(chain_data_dir, tmp_path):
    import json

    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.training import bond_length_limit, build_datasets, exclusion_distance

    config = tiny_config(chain_data_dir, steps=10, val_every=5, checkpoint_every=5,
                         rollout={"steps": 5, "starts": 1}, exclusion_calibration=[0.0, 0.3])
    train(config, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "exclusion_calibration.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # candidates: best.pt and the step checkpoints of the second half (steps 5 and 10)
    assert sorted({int(r["step"]) for r in rows}) == [5, 10]
    assert {float(r["quantile"]) for r in rows} == {0.0, 0.3}
    chosen = [r for r in rows if r["chosen"] == "True"]
    assert len(chosen) == 1 and float(chosen[0]["rollout_score"]) == min(float(r["rollout_score"]) for r in rows)
    train_set, _ = build_datasets(config)
    off = [r for r in rows if float(r["quantile"]) == 0.0][0]
    on = [r for r in rows if float(r["quantile"]) == 0.3][0]
    assert float(off["distance_nm"]) == 0.0 and float(off["bond_limit_nm"]) == 0.0
    assert float(on["distance_nm"]) == pytest.approx(exclusion_distance(train_set, 0.3))
    assert float(on["bond_limit_nm"]) == pytest.approx(bond_length_limit(train_set, 0.3))
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["step"] == int(chosen[0]["step"])
    assert best["exclusion_distance"] == pytest.approx(float(chosen[0]["distance_nm"]))
    assert best["bond_length_limit"] == pytest.approx(float(chosen[0]["bond_limit_nm"]))
    assert best["metrics"]["val_rollout_score"] == pytest.approx(float(chosen[0]["rollout_score"]))
    manifest = json.loads((export_checkpoint(tmp_path / "run", tmp_path / "model", verify=False)
                           / "simulator.json").read_text())
    assert manifest["exclusion_distance_nm"] == pytest.approx(best["exclusion_distance"])
    assert manifest["bond_length_limit_nm"] == pytest.approx(best["bond_length_limit"])
    assert manifest["checkpoint"]["step"] == best["step"]
    # a rerun of the finished run (--resume) keeps the choice (and does not redo it)
    written = (tmp_path / "run" / "exclusion_calibration.csv").stat().st_mtime_ns
    train(config, tmp_path / "run", resume=True, progress=False)
    again = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert again["exclusion_calibration"]["chosen_step"] == best["exclusion_calibration"]["chosen_step"]
    assert again["exclusion_distance"] == best["exclusion_distance"]
    assert (tmp_path / "run" / "exclusion_calibration.csv").stat().st_mtime_ns == written


def test_untrained_step_zero_scoring_best_does_not_block_best_pt(chain_data_dir, tmp_path, monkeypatch):
    """The step-0 rollouts are a baseline without a checkpoint: best.pt must still be written
    (the demo's untrained networks once scored best, and no best.pt ever existed)."""
    calls = []

    def fake_evaluate(self, net):
        calls.append(1)
        score = 0.0 if len(calls) == 1 else float(len(calls))  # step 0 best, then worse and worse
        return {"rollout_score": score, "rollout_rg2_bias": 0.0, "rollout_collisions": 0.0,
                "reference_collisions": 0.0, "rollout_failures": 0.0, "rollout_relaxation_error": 0.0}

    monkeypatch.setattr(RolloutValidator, "evaluate", fake_evaluate)
    config = tiny_config(chain_data_dir, steps=10, val_every=5, checkpoint_every=10, rollout={"steps": 5, "starts": 1})
    train(config, tmp_path / "run", progress=False)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["step"] == 5  # the first trained step, the best of the trained ones
