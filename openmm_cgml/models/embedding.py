"""Time-invariant embedding GNN on the fine (all-atom) bond graph (docs/method.md step 2).

It never sees positions, so it runs once per system; its per-bead output (mean over the
bead's atoms) ++ the bead mass is the ``features`` tensor handed to the exported
dynamics and score modules. It is trained jointly with the dynamics GNN (gradients flow
through ``bead_features``) but is not part of the exported archives.
"""

import torch
from torch import Tensor, nn

from .layers import EncodeProcessDecode, segment_mean, segment_sum


class AtomEmbeddingGNN(nn.Module):
    """Encode-process-decode MPNN over atoms and chemical bonds.

    Node input = type embedding ++ normalised mass; edge input = emb(sender) +
    emb(receiver) + bond-type embedding. Output: one ``out_dim`` latent per atom."""

    def __init__(
        self,
        num_atom_types: int,
        num_bond_types: int,
        type_dim: int = 32,
        latent_dim: int = 64,
        hidden_dim: int = 64,
        hidden_layers: int = 2,
        rounds: int = 7,
        out_dim: int = 128,
        activation: str = "silu",
    ):
        super().__init__()
        if num_atom_types < 1 or num_bond_types < 1:
            raise ValueError("need at least one atom type and one bond type")
        self.num_atom_types = num_atom_types
        self.num_bond_types = num_bond_types
        self.out_dim = out_dim
        self.atom_type_embedding = nn.Embedding(num_atom_types, type_dim)
        self.bond_type_embedding = nn.Embedding(num_bond_types, type_dim)
        self.gnn = EncodeProcessDecode(
            type_dim + 1, type_dim, out_dim, latent_dim, hidden_dim, hidden_layers, rounds, activation
        )
        # masses in amu span ~1 (H) to ~200 (united groups): scale them to O(1)
        self.register_buffer("mass_scale", torch.tensor(12.0))

    @property
    def num_features(self) -> int:
        """Width of the bead features it produces (embedding ++ mass)."""
        return self.out_dim + 1

    def forward(self, atom_types: Tensor, atom_masses: Tensor, bonds: Tensor, bond_types: Tensor) -> Tensor:
        n = atom_types.size(0)
        if atom_masses.shape != (n,):
            raise ValueError(f"atom_masses must be [{n}], got {tuple(atom_masses.shape)}")
        if bonds.numel() > 0 and (bonds.dim() != 2 or bonds.size(1) != 2):
            raise ValueError("bonds must be [B, 2]")
        bonds = bonds.reshape(-1, 2).to(torch.long)
        if bond_types.shape != (bonds.size(0),):
            raise ValueError("need one bond type per bond")
        if n > 0 and (int(atom_types.min()) < 0 or int(atom_types.max()) >= self.num_atom_types):
            raise ValueError(f"atom type index outside 0..{self.num_atom_types - 1}")
        if bonds.size(0) > 0 and (int(bond_types.min()) < 0 or int(bond_types.max()) >= self.num_bond_types):
            raise ValueError(f"bond type index outside 0..{self.num_bond_types - 1}")
        type_emb = self.atom_type_embedding(atom_types)
        node_in = torch.cat([type_emb, (atom_masses / self.mass_scale).unsqueeze(1).to(type_emb.dtype)], dim=1)
        # chemical bonds are undirected: message in both directions
        senders = torch.cat([bonds[:, 0], bonds[:, 1]])
        receivers = torch.cat([bonds[:, 1], bonds[:, 0]])
        bond_emb = self.bond_type_embedding(bond_types).repeat(2, 1)
        edge_in = type_emb[senders] + type_emb[receivers] + bond_emb
        atom_latent, _ = self.gnn(node_in, edge_in, senders, receivers)
        return atom_latent

    def bead_features(
        self,
        atom_types: Tensor,
        atom_masses: Tensor,
        bonds: Tensor,
        bond_types: Tensor,
        bead_of_atom: Tensor,
        num_beads: int,
    ) -> Tensor:
        """[num_beads, out_dim + 1]: mean atom latent of each bead ++ bead mass (amu)."""
        if bead_of_atom.shape != atom_types.shape:
            raise ValueError("bead_of_atom needs one bead index per atom")
        atom_latent = self.forward(atom_types, atom_masses, bonds, bond_types)
        bead_of_atom = bead_of_atom.to(torch.long)
        bead_latent = segment_mean(atom_latent, bead_of_atom, num_beads)
        bead_mass = segment_sum(atom_masses.to(atom_latent.dtype), bead_of_atom, num_beads)
        return torch.cat([bead_latent, bead_mass.unsqueeze(1)], dim=1)
