"""K replicas advanced in one integrator call behave as K separate rollouts."""
import numpy as np
import pytest

from openmm_cgml.simulator import LearnedSimulator
from openmm_cgml.trajectories import list_trajectories, load_trajectory


@pytest.fixture(scope="module")
def setup(chain_data_dir):
    learned = LearnedSimulator.pretrained("chain")
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = learned.coarseGrain(record, masses=np.ones(record.n_atoms))
    frames = cg.mapping.map_positions(record.positions)[::learned.dilation]
    seq = learned.seqLen
    histories = np.stack([frames[i:i + seq] for i in (0, 2, 5)])  # three different start windows
    return learned, cg, histories


def test_stochastic_replicas_run_and_keep_their_starts(setup):
    learned, cg, histories = setup
    runs = learned.rollout_replicas(cg, histories, 6, seed=3)  # with score refinement
    assert [r.label for r in runs] == ["replica 0", "replica 1", "replica 2"]
    for history, run in zip(histories, runs):
        assert run.positions.shape == (7, cg.n_beads, 3) and run.failure is None
        np.testing.assert_allclose(run.positions[0], history[-1], atol=1e-5)
        assert np.all(np.isfinite(run.positions))
    # different noise per replica: the moves differ even from the same start
    same = learned.rollout_replicas(cg, np.stack([histories[0]] * 2), 3, seed=3)
    assert not np.allclose(same[0].positions[1:], same[1].positions[1:])


def test_deterministic_replicas_equal_single_runs(setup, monkeypatch):
    learned, cg, histories = setup
    original = learned.createIntegrator

    def deterministic(*args, **kwargs):
        kwargs["deterministic"] = True
        return original(*args, **kwargs)

    monkeypatch.setattr(learned, "createIntegrator", deterministic)
    together = learned.rollout_replicas(cg, histories, 5, score=False)
    for history, replica in zip(histories, together):
        alone = learned.rollout(cg, history, 5, score=False)
        np.testing.assert_allclose(replica.positions, alone.positions, atol=2e-4)


def test_replicas_refuse_bad_input(setup):
    learned, cg, histories = setup
    with pytest.raises(ValueError, match=r"histories must be \[K, T"):
        learned.rollout_replicas(cg, histories[0], 2)
    with pytest.raises(ValueError, match="integer >= 1"):
        cg.mapping.replicate(0)


def test_close_replicas_warn(setup):
    learned, cg, histories = setup
    with pytest.warns(UserWarning, match="within the model cutoff"):
        learned.rollout_replicas(cg, histories[:2], 1, score=False, spacing=1.0)
