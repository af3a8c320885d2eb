"""TorchScript models with closed-form behaviour, made by the tests, following the
integrator's TorchScript contract (docs/contract.md)."""

from typing import Tuple

import torch


class HarmonicDynamics(torch.nn.Module):
    """mean = -k x_t (+ drift), std = s: a deterministic harmonic recurrence when s = 0."""

    seq_len: int
    step_size_ps: float

    def __init__(self, k: float = 0.1, std: float = 0.0, seq_len: int = 3, step_size_ps: float = 0.5,
                 drift=(0.0, 0.0, 0.0), latent_size: int = 4):
        super().__init__()
        self.seq_len = seq_len
        self.step_size_ps = step_size_ps
        self.k = k
        self.std = std
        self.latent_size = latent_size
        self.register_buffer("drift", torch.tensor(drift, dtype=torch.float32))

    def forward(self, history: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = history[-1]
        mean = -self.k * x + self.drift
        return mean, torch.full_like(x, self.std), torch.zeros(x.shape[0], self.latent_size)


class InputEcho(torch.nn.Module):
    """mean = [features[:,0], bond degree, box[0,0]] * 1e-3: proves what the integrator passes."""

    seq_len: int
    step_size_ps: float

    def __init__(self, seq_len: int = 2, step_size_ps: float = 1.0):
        super().__init__()
        self.seq_len = seq_len
        self.step_size_ps = step_size_ps

    def forward(self, history: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = history.shape[1]
        degree = torch.zeros(n)
        if bonds.shape[0] > 0:
            degree.index_add_(0, bonds.reshape(-1), torch.ones(bonds.numel()))
        first = features[:, 0] if features.shape[1] > 0 else torch.zeros(n)
        mean = torch.stack([first, degree, box[0, 0].expand(n)], dim=1) * 1e-3
        return mean, torch.zeros(n, 3), torch.zeros(n, 1)


class BadShapeDynamics(torch.nn.Module):
    seq_len: int
    step_size_ps: float

    def __init__(self, mode: str):
        super().__init__()
        self.seq_len = 2
        self.step_size_ps = 1.0
        self.mode = mode

    def forward(self, history: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = history[-1]
        if self.mode == "shape":
            return x[:, :2], torch.zeros_like(x), torch.zeros(x.shape[0], 2)
        if self.mode == "dtype":
            return x.double(), torch.zeros_like(x), torch.zeros(x.shape[0], 2)
        if self.mode == "nan-after-3":
            # NaN once the newest frame has moved 3 steps (x grows by 1 nm per step)
            mean = torch.where(x[0, 0] > 2.5, torch.full_like(x, float("nan")), torch.ones_like(x))
            return mean, torch.zeros_like(x), torch.zeros(x.shape[0], 2)
        raise RuntimeError("unknown mode " + self.mode)


class GaussianScore(torch.nn.Module):
    """Score of N(centre, tau^2) per coordinate, whatever sigma: closed-form Langevin."""

    sigmas: torch.Tensor
    langevin_steps: int
    langevin_step_size: float

    def __init__(self, tau: float = 0.2, centre: float = 0.0, sigmas=(0.3, 0.1, 0.03),
                 langevin_steps: int = 5, langevin_step_size: float = 1e-3):
        super().__init__()
        self.tau = tau
        self.centre = centre
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float32))
        self.langevin_steps = langevin_steps
        self.langevin_step_size = langevin_step_size

    def forward(self, x: torch.Tensor, latent: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -(x - self.centre) / (self.tau * self.tau)


def save(module: torch.nn.Module, path) -> str:
    torch.jit.script(module).save(str(path))
    return str(path)


class ExcludingDynamics(HarmonicDynamics):
    """HarmonicDynamics declaring the optional contract attribute exclusion_distance (nm)."""

    exclusion_distance: float

    def __init__(self, exclusion_distance: float, **kwargs):
        super().__init__(**kwargs)
        self.exclusion_distance = exclusion_distance


class LimitedDynamics(HarmonicDynamics):
    """HarmonicDynamics declaring the optional contract attribute bond_length_limit (nm)."""

    bond_length_limit: float

    def __init__(self, bond_length_limit: float, **kwargs):
        super().__init__(**kwargs)
        self.bond_length_limit = bond_length_limit
