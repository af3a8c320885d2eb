"""``et`` backbone: E(3)-equivariant transformer built from torchmd-net's pure-torch
equivariant-transformer blocks (Tholke & De Fabritiis, ICLR 2022).

Differences from torchmd-net's TorchMD_ET, all forced by the CG setting:
- continuous bead features enter through a Linear (TorchMD_ET embeds atomic numbers);
- ET starts vector features at zero; the dynamics model puts the scaled velocity
  history there (a bias-free Linear over the time channel keeps equivariance);
- our own graph (radius + CG bonds, minimum image) replaces OptimizedDistance, whose
  3.x version is a custom op that exported archives could not load;
- the edge features are rbf(r) ++ r/cutoff ++ edge-type embedding, and bond and self
  edges get the full attention weight (CosineCutoff would silence bonds beyond the
  cutoff);
- outputs: two GatedEquivariantBlocks give one vector and one scalar per bead; the
  vector is the mean acceleration (or the score), the scalar an isotropic std, so the
  whole predicted distribution is equivariant.

Only the building blocks come from torchmd-net; scripted modules contain them as plain
TorchScript code, so exported archives load without torchmd-net.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DynamicsBase, ScoreBase
from .graph import NUM_EDGE_TYPES


def _import_torchmdnet_blocks():
    try:
        # torchmd-net 3.x initialises NVIDIA warp on import, which prints a banner
        import warp

        warp.config.log_level = warp.LOG_WARNING
    except (ImportError, AttributeError):
        pass
    try:
        from torchmdnet.models.torchmd_et import EquivariantMultiHeadAttention
        from torchmdnet.models.utils import (
            ExpNormalSmearing,
            GatedEquivariantBlock,
            GaussianSmearing,
            act_class_mapping,
        )
    except ImportError as err:
        raise ImportError(
            "the 'et' backbone needs torchmd-net's building blocks: "
            "pip install torchmd-net==3.1.0 torch==2.13.0"
        ) from err
    return EquivariantMultiHeadAttention, ExpNormalSmearing, GatedEquivariantBlock, GaussianSmearing, act_class_mapping


# CosineCutoff comes in through the attention layer and ExpNormalSmearing
(
    EquivariantMultiHeadAttention,
    ExpNormalSmearing,
    GatedEquivariantBlock,
    GaussianSmearing,
    act_class_mapping,
) = _import_torchmdnet_blocks()

RBF_CLASSES = {"expnorm": ExpNormalSmearing, "gauss": GaussianSmearing}


class ETBackbone(nn.Module):
    """Equivariant transformer on a prebuilt graph. Its arguments keep torchmd-net's
    names: ``hidden_channels`` is the model config's ``latent_dim`` (the score's
    ``hidden_latent_dim``), ``num_layers`` its ``rounds``.

    forward(scalars [N,S], vectors [N,3,C] or None, senders, receivers, edge_vec,
    edge_type) -> (scalar out [N], vector out [N,3], latent scalars [N,hidden])."""

    cutoff: float

    def __init__(
        self,
        scalar_in_dim: int,
        vector_in_channels: int,
        cutoff: float,
        hidden_channels: int = 128,
        num_layers: int = 7,
        num_heads: int = 8,
        num_rbf: int = 32,
        rbf_type: str = "expnorm",
        edge_type_dim: int = 16,
        activation: str = "silu",
        attn_activation: str = "silu",
        distance_influence: str = "both",
    ):
        super().__init__()
        if rbf_type not in RBF_CLASSES:
            raise ValueError(f"unknown rbf_type {rbf_type!r}; choose from {sorted(RBF_CLASSES)}")
        if activation not in act_class_mapping or attn_activation not in act_class_mapping:
            raise ValueError(f"activations must be one of {sorted(act_class_mapping)}")
        if hidden_channels % num_heads != 0 or hidden_channels < 4:
            raise ValueError("hidden_channels must be divisible by num_heads")
        self.cutoff = float(cutoff)
        self.hidden_channels = hidden_channels
        self.scalar_embedding = nn.Linear(scalar_in_dim, hidden_channels)
        # bias-free and acting on the channel axis only: commutes with rotations
        self.vector_embedding: Optional[nn.Linear] = (
            nn.Linear(vector_in_channels, hidden_channels, bias=False) if vector_in_channels > 0 else None
        )
        self.distance_expansion = RBF_CLASSES[rbf_type](0.0, cutoff, num_rbf, True)
        self.edge_type_embedding = nn.Embedding(NUM_EDGE_TYPES, edge_type_dim)
        edge_dim = num_rbf + 1 + edge_type_dim
        act_class = act_class_mapping[activation]
        self.attention_layers = nn.ModuleList(
            [
                EquivariantMultiHeadAttention(
                    hidden_channels, edge_dim, distance_influence, num_heads, act_class,
                    attn_activation, 0.0, cutoff,
                )
                for _ in range(num_layers)
            ]
        )
        self.out_norm = nn.LayerNorm(hidden_channels)
        self.output_blocks = nn.ModuleList(
            [
                GatedEquivariantBlock(hidden_channels, hidden_channels // 2, activation=activation, scalar_activation=True),
                GatedEquivariantBlock(hidden_channels // 2, 1, activation=activation),
            ]
        )

    def forward(self, scalars: Tensor, vectors: Optional[Tensor], senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        x = self.scalar_embedding(scalars)
        vector_embedding = self.vector_embedding
        if vector_embedding is not None and vectors is not None:
            vec = vector_embedding(vectors)
        else:
            vec = torch.zeros(x.size(0), 3, self.hidden_channels, dtype=x.dtype, device=x.device)

        r = torch.linalg.vector_norm(edge_vec, dim=1)
        # self loops have no direction: their unit vector is zero
        unit = edge_vec / torch.where(r > 0, r, torch.ones_like(r)).unsqueeze(1)
        edge_attr = torch.cat(
            [self.distance_expansion(r), (r / self.cutoff).unsqueeze(1), self.edge_type_embedding(edge_type).to(x.dtype)],
            dim=1,
        )
        # ET's CosineCutoff(r) weights attention; bond and self edges (types 1, 2) keep
        # full weight by presenting distance 0 to it
        r_attention = torch.where(edge_type == 0, r, torch.zeros_like(r))
        edge_index = torch.stack([senders, receivers])
        for layer in self.attention_layers:
            dx, dvec = layer(x, vec, edge_index, r_attention, edge_attr, unit)
            x = x + dx
            vec = vec + dvec
        x = self.out_norm(x)
        latent = x
        for block in self.output_blocks:
            x, vec = block(x, vec)
        return x[:, 0], vec[:, :, 0], latent


class ETDynamics(DynamicsBase):
    """Scalars = standardised bead features ++ |v_k| (invariant); vectors = the
    seq_len-1 scaled velocities. mean = vector output, std = isotropic scalar output."""

    def __init__(
        self,
        num_features: int,
        seq_len: int = 20,
        cutoff: float = 0.6,
        step_size_ps: float = 200.0,
        latent_dim: int = 128,
        rounds: int = 7,
        num_heads: int = 8,
        num_rbf: int = 32,
        edge_type_dim: int = 16,
        min_std: float = 0.05,
        activation: str = "silu",
        graph_method: str = "auto",
    ):
        super().__init__(seq_len, num_features, cutoff, step_size_ps, min_std, latent_dim, graph_method)
        self.backbone = ETBackbone(
            num_features + seq_len - 1, seq_len - 1, cutoff, latent_dim, rounds, num_heads,
            num_rbf, "expnorm", edge_type_dim, activation, activation,
        )

    def predict(self, history: Tensor, features: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        velocities = (history[1:] - history[:-1]) * self.velocity_scale  # [T-1, N, 3]
        speeds = torch.linalg.vector_norm(velocities, dim=2).transpose(0, 1)
        scalars = torch.cat([self.normalized_features(features), speeds], dim=1)
        scalar_out, vector_out, latent = self.backbone(
            scalars, velocities.permute(1, 2, 0), senders, receivers, edge_vec, edge_type
        )
        mean = vector_out * self.acceleration_scale
        std = (self.min_std + F.softplus(scalar_out)).unsqueeze(1).expand(-1, 3) * self.acceleration_scale
        return mean, std.contiguous(), latent


class ETScore(ScoreBase):
    """Scalars = dynamics latent ++ conditions (standardised mass, log sigma); vectors
    start at zero."""

    def __init__(
        self,
        latent_dim: int,
        num_features: int,
        sigmas: Tensor,
        cutoff: float = 0.6,
        langevin_steps: int = 5,
        langevin_step_size: float = 5e-7,
        hidden_latent_dim: int = 128,
        rounds: int = 7,
        num_heads: int = 8,
        num_rbf: int = 32,
        edge_type_dim: int = 16,
        activation: str = "silu",
        graph_method: str = "auto",
        sigma_conditioned: bool = True,
    ):
        super().__init__(latent_dim, num_features, cutoff, sigmas, langevin_steps, langevin_step_size, graph_method,
                         sigma_conditioned)
        self.backbone = ETBackbone(
            latent_dim + self.num_conditions, 0, cutoff, hidden_latent_dim, rounds, num_heads, num_rbf, "expnorm",
            edge_type_dim, activation, activation,
        )

    def predict(self, latent: Tensor, conditions: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tensor:
        scalars = torch.cat([latent, conditions], dim=1)
        _, vector_out, _ = self.backbone(scalars, None, senders, receivers, edge_vec, edge_type)
        return vector_out
