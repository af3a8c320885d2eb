"""Small composable building blocks of the encode-process-decode message-passing GNN
(Sanchez-Gonzalez et al., "Learning to simulate", as used by Fu et al.)."""

from typing import List, Tuple

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


def activation_class(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def segment_sum(src: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum the rows of ``src`` that share an ``index`` value, [num_segments, ...]."""
    shape = [num_segments] + list(src.shape[1:])
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)


def segment_mean(src: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Mean of the rows of ``src`` that share an ``index`` value; empty segments give 0."""
    total = segment_sum(src, index, num_segments)
    count = torch.zeros(num_segments, dtype=src.dtype, device=src.device)
    count = count.index_add_(0, index, torch.ones_like(index, dtype=src.dtype))
    count = count.clamp(min=1.0).reshape([num_segments] + [1] * (src.dim() - 1))
    return total / count


class MLP(nn.Module):
    """Linear -> act -> (Linear -> act) x (hidden_layers - 1) -> Linear [-> LayerNorm]."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        hidden_layers: int = 2,
        activation: str = "silu",
        layer_norm: bool = True,
    ):
        super().__init__()
        if hidden_layers < 1:
            raise ValueError("an MLP needs at least one hidden layer")
        act = activation_class(activation)
        # the first layer is separate so callers can apply it to concatenated inputs
        # piecewise (see InteractionNetwork)
        self.first = nn.Linear(in_dim, hidden_dim)
        layers: List[nn.Module] = [act()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), act()]
        layers.append(nn.Linear(hidden_dim, out_dim))
        # LayerNorm on MLP outputs keeps latent magnitudes stable across rounds
        layers.append(nn.LayerNorm(out_dim) if layer_norm else nn.Identity())
        self.rest = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.first(x))


class InteractionNetwork(nn.Module):
    """One message-passing round with residual edge and node updates:
    e' = e + MLP([e, h_recv, h_send]);  h' = h + MLP([h, sum of incoming e'])."""

    def __init__(self, latent_dim: int, hidden_dim: int, hidden_layers: int, activation: str):
        super().__init__()
        self.edge_mlp = MLP(3 * latent_dim, latent_dim, hidden_dim, hidden_layers, activation)
        self.node_mlp = MLP(2 * latent_dim, latent_dim, hidden_dim, hidden_layers, activation)

    def forward(self, h: Tensor, e: Tensor, senders: Tensor, receivers: Tensor) -> Tuple[Tensor, Tensor]:
        # edge_mlp.first applied to [e, h_recv, h_send] block by block: the node blocks
        # are projected once per node, not once per edge (same function, ~40% cheaper)
        weight = self.edge_mlp.first.weight
        d = h.size(1)
        node_recv = h @ weight[:, d:2 * d].t()
        node_send = h @ weight[:, 2 * d:].t()
        hidden = (torch.nn.functional.linear(e, weight[:, :d], self.edge_mlp.first.bias)
                  + node_recv.index_select(0, receivers) + node_send.index_select(0, senders))
        e = e + self.edge_mlp.rest(hidden)
        incoming = segment_sum(e, receivers, h.size(0))
        h = h + self.node_mlp(torch.cat([h, incoming], dim=1))
        return h, e


class EncodeProcessDecode(nn.Module):
    """Encoder MLPs -> ``rounds`` interaction networks -> per-node decoder MLP.

    ``forward`` returns (decoded node outputs, final latent node vectors)."""

    def __init__(
        self,
        node_in_dim: int,
        edge_in_dim: int,
        out_dim: int,
        latent_dim: int = 128,
        hidden_dim: int = 128,
        hidden_layers: int = 2,
        rounds: int = 7,
        activation: str = "silu",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.node_encoder = MLP(node_in_dim, latent_dim, hidden_dim, hidden_layers, activation)
        self.edge_encoder = MLP(edge_in_dim, latent_dim, hidden_dim, hidden_layers, activation)
        self.processors = nn.ModuleList(
            [InteractionNetwork(latent_dim, hidden_dim, hidden_layers, activation) for _ in range(rounds)]
        )
        self.decoder = MLP(latent_dim, out_dim, hidden_dim, hidden_layers, activation, layer_norm=False)

    def forward(
        self, node_features: Tensor, edge_features: Tensor, senders: Tensor, receivers: Tensor
    ) -> Tuple[Tensor, Tensor]:
        h = self.node_encoder(node_features)
        e = self.edge_encoder(edge_features)
        for processor in self.processors:
            h, e = processor(h, e, senders, receivers)
        return self.decoder(h), h
