"""Training: the dynamics GNN overfits one window, the DSM loss of the score GNN falls,
and the dataset-batch loss trains all three networks (embedding included)."""
import math

import pytest
import torch

from openmm_cgml.models import (ModelConfig, acceleration_target, build_dynamics_model, build_embedding_model,
                                build_score_model, dynamics_loss, gaussian_nll, trajectory_statistics)
from openmm_cgml.models.losses import (dsm_loss, random_rotation, rotate_positions, sample_noise, score_loss,
                                       symmetry_rotation)

torch.set_num_threads(1)


def config(backbone="gns"):
    return ModelConfig(backbone=backbone, seq_len=4, cutoff=0.8, latent_dim=32, hidden_dim=32, rounds=2,
                       num_heads=4, num_rbf=8, edge_type_dim=4, type_dim=8, embedding_latent_dim=16,
                       embedding_hidden_dim=16, embedding_rounds=2, embedding_out_dim=8)


def spring_chain(n_beads=6, n_frames=12, seed=0):
    """Damped bead-spring chain integrated with small steps, recorded every 10 steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(n_beads, dtype=torch.float64).unsqueeze(1) * torch.tensor([0.35, 0.1, 0.0], dtype=torch.float64)
    x = x + 0.05 * torch.randn(n_beads, 3, dtype=torch.float64, generator=g)
    v = 0.02 * torch.randn(n_beads, 3, dtype=torch.float64, generator=g)
    frames = []
    for step in range(n_frames * 10):
        bond = x[1:] - x[:-1]
        length = bond.norm(dim=1, keepdim=True)
        f = 5.0 * (length - 0.35) * bond / length
        force = torch.zeros_like(x)
        force[:-1] += f
        force[1:] -= f
        v = 0.995 * v + 0.01 * force
        x = x + 0.01 * v
        if step % 10 == 9:
            frames.append(x.clone())
    return torch.stack(frames).float()


def fine_graph(n_beads):
    """Two atoms per bead: types alternate, bonds inside beads and along the chain."""
    n_atoms = 2 * n_beads
    atom_type = torch.arange(n_atoms) % 3
    atom_masses = torch.where(atom_type == 0, 12.0, 16.0)
    fine_bonds = torch.stack([torch.arange(n_atoms - 1), torch.arange(1, n_atoms)], dim=1)
    bond_type = torch.arange(n_atoms - 1) % 2
    bead_of_atom = torch.arange(n_atoms) // 2
    return atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom


def test_dynamics_overfits_one_window():
    torch.manual_seed(0)
    cfg = config()
    frames = spring_chain()
    n = frames.size(1)
    history, target = frames[:4], frames[4]
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    batch = torch.zeros(n, dtype=torch.long)
    box = torch.zeros(1, 3, 3)
    atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom = fine_graph(n)
    embedding = build_embedding_model(cfg, 3, 2)
    dynamics = build_dynamics_model(cfg)
    v_std, a_std = trajectory_statistics(frames)
    features = embedding.bead_features(atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom, n)
    dynamics.set_normalization(v_std, a_std, features.detach().mean(0), features.detach().std(0))
    params = list(embedding.parameters()) + list(dynamics.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3, foreach=True)
    truth = acceleration_target(history, target)
    losses = []
    for _ in range(150):
        features = embedding.bead_features(atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom, n)
        loss, _ = dynamics_loss(dynamics, history, target, box, features, bonds, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 20.0)
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        features = embedding.bead_features(atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom, n)
        mean, std, _ = dynamics.forward_batch(history, box, features, bonds, batch)
    rel_error = float((mean - truth).norm() / truth.norm())
    assert losses[-1] < losses[0] - 2.0, (losses[0], losses[-1])
    assert rel_error < 0.1, rel_error
    # the learned std shrinks with the error (in network units, min_std = 0.05)
    assert float(std.mean() / dynamics.acceleration_scale) < 0.5


def test_score_dsm_loss_falls():
    """DSM on four fixed noise draws (seeded generators) of four copies of one frame:
    the loss must fall well below the 'predict nothing' level of 1.5. Generalising over
    fresh noise needs far more steps than a unit test can afford."""
    torch.manual_seed(0)
    cfg = config()
    frames = spring_chain(n_beads=8)
    n, copies = frames.size(1), 4
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    bonds = torch.cat([bonds + k * n for k in range(copies)])
    batch = torch.repeat_interleave(torch.arange(copies), n)
    box = torch.zeros(copies, 3, 3)
    features = torch.cat([torch.randn(n, cfg.num_features - 1), torch.full((n, 1), 28.0)], dim=1).repeat(copies, 1)
    latent = torch.randn(n, cfg.latent_dim).repeat(copies, 1)
    x = frames[0].repeat(copies, 1)
    score = build_score_model(cfg)
    # sigmas comparable to the structure (bond 0.35 nm)
    score.set_sigmas(torch.tensor([0.2, 0.1, 0.05]))
    optimizer = torch.optim.Adam(score.parameters(), lr=3e-3, foreach=True)

    def loss_on(seed):
        g = torch.Generator().manual_seed(seed)
        sigma = score.sigmas[torch.randint(0, 3, (copies,), generator=g)][batch]
        return score_loss(score, x, latent, box, features, bonds, batch, sigma, torch.randn(x.shape, generator=g))

    with torch.no_grad():
        before = sum(loss_on(seed).item() for seed in range(4)) / 4
    for step in range(100):
        loss = loss_on(step % 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(loss_on(seed).item() for seed in range(4)) / 4
    assert before > 1.0 and after < 0.65 * before, (before, after)


def test_gaussian_nll_and_noise():
    mean = torch.zeros(4, 3)
    std = torch.full((4, 3), 2.0)
    target = torch.ones(4, 3)
    expected = math.log(2.0) + 0.5 * 0.25 + 0.5 * math.log(2 * math.pi)
    assert abs(gaussian_nll(mean, std, target).item() - expected) < 1e-6
    # network units only shift the value by log(scale)
    scaled = gaussian_nll(mean, std, target, torch.tensor(2.0)).item()
    assert abs(scaled - (expected - math.log(2.0))) < 1e-6
    # DSM: the zero score scores 1.5 (0.5 per axis) at any sigma; the exact score 0
    clean = torch.zeros(2000, 3)
    for level in (0.01, 1.0):
        sigma = torch.full((2000, 1), level)
        noisy = clean + sigma * torch.randn(2000, 3, generator=torch.Generator().manual_seed(1))
        assert abs(dsm_loss(torch.zeros_like(noisy), noisy, clean, sigma).item() - 1.5) < 0.1
        assert dsm_loss(-(noisy - clean) / sigma.square(), noisy, clean, sigma).item() < 1e-8


def two_graph_batch(n=500, box=None):
    """The keys ``sample_noise`` reads, for two graphs of ``n`` beads."""
    return {"history": torch.zeros(3, 2 * n, 3), "n_beads": torch.tensor([n, n]), "system": torch.tensor([0, 1]),
            "start_frame": torch.tensor([7, 7]), "box": torch.zeros(2, 3, 3) if box is None else box}


def test_training_noise_levels_and_per_sample_draws():
    noise = sample_noise(two_graph_batch(), 0, 5, torch.tensor([0.01]), torch.tensor([0.3, 0.2]))
    assert noise["history"].shape == (3, 1000, 3) and abs(noise["history"].std().item() - 0.01) < 1e-3
    # one DSM level per graph, from the ladder
    for sig in (noise["score_sigma"][:500], noise["score_sigma"][500:]):
        assert sig.unique().numel() == 1 and float(sig[0]) in (pytest.approx(0.3), pytest.approx(0.2))
    assert noise["rotation"] is None
    # switching the rotation on adds draws after the others: those stay the same
    rotated = sample_noise(two_graph_batch(), 0, 5, torch.tensor([0.01]), torch.tensor([0.3, 0.2]), rotate=True)
    assert torch.equal(rotated["history"], noise["history"]) and torch.equal(rotated["score_z"], noise["score_z"])


def test_random_rotations_are_proper_and_cover_directions():
    g = torch.Generator().manual_seed(0)
    rotations = torch.stack([random_rotation(g) for _ in range(2000)])
    eye = torch.eye(3, dtype=torch.float64).expand(2000, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(2000, dtype=torch.float64))
    # uniform: the image of a fixed vector has mean ~0 and covariance I/3
    images = rotations @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert images.mean(0).abs().max() < 0.05
    torch.testing.assert_close(images.T @ images / 2000, eye[0] / 3, atol=0.03, rtol=0)
    # an orthorhombic box only gets the rotations by pi that map its lattice onto itself
    box = torch.diag(torch.tensor([3.0, 4.0, 5.0]))
    seen = {tuple(torch.diagonal(symmetry_rotation(g, box)).tolist()) for _ in range(200)}
    assert seen == {(1.0, 1.0, 1.0), (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)}
    triclinic = box.clone()
    triclinic[1, 0] = 1.0
    assert torch.equal(symmetry_rotation(g, triclinic), torch.eye(3, dtype=torch.float64))


def test_rotated_window_gives_rotated_target():
    """Augmentation rotates input frames and target together: the loss of a batch under
    rotation R equals the loss of the model on R-rotated frames with the R-rotated
    acceleration as target; the gns model is not equivariant, so the loss changes."""
    from openmm_cgml.models.net import CGMLNet

    torch.manual_seed(0)
    cfg = config()
    frames = spring_chain(n_beads=6)
    n = frames.size(1)
    atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom = fine_graph(n)
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    batch = {"history": frames[0:4], "target": frames[4], "batch": torch.zeros(n, dtype=torch.long),
             "cg_bonds": bonds, "box": torch.zeros(1, 3, 3), "atom_type": atom_type, "atom_masses": atom_masses,
             "fine_bonds": fine_bonds, "bond_type": bond_type, "bead_of_atom": bead_of_atom,
             "atom_batch": torch.zeros(2 * n, dtype=torch.long), "system": torch.tensor([0]),
             "n_beads": torch.tensor([n]), "start_frame": torch.tensor([0])}
    net = CGMLNet(cfg, 3, 2, with_score=False).eval()
    noise = sample_noise(batch, 0, 0, None, None, rotate=True)
    R = noise["rotation"][0]
    assert not torch.allclose(R, torch.eye(3, dtype=torch.float64))
    with torch.no_grad():
        augmented = net(batch, noise)["dynamics"]
        plain = net(batch, {"rotation": None})["dynamics"]
        features = net.bead_features(batch)
        history = (frames[0:4].double() @ R.T).float()
        target = (frames[4].double() @ R.T).float()
        by_hand, _ = dynamics_loss(net.dynamics, history, target, batch["box"], features, bonds, batch["batch"])
    torch.testing.assert_close(augmented, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acceleration_target(history, target),
                               (acceleration_target(frames[0:4], frames[4]).double() @ R.T).float(),
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # not equivariant: the rotated input does not give the rotated prediction
        mean_rotated = net.dynamics.forward_batch(history, batch["box"], features, bonds, batch["batch"])[0]
        mean_plain = net.dynamics.forward_batch(frames[0:4], batch["box"], features, bonds, batch["batch"])[0]
    mismatch = (mean_rotated - (mean_plain.double() @ R.T).float()).norm() / mean_plain.norm()
    assert mismatch > 0.05, float(mismatch)
    assert float(plain) != float(augmented)
    torch.testing.assert_close(rotate_positions(frames[4], noise["rotation"]), target)


def test_dataset_batch_losses_train_all_networks():
    torch.manual_seed(0)
    cfg = config()
    frames = spring_chain(n_beads=5)
    n = frames.size(1)
    atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom = fine_graph(n)
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    two = lambda t: torch.cat([t, t])  # noqa: E731
    batch = {  # two windows of one system, in openmm_cgml.dataset's batch format
        "history": torch.cat([frames[0:4], frames[3:7]], dim=1),
        "target": torch.cat([frames[4], frames[7]]),
        "batch": torch.repeat_interleave(torch.arange(2), n),
        "cg_bonds": torch.cat([bonds, bonds + n]),
        "box": torch.zeros(2, 3, 3),
        "atom_type": two(atom_type),
        "atom_masses": two(atom_masses),
        "fine_bonds": torch.cat([fine_bonds, fine_bonds + 2 * n]),
        "bond_type": two(bond_type),
        "bead_of_atom": torch.cat([bead_of_atom, bead_of_atom + n]),
    }
    from openmm_cgml.models.net import CGMLNet

    batch.update({"atom_batch": torch.repeat_interleave(torch.arange(2), 2 * n), "system": torch.tensor([0, 0]),
                  "n_beads": torch.tensor([n, n]), "start_frame": torch.tensor([0, 3])})
    net = CGMLNet(cfg, 3, 2)
    embedding, dynamics, score = net.embedding, net.dynamics, net.score
    noise = sample_noise(batch, 0, 0, cfg.noise_sigmas(), score.sigmas, rotate=True)
    losses = net(batch, noise, detach_latent=False)
    losses["total"].backward()
    for model in (embedding, dynamics, score):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), type(model).__name__
    features = embedding.bead_features(batch["atom_type"], batch["atom_masses"], batch["fine_bonds"],
                                       batch["bond_type"], batch["bead_of_atom"], 2 * n)
    assert features.shape == (2 * n, cfg.num_features)
    bead_mass = torch.zeros(2 * n).index_add_(0, batch["bead_of_atom"], batch["atom_masses"])
    torch.testing.assert_close(features[:, -1], bead_mass)


@pytest.mark.parametrize("backbone", ["gns", "et"])
def test_score_network_is_told_sigma(backbone):
    """GNN(x, sigma) = sigma * score depends on sigma when conditioned (the default), and
    not at all when ``score_sigma_input`` is off (the authors' network)."""
    torch.manual_seed(0)
    frames = spring_chain(n_beads=6)
    n = frames.size(1)
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    for conditioned in (True, False):
        cfg = config(backbone)
        cfg.score_sigma_input = conditioned
        score = build_score_model(cfg).eval()
        assert score.sigma_conditioned == conditioned
        features = torch.randn(n, cfg.num_features)
        latent = torch.randn(n, cfg.latent_dim)
        with torch.no_grad():
            a, b = (score(frames[0], latent, torch.zeros(3, 3), features, bonds, torch.tensor(s)) * s
                    for s in (0.05, 0.5))
        difference = float((a - b).abs().max() / a.abs().max())
        assert (difference > 1e-3) if conditioned else (difference < 1e-5), (conditioned, difference)
    # set_sigmas moves the standardisation of log sigma with the ladder
    score.set_sigmas(torch.tensor([0.4, 0.2, 0.1]))
    assert float(score.log_sigma_shift) == pytest.approx(float(torch.log(torch.tensor(0.2))), rel=1e-5)
    with pytest.raises(ValueError):
        score.set_sigmas(torch.tensor([0.1, 0.2]))
