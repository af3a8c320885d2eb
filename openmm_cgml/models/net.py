"""``CGMLNet``: the embedding, dynamics, score GNNs (and the optional property head) as
one module with one loss: what the trainer optimises and a checkpoint restores."""
from __future__ import annotations

import torch
from torch import nn


class CGMLNet(nn.Module):
    """The three networks as one module (one parameter set to average over ranks, one state)."""

    def __init__(self, model_config, num_atom_types: int, num_bond_types: int, with_score: bool = True,
                 property_config: dict | None = None):
        super().__init__()
        from openmm_cgml.models import build_dynamics_model, build_embedding_model, build_score_model
        from openmm_cgml.models.property import build_property_head

        self.embedding = build_embedding_model(model_config, num_atom_types, num_bond_types)
        self.dynamics = build_dynamics_model(model_config, self.embedding.num_features)
        self.score = build_score_model(model_config, self.embedding.num_features,
                                       self.dynamics.latent_dim) if with_score else None
        # built last: the other networks' initial weights do not depend on whether it exists
        self.property = build_property_head({**property_config, "num_features": self.embedding.num_features}) \
            if property_config else None

    def main_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embedding, dynamics and score GNNs (not the property head)."""
        head = {id(p) for p in self.property.parameters()} if self.property is not None else set()
        return [p for p in self.parameters() if id(p) not in head]

    def bead_features(self, batch: dict) -> torch.Tensor:
        """Embedding GNN once per distinct system of the batch, gathered onto every graph."""
        graph_system = batch["system"]
        n_graphs = graph_system.numel()
        bead_graph, atom_graph = batch["batch"], batch["atom_batch"]
        systems, inverse = torch.unique(graph_system, return_inverse=True)
        first_graph = torch.full((systems.numel(),), n_graphs, dtype=torch.long)
        first_graph = first_graph.scatter_reduce(0, inverse, torch.arange(n_graphs), "amin")
        keep_graph = torch.zeros(n_graphs, dtype=torch.bool)
        keep_graph[first_graph] = True
        atom_keep, bead_keep = keep_graph[atom_graph], keep_graph[bead_graph]
        atom_new = torch.cumsum(atom_keep.long(), 0) - 1
        bead_new = torch.cumsum(bead_keep.long(), 0) - 1
        bonds = batch["fine_bonds"]
        bond_keep = atom_keep[bonds[:, 0]] if bonds.numel() else torch.zeros(0, dtype=torch.bool)
        unique_features = self.embedding.bead_features(
            batch["atom_type"][atom_keep], batch["atom_masses"][atom_keep], atom_new[bonds[bond_keep]],
            batch["bond_type"][bond_keep], bead_new[batch["bead_of_atom"][atom_keep]],
            int(bead_keep.sum()))
        n_beads = batch["n_beads"]
        graph_ptr = torch.cumsum(n_beads, 0) - n_beads
        # first bead of each kept graph in the compressed numbering
        block_start = bead_new[graph_ptr[first_graph]]
        local = torch.arange(bead_graph.numel()) - graph_ptr[bead_graph]
        return unique_features[block_start[inverse[bead_graph]] + local]

    def forward(self, batch: dict, noise: dict, score_weight: float = 1.0,
                detach_latent: bool = True, property_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Losses of one batch under the draws of ``models.losses.sample_noise``:
        the window rotated (augmentation), its input frames noised, the DSM noise; with a
        property head, its loss on the (clean, unrotated: it is invariant) target frame."""
        from openmm_cgml.models.losses import dynamics_loss, property_loss, rotate_positions, score_loss

        features = self.bead_features(batch)
        history, target = batch["history"], batch["target"]
        if noise.get("rotation") is not None:
            history = rotate_positions(history, noise["rotation"])
            target = rotate_positions(target, noise["rotation"])
        if noise.get("history") is not None:
            history = history + noise["history"]
        nll, latent = dynamics_loss(self.dynamics, history, target, batch["box"], features, batch["cg_bonds"],
                                    batch["batch"])
        out = {"dynamics": nll}
        if self.score is not None:
            if detach_latent:
                latent = latent.detach()
            dsm = score_loss(self.score, target, latent, batch["box"], features, batch["cg_bonds"],
                             batch["batch"], noise["score_sigma"], noise["score_z"])
            out["score"] = dsm
            out["total"] = nll + score_weight * dsm
        else:
            out["total"] = nll
        if self.property is not None and "property_bead" in batch:
            beads = batch["property_bead"]
            prop = property_loss(self.property, batch["target"][beads], features.detach()[beads],
                                 batch["property_molecule"], batch["fine_rg2"])
            out["property"] = prop
            out["total"] = out["total"] + property_weight * prop
        return out
