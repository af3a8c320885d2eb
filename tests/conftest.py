"""Shared fixtures: one small generated chain data set per test session (CPU, 1 thread)."""
from __future__ import annotations

import pytest

# 2 train + 1 test chains of 8 monomers (16 beads), 10 tau equilibration, 30 frames (150 tau)
_CHAIN_SETTINGS = dict(n_train=2, n_test=1, n_monomers=8, equilibration_tau=10.0, n_frames=30)


@pytest.fixture(scope="session")
def chain_settings():
    """The make_specs overrides (plus n_frames) used for ``chain_data_dir``."""
    return dict(_CHAIN_SETTINGS)


@pytest.fixture(scope="session")
def chain_data_dir(tmp_path_factory):
    """A generated chain data set (see ``chain_settings``)."""
    from openmm_cgml.generate import generate_dataset

    out = tmp_path_factory.mktemp("chain_data")
    overrides = {k: v for k, v in _CHAIN_SETTINGS.items() if k != "n_frames"}
    generate_dataset("chain", "tiny", out, seed=3, overrides=overrides,
                     n_frames=_CHAIN_SETTINGS["n_frames"], platform="CPU", threads=1, progress=False)
    return out


@pytest.fixture(scope="session")
def exported_tiny_model(chain_data_dir, tmp_path_factory):
    """A chain-tiny model trained for a few steps on ``chain_data_dir`` and exported."""
    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.training import load_config, train

    run = tmp_path_factory.mktemp("tiny_run")
    config = load_config("chain-tiny", {"data_dir": str(chain_data_dir), "steps": 20, "val_every": 0,
                                        "checkpoint_every": 20, "num_threads": 1})
    train(config, run, progress=False)
    return export_checkpoint(run, run / "exported")
