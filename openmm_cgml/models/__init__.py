"""Learned CG dynamics models (Fu et al., TMLR 2023): embedding, dynamics and score GNNs
with two backbones (``gns``, ``et``), their losses and the TorchScript export for the
C++ integrator. The ``et`` classes import torchmd-net on first use only."""
from .config import (ModelConfig, build_dynamics_model, build_embedding_model, build_score_model,
                     geometric_ladder)
from .embedding import AtomEmbeddingGNN
from .gns import GNSDynamics, GNSScore
from .graph import EDGE_BOND, EDGE_RADIUS, EDGE_SELF, build_graph, build_graph_batched, radius_edges
from .losses import (acceleration_target, dsm_loss, dynamics_loss, gaussian_nll, sample_noise, score_loss,
                     trajectory_statistics)
from .torchscript import ExportError, export_dynamics, export_models, export_module, find_custom_ops, verify_archive

_LAZY = {"ETDynamics": "et", "ETScore": "et", "ETBackbone": "et"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ModelConfig", "build_dynamics_model", "build_embedding_model", "build_score_model",
    "geometric_ladder", "AtomEmbeddingGNN", "ExportError", "export_dynamics", "export_models",
    "export_module", "find_custom_ops", "verify_archive", "GNSDynamics", "GNSScore",
    "EDGE_BOND", "EDGE_RADIUS", "EDGE_SELF", "build_graph", "build_graph_batched", "radius_edges",
    "acceleration_target", "dsm_loss", "dynamics_loss", "gaussian_nll", "sample_noise", "score_loss",
    "trajectory_statistics",
]  # ET classes are lazy (torchmd-net import) and left out of * imports
