"""Symmetries: `et` is E(3)-equivariant (mean and score rotate, std and latent are
invariant); `gns` is translation-invariant (and, as a check that the equivariance test
can fail, not rotation-equivariant)."""
import pytest
import torch

from openmm_cgml.models import ModelConfig, build_dynamics_model, build_score_model

torch.set_num_threads(1)

N_BEADS = 24
NUM_FEATURES = 6


def small_config(backbone):
    return ModelConfig(backbone=backbone, seq_len=4, cutoff=0.6, latent_dim=32, hidden_dim=32, rounds=2,
                       num_heads=4, num_rbf=8, edge_type_dim=4)


def rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def inputs(periodic, seed=0):
    g = torch.Generator().manual_seed(seed)
    box = torch.tensor([[1.8, 0.0, 0.0], [0.3, 1.7, 0.0], [-0.2, 0.4, 1.9]], dtype=torch.float64) if periodic \
        else torch.zeros(3, 3, dtype=torch.float64)
    start = torch.rand(N_BEADS, 3, dtype=torch.float64, generator=g) * 1.6
    history = start + torch.cumsum(0.02 * torch.randn(4, N_BEADS, 3, dtype=torch.float64, generator=g), dim=0)
    features = torch.randn(N_BEADS, NUM_FEATURES, dtype=torch.float64, generator=g)
    features[:, -1] = 20 + 10 * torch.rand(N_BEADS, dtype=torch.float64, generator=g)
    bonds = torch.stack([torch.arange(0, N_BEADS - 1, 2), torch.arange(1, N_BEADS, 2)], dim=1)
    return history, box, features, bonds


def models(backbone):
    torch.manual_seed(0)
    config = small_config(backbone)
    dynamics = build_dynamics_model(config, NUM_FEATURES).double().eval()
    score = build_score_model(config, NUM_FEATURES).double().eval()
    # non-trivial normalisation so the buffers take part in the check
    dynamics.set_normalization(0.02, 0.01, torch.zeros(NUM_FEATURES), torch.ones(NUM_FEATURES))
    return dynamics, score


def run(dynamics, score, history, box, features, bonds):
    mean, std, latent = dynamics(history, box, features, bonds)
    sigma = torch.tensor(0.05, dtype=torch.float64)
    s = score(history[-1] + 0.03, latent, box, features, bonds, sigma)
    return mean, std, latent, s


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("periodic", [False, True])
def test_et_is_equivariant(periodic):
    dynamics, score = models("et")
    history, box, features, bonds = inputs(periodic)
    rot = rotation(3)
    shift = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    with torch.no_grad():
        mean, std, latent, s = run(dynamics, score, history, box, features, bonds)
        mean_r, std_r, latent_r, s_r = run(dynamics, score, history @ rot.T + shift, box @ rot.T, features, bonds)
    assert mean.abs().max() > 0 and s.abs().max() > 0
    assert rel_err(mean_r, mean @ rot.T) < 1e-5
    assert rel_err(s_r, s @ rot.T) < 1e-5
    assert rel_err(std_r, std) < 1e-5
    assert rel_err(latent_r, latent) < 1e-5
    # isotropic std: one value per bead
    assert torch.equal(std, std[:, :1].expand(-1, 3))


def test_gns_is_translation_invariant_but_not_rotation_equivariant():
    dynamics, score = models("gns")
    history, box, features, bonds = inputs(periodic=True)
    with torch.no_grad():
        base = run(dynamics, score, history, box, features, bonds)
        # a shift by a lattice vector plus a small offset changes neither edges nor output
        shifted = run(dynamics, score, history + box[1] + 0.37, box, features, bonds)
        for a, b in zip(shifted, base):
            assert rel_err(a, b) < 1e-7
        history_np, box_np, _, _ = inputs(periodic=False)
        base_np = run(dynamics, score, history_np, box_np, features, bonds)
        rot = rotation(3)
        rotated = run(dynamics, score, history_np @ rot.T, box_np, features, bonds)
    assert rel_err(rotated[0], base_np[0] @ rot.T) > 1e-2
