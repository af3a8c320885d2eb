"""The paper's supervised-learning (SL) baseline: a GNN that predicts a system's property
(e.g. the mean Rg^2) directly from its fine graph, with no simulation.

It reuses the embedding GNN's architecture (types, masses, bonds; no positions), pools
the atom latents per system and regresses the standardised property with an MLP. It
learns only from the training systems' (short) reference trajectories, which is
exactly why it generalises poorly to unseen chemistry in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from openmm_cgml.coarse_grain import CGMapping, build_vocabulary, types_to_index
from openmm_cgml.models import AtomEmbeddingGNN


@dataclass
class FineGraph:
    """A system's fine graph as the SL baseline reads it (types as strings)."""

    atom_types: Sequence[str]
    atom_masses: np.ndarray
    bonds: np.ndarray
    bond_types: Sequence[str]

    @classmethod
    def from_mapping(cls, mapping: CGMapping) -> "FineGraph":
        return cls(list(mapping.atom_types), np.asarray(mapping.atom_masses), np.asarray(mapping.fine_bonds),
                   list(mapping.bond_types))


class GraphPropertyRegressor(nn.Module):
    """Fine graph -> one scalar: embedding GNN, mean pooling over atoms, MLP."""

    def __init__(self, num_atom_types: int, num_bond_types: int, width: int = 32, rounds: int = 3):
        super().__init__()
        self.embedding = AtomEmbeddingGNN(num_atom_types, num_bond_types, type_dim=16, latent_dim=width,
                                          hidden_dim=width, hidden_layers=2, rounds=rounds, out_dim=width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, atom_types, atom_masses, bonds, bond_types) -> torch.Tensor:
        latent = self.embedding(atom_types, atom_masses, bonds, bond_types)
        return self.head(latent.mean(dim=0)).squeeze(-1)


class SupervisedBaseline:
    """Train on (graph, property) pairs of the training systems; predict for new graphs."""

    def __init__(self, steps: int = 300, lr: float = 3e-3, seed: int = 0):
        self.steps, self.lr, self.seed = steps, lr, seed
        self.model: GraphPropertyRegressor | None = None

    def _tensors(self, graph: FineGraph):
        atom_types = torch.as_tensor(types_to_index(graph.atom_types, self.atom_vocabulary), dtype=torch.long)
        bond_types = torch.as_tensor(types_to_index(graph.bond_types, self.bond_vocabulary), dtype=torch.long)
        return (atom_types, torch.as_tensor(graph.atom_masses, dtype=torch.float32),
                torch.as_tensor(graph.bonds, dtype=torch.long).reshape(-1, 2), bond_types)

    def fit(self, graphs: Sequence[FineGraph], targets: Sequence[float]) -> "SupervisedBaseline":
        if len(graphs) != len(targets) or not graphs:
            raise ValueError("need one target per graph and at least one graph")
        self.atom_vocabulary = build_vocabulary([g.atom_types for g in graphs])
        self.bond_vocabulary = build_vocabulary([g.bond_types for g in graphs] + [["none"]])
        targets = np.asarray(targets, dtype=np.float64)
        self.mean, self.scale = float(targets.mean()), float(targets.std() or 1.0)
        torch.manual_seed(self.seed)
        self.model = GraphPropertyRegressor(len(self.atom_vocabulary), len(self.bond_vocabulary))
        optimiser = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        inputs = [self._tensors(g) for g in graphs]
        y = torch.as_tensor((targets - self.mean) / self.scale, dtype=torch.float32)
        for _ in range(self.steps):
            optimiser.zero_grad()
            loss = torch.stack([(self.model(*x) - t) ** 2 for x, t in zip(inputs, y)]).mean()
            loss.backward()
            optimiser.step()
        self.final_loss = float(loss.detach())
        return self

    def predict(self, graph: FineGraph) -> float:
        if self.model is None:
            raise RuntimeError("fit() the baseline first")
        unknown = sorted(set(graph.atom_types) - set(self.atom_vocabulary))
        if unknown:
            # unseen atom types: the SL model has no embedding for them (it cannot generalise)
            raise ValueError(f"atom types not seen in training: {unknown}")
        with torch.no_grad():
            return float(self.model(*self._tensors(graph))) * self.scale + self.mean
