"""The training objective, in one place: the losses (docs: METHOD steps 4 and 5), the
training noise and the data augmentation. ``openmm_cgml.training`` and the tests use these
functions and nothing else.

All functions work on batched graphs: beads of B graphs concatenated along the bead
axis with ``batch`` [N] giving each bead's graph, as in ``openmm_cgml.dataset``'s
batches. Every random draw of a training sample comes from a generator seeded by
(seed, step, system, start frame) of that sample (``sample_generator``), so a sample's
noise does not depend on which batch, DDP rank or resumed run it lands in.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor


# ----------------------------------------------------------------------------- losses
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


def dynamics_loss(model, history: Tensor, next_frame: Tensor, boxes: Tensor, features: Tensor,
                  bonds: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
    """Gaussian NLL of the acceleration that takes ``history`` (possibly noised: then
    the model learns to correct drift) to the clean ``next_frame``. Returns (loss, latent)."""
    mean, std, latent = model.forward_batch(history, boxes, features, bonds, batch)
    target = acceleration_target(history, next_frame)
    return gaussian_nll(mean, std, target, model.acceleration_scale), latent


def dsm_loss(score: Tensor, noisy: Tensor, clean: Tensor, sigma: Tensor) -> Tensor:
    """Denoising score matching (NCSN, anneal power 2) of a predicted ``score`` at
    ``noisy`` = clean + sigma z; sigma [N, 1] per bead: target = -(noisy - clean)/sigma^2,
    loss = 0.5 |score - target|^2 sigma^2, summed over xyz, mean over beads. A score of
    zero scores 1.5 whatever sigma (the no-information value)."""
    target = -(noisy - clean) / sigma.square()
    return 0.5 * ((score - target).square().sum(dim=1) * sigma.square().squeeze(1)).mean()


def score_loss(model, clean: Tensor, latent: Tensor, boxes: Tensor, features: Tensor, bonds: Tensor,
               batch: Tensor, sigma: Tensor, z: Tensor) -> Tensor:
    """``dsm_loss`` of the score GNN at clean + sigma z (sigma [N] or [N, 1], z [N, 3])."""
    sigma = sigma.reshape(-1, 1).to(clean.dtype)
    noisy = clean + sigma * z.to(clean.dtype)
    score = model.forward_batch(noisy, latent, boxes, features, bonds, batch, sigma)
    return dsm_loss(score, noisy, clean, sigma)


def property_loss(model, positions: Tensor, features: Tensor, molecule: Tensor, target: Tensor) -> Tensor:
    """Property head loss: mean squared *relative* error of the predicted fine-level Rg^2
    per molecule (``models.property.PropertyHead`` on CG ``positions`` [K, 3] of the
    molecules' beads) against the true ``target`` [M] (NaN targets are left out). The
    zero-residual baseline (predict the CG Rg^2) scores mean((Rg^2_CG / Rg^2_fine - 1)^2)."""
    prediction = model(positions, features, molecule)
    keep = torch.isfinite(target) & (target > 0)
    if not bool(keep.any()):
        return prediction.sum() * 0.0
    return ((prediction[keep] - target[keep]) / target[keep]).square().mean()


# ----------------------------------------------------------------------------- randomness
def sample_generator(seed: int, step: int, system: int, start_frame: int) -> torch.Generator:
    """The generator of one training sample's random draws."""
    key = [int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, int(system), int(start_frame)]
    gen_seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(gen_seed)


def random_rotation(generator: torch.Generator) -> Tensor:
    """A uniformly distributed proper rotation [3, 3] (float64), from a normalised
    Gaussian quaternion."""
    q = torch.randn(4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm()).tolist()
    return torch.tensor([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ], dtype=torch.float64)


# rotations by pi about x, y and z (and none): they map an orthorhombic lattice onto itself
_BOX_ROTATIONS = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)


def symmetry_rotation(generator: torch.Generator, box: Tensor) -> Tensor:
    """A random rotation that leaves the system's boundary conditions unchanged: any
    rotation without periodic box (all-zero ``box``), one of the four box-preserving
    rotations by pi of an orthorhombic box, and the identity for a triclinic box."""
    if not bool(box.abs().sum() > 0):
        return random_rotation(generator)
    if bool((box - torch.diag(torch.diagonal(box))).abs().sum() > 0):
        return torch.eye(3, dtype=torch.float64)
    index = int(torch.randint(0, 4, (1,), generator=generator))
    return torch.diag(_BOX_ROTATIONS[index])


def sample_noise(batch: dict, seed: int, step: int, noise_ladder: Optional[Tensor],
                 score_ladder: Optional[Tensor], rotate: bool = False) -> dict[str, Optional[Tensor]]:
    """Every random draw of a training batch, per sample from ``sample_generator``:

    - ``history`` [T, N, 3]: Gaussian position noise on the input frames, one sigma per
      graph from ``noise_ladder`` (the target stays clean), or None;
    - ``score_sigma`` [N], ``score_z`` [N, 3]: the DSM noise level (one per graph, from
      ``score_ladder``) and unit noise, or None;
    - ``rotation`` [N, 3, 3] (float64, per bead): with ``rotate``, a random symmetry
      rotation per graph (``symmetry_rotation``), else None.

    Draw order is fixed (history, score, rotation), so switching one off does not change
    the others."""
    history = batch["history"]
    T = history.size(0)
    hist_parts, sig_parts, z_parts, rot_parts = [], [], [], []
    for g in range(batch["system"].numel()):
        n = int(batch["n_beads"][g])
        gen = sample_generator(seed, step, int(batch["system"][g]), int(batch["start_frame"][g]))
        if noise_ladder is not None:
            level = noise_ladder[torch.randint(0, noise_ladder.numel(), (1,), generator=gen)]
            hist_parts.append(torch.randn(T, n, 3, generator=gen) * level)
        if score_ladder is not None:
            level = score_ladder[torch.randint(0, score_ladder.numel(), (1,), generator=gen)]
            sig_parts.append(level.expand(n))
            z_parts.append(torch.randn(n, 3, generator=gen))
        if rotate:
            rot_parts.append(symmetry_rotation(gen, batch["box"][g]).expand(n, 3, 3))
    return {
        "history": torch.cat(hist_parts, dim=1).to(history.dtype) if hist_parts else None,
        "score_sigma": torch.cat(sig_parts).to(history.dtype) if sig_parts else None,
        "score_z": torch.cat(z_parts).to(history.dtype) if z_parts else None,
        "rotation": torch.cat(rot_parts) if rot_parts else None,
    }


def rotate_positions(positions: Tensor, rotation: Tensor) -> Tensor:
    """Rotate [..., N, 3] positions bead by bead with ``rotation`` [N, 3, 3] (about the
    origin: every backbone sees only relative positions)."""
    rotated = torch.einsum("nij,...nj->...ni", rotation, positions.to(torch.float64))
    return rotated.to(positions.dtype)


# ----------------------------------------------------------------------------- statistics
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
