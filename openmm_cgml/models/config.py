"""Model configuration (defaults = METHOD.md's electrolyte configuration, lengths in nm)
and the factories that build the three networks from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

ANGSTROM = 0.1  # nm


def geometric_ladder(largest: float, smallest: float, levels: int) -> torch.Tensor:
    """``levels`` values from ``largest`` down to ``smallest``, equal ratios (float32)."""
    if levels < 1 or largest <= 0 or smallest <= 0 or smallest > largest:
        raise ValueError("need levels >= 1 and 0 < smallest <= largest")
    if levels == 1:
        return torch.tensor([largest], dtype=torch.float32)
    return torch.exp(torch.linspace(torch.log(torch.tensor(largest)), torch.log(torch.tensor(smallest)), levels)).float()


@dataclass
class ModelConfig:
    backbone: str = "gns"  # "gns" or "et"
    seq_len: int = 20
    step_size_ps: float = 200.0  # dilation x record interval (100 x 2 ps)
    cutoff: float = 6 * ANGSTROM
    # dynamics / score GNNs
    latent_dim: int = 128
    hidden_dim: int = 128
    hidden_layers: int = 2
    rounds: int = 7
    edge_type_dim: int = 16
    min_std: float = 0.05  # in units of acceleration_scale (network units)
    activation: str = "silu"
    # et only
    num_heads: int = 8
    num_rbf: int = 32
    # embedding GNN (fine graph)
    type_dim: int = 32
    embedding_latent_dim: int = 64
    embedding_hidden_dim: int = 64
    embedding_rounds: int = 7
    embedding_out_dim: int = 128
    # score ladder (NCSN): 10 -> 0.01 A, 20 levels; Langevin K and eps (5e-5 A^2)
    score_sigma_max: float = 10 * ANGSTROM
    score_sigma_min: float = 0.01 * ANGSTROM
    score_levels: int = 20
    langevin_steps: int = 5
    langevin_step_size: float = 5e-7  # 5e-5 A^2, in nm^2
    # dynamics training noise: 0.1 -> 0.01 A, 10 levels
    noise_sigma_max: float = 0.1 * ANGSTROM
    noise_sigma_min: float = 0.01 * ANGSTROM
    noise_levels: int = 10
    graph_method: str = "auto"

    def __post_init__(self):
        if self.backbone not in ("gns", "et"):
            raise ValueError(f"backbone must be 'gns' or 'et', got {self.backbone!r}")

    @property
    def num_features(self) -> int:
        return self.embedding_out_dim + 1

    def score_sigmas(self) -> torch.Tensor:
        return geometric_ladder(self.score_sigma_max, self.score_sigma_min, self.score_levels)

    def noise_sigmas(self) -> torch.Tensor:
        return geometric_ladder(self.noise_sigma_max, self.noise_sigma_min, self.noise_levels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def build_embedding_model(config: ModelConfig, num_atom_types: int, num_bond_types: int):
    from .embedding import AtomEmbeddingGNN

    return AtomEmbeddingGNN(
        num_atom_types, num_bond_types, config.type_dim, config.embedding_latent_dim,
        config.embedding_hidden_dim, config.hidden_layers, config.embedding_rounds,
        config.embedding_out_dim, config.activation,
    )


def build_dynamics_model(config: ModelConfig, num_features: int | None = None):
    num_features = config.num_features if num_features is None else num_features
    if config.backbone == "gns":
        from .gns import GNSDynamics

        return GNSDynamics(
            num_features, config.seq_len, config.cutoff, config.step_size_ps, config.latent_dim,
            config.hidden_dim, config.hidden_layers, config.rounds, config.edge_type_dim,
            config.min_std, config.activation, config.graph_method,
        )
    from .et import ETDynamics

    return ETDynamics(
        num_features, config.seq_len, config.cutoff, config.step_size_ps, config.latent_dim,
        config.rounds, config.num_heads, config.num_rbf, config.edge_type_dim, config.min_std,
        config.activation, config.graph_method,
    )


def build_score_model(config: ModelConfig, num_features: int | None = None, latent_dim: int | None = None):
    """``latent_dim`` = the dynamics model's latent width (config.latent_dim by default)."""
    num_features = config.num_features if num_features is None else num_features
    latent_dim = config.latent_dim if latent_dim is None else latent_dim
    if config.backbone == "gns":
        from .gns import GNSScore

        return GNSScore(
            latent_dim, num_features, config.score_sigmas(), config.cutoff, config.langevin_steps,
            config.langevin_step_size, config.latent_dim, config.hidden_dim, config.hidden_layers,
            config.rounds, config.edge_type_dim, config.activation, config.graph_method,
        )
    from .et import ETScore

    return ETScore(
        latent_dim, num_features, config.score_sigmas(), config.cutoff, config.langevin_steps,
        config.langevin_step_size, config.latent_dim, config.rounds, config.num_heads, config.num_rbf,
        config.edge_type_dim, config.activation, config.graph_method,
    )
