"""``gns`` backbone: the paper's encode-process-decode MPNN (docs/method.md steps 4 and 5).

Not rotation-equivariant (displacements enter as raw components); translation-invariant
because only velocities and displacements enter."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DynamicsBase, EdgeFeatures, ScoreBase
from .layers import EncodeProcessDecode


class GNSDynamics(DynamicsBase):
    """Node input = seq_len-1 scaled velocities (flattened) ++ standardised bead
    features; decoder -> mean (3) and std = min_std + softplus (3) of the acceleration."""

    def __init__(
        self,
        num_features: int,
        seq_len: int = 20,
        cutoff: float = 0.6,
        step_size_ps: float = 200.0,
        latent_dim: int = 128,
        hidden_dim: int = 128,
        hidden_layers: int = 2,
        rounds: int = 7,
        edge_type_dim: int = 16,
        min_std: float = 0.05,
        activation: str = "silu",
        graph_method: str = "auto",
    ):
        super().__init__(seq_len, num_features, cutoff, step_size_ps, min_std, latent_dim, graph_method)
        self.edge_features = EdgeFeatures(cutoff, edge_type_dim)
        node_in = 3 * (seq_len - 1) + num_features
        self.gnn = EncodeProcessDecode(
            node_in, self.edge_features.dim, 6, latent_dim, hidden_dim, hidden_layers, rounds, activation
        )

    def predict(self, history: Tensor, features: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        n = history.size(1)
        velocities = (history[1:] - history[:-1]) * self.velocity_scale
        node_in = torch.cat(
            [velocities.permute(1, 0, 2).reshape(n, -1), self.normalized_features(features)], dim=1
        )
        out, latent = self.gnn(node_in, self.edge_features(edge_vec, edge_type), senders, receivers)
        mean = out[:, :3] * self.acceleration_scale
        std = (self.min_std + F.softplus(out[:, 3:])) * self.acceleration_scale
        return mean, std, latent


class GNSScore(ScoreBase):
    """Node input = dynamics latent ++ conditions (standardised bead mass, log sigma);
    output 3 per bead."""

    def __init__(
        self,
        latent_dim: int,
        num_features: int,
        sigmas: Tensor,
        cutoff: float = 0.6,
        langevin_steps: int = 5,
        langevin_step_size: float = 5e-7,
        hidden_latent_dim: int = 128,
        hidden_dim: int = 128,
        hidden_layers: int = 2,
        rounds: int = 7,
        edge_type_dim: int = 16,
        activation: str = "silu",
        graph_method: str = "auto",
        sigma_conditioned: bool = True,
    ):
        super().__init__(latent_dim, num_features, cutoff, sigmas, langevin_steps, langevin_step_size, graph_method,
                         sigma_conditioned)
        self.edge_features = EdgeFeatures(cutoff, edge_type_dim)
        self.gnn = EncodeProcessDecode(
            latent_dim + self.num_conditions, self.edge_features.dim, 3, hidden_latent_dim, hidden_dim, hidden_layers, rounds, activation
        )

    def predict(self, latent: Tensor, conditions: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tensor:
        node_in = torch.cat([latent, conditions], dim=1)
        out, _ = self.gnn(node_in, self.edge_features(edge_vec, edge_type), senders, receivers)
        return out
