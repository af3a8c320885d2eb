"""Training: losses fall, one window is overfitted, resume == uninterrupted, checkpoints
load with weights_only, same seed -> same losses, DDP (2 ranks) == 1 process."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_cgml.models.losses import sample_noise
from openmm_cgml.training import TrainConfig, build_models_from_checkpoint, load_checkpoint, load_config, train

torch.set_num_threads(1)


def tiny_config(data_dir, **overrides) -> TrainConfig:
    """The chain-tiny preset on the session's chain data (2 train chains -> 1 train + 1 val)."""
    overrides = {"data_dir": str(data_dir), "num_threads": 1, **overrides}
    return load_config("chain-tiny", overrides)


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def column(rows, name):
    return [float(r[name]) for r in rows if r.get(name) not in ("", None)]


def weights(checkpoint) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(checkpoint)
    return {f"{part}.{k}": v for part in ("embedding", "dynamics", "score") for k, v in ckpt[part].items()}


def test_losses_fall_on_tiny_data(chain_data_dir, tmp_path):
    config = tiny_config(chain_data_dir, steps=60, val_every=30, log_every=10, checkpoint_every=60)
    result = train(config, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert result["step"] == 60 and int(rows[-1]["step"]) == 60
    train_nll, val_nll = column(rows, "train_dynamics"), column(rows, "val_dynamics")
    val_dsm = column(rows, "val_score")
    assert len(val_nll) == 3  # step 0, 30, 60
    assert train_nll[-1] < train_nll[0] - 0.1, train_nll
    assert val_nll[-1] < val_nll[0] - 0.1, val_nll
    assert val_dsm[-1] < val_dsm[0], val_dsm
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "config.yaml").exists()
    header = rows[0].keys()
    for name in ("step", "train_dynamics", "train_score", "val_dynamics", "val_score", "lr", "time_s"):
        assert name in header


def test_overfits_one_window(chain_data_dir, tmp_path):
    # memorising one fixed window: no noise, no rotation
    config = tiny_config(chain_data_dir, steps=150, batch_size=1, train_max_windows=1, val_every=0,
                         dynamics_noise=False, augment_rotations=False, checkpoint_every=1000, log_every=150,
                         optimizer={"name": "adam", "lr": 3e-3}, schedule={"name": "constant"})
    train(config, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    net = build_models_from_checkpoint(ckpt).eval()
    from openmm_cgml.training import build_datasets

    train_set, _ = build_datasets(config)
    assert len(train_set) == 1
    batch = train_set.collate([train_set[0]])
    with torch.no_grad():
        features = net.bead_features(batch)
        mean, std, _ = net.dynamics.forward_batch(batch["history"], batch["box"], features, batch["cg_bonds"],
                                                  batch["batch"])
    history = batch["history"]
    true_accel = batch["target"] - 2 * history[-1] + history[-2]
    error = (mean - true_accel).norm() / true_accel.norm()
    assert error < 0.05, f"relative error of the mean acceleration on the memorised window: {error:.3f}"
    assert float(std.mean()) < 0.5 * float(true_accel.abs().mean())


def test_resume_equals_uninterrupted(chain_data_dir, tmp_path):
    # 27 windows / batch 4 = 6 batches per epoch: the interruption at 7 is inside epoch 1
    config = tiny_config(chain_data_dir, steps=14, checkpoint_every=5, val_every=7, log_every=1)
    train(config, tmp_path / "full", progress=False)
    first = train(config, tmp_path / "resumed", progress=False, stop_after=7)
    assert first["step"] == 7
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "resumed", progress=False)
    second = train(config, tmp_path / "resumed", resume=True, progress=False)
    assert second["step"] == 14
    full, resumed = (weights(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose(column(b, "train_total"), column(a, "train_total"), rtol=1e-6)
    np.testing.assert_allclose(column(b, "val_dynamics"), column(a, "val_dynamics"), rtol=1e-6)
    ca, cb = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("full", "resumed"))
    assert (ca["epoch"], ca["batch_in_epoch"]) == (cb["epoch"], cb["batch_in_epoch"])
    for key, value in ca["optimizer"]["state"].items():
        torch.testing.assert_close(cb["optimizer"]["state"][key]["exp_avg"], value["exp_avg"], atol=1e-6, rtol=0)


def _plain(value, path="ckpt"):
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, (str, int)), f"{path}: key {k!r}"
            _plain(v, f"{path}.{k}")
        return
    assert isinstance(value, (list, tuple)), f"{path}: {type(value)}"
    for i, v in enumerate(value):
        _plain(v, f"{path}[{i}]")


def test_checkpoint_loads_with_weights_only(chain_data_dir, tmp_path):
    train(tiny_config(chain_data_dir, steps=3, val_every=0, checkpoint_every=2), tmp_path / "run", progress=False)
    paths = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert [p.name for p in paths] == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    ckpt = torch.load(paths[0], map_location="cpu", weights_only=True)
    _plain(ckpt)
    assert ckpt["format"] == "openmm-cgml-checkpoint/1" and ckpt["step"] == 3
    for key in ("embedding", "dynamics", "score", "optimizer", "scheduler", "rng", "config", "model_config",
                "atom_vocabulary", "bond_vocabulary", "step_size_ps", "mapping_options"):
        assert key in ckpt, key
    assert ckpt["step_size_ps"] == pytest.approx(5.0)
    net = build_models_from_checkpoint(ckpt)
    assert net.dynamics.seq_len == 3 and net.score is not None


def test_score_ladder_from_data_and_dsm_per_level(chain_data_dir, tmp_path):
    config = tiny_config(chain_data_dir, steps=2, val_every=2, checkpoint_every=2, score_ladder_from_data=[3.0, 0.1],
                         rollout={"enabled": False})
    train(config, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    spread = ckpt["data_statistics"]["acceleration_std"]
    assert ckpt["model_config"]["score_sigma_max"] == pytest.approx(3.0 * spread)
    assert ckpt["model_config"]["score_sigma_min"] == pytest.approx(0.1 * spread)
    sigmas = ckpt["score"]["sigmas"]
    assert float(sigmas[0]) == pytest.approx(3.0 * spread, rel=1e-5)
    assert float(sigmas[-1]) == pytest.approx(0.1 * spread, rel=1e-5)
    with open(tmp_path / "run" / "dsm_levels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    levels = len(sigmas)
    assert [int(r["step"]) for r in rows] == [0] * levels + [2] * levels  # step 0 and the end
    assert [float(r["sigma_nm"]) for r in rows[:levels]] == pytest.approx(sigmas.tolist(), rel=1e-5)
    assert all(float(r["no_information"]) == 1.5 and np.isfinite(float(r["val_dsm"])) for r in rows)


def test_same_seed_same_losses(chain_data_dir, tmp_path):
    config = tiny_config(chain_data_dir, steps=8, val_every=4, log_every=1, checkpoint_every=100)
    runs = [read_metrics(train(config, tmp_path / name, progress=False)["out"]) for name in ("a", "b")]
    for name in ("train_dynamics", "train_score", "val_dynamics", "val_score"):
        assert column(runs[0], name) == column(runs[1], name), name
    other = train(tiny_config(chain_data_dir, steps=8, val_every=4, log_every=1, checkpoint_every=100, seed=1),
                  tmp_path / "c", progress=False)
    assert column(read_metrics(other["out"]), "train_total") != column(runs[0], "train_total")


def test_noise_is_per_sample_not_per_batch(chain_data_dir):
    """The same window gets the same draws whatever batch it is in (so DDP and resume
    do not change the randomness)."""
    from openmm_cgml.training import build_datasets

    train_set, _ = build_datasets(tiny_config(chain_data_dir))
    ladder = torch.tensor([0.1, 0.05, 0.01])
    both = sample_noise(train_set.collate([train_set[0], train_set[5]]), 0, 3, ladder, ladder)
    alone = sample_noise(train_set.collate([train_set[5]]), 0, 3, ladder, ladder)
    n = train_set.systems[0].n_beads
    torch.testing.assert_close(both["history"][:, n:], alone["history"], rtol=0, atol=0)
    torch.testing.assert_close(both["score_z"][n:], alone["score_z"], rtol=0, atol=0)
    later = sample_noise(train_set.collate([train_set[5]]), 0, 4, ladder, ladder)
    assert not torch.equal(later["score_z"], alone["score_z"])


def test_bead_features_once_per_system(chain_data_dir):
    """Deduplicated embedding (once per distinct system) == embedding of every graph."""
    from openmm_cgml.models.net import CGMLNet
    from openmm_cgml.training import build_datasets

    config = tiny_config(chain_data_dir, val_fraction=0.0)
    train_set, _ = build_datasets(config)
    assert len(train_set.systems) == 2
    net = CGMLNet(config.model_config(5.0), len(train_set.atom_vocabulary), len(train_set.bond_vocabulary))
    last = len(train_set) - 1  # a window of the second system
    batch = train_set.collate([train_set[0], train_set[last], train_set[1], train_set[last - 1]])
    features = net.bead_features(batch)
    direct = net.embedding.bead_features(batch["atom_type"], batch["atom_masses"], batch["fine_bonds"],
                                         batch["bond_type"], batch["bead_of_atom"], batch["history"].size(1))
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(chain_data_dir, tmp_path):
    """SLOW (~30-50 s): `torchrun --nproc_per_node 2` on the same global batch gives the
    same weights after 2 steps as one process (SGD, so weights differ by lr x grads)."""
    overrides = {"steps": 2, "batch_size": 4, "val_every": 0, "checkpoint_every": 2, "log_every": 1,
                 "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"}}
    config = tiny_config(chain_data_dir, **overrides)
    train(config, tmp_path / "single", progress=False)
    config_file = tmp_path / "ddp.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(config.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a free rendezvous port (a fixed one collides with anything else on it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "openmm_cgml.cli", "train", str(config_file), "--out", str(tmp_path / "ddp"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # Trainer.close joined gloo's worker threads before exit (a worker alive at interpreter
    # exit can abort a rank with "terminate called without an active exception")
    assert "gloo worker threads still running" not in proc.stderr, proc.stderr[-4000:]
    assert "terminate called" not in proc.stderr
    single, ddp = (weights(tmp_path / d / "checkpoints" / "last.pt") for d in ("single", "ddp"))
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    np.testing.assert_allclose(column(b, "train_total"), column(a, "train_total"), rtol=1e-5)
    np.testing.assert_allclose(column(b, "grad_norm"), column(a, "grad_norm"), rtol=1e-5)
    # not vacuous: each SGD step moves weights by lr x |grad| >> the tolerance
    assert min(column(a, "grad_norm")) * 0.05 > 1e-2


def test_property_head_falls_below_the_zero_residual_baseline(chain_data_dir, tmp_path):
    """~10 s. The property head's loss on the training windows falls below its
    no-learning baseline (the CG Rg^2 alone), and is logged beside its baselines."""
    import json

    from openmm_cgml.models.losses import property_loss
    from openmm_cgml.training import build_datasets

    config = tiny_config(chain_data_dir, steps=40, val_every=40, log_every=10, checkpoint_every=40,
                         rollout={"enabled": False})
    assert config.property_weight == 1.0  # on by default
    train(config, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    baselines = json.loads((tmp_path / "run" / "property_baselines.json").read_text())
    assert baselines == ckpt["property_baselines"]
    net = build_models_from_checkpoint(ckpt).eval()
    train_set, _ = build_datasets(config)
    batch = train_set.collate([train_set[i] for i in range(len(train_set))])  # every training window
    with torch.no_grad():
        features = net.bead_features(batch)
        beads = batch["property_bead"]
        loss = float(property_loss(net.property, batch["target"][beads], features[beads],
                                   batch["property_molecule"], batch["fine_rg2"]))
    zero = baselines["train"]["zero_residual"]
    assert baselines["train"]["pairs"] == len(train_set)  # one chain per window
    print(f"property loss on the training windows: head {loss:.3g}, zero residual {zero:.3g}, "
          f"constant ratio {baselines['train']['constant_ratio']:.3g}")
    assert loss < 0.5 * zero, (loss, baselines["train"])

    rows = read_metrics(tmp_path / "run")
    assert column(rows, "train_property") and len(column(rows, "val_property")) == 2  # steps 0 and 40
    # at step 0 the head is the zero-residual baseline (zero output layer)
    assert column(rows, "val_property")[0] == pytest.approx(baselines["val"]["zero_residual"], rel=1e-5)
    assert column(rows, "val_property_zero_residual")[-1] == pytest.approx(baselines["val"]["zero_residual"])
    assert column(rows, "val_property_constant_ratio")[-1] == pytest.approx(baselines["val"]["constant_ratio"])
    assert column(rows, "val_property")[-1] < 0.5 * column(rows, "val_property_zero_residual")[-1]


def test_property_head_leaves_the_other_networks_unchanged(chain_data_dir, tmp_path):
    """~4 s. Training with the head (property_weight 1) gives exactly the embedding,
    dynamics and score weights of training without it (property_weight 0: no head)."""
    common = dict(steps=4, val_every=0, log_every=1, checkpoint_every=4)
    train(tiny_config(chain_data_dir, **common), tmp_path / "head", progress=False)
    train(tiny_config(chain_data_dir, property_weight=0.0, **common), tmp_path / "none", progress=False)
    with_head = load_checkpoint(tmp_path / "head" / "checkpoints" / "last.pt")
    assert with_head["property"] is not None
    assert load_checkpoint(tmp_path / "none" / "checkpoints" / "last.pt")["property"] is None
    a, b = weights(tmp_path / "head" / "checkpoints" / "last.pt"), weights(tmp_path / "none" / "checkpoints" / "last.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert not column(read_metrics(tmp_path / "none"), "train_property")
    assert column(read_metrics(tmp_path / "head"), "train_property")
