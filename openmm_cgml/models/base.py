"""What the dynamics and score modules of both backbones share: the graph builder, the
edge featuriser, the TorchScript contract's input checks and normalisation buffers.

Contract (run by the C++ integrator; float32, nm, CPU):
  dynamics.forward(history [T,N,3], box [3,3], features [N,F], bonds [E,2])
      -> (mean [N,3], std [N,3], latent [N,L])     acceleration in nm/step^2
  score.forward(x [N,3], latent [N,L], box, features, bonds, sigma [])
      -> score [N,3] = GNN(x, sigma) / sigma   (the GNN is told log sigma unless
                                               sigma_conditioned is False)
"""

from typing import Tuple

import torch
from torch import Tensor, nn

from .graph import NUM_EDGE_TYPES, build_graph, build_graph_batched


class GraphBuilder(nn.Module):
    """Radius graph (minimum image, self loops) united with the CG bonds."""

    cutoff: float
    method: str
    all_pairs_max_n: int

    def __init__(self, cutoff: float, method: str = "auto", all_pairs_max_n: int = 256):
        super().__init__()
        if cutoff <= 0:
            raise ValueError("cutoff must be positive")
        if method not in ("auto", "all_pairs", "cell_list"):
            raise ValueError(f"unknown neighbour search method {method!r}")
        self.cutoff = float(cutoff)
        self.method = method
        self.all_pairs_max_n = int(all_pairs_max_n)

    def forward(self, pos: Tensor, box: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return build_graph(pos, box, bonds, self.cutoff, self.method, self.all_pairs_max_n)

    @torch.jit.unused
    def batched(self, pos: Tensor, boxes: Tensor, bonds: Tensor, batch: Tensor):
        # with "auto" each graph of the batch picks its own search by size
        return build_graph_batched(pos, boxes, bonds, batch, self.cutoff, self.method)


class EdgeFeatures(nn.Module):
    """displacement / cutoff (3) ++ distance / cutoff (1) ++ edge-type embedding."""

    cutoff: float

    def __init__(self, cutoff: float, type_dim: int):
        super().__init__()
        self.cutoff = float(cutoff)
        self.type_embedding = nn.Embedding(NUM_EDGE_TYPES, type_dim)
        self.dim = 4 + type_dim

    def forward(self, edge_vec: Tensor, edge_type: Tensor) -> Tensor:
        scaled = edge_vec / self.cutoff
        dist = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
        return torch.cat([scaled, dist, self.type_embedding(edge_type).to(edge_vec.dtype)], dim=1)


def check_common_inputs(n: int, box: Tensor, features: Tensor, num_features: int, bonds: Tensor):
    if box.dim() != 2 or box.size(0) != 3 or box.size(1) != 3:
        raise ValueError("box must be [3, 3] (rows = box vectors; zeros if not periodic)")
    if features.dim() != 2 or features.size(0) != n or features.size(1) != num_features:
        raise ValueError(
            "features must be [N={}, F={}], got {}".format(n, num_features, features.shape)
        )
    if bonds.dim() != 2 or bonds.size(1) != 2:
        raise ValueError("bonds must be [E, 2], got {}".format(bonds.shape))


class DynamicsBase(nn.Module):
    """Contract wrapper of a dynamics GNN; subclasses implement ``predict``.

    Buffers (travel with the export): ``velocity_scale`` multiplies the finite-difference
    velocities, ``acceleration_scale`` converts network units to nm/step^2,
    ``feature_shift``/``feature_scale`` standardise the bead features.

    ``exclusion_distance`` and ``bond_length_limit`` (nm, contract attributes; 0: none)
    are the integrator's default distance limits: the trainer sets them from the training
    data's closest approach of non-bonded beads and longest CG bonds
    (``TrainConfig.exclusion_quantile`` / ``bond_limit_quantile``)."""

    seq_len: int
    step_size_ps: float
    exclusion_distance: float
    bond_length_limit: float
    num_features: int
    latent_dim: int
    min_std: float
    cutoff: float

    def __init__(self, seq_len: int, num_features: int, cutoff: float, step_size_ps: float,
                 min_std: float, latent_dim: int, graph_method: str = "auto"):
        super().__init__()
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2 (velocities need two frames)")
        if min_std <= 0:
            raise ValueError("min_std must be positive")
        self.seq_len = int(seq_len)
        self.step_size_ps = float(step_size_ps)
        self.exclusion_distance = 0.0
        self.bond_length_limit = 0.0
        self.num_features = int(num_features)
        self.latent_dim = int(latent_dim)
        self.min_std = float(min_std)
        self.cutoff = float(cutoff)
        # note: on a *scripted* module, `.graph` is TorchScript's IR; use `.cutoff`
        self.graph = GraphBuilder(cutoff, graph_method)
        self.register_buffer("velocity_scale", torch.tensor(1.0))
        self.register_buffer("acceleration_scale", torch.tensor(1.0))
        self.register_buffer("feature_shift", torch.zeros(num_features))
        self.register_buffer("feature_scale", torch.ones(num_features))

    @torch.jit.unused
    def set_normalization(self, velocity_std: float, acceleration_std: float,
                          feature_mean: Tensor, feature_std: Tensor) -> None:
        """Standardise inputs and outputs; call with statistics of the training data."""
        if velocity_std <= 0 or acceleration_std <= 0:
            raise ValueError("velocity_std and acceleration_std must be positive")
        feature_std = torch.as_tensor(feature_std, dtype=self.feature_scale.dtype)
        if feature_std.shape != self.feature_scale.shape:
            raise ValueError(f"feature statistics must be [{self.num_features}]")
        self.velocity_scale.fill_(1.0 / velocity_std)
        self.acceleration_scale.fill_(acceleration_std)
        self.feature_shift.copy_(torch.as_tensor(feature_mean, dtype=self.feature_shift.dtype))
        # constant columns (e.g. every bead of equal mass) stay unscaled
        self.feature_scale.copy_(torch.where(feature_std > 1e-6, feature_std, torch.ones_like(feature_std)))

    def normalized_features(self, features: Tensor) -> Tensor:
        return (features - self.feature_shift) / self.feature_scale

    def forward(self, history: Tensor, box: Tensor, features: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if history.dim() != 3 or history.size(0) != self.seq_len or history.size(2) != 3:
            raise ValueError(
                "history must be [seq_len={}, N, 3] (oldest first), got {}".format(self.seq_len, history.shape)
            )
        check_common_inputs(history.size(1), box, features, self.num_features, bonds)
        senders, receivers, edge_vec, edge_type = self.graph(history[-1], box, bonds)
        return self.predict(history, features, senders, receivers, edge_vec, edge_type)

    @torch.jit.export
    def build_graph(self, x: Tensor, box: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The graph ``forward`` builds on the newest frame ``x``; with ``predict`` it
        splits a call in two, so the network can be compiled alone (docs/contract.md)."""
        return self.graph(x, box, bonds)

    @torch.jit.unused
    def forward_batch(self, history: Tensor, boxes: Tensor, features: Tensor, bonds: Tensor,
                      batch: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Training entry: several graphs concatenated along the bead axis (``batch`` [N]
        graph ids, ``boxes`` [B,3,3], ``bonds`` with global bead indices)."""
        if history.dim() != 3 or history.size(0) != self.seq_len or history.size(2) != 3:
            raise ValueError(f"history must be [seq_len={self.seq_len}, N, 3], got {tuple(history.shape)}")
        if features.shape != (history.size(1), self.num_features):
            raise ValueError(f"features must be [N, {self.num_features}], got {tuple(features.shape)}")
        senders, receivers, edge_vec, edge_type = self.graph.batched(history[-1], boxes, bonds, batch)
        return self.predict(history, features, senders, receivers, edge_vec, edge_type)

    def predict(self, history: Tensor, features: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError("a dynamics backbone must implement predict")


class ScoreBase(nn.Module):
    """Contract wrapper of a score GNN; subclasses implement ``predict`` (returns GNN(x),
    which ``forward`` divides by sigma). ``sigmas`` is the annealing ladder (nm, largest
    first). Per-bead conditions (``conditions``): the bead mass (last feature column)
    standardised by ``mass_shift`` and ``mass_scale`` and, when ``sigma_conditioned``,
    log sigma standardised over the ladder: a network that is not told the noise level
    must guess it from the noisy positions, and at levels below the data's own spread it
    cannot (its output then pulls beads toward the predicted mode)."""

    latent_dim: int
    sigma_conditioned: bool
    num_features: int
    langevin_steps: int
    langevin_step_size: float
    langevin_schedule: str
    cutoff: float

    def __init__(self, latent_dim: int, num_features: int, cutoff: float, sigmas: Tensor,
                 langevin_steps: int, langevin_step_size: float, graph_method: str = "auto",
                 sigma_conditioned: bool = True):
        super().__init__()
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if sigmas.dim() != 1 or sigmas.numel() == 0 or bool((sigmas <= 0).any()):
            raise ValueError("sigmas must be a non-empty 1-D tensor of positive values")
        if bool((sigmas[1:] > sigmas[:-1]).any()):
            raise ValueError("sigmas must be ordered largest first")
        if langevin_steps < 0 or langevin_step_size <= 0:
            raise ValueError("langevin_steps must be >= 0 and langevin_step_size > 0")
        self.latent_dim = int(latent_dim)
        self.sigma_conditioned = bool(sigma_conditioned)
        self.num_features = int(num_features)
        self.langevin_steps = int(langevin_steps)
        self.langevin_step_size = float(langevin_step_size)
        self.langevin_schedule = "constant"  # or "ncsn" (the integrator's default, docs/contract.md)
        self.cutoff = float(cutoff)
        self.graph = GraphBuilder(cutoff, graph_method)
        self.register_buffer("sigmas", sigmas.clone())
        self.register_buffer("mass_shift", torch.tensor(0.0))
        self.register_buffer("mass_scale", torch.tensor(1.0))
        log_ladder = torch.log(sigmas.double())
        self.register_buffer("log_sigma_shift", log_ladder.mean().float())
        self.register_buffer("log_sigma_scale", log_ladder.std().float() if sigmas.numel() > 1
                             else torch.tensor(1.0))

    @property
    def num_conditions(self) -> int:
        """Width of ``conditions``: the standardised mass, and log sigma if conditioned."""
        return 2 if self.sigma_conditioned else 1

    def set_sigmas(self, sigmas: Tensor) -> None:
        """Replace the ladder (nm, largest first), e.g. one derived from the data."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if sigmas.dim() != 1 or sigmas.numel() == 0 or bool((sigmas <= 0).any()) or \
                bool((sigmas[1:] > sigmas[:-1]).any()):
            raise ValueError("sigmas must be a non-empty 1-D tensor of positive values, largest first")
        self.sigmas = sigmas.clone()
        log_ladder = torch.log(sigmas.double())
        self.log_sigma_shift.fill_(float(log_ladder.mean()))
        self.log_sigma_scale.fill_(float(log_ladder.std()) if sigmas.numel() > 1 else 1.0)

    def conditions(self, features: Tensor, sigma: Tensor) -> Tensor:
        """[N, num_conditions] per-bead inputs besides the latent; ``sigma`` [] or [N, 1]."""
        mass = self.normalized_mass(features)
        if not self.sigma_conditioned:
            return mass
        log_sigma = (torch.log(sigma.to(mass.dtype)) - self.log_sigma_shift) / self.log_sigma_scale
        return torch.cat([mass, log_sigma.reshape(-1, 1).expand(mass.size(0), 1)], dim=1)

    @torch.jit.unused
    def set_normalization(self, mass_mean: float, mass_std: float) -> None:
        self.mass_shift.fill_(float(mass_mean))
        self.mass_scale.fill_(float(mass_std) if mass_std > 1e-6 else 1.0)

    def normalized_mass(self, features: Tensor) -> Tensor:
        return (features[:, -1:] - self.mass_shift) / self.mass_scale

    def forward(self, x: Tensor, latent: Tensor, box: Tensor, features: Tensor, bonds: Tensor,
                sigma: Tensor) -> Tensor:
        if x.dim() != 2 or x.size(1) != 3:
            raise ValueError("x must be [N, 3], got {}".format(x.shape))
        n = x.size(0)
        if latent.dim() != 2 or latent.size(0) != n or latent.size(1) != self.latent_dim:
            raise ValueError("latent must be [N={}, L={}], got {}".format(n, self.latent_dim, latent.shape))
        check_common_inputs(n, box, features, self.num_features, bonds)
        if sigma.numel() != 1:
            raise ValueError("sigma must be a single value")
        senders, receivers, edge_vec, edge_type = self.graph(x, box, bonds)
        return self.score_on_graph(latent, features, sigma, senders, receivers, edge_vec, edge_type)

    @torch.jit.export
    def build_graph(self, x: Tensor, box: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The graph ``forward`` builds: (senders, receivers, edge_vec, edge_type). With
        ``score_on_graph`` it splits a call in two, so the network can be compiled alone
        (the compiled route of docs/contract.md)."""
        return self.graph(x, box, bonds)

    def score_on_graph(self, latent: Tensor, features: Tensor, sigma: Tensor, senders: Tensor, receivers: Tensor,
                       edge_vec: Tensor, edge_type: Tensor) -> Tensor:
        """``forward`` after its graph: GNN(x, sigma) / sigma on a prebuilt graph."""
        out = self.predict(latent, self.conditions(features, sigma.reshape(())), senders, receivers, edge_vec,
                           edge_type)
        return out / sigma.reshape(())

    @torch.jit.unused
    def forward_batch(self, x: Tensor, latent: Tensor, boxes: Tensor, features: Tensor, bonds: Tensor,
                      batch: Tensor, sigma: Tensor) -> Tensor:
        """Training entry: graphs concatenated along the bead axis; ``sigma`` per bead [N]
        or a scalar."""
        senders, receivers, edge_vec, edge_type = self.graph.batched(x, boxes, bonds, batch)
        sigma = sigma.reshape(-1, 1) if sigma.dim() > 0 else sigma
        out = self.predict(latent, self.conditions(features, sigma), senders, receivers, edge_vec, edge_type)
        return out / sigma

    def predict(self, latent: Tensor, conditions: Tensor, senders: Tensor, receivers: Tensor,
                edge_vec: Tensor, edge_type: Tensor) -> Tensor:
        raise NotImplementedError("a score backbone must implement predict")
