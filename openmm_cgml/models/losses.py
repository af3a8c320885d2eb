"""Training losses (METHOD.md steps 4 and 5) and the dynamics training noise.

All functions work on batched graphs: beads of B graphs concatenated along the bead
axis with ``batch`` [N] giving each bead's graph, as in ``openmm_cgml.dataset``'s
batches. Random draws take an optional ``torch.Generator`` for reproducibility.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def acceleration_target(history: Tensor, next_frame: Tensor) -> Tensor:
    """a = x_{t+1} - 2 x_t + x_{t-1}: the acceleration (nm/step^2) whose Euler update
    v = (x_t - x_{t-1}) + a, x_{t+1} = x_t + v lands on ``next_frame``."""
    if history.dim() != 3 or history.size(0) < 2:
        raise ValueError("history must be [T >= 2, N, 3]")
    if next_frame.shape != history.shape[1:]:
        raise ValueError("next_frame must be [N, 3] like one history frame")
    return next_frame - 2.0 * history[-1] + history[-2]


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Mean Gaussian negative log-likelihood per component. ``scale`` (e.g. the model's
    acceleration_scale) only shifts the value to network units; gradients are unchanged."""
    if not (mean.shape == std.shape == target.shape):
        raise ValueError("mean, std and target must have the same shape")
    if scale is not None:
        mean, std, target = mean / scale, std / scale, target / scale
    z = (target - mean) / std
    return (torch.log(std) + 0.5 * z.square()).mean() + 0.5 * math.log(2.0 * math.pi)


def sample_graph_sigmas(ladder: Tensor, num_graphs: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """One sigma per graph, drawn uniformly from the ladder."""
    index = torch.randint(0, ladder.numel(), (num_graphs,), generator=generator, device=ladder.device)
    return ladder[index]


def _num_graphs(batch: Tensor) -> int:
    return int(batch.max()) + 1 if batch.numel() > 0 else 0


def add_history_noise(history: Tensor, batch: Tensor, ladder: Tensor,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Training noise for the dynamics GNN: each graph's input frames get i.i.d.
    Gaussian position noise with one sigma per graph drawn from ``ladder`` (nm)."""
    sigma = sample_graph_sigmas(ladder.to(history.dtype), _num_graphs(batch), generator)[batch]
    noise = torch.randn(history.shape, generator=generator, dtype=history.dtype, device=history.device)
    return history + noise * sigma.view(1, -1, 1)


def dynamics_loss(model, history: Tensor, next_frame: Tensor, boxes: Tensor, features: Tensor,
                  bonds: Tensor, batch: Tensor, noise_ladder: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None):
    """Gaussian NLL of the acceleration. With ``noise_ladder`` the inputs are noised and
    the target stays clean: the acceleration that brings the noisy state to the clean
    next frame, so the model learns to correct drift. Returns (loss, latent)."""
    if noise_ladder is not None:
        history = add_history_noise(history, batch, noise_ladder, generator)
    mean, std, latent = model.forward_batch(history, boxes, features, bonds, batch)
    target = acceleration_target(history, next_frame)
    return gaussian_nll(mean, std, target, model.acceleration_scale), latent


def dsm_loss(model, x: Tensor, latent: Tensor, boxes: Tensor, features: Tensor, bonds: Tensor,
             batch: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Denoising score matching (NCSN, anneal power 2): sigma per graph from
    ``model.sigmas``; x~ = x + sigma z; target = -(x~ - x)/sigma^2;
    loss = 0.5 |score - target|^2 sigma^2, summed over xyz, mean over beads."""
    sigma = sample_graph_sigmas(model.sigmas.to(x.dtype), _num_graphs(batch), generator)[batch].unsqueeze(1)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    noisy = x + sigma * z
    score = model.forward_batch(noisy, latent, boxes, features, bonds, batch, sigma)
    target = -(noisy - x) / sigma.square()
    return 0.5 * ((score - target).square().sum(dim=1) * sigma.square().squeeze(1)).mean()


def batch_losses(embedding, dynamics, score, batch: dict, noise_ladder: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None, detach_latent: bool = False) -> dict:
    """Both losses for one ``openmm_cgml.dataset`` batch (keys history, target, batch,
    cg_bonds, box, atom_type, atom_masses, fine_bonds, bond_type, bead_of_atom).

    The embedding GNN is trained through the dynamics loss; the score model gets the
    dynamics latent (detached if ``detach_latent``)."""
    history = batch["history"]
    features = embedding.bead_features(
        batch["atom_type"], batch["atom_masses"], batch["fine_bonds"], batch["bond_type"],
        batch["bead_of_atom"], history.size(1),
    )
    nll, latent = dynamics_loss(
        dynamics, history, batch["target"], batch["box"], features, batch["cg_bonds"], batch["batch"],
        noise_ladder, generator,
    )
    if detach_latent:
        latent = latent.detach()
    dsm = dsm_loss(score, batch["target"], latent, batch["box"], features, batch["cg_bonds"], batch["batch"], generator)
    return {"dynamics": nll, "score": dsm}


def trajectory_statistics(positions: Tensor, dilation: int = 1) -> tuple[float, float]:
    """(velocity std, acceleration std) per component, nm/step and nm/step^2, of a CG
    trajectory [F, N, 3] (unwrapped) at one learned step = ``dilation`` frames."""
    positions = torch.as_tensor(positions, dtype=torch.float64)
    frames = positions[::dilation]
    if frames.size(0) < 3:
        raise ValueError("need at least 3 frames at the given dilation")
    velocity = frames[1:] - frames[:-1]
    acceleration = velocity[1:] - velocity[:-1]
    return float(velocity.std()), float(acceleration.std())
