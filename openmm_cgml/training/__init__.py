"""Training of the embedding, dynamics and score GNNs (``cgml train CONFIG``).

One concept per module:

- :mod:`.config`      the training keys (``TrainConfig``), config files and presets
- :mod:`.data`        data sets, normalisation statistics and the learned distance limits
- :mod:`.optim`       optimiser and learning-rate schedule
- :mod:`.checkpoint`  the checkpoint format (write, read, resume, RNG state)
- :mod:`.distributed` data parallelism over gloo
- :mod:`.metrics`     ``metrics.csv`` and the loss-curve plot
- :mod:`.trainer`     the loop, model selection and the CLI

The networks and their losses live in :mod:`openmm_cgml.models` (``models.net.CGMLNet``
wraps them as one module, ``models.losses`` is the one loss implementation).
"""
from openmm_cgml.training.checkpoint import CHECKPOINT_FORMAT, build_models_from_checkpoint, load_checkpoint
from openmm_cgml.training.config import TrainConfig, load_config, resolve_config_path
from openmm_cgml.training.data import bond_length_limit, build_datasets, data_statistics, distance_pools, exclusion_distance
from openmm_cgml.training.trainer import Trainer, add_cli, train

__all__ = ["CHECKPOINT_FORMAT", "TrainConfig", "Trainer", "add_cli", "bond_length_limit", "build_datasets",
           "build_models_from_checkpoint", "data_statistics", "distance_pools", "exclusion_distance", "load_checkpoint",
           "load_config", "resolve_config_path", "train"]
