"""The property head (issue 9, the paper's property prediction): the *fine-level*
squared radius of gyration of each molecule, predicted from its CG state.

For a molecule of beads b with masses M_b at the beads' centres of mass X_b (the CG
positions), the fine Rg^2 splits exactly (parallel-axis theorem) into

    Rg^2_fine = Rg^2_CG + sum_b (M_b / M) Rg^2_b

where Rg^2_CG is the mass-weighted Rg^2 of the beads and Rg^2_b the Rg^2 of the atoms
*inside* bead b, which the CG state does not carry. The head computes Rg^2_CG exactly
from the CG positions and learns the second term: a per-bead MLP reads the bead's
features (embedding GNN output ++ mass: composition/sequence) and three invariant
geometric terms (the bead's squared distance to the molecule's centre over Rg^2_CG,
log of Rg^2_CG over its training mean, the bead's mass fraction), and its outputs are
pooled per molecule with the mass fractions as weights and scaled by ``residual_scale``
(the training data's mean Rg^2_fine - Rg^2_CG, nm^2). Every input is invariant under
rotations and translations, so the prediction is too. The output layer starts at zero:
an untrained head *is* the zero-residual baseline (Rg^2_fine = Rg^2_CG), and with a zero
output layer it returns Rg^2_CG exactly.

Exported as TorchScript (``property.pt``, see ``openmm_cgml.packaging``); the forward is
``(positions [N,3] or [F,N,3] nm, features [N,F], molecule [N] int64 in [0, M)) ->
[M] or [F,M]`` nm^2, where ``molecule`` numbers the molecules with >= ``min_beads``
beads (``property_molecules``) and only their beads are passed.

NumPy helpers here define which molecules the head covers and compute the true fine
Rg^2 from atoms (the training target, and the reference in ``cgml evaluate``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

MIN_BEADS = 2


class PropertyHead(nn.Module):
    """Fine-level Rg^2 per molecule = CG Rg^2 + learned residual (module docstring)."""

    def __init__(self, num_features: int, hidden_dim: int = 32, hidden_layers: int = 2):
        super().__init__()
        if num_features < 1 or hidden_dim < 1 or hidden_layers < 0:
            raise ValueError("num_features and hidden_dim must be >= 1, hidden_layers >= 0")
        self.num_features = int(num_features)
        self.min_beads = MIN_BEADS
        layers: list[nn.Module] = []
        width = self.num_features + 3
        for _ in range(int(hidden_layers)):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = int(hidden_dim)
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))
        self.register_buffer("residual_scale", torch.tensor(1.0))  # nm^2
        self.register_buffer("rg2_reference", torch.tensor(1.0))  # nm^2

    @torch.jit.ignore
    def set_normalization(self, feature_mean: Tensor, feature_std: Tensor, residual_scale: float,
                          rg2_reference: float) -> None:
        """Feature shift/scale (the last feature is the bead mass), the residual's scale
        (nm^2, mean Rg^2_fine - Rg^2_CG of the training data) and the CG Rg^2 that the
        log-size input is measured against (nm^2)."""
        with torch.no_grad():
            self.feature_mean.copy_(torch.as_tensor(feature_mean, dtype=self.feature_mean.dtype))
            self.feature_std.copy_(torch.as_tensor(feature_std, dtype=self.feature_std.dtype).clamp_min(1e-6))
            self.residual_scale.fill_(max(float(residual_scale), 1e-8))
            self.rg2_reference.fill_(max(float(rg2_reference), 1e-8))

    def forward(self, positions: Tensor, features: Tensor, molecule: Tensor) -> Tensor:
        single = positions.dim() == 2
        x = positions.unsqueeze(0) if single else positions
        n_mol = int(molecule.max()) + 1 if molecule.numel() > 0 else 0
        frames = x.size(0)
        dtype = x.dtype
        masses = features[:, -1].to(dtype)
        total = torch.zeros(n_mol, dtype=dtype).index_add_(0, molecule, masses)
        weight = masses / total[molecule]  # mass fraction of each bead in its molecule
        com = torch.zeros(frames, n_mol, 3, dtype=dtype).index_add_(1, molecule, x * weight.unsqueeze(0).unsqueeze(-1))
        d = x - com[:, molecule]
        d2 = (d * d).sum(-1)  # [F, N]
        rg2_cg = torch.zeros(frames, n_mol, dtype=dtype).index_add_(1, molecule, d2 * weight)
        rg2_bead = rg2_cg[:, molecule].clamp_min(1e-12)
        pdtype = self.out.weight.dtype
        geometric = torch.stack([d2 / rg2_bead, torch.log(rg2_bead / self.rg2_reference.to(dtype)),
                                 weight.unsqueeze(0).expand(frames, -1)], dim=-1).to(pdtype)
        h = ((features.to(pdtype) - self.feature_mean) / self.feature_std).unsqueeze(0).expand(frames, -1, -1)
        per_bead = self.out(self.mlp(torch.cat([h, geometric], dim=-1))).squeeze(-1).to(dtype)  # [F, N]
        residual = torch.zeros(frames, n_mol, dtype=dtype).index_add_(1, molecule, per_bead * weight)
        rg2 = rg2_cg + residual * self.residual_scale.to(dtype)
        return rg2.squeeze(0) if single else rg2


def build_property_head(config: dict) -> PropertyHead:
    """A head from its config dict {"num_features", "hidden_dim", "hidden_layers"}."""
    return PropertyHead(int(config["num_features"]), int(config.get("hidden_dim", 32)),
                        int(config.get("hidden_layers", 2)))


# ----------------------------------------------------------------------------- NumPy helpers
def property_molecules(molecule_of_bead, min_beads: int = MIN_BEADS) -> np.ndarray:
    """int64 [N]: each bead's molecule index among the molecules with >= ``min_beads``
    beads (in order of molecule id, like ``evaluate.molecule_groups``), -1 for others."""
    molecule_of_bead = np.asarray(molecule_of_bead, dtype=np.int64)
    ids, counts = np.unique(molecule_of_bead, return_counts=True)
    kept = ids[counts >= min_beads]
    out = np.full(len(molecule_of_bead), -1, dtype=np.int64)
    for k, m in enumerate(kept.tolist()):
        out[molecule_of_bead == m] = k
    return out


def fine_rg2(positions, mapping, min_beads: int = MIN_BEADS, chunk: int = 2048) -> np.ndarray:
    """True fine-level (atomistic) mass-weighted Rg^2 per molecule with >= ``min_beads``
    beads: positions [F, n, 3] (or [n, 3]) nm, unwrapped -> float64 [F, M] (or [M])."""
    from openmm_cgml.analysis import radius_of_gyration_squared

    positions = np.asarray(positions)
    single = positions.ndim == 2
    if single:
        positions = positions[None]
    bead_molecule = property_molecules(mapping.molecule_of_bead, min_beads)
    atom_molecule = bead_molecule[np.asarray(mapping.bead_of_atom)]
    n_mol = int(bead_molecule.max()) + 1 if len(bead_molecule) else 0
    out = np.zeros((positions.shape[0], n_mol))
    if n_mol:
        groups = [np.flatnonzero(atom_molecule == k) for k in range(n_mol)]
        for start in range(0, positions.shape[0], chunk):
            out[start:start + chunk] = radius_of_gyration_squared(positions[start:start + chunk],
                                                                  mapping.atom_masses, groups)
    return out[0] if single else out


def cg_rg2(positions, bead_masses, molecule_of_bead, min_beads: int = MIN_BEADS) -> np.ndarray:
    """CG mass-weighted Rg^2 per molecule (same molecules as ``fine_rg2``): [F, N, 3] -> [F, M]."""
    from openmm_cgml.analysis import radius_of_gyration_squared

    positions = np.asarray(positions, dtype=np.float64)
    single = positions.ndim == 2
    if single:
        positions = positions[None]
    bead_molecule = property_molecules(molecule_of_bead, min_beads)
    n_mol = int(bead_molecule.max()) + 1 if len(bead_molecule) else 0
    if not n_mol:
        out = np.zeros((positions.shape[0], 0))
    else:
        groups = [np.flatnonzero(bead_molecule == k) for k in range(n_mol)]
        out = radius_of_gyration_squared(positions, bead_masses, groups)
    return out[0] if single else out


def baseline_losses(cg, fine, ratio: float | None = None) -> dict[str, float]:
    """The no-learning baselines' property loss (mean squared relative error) on pairs of
    CG and true fine Rg^2: ``zero_residual`` (predict Rg^2_CG) and ``constant_ratio``
    (predict c Rg^2_CG; c fitted here by least squares of the relative error unless
    given). Returns {"zero_residual", "constant_ratio", "ratio"}."""
    cg, fine = np.asarray(cg, dtype=np.float64).ravel(), np.asarray(fine, dtype=np.float64).ravel()
    keep = np.isfinite(cg) & np.isfinite(fine) & (fine > 0)
    q = cg[keep] / fine[keep]
    if not q.size:
        return {"zero_residual": float("nan"), "constant_ratio": float("nan"),
                "ratio": float("nan") if ratio is None else float(ratio)}
    if ratio is None:
        ratio = float(q.sum() / np.square(q).sum())
    return {"zero_residual": float(np.mean(np.square(q - 1))),
            "constant_ratio": float(np.mean(np.square(ratio * q - 1))), "ratio": float(ratio)}
