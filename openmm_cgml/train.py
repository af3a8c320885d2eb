"""Training of the embedding, dynamics and score GNNs (``cgml train CONFIG``).

Config file (YAML, or TOML by extension ``.toml``; presets in ``openmm_cgml/configs/``,
pass a preset name such as ``chain-demo`` instead of a path)::

    data_dir: /tmp/chain-demo        # a ``cgml generate`` / ``import-trajectory`` data set
    system: chain                    # trajectory kind to use (null: every kind)
    cg_level: 10                     # atoms per bead (METIS), docs/method.md step 3
    small_molecules_as_beads: false
    small_molecule_max_atoms: 20
    seq_len: 10                      # input frames (overrides model.seq_len)
    dilation: 1                      # recorded frames per learned step
    stride: 1                        # between window starts
    val_fraction: 0.25               # validation split *by system*
    split_seed: 0
    model: {...}                     # openmm_cgml.models.ModelConfig fields (backbone gns|et)
    optimizer: {name: adam, lr: 1.0e-4, weight_decay: 0.0, betas: [0.9, 0.999]}
    schedule: {name: cosine, warmup_steps: 0, min_lr_fraction: 0.05}   # or exponential
                                     # {gamma: 0.1, decay_steps: steps} or constant
    grad_clip: 20.0
    batch_size: 8                    # *global* batch (split over DDP ranks)
    steps: 1000
    checkpoint_every: 500
    val_every: 100                   # 0: never (also evaluated at step 0 and at the end)
    val_max_windows: 256             # evenly spaced subset of the validation windows
    log_every: 10
    seed: 0
    models: both                     # both | dynamics
    score_weight: 1.0
    detach_latent: true
    dynamics_noise: true             # multi-scale history noise (docs/method.md step 4)
    augment_rotations: null          # a random rotation of each training window (the
                                     # boundary conditions' symmetry under PBC); null: on
                                     # for backbones that are not rotation-equivariant (gns)
    score_ladder_from_data: null     # [top, bottom]: the score ladder runs from top to
                                     # bottom times the per-step spread (std) of the
                                     # acceleration in the training data; null: the
                                     # model's score_sigma_max/min as given
    exclusion_quantile: 1.0e-3       # excluded volume: the exported dynamics model's
                                     # exclusion_distance (the integrator pushes non-bonded
                                     # beads apart to it after each step) is this quantile
                                     # of the training data's nearest-non-bonded-bead
                                     # distances; null: no excluded volume
    bond_limit_quantile: 1.0e-3      # the bond-length limit (CG bonds longer are pulled in
                                     # after each step) is the (1 - this) quantile of the
                                     # training data's CG bond lengths; null: no limit
    exclusion_calibration: null      # e.g. [0, 1.0e-3, 1.0e-2, 3.0e-2]: after training, the
                                     # exported checkpoint (best.pt or one of the second
                                     # half's step checkpoints) and its limits (each q sets
                                     # exclusion_quantile = bond_limit_quantile = q; 0: no
                                     # limits) are chosen together by rollout validation
                                     # (2 rollout seeds); table: exclusion_calibration.csv
    rollout: {enabled: true, steps: 200, starts: 4, systems: 4, score: false}
                                     # rollout validation at each validation (see
                                     # openmm_cgml.validation): `starts` reference windows
                                     # of up to `systems` validation systems, `steps`
                                     # learned steps each through CGMLIntegrator (with
                                     # refinement if `score`); best.pt is chosen by its
                                     # score, or by the validation NLL when it is off
    train_max_windows: null          # keep only the first N training windows (debugging)
    property_weight: 1.0             # weight of the property head's loss (fine-level Rg^2,
                                     # openmm_cgml.models.property); 0: no property head
    property_hidden_dim: 32          # width of the property head's two hidden layers

Training scheme (decided here): the three networks are trained *jointly* with one Adam
optimiser on ``loss = NLL_dynamics + score_weight * DSM_score``. With ``detach_latent``
(default) the score loss does not flow into the dynamics GNN, so the dynamics GNN and the
embedding GNN see exactly the gradients they would get when trained alone; the score GNN
learns on the (moving) dynamics latent. ``models: dynamics`` trains without the score.

The property head (``property_weight`` > 0) predicts each molecule's fine-level Rg^2
from the target frame's CG positions and the (detached) bead features; its loss
(mean squared relative error, ``models.losses.property_loss``) is added as
``+ property_weight * property``. It sees no gradient path into the other networks and
its gradients are clipped on their own, so the embedding, dynamics and score GNNs train
exactly as without it. Its no-learning baselines on the same windows (the CG Rg^2 alone,
and a constant ratio fitted on the training windows) are printed, written to
``property_baselines.json`` and logged beside its validation loss.

Randomness: model initialisation uses ``seed``. Every random draw of a training step
(position-noise level and noise, DSM level and noise, the augmenting rotation; all in
``openmm_cgml.models.losses``) comes from a generator seeded by
(seed, step, system, start frame) of each sample, so a step's loss does not depend on
the number of DDP ranks nor on where a run was resumed. The window order is
``DistributedSampler``'s (seed, epoch) permutation; a global batch of B windows is the
same set of windows for any number of ranks dividing B.

Outputs in ``--out`` (default: ``runs/<config name>``)::

    config.yaml          the resolved config
    metrics.csv          step, epoch, train_dynamics, train_score, train_property,
                         train_total, val_dynamics, val_score, val_property,
                         val_property_zero_residual, val_property_constant_ratio
                         (the baselines on the same validation windows),
                         val_rollout_* (score, rg2_bias,
                         collisions, relaxation_error, failures),
                         val_reference_collisions, lr, grad_norm, time_s (wall
                         seconds in training steps, excluding validation and
                         checkpoints), cpu_s (process CPU seconds since start)
    loss_curves.png
    exclusion_calibration.csv  with exclusion_calibration: the rollout validation of each
                         candidate checkpoint at each quantile, and the pair best.pt keeps
    property_baselines.json  the property head's baselines: {"train": {...}, "val": {...}}
                         each {"zero_residual", "constant_ratio", "ratio", "pairs"}
    checkpoints/step_<N>.pt, checkpoints/last.pt, checkpoints/best.pt (lowest rollout
                         score, or validation dynamics NLL without rollouts; what
                         `cgml export RUN` exports unless --last)

Checkpoint format (``torch.save`` dict; only tensors and plain types, so it loads with
``torch.load(path, weights_only=True)``)::

    format "openmm-cgml-checkpoint/1", step, epoch, batch_in_epoch, config (dict),
    model_config (dict), atom_vocabulary, bond_vocabulary, bond_type_of_pair (dict
    "A|B" -> bond type), mapping_options (dict), record_interval_ps, step_size_ps,
    kind, periodic, embedding / dynamics / score (state dicts; score None if not
    trained), property (state dict or None), property_config, property_baselines,
    optimizer, scheduler (state dicts), rng {torch, numpy, python},
    metrics (last logged row), versions.

Data-parallel: ``torchrun --nproc_per_node 2 -m openmm_cgml.cli train CONFIG`` (gloo on
CPU); only rank 0 writes files. Gradients are averaged over ranks (one all-reduce per
step), each rank's loss is the mean over its beads, so with graphs of equal size the
update equals the 1-process one. ``Trainer.close`` (called by ``train`` and the CLI)
destroys the process group and joins gloo's worker threads before the process exits.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_FORMAT = "openmm-cgml-checkpoint/1"
CONFIG_DIR = Path(__file__).with_name("configs")
ROLLOUT_COLUMNS = ["val_rollout_score", "val_rollout_rg2_bias", "val_rollout_collisions",
                   "val_reference_collisions", "val_rollout_relaxation_error", "val_rollout_failures"]
PROPERTY_COLUMNS = ["val_property", "val_property_zero_residual", "val_property_constant_ratio"]
METRIC_COLUMNS = ["step", "epoch", "train_dynamics", "train_score", "train_property", "train_total",
                  "val_dynamics", "val_score", *PROPERTY_COLUMNS, *ROLLOUT_COLUMNS, "lr", "grad_norm", "time_s",
                  "cpu_s"]


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    data_dir: str = ""
    system: str | None = None
    cg_level: float = 7.0
    small_molecules_as_beads: bool = False
    small_molecule_max_atoms: int = 20
    seq_len: int = 20
    dilation: int = 100
    stride: int = 1
    val_fraction: float = 0.2
    split_seed: int = 0
    model: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 1e-4})
    schedule: dict = field(default_factory=lambda: {"name": "cosine"})
    grad_clip: float = 20.0
    batch_size: int = 8
    steps: int = 10000
    checkpoint_every: int = 1000
    val_every: int = 500
    val_max_windows: int | None = 512
    log_every: int = 10
    seed: int = 0
    models: str = "both"
    score_weight: float = 1.0
    detach_latent: bool = True
    dynamics_noise: bool = True
    augment_rotations: bool | None = None
    rollout: dict = field(default_factory=dict)
    score_ladder_from_data: list | None = None
    exclusion_quantile: float | None = 1.0e-3
    bond_limit_quantile: float | None = 1.0e-3
    exclusion_calibration: list | None = None
    train_max_windows: int | None = None
    property_weight: float = 1.0
    property_hidden_dim: int = 32
    num_threads: int | None = None
    name: str = ""

    def __post_init__(self):
        """Types and ranges of every key (nested ``model``, ``optimizer``, ``schedule`` too):
        a bad value raises ConfigError (a ValueError) naming the key."""
        from openmm_cgml.models.config import check_fields, check_mapping, check_value, require

        check_fields(self)
        require(self.models in ("both", "dynamics"), "models", self.models, "'both' or 'dynamics'")
        require(self.seq_len >= 2, "seq_len", self.seq_len, ">= 2")
        for key in ("dilation", "stride", "batch_size", "small_molecule_max_atoms"):
            require(getattr(self, key) >= 1, key, getattr(self, key), ">= 1")
        require(self.property_hidden_dim >= 1, "property_hidden_dim", self.property_hidden_dim, ">= 1")
        require(math.isfinite(self.property_weight), "property_weight", self.property_weight, "a finite number")
        for key in ("steps", "checkpoint_every", "val_every", "log_every", "score_weight", "property_weight"):
            require(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        require(0 < self.cg_level < math.inf, "cg_level", self.cg_level, "a positive number (atoms per bead)")
        require(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        require(self.grad_clip > 0, "grad_clip", self.grad_clip, "> 0")
        for key in ("val_max_windows", "train_max_windows", "num_threads"):
            value = getattr(self, key)
            require(value is None or value >= (0 if key == "num_threads" else 1), key, value,
                    ">= 0 or null" if key == "num_threads" else ">= 1 or null")
        self.optimizer = check_mapping("optimizer", self.optimizer, _OPTIMIZER_KEYS)
        name = self.optimizer.get("name", "adam")
        require(name.lower() in ("adam", "adamw", "sgd"), "optimizer.name", name, "adam, adamw or sgd")
        betas = self.optimizer.get("betas")
        if betas is not None:
            require(len(betas) == 2, "optimizer.betas", betas, "a list of two numbers")
            self.optimizer["betas"] = [check_value("optimizer.betas", b, "float") for b in betas]
        require(self.optimizer.get("lr", 1.0) > 0, "optimizer.lr", self.optimizer.get("lr"), "> 0")
        self.schedule = check_mapping("schedule", self.schedule, _SCHEDULE_KEYS)
        if self.score_ladder_from_data is not None:
            ladder = [check_value("score_ladder_from_data", v, "float") for v in self.score_ladder_from_data]
            require(len(ladder) == 2 and 0 < ladder[1] <= ladder[0] < math.inf, "score_ladder_from_data", ladder,
                    "[top, bottom] with top >= bottom > 0")
            self.score_ladder_from_data = ladder
        if self.exclusion_quantile is not None:
            q = check_value("exclusion_quantile", self.exclusion_quantile, "float")
            require(0 < q < 1, "exclusion_quantile", q, "in (0, 1) or null")
            self.exclusion_quantile = q
        if self.bond_limit_quantile is not None:
            q = check_value("bond_limit_quantile", self.bond_limit_quantile, "float")
            require(0 < q < 1, "bond_limit_quantile", q, "in (0, 1) or null")
            self.bond_limit_quantile = q
        if self.exclusion_calibration is not None:
            quantiles = [check_value("exclusion_calibration", v, "float") for v in self.exclusion_calibration]
            require(bool(quantiles) and all(0 <= q < 1 for q in quantiles), "exclusion_calibration", quantiles,
                    "a non-empty list of quantiles in [0, 1) (0: no excluded volume) or null")
            self.exclusion_calibration = quantiles
        self.rollout = {**_ROLLOUT_DEFAULTS, **check_mapping("rollout", self.rollout, _ROLLOUT_KEYS)}
        for key in ("steps", "starts", "systems"):
            require(self.rollout[key] >= (2 if key == "steps" else 1), f"rollout.{key}", self.rollout[key],
                    ">= 2" if key == "steps" else ">= 1")
        name = self.schedule.get("name", "cosine")
        require(name in ("cosine", "exponential", "constant"), "schedule.name", name,
                "cosine, exponential or constant")
        require(self.schedule.get("warmup_steps", 0) >= 0, "schedule.warmup_steps",
                self.schedule.get("warmup_steps"), ">= 0")
        for key in ("gamma", "decay_steps"):
            require(self.schedule.get(key, 1.0) > 0, f"schedule.{key}", self.schedule.get(key), "> 0")
        if "seq_len" in self.model:
            seq = check_value("model.seq_len", self.model["seq_len"], "int")
            if seq != self.seq_len:
                raise ValueError(f"model.seq_len ({seq}) differs from seq_len ({self.seq_len}); set only seq_len")
        self.model_config()  # validates the model dict early

    def check_system_filter(self) -> None:
        """If ``data_dir`` holds a data set, ``system`` (when set) must match some of its
        trajectories: otherwise raise ValueError naming the kinds it has."""
        from openmm_cgml.trajectories import INDEX_FILE, read_index

        if self.system is None or not (Path(self.data_dir) / INDEX_FILE).is_file():
            return
        entries = [e for e in read_index(self.data_dir)["trajectories"] if e.get("complete")]
        kinds = sorted({str(e.get("kind")) for e in entries})
        if not any(e.get("kind") == self.system and e.get("split") == "train" for e in entries):
            have = f"has kinds {kinds}" if kinds else "has no complete trajectories"
            raise ValueError(f"config key system: {self.system!r} matches no complete training trajectory in "
                             f"{self.data_dir} (it {have}; set system to one of them, or null for all)")

    def model_config(self, step_size_ps: float | None = None):
        from openmm_cgml.models import ModelConfig

        data = dict(self.model)
        data["seq_len"] = int(self.seq_len)
        if step_size_ps is not None:
            data["step_size_ps"] = float(step_size_ps)
        return ModelConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)


# keys of the nested ``optimizer`` / ``schedule`` mappings and their types
_OPTIMIZER_KEYS = {"name": "str", "lr": "float", "weight_decay": "float", "betas": "list", "eps": "float",
                   "momentum": "float", "dampening": "float", "nesterov": "bool", "amsgrad": "bool",
                   "maximize": "bool", "foreach": "bool | None"}
_SCHEDULE_KEYS = {"name": "str", "warmup_steps": "int", "min_lr_fraction": "float", "gamma": "float",
                  "decay_steps": "float"}
_ROLLOUT_KEYS = {"enabled": "bool", "steps": "int", "starts": "int", "systems": "int", "score": "bool"}
_ROLLOUT_DEFAULTS = {"enabled": True, "steps": 200, "starts": 4, "systems": 4, "score": False}


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A config file path, or the name of a preset in openmm_cgml/configs (``chain-demo``)."""
    path = Path(name)
    if path.is_file():
        return path
    for suffix in ("", ".yaml", ".yml", ".toml"):
        candidate = CONFIG_DIR / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config file {name!r} (presets: {presets})")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = resolve_config_path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from error
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of keys to values")
    data.setdefault("name", path.stem)
    return data


def _set_nested(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"bad config key {dotted!r}")
    for depth, key in enumerate(keys[:-1]):
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ValueError(f"config key {'.'.join(keys[:depth + 1])} is not a mapping; cannot set {dotted}")
    data[keys[-1]] = value


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a config file (or preset name) and apply dotted ``overrides`` ({"model.rounds": 2}).
    A bad value raises ValueError naming the file and the key (and, for ``system``, the
    trajectory kinds that ``data_dir`` holds)."""
    data = read_config_file(path)
    for key, value in (overrides or {}).items():
        _set_nested(data, key, value)
    try:
        config = TrainConfig.from_dict(data)
        config.check_system_filter()
    except ValueError as error:
        from openmm_cgml.models.config import ConfigError

        kind = ConfigError if isinstance(error, ConfigError) else ValueError
        raise kind(f"{resolve_config_path(path)}: {error}") from error
    return config


# ----------------------------------------------------------------------------- models
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


# ----------------------------------------------------------------------------- data
def _bond_type_table(data_dir, kind: str | None) -> dict[str, str]:
    """{"A|B": bond type} over sorted atom-type pairs of every system of the data set
    (train and test, like the vocabularies); pairs seen with several bond types map to
    "" (ambiguous)."""
    from openmm_cgml.trajectories import list_trajectories, read_metadata

    table: dict[str, set] = {}
    for directory in list_trajectories(data_dir, kind=kind):
        metadata = read_metadata(directory)
        types = metadata["atom_types"]
        for (i, j), bond_type in zip(metadata["bonds"], metadata["bond_types"]):
            key = "|".join(sorted((types[i], types[j])))
            table.setdefault(key, set()).add(bond_type)
    return {k: (next(iter(v)) if len(v) == 1 else "") for k, v in sorted(table.items())}


def build_datasets(config: TrainConfig):
    from openmm_cgml.dataset import make_train_val_datasets

    if not config.data_dir:
        raise ValueError("the config needs data_dir (a generated data set)")
    if not Path(config.data_dir).is_dir():
        raise FileNotFoundError(f"data_dir {config.data_dir} does not exist; make it with `cgml generate`")
    config.check_system_filter()
    train_set, val_set = make_train_val_datasets(
        config.data_dir, config.cg_level, config.seq_len, config.dilation, config.val_fraction,
        seed=config.split_seed, stride=config.stride, kind=config.system,
        small_molecules_as_beads=config.small_molecules_as_beads,
        small_molecule_max_atoms=config.small_molecule_max_atoms)
    if config.train_max_windows is not None:
        train_set.index = train_set.index[: int(config.train_max_windows)]
    if len(train_set) == 0:
        raise ValueError("no training windows: trajectories shorter than seq_len x dilation + 1 frames?")
    return train_set, val_set


def data_statistics(train_set, dilation: int) -> dict[str, float]:
    """Velocity / acceleration std (nm/step, nm/step^2) and bead-mass mean/std of the training set."""
    velocities, accelerations = [], []
    for trajectory in train_set.trajectories:
        frames = torch.as_tensor(trajectory.positions[::dilation], dtype=torch.float64)
        if frames.size(0) >= 3:
            v = frames[1:] - frames[:-1]
            velocities.append(v.reshape(-1))
            accelerations.append((v[1:] - v[:-1]).reshape(-1))
    masses = np.concatenate([s.bead_masses for s in train_set.systems]).astype(np.float64)
    return {"velocity_std": float(torch.cat(velocities).std()),
            "acceleration_std": float(torch.cat(accelerations).std()),
            "mass_mean": float(masses.mean()), "mass_std": float(masses.std())}


def distance_pools(dataset, max_frames: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The pair distances the distance limits are learned from, pooled over at most
    ``max_frames`` evenly spaced frames of each trajectory: (nearest-non-bonded-bead
    distances, CG bond lengths), nm. Computed once, read at any quantile."""
    from openmm_cgml import analysis

    nonbonded, bonded = [], []
    for trajectory, graph in zip(dataset.trajectories, dataset.systems):
        frames = np.unique(np.linspace(0, trajectory.n_frames - 1, min(max_frames, trajectory.n_frames)).astype(int))
        if trajectory.n_beads >= 2:
            d = analysis.nearest_nonbonded_distances(trajectory.positions, trajectory.box, graph.cg_bonds, frames)
            nonbonded.append(d[np.isfinite(d)].ravel())
        bonds = np.asarray(graph.cg_bonds).reshape(-1, 2)
        if len(bonds):
            x = trajectory.positions[frames].astype(np.float64)
            bonded.append(np.linalg.norm(x[:, bonds[:, 1]] - x[:, bonds[:, 0]], axis=-1).ravel())
    pool = lambda parts: np.concatenate(parts) if parts else np.empty(0)  # noqa: E731
    return pool(nonbonded), pool(bonded)


def exclusion_distance(dataset, quantile: float | None, max_frames: int = 200, pools=None) -> float:
    """The excluded-volume distance (nm) learned from data: ``quantile`` of the
    nearest-non-bonded-bead distances pooled over at most ``max_frames`` evenly spaced
    frames of each training trajectory (0.0 for None or when no bead has a non-bonded
    neighbour). The default 1e-3 sits just above the data's closest approach (the very
    minimum is one outlier frame: on 100-monomer chains 1.5 nm against ~2.05 nm for the
    1e-3 quantile of every chain length), so the correction only removes overlaps the
    data almost never shows. ``pools``: ``distance_pools(dataset, max_frames)``, if
    already computed."""
    if quantile is None:
        return 0.0
    pooled = (pools if pools is not None else distance_pools(dataset, max_frames))[0]
    return float(np.quantile(pooled, quantile)) if pooled.size else 0.0


def bond_length_limit(dataset, quantile: float | None, max_frames: int = 200, pools=None) -> float:
    """The bond-length limit (nm) learned from data: the (1 - ``quantile``) quantile of
    the CG bond lengths pooled over at most ``max_frames`` evenly spaced frames of each
    training trajectory (0.0 for None or without CG bonds). Learned rollouts whose bonds
    outgrow the data's range are out of distribution, and the model does not pull them
    back: on the pretrained chain data, bonds of a swelling rollout reached 40 nm
    against at most ~5 nm in MD. ``pools``: as for ``exclusion_distance``."""
    if quantile is None:
        return 0.0
    pooled = (pools if pools is not None else distance_pools(dataset, max_frames))[1]
    return float(np.quantile(pooled, 1.0 - quantile)) if pooled.size else 0.0


def _evenly_spaced(n: int, limit: int | None) -> list[int]:
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, int(limit)).round().astype(int).tolist()))


# ----------------------------------------------------------------------------- schedule
def lr_factor(schedule: dict, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    name = schedule.get("name", "cosine")
    warmup = int(schedule.get("warmup_steps", 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0, step - warmup) / span)
    if name == "cosine":
        floor = float(schedule.get("min_lr_fraction", 0.0))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "exponential":
        gamma = float(schedule.get("gamma", 0.1))
        decay_steps = float(schedule.get("decay_steps", span))
        return gamma ** (max(0, step - warmup) / decay_steps)
    raise ValueError(f"unknown LR schedule {name!r} (cosine, exponential, constant)")


def make_optimizer(params, config: TrainConfig):
    options = dict(config.optimizer)
    name = options.pop("name", "adam").lower()
    options.setdefault("lr", 1e-4)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r} ({sorted(classes)})")
    return classes[name](params, **options)


# ----------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _versions() -> dict[str, str]:
    import openmm

    import openmm_cgml

    return {"openmm_cgml": openmm_cgml.__version__, "torch": str(torch.__version__),
            "openmm": openmm.__version__, "python": sys.version.split()[0]}


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint (safe loader: tensors and plain types only). A missing file
    is FileNotFoundError; an unreadable, corrupt or foreign one ValueError naming the
    file and what was expected."""
    path = Path(path)
    expected = f"expected a torch.save dict with format {CHECKPOINT_FORMAT!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt zip, foreign pickle, ...
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not an openmm-cgml checkpoint ({expected}; reading it failed: "
                         f"{type(err).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = f"a dict with format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an openmm-cgml checkpoint ({expected}; found {found})")
    return ckpt


def build_models_from_checkpoint(ckpt: dict[str, Any]) -> CGMLNet:
    from openmm_cgml.models import ModelConfig

    with_property = ckpt.get("property") is not None and ckpt.get("property_config")
    net = CGMLNet(ModelConfig.from_dict(ckpt["model_config"]), len(ckpt["atom_vocabulary"]),
                  len(ckpt["bond_vocabulary"]), with_score=ckpt["score"] is not None,
                  property_config=ckpt["property_config"] if with_property else None)
    net.embedding.load_state_dict(ckpt["embedding"])
    net.dynamics.load_state_dict(ckpt["dynamics"])
    net.dynamics.exclusion_distance = float(ckpt.get("exclusion_distance", 0.0))
    net.dynamics.bond_length_limit = float(ckpt.get("bond_length_limit", 0.0))
    if net.score is not None:
        net.score.load_state_dict(ckpt["score"])
    if net.property is not None:
        net.property.load_state_dict(ckpt["property"])
    return net


# ----------------------------------------------------------------------------- sampler
class _SkipSampler(torch.utils.data.Sampler):
    """Epoch permutation of a DistributedSampler, starting ``skip`` indices in (resume)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self):
        return max(0, len(self.sampler) - self.skip)


# ----------------------------------------------------------------------------- trainer
def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) from torchrun's
    environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        # torch._dynamo (which torchmd-net imports) takes references to any process group
        # that exists when it is first imported, so that group is never freed and its
        # worker threads outlive destroy_process_group (see Trainer.close): import it first.
        importlib.import_module("torch._dynamo")
        torch.distributed.init_process_group("gloo")
        return rank, world, True
    return rank, world, False


def _broadcast_parameters(net: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers."""
    tensors = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    torch.distributed.broadcast(flat, 0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _average_gradients(net: nn.Module, world: int) -> None:
    """Data-parallel gradients: the mean over ranks, in one all-reduce. A parameter
    that no rank gave a gradient keeps ``grad=None`` (the optimiser skips it, as in one
    process); one that some ranks did not reach counts as zero there."""
    params = [p for p in net.parameters() if p.requires_grad]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    grads = [p.grad.detach().reshape(-1).double() if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float64) for p in params]
    flat = torch.cat([has_grad] + grads)
    torch.distributed.all_reduce(flat)
    offset = len(params)
    for p, count in zip(params, flat[:len(params)].tolist()):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        p.grad = (chunk / world).view_as(p).to(p.dtype) if count > 0 else None


def gloo_worker_threads() -> int:
    """Running gloo worker threads of this process (Linux; 0 where /proc is missing)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    count = 0
    for task in tasks.iterdir():
        try:
            count += (task / "comm").read_text().startswith("pt_gloo")
        except OSError:  # the thread ended while we looked
            pass
    return count


def _write_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(float(row["step"])) <= up_to_step]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
    os.replace(tmp, path)


def plot_metrics(rows: list[dict], png: Path) -> None:
    """Loss curves (train/val NLL and DSM) and, beside them, the rollout validation."""
    from openmm_cgml.plots import plot_training_curves

    def column(name):
        return np.array([float(r[name]) if r.get(name) not in ("", None) else np.nan for r in rows])

    losses = {c: column(c) for c in ("train_dynamics", "train_score", "val_dynamics", "val_score")}
    losses = {c: v for c, v in losses.items() if np.isfinite(v).any()}
    if not rows or not losses:
        return
    rollout = {c.removeprefix("val_"): column(c) for c in ("val_rollout_rg2_bias", "val_rollout_collisions",
                                                            "val_reference_collisions")}
    plot_training_curves(column("step"), losses, rollout, path=png, title=png.parent.name)


class Trainer:
    """One training run (see the module docstring). ``Trainer(config, out).run()``."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
                 progress: bool = True):
        self.config = config
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.rank, self.world, self._owns_process_group = _distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} ranks")
        if config.num_threads:
            torch.set_num_threads(int(config.num_threads))

    # -- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        config = self.config
        _seed_everything(config.seed)
        # rank 0 coarse-grains first (and writes the CG caches); the others then read them
        if self.world > 1 and self.rank != 0:
            torch.distributed.barrier()
        self.train_set, self.val_set = build_datasets(config)
        if self.world > 1 and self.rank == 0:
            torch.distributed.barrier()
        trajectories = self.train_set.trajectories
        intervals = {round(t.record_interval_ps, 9) for t in trajectories}
        if len(intervals) != 1:
            raise ValueError(f"training trajectories have different record intervals {sorted(intervals)}")
        self.record_interval_ps = float(trajectories[0].record_interval_ps)
        self.step_size_ps = config.dilation * self.record_interval_ps
        self.stats = data_statistics(self.train_set, config.dilation)
        self.model_config = config.model_config(self.step_size_ps)
        if config.score_ladder_from_data is not None:
            top, bottom = config.score_ladder_from_data
            spread = self.stats["acceleration_std"]
            self.model_config = dataclasses.replace(self.model_config, score_sigma_max=top * spread,
                                                    score_sigma_min=bottom * spread)
        self.property_config = None
        if config.property_weight > 0:
            self.property_config = {"hidden_dim": int(config.property_hidden_dim), "hidden_layers": 2}
        self.net = CGMLNet(self.model_config, len(self.train_set.atom_vocabulary),
                           len(self.train_set.bond_vocabulary), with_score=config.models == "both",
                           property_config=self.property_config)
        if self.property_config:
            self.property_config["num_features"] = int(self.net.embedding.num_features)
        num_features = self.net.embedding.num_features
        feature_mean = torch.zeros(num_features)
        feature_std = torch.ones(num_features)
        feature_mean[-1] = self.stats["mass_mean"]
        feature_std[-1] = self.stats["mass_std"]
        self.net.dynamics.set_normalization(self.stats["velocity_std"], self.stats["acceleration_std"],
                                            feature_mean, feature_std)
        self.property_baselines = self._setup_property(feature_mean, feature_std)
        pools = distance_pools(self.train_set)
        self.net.dynamics.exclusion_distance = exclusion_distance(self.train_set, config.exclusion_quantile, pools=pools)
        self.net.dynamics.bond_length_limit = bond_length_limit(self.train_set, config.bond_limit_quantile, pools=pools)
        if self.rank == 0 and self.progress:
            print(f"distance limits from the training data: excluded volume "
                  f"{self.net.dynamics.exclusion_distance:.4g} nm, bond-length limit "
                  f"{self.net.dynamics.bond_length_limit:.4g} nm (0: off)")
        if self.net.score is not None:
            self.net.score.set_normalization(self.stats["mass_mean"], self.stats["mass_std"])
        self.augment_rotations = (config.augment_rotations if config.augment_rotations is not None
                                  else self.model_config.backbone != "et")
        self.noise_ladder = self.model_config.noise_sigmas() if config.dynamics_noise else None
        self.score_ladder = self.net.score.sigmas.clone() if self.net.score is not None else None
        self.optimizer = make_optimizer(self.net.parameters(), config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(config.schedule, s, config.steps))
        if self.world > 1:
            _broadcast_parameters(self.net)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.rows: list[dict] = []
        self.elapsed = 0.0
        self._cpu0 = time.process_time()
        self.periodic = any(s.periodic for s in self.train_set.systems)
        self.validator = None
        rollout = config.rollout
        if rollout["enabled"] and config.val_every and len(self.val_set) and self.rank == 0:
            from openmm_cgml.validation import RolloutValidator

            self.validator = RolloutValidator(self.val_set, config.dilation, rollout["steps"], rollout["starts"],
                                              rollout["systems"], config.seed, rollout["score"]) or None
        self.bond_type_of_pair = _bond_type_table(config.data_dir, config.system)

    def _setup_property(self, feature_mean: torch.Tensor, feature_std: torch.Tensor) -> dict[str, Any]:
        """Normalise the property head from the training windows and measure its
        no-learning baselines (train: every training window; val: the windows
        ``validate`` uses). Returns {"train": {...}, "val": {...}} ({} without a head)."""
        from openmm_cgml.models.property import baseline_losses

        if self.net.property is None:
            return {}
        cg, fine = self.train_set.rg2_pairs()
        keep = np.isfinite(fine) & (fine > 0)
        residual = float(np.mean(fine[keep] - cg[keep])) if keep.any() else 1.0
        reference = float(np.mean(cg[keep])) if keep.any() else 1.0
        self.net.property.set_normalization(feature_mean, feature_std, residual, reference)
        train = {**baseline_losses(cg, fine), "pairs": int(keep.sum())}
        baselines: dict[str, Any] = {"train": train, "residual_scale_nm2": residual, "rg2_reference_nm2": reference}
        if len(self.val_set):
            vcg, vfine = self.val_set.rg2_pairs(_evenly_spaced(len(self.val_set), self.config.val_max_windows))
            vkeep = np.isfinite(vfine) & (vfine > 0)
            baselines["val"] = {**baseline_losses(vcg, vfine, train["ratio"]), "pairs": int(vkeep.sum())}
        if self.rank == 0 and self.progress:
            text = "; ".join(f"{split}: zero residual {b['zero_residual']:.4g}, constant ratio "
                             f"{b['constant_ratio']:.4g} (c = {b['ratio']:.4g})"
                             for split, b in baselines.items() if isinstance(b, dict))
            print(f"property head baselines (mean squared relative error of fine Rg^2) {text}")
        return baselines

    def _checkpoint_dict(self) -> dict[str, Any]:
        config = self.config
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed,
            "config": config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "atom_vocabulary": list(self.train_set.atom_vocabulary),
            "bond_vocabulary": list(self.train_set.bond_vocabulary),
            "bond_type_of_pair": dict(self.bond_type_of_pair),
            "mapping_options": {"cg_level": float(config.cg_level),
                                "small_molecules_as_beads": bool(config.small_molecules_as_beads),
                                "small_molecule_max_atoms": int(config.small_molecule_max_atoms),
                                "seed": 0},
            "record_interval_ps": self.record_interval_ps,
            "step_size_ps": self.step_size_ps,
            "kind": config.system,
            "periodic": bool(self.periodic),
            "data_statistics": dict(self.stats),
            "exclusion_distance": float(self.net.dynamics.exclusion_distance),
            "bond_length_limit": float(self.net.dynamics.bond_length_limit),
            "train_systems": [s.name for s in self.train_set.systems],
            "val_systems": [s.name for s in self.val_set.systems],
            "embedding": self.net.embedding.state_dict(),
            "dynamics": self.net.dynamics.state_dict(),
            "score": self.net.score.state_dict() if self.net.score is not None else None,
            "property": self.net.property.state_dict() if self.net.property is not None else None,
            "property_config": dict(self.property_config) if self.property_config else None,
            "property_baselines": copy.deepcopy(self.property_baselines),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "metrics": dict(self.rows[-1]) if self.rows else {},
            "selected_by": self.selection_metric,
            "versions": _versions(),
        }

    @property
    def selection_metric(self) -> str:
        """The metrics column that chooses best.pt (lower is better)."""
        return "val_rollout_score" if self.validator is not None else "val_dynamics"

    def _best_val(self) -> float:
        """Lowest selection metric logged before the newest row, over trained steps: the
        untrained step-0 networks are logged as a baseline but have no checkpoint (the
        demo's step-0 rollouts once scored best, so no best.pt was ever written)."""
        key = self.selection_metric
        values = [float(r[key]) for r in self.rows[:-1] if r.get(key) not in (None, "") and int(r["step"]) > 0]
        return min(values) if values else float("inf")

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """``checkpoints/step_<N>.pt`` + ``last.pt``; with ``best``, ``best.pt`` only
        (the lowest ``selection_metric`` so far)."""
        if self.rank != 0:
            return None
        directory = self.out / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpoint_dict()
        if best:
            _write_atomic(ckpt, directory / "best.pt")
            return directory / "best.pt"
        path = directory / f"step_{self.step:07d}.pt"
        _write_atomic(ckpt, path)
        shutil.copyfile(path, directory / "last.pt.tmp")
        os.replace(directory / "last.pt.tmp", directory / "last.pt")
        return path

    def _resume_checkpoint(self, last: Path) -> tuple[Path, dict[str, Any]]:
        """``last.pt`` and its contents; if it is missing or unreadable (a warning says
        so, with its path), the newest readable ``checkpoints/step_N.pt`` (a warning
        names it, and every newer one skipped as unreadable)."""
        import re
        import warnings

        if last.exists():
            try:
                return last, load_checkpoint(last)
            except ValueError as err:
                warnings.warn(f"--resume: {last} is unreadable ({err}); falling back to the newest readable "
                              f"{last.parent}/step_N.pt", stacklevel=3)

        def step_of(path: Path) -> int:
            match = re.fullmatch(r"step_(\d+)\.pt", path.name)
            return int(match.group(1)) if match else -1

        candidates = sorted((p for p in last.parent.glob("step_*.pt") if step_of(p) >= 0), key=step_of, reverse=True)
        for path in candidates:
            try:
                ckpt = load_checkpoint(path)
            except ValueError as err:
                warnings.warn(f"--resume: skipping unreadable {path} ({err})", stacklevel=3)
                continue
            warnings.warn(f"--resume: resuming from {path} (step {ckpt.get('step')}) instead of {last}",
                          stacklevel=3)
            return path, ckpt
        state = "is unreadable" if last.exists() else "does not exist"
        raise FileNotFoundError(f"--resume: no checkpoint to resume from: {last} {state} and "
                                f"{last.parent} has no readable step_N.pt")

    def _restore(self, path: Path, ckpt: dict[str, Any] | None = None) -> None:
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if ckpt["model_config"] != self.model_config.to_dict():
            raise ValueError(f"{path}: its model config differs from this config's; cannot resume")
        if (ckpt.get("property") is None) != (self.net.property is None):
            have = "has no property head" if ckpt.get("property") is None else "has a property head"
            raise ValueError(f"{path}: the checkpoint {have} but this config's property_weight is "
                             f"{self.config.property_weight}; resume with the property_weight it was trained with")
        self.net.embedding.load_state_dict(ckpt["embedding"])
        self.net.dynamics.load_state_dict(ckpt["dynamics"])
        if self.net.score is not None:
            self.net.score.load_state_dict(ckpt["score"])
        if self.net.property is not None:
            self.net.property.load_state_dict(ckpt["property"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.elapsed = float(ckpt.get("elapsed_s", 0.0))
        self.rows = _read_metrics(self.out / "metrics.csv", self.step)

    # -- data --------------------------------------------------------------------------
    def _loader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        per_rank = self.config.batch_size // self.world
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.config.seed, drop_last=True)
        batches_per_epoch = len(sampler) // per_rank
        if batches_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training windows cannot fill one batch of "
                             f"{self.config.batch_size}")
        while True:
            sampler.set_epoch(self.epoch)
            skip = self.batch_in_epoch * per_rank
            loader = DataLoader(self.train_set, batch_size=per_rank, sampler=_SkipSampler(sampler, skip),
                                collate_fn=self.train_set.collate, drop_last=True, num_workers=0)
            for batch in loader:
                self.batch_in_epoch += 1  # counted before use: a checkpoint after it skips it
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean losses over a fixed subset of validation windows: clean history (no
        position noise), DSM noise drawn with a fixed key, so values are comparable."""
        from openmm_cgml.models.losses import sample_noise

        if len(self.val_set) == 0:
            return {}
        self.net.eval()
        indices = _evenly_spaced(len(self.val_set), self.config.val_max_windows)
        per_rank = max(1, self.config.batch_size // self.world)
        totals: dict[str, float] = {}
        weight = 0
        for start in range(0, len(indices), per_rank):
            batch = self.val_set.collate([self.val_set[i] for i in indices[start:start + per_rank]])
            noise = sample_noise(batch, self.config.seed, -1, None, self.score_ladder, rotate=False)
            losses = self.net(batch, noise, self.config.score_weight, True, self.config.property_weight)
            n = int(batch["system"].numel())
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value) * n
            weight += n
        result = {k: v / weight for k, v in totals.items()}
        if "val" in self.property_baselines:
            result["property_zero_residual"] = self.property_baselines["val"]["zero_residual"]
            result["property_constant_ratio"] = self.property_baselines["val"]["constant_ratio"]
        if self.net.score is not None and self.rank == 0:
            self._log_dsm_levels(indices[:64])
        if self.validator is not None:
            result.update(self.validator.evaluate(self.net))
        self.net.train()
        return result

    @torch.no_grad()
    def _log_dsm_levels(self, indices: list[int]) -> None:
        """Validation DSM loss at each level of the ladder, appended to dsm_levels.csv
        beside its no-information value (1.5: a zero score): where the level lies below
        the data's own next-step spread, little more is learnable."""
        from openmm_cgml.models.losses import sample_noise, score_loss

        batch = self.val_set.collate([self.val_set[i] for i in indices])
        noise = sample_noise(batch, self.config.seed, -1, None, self.score_ladder)
        features = self.net.bead_features(batch)
        _, _, latent = self.net.dynamics.forward_batch(batch["history"], batch["box"], features, batch["cg_bonds"],
                                                       batch["batch"])
        path = self.out / "dsm_levels.csv"
        kept = []  # rows of earlier steps (a resumed run rewrites what came after its checkpoint)
        if path.exists():
            with open(path, newline="") as handle:
                kept = [r for r in csv.reader(handle)][1:]
            kept = [r for r in kept if int(r[0]) < self.step]
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "level", "sigma_nm", "val_dsm", "no_information"])
            writer.writerows(kept)
            for level, sigma in enumerate(self.score_ladder.tolist()):
                value = score_loss(self.net.score, batch["target"], latent, batch["box"], features,
                                   batch["cg_bonds"], batch["batch"], torch.full_like(noise["score_sigma"], sigma),
                                   noise["score_z"])
                writer.writerow([self.step, level, f"{sigma:.6g}", f"{float(value):.6g}", 1.5])

    # -- loop ----------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train up to ``config.steps`` (or stop once ``stop_after`` steps are done,
        checkpointing there: an interruption that ``--resume`` continues exactly)."""
        from openmm_cgml.models.losses import sample_noise

        config = self.config
        last = self.out / "checkpoints" / "last.pt"
        if not self.resume and last.exists():  # every rank: each then stops with this message
            raise FileExistsError(f"{self.out} already holds a run; use --resume or another --out")
        self._setup()
        if self.resume:
            self._restore(*self._resume_checkpoint(last))
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            if self.property_baselines:
                (self.out / "property_baselines.json").write_text(json.dumps(self.property_baselines, indent=1))
        target = config.steps if stop_after is None else min(config.steps, int(stop_after))
        self.net.train()
        if self.step == 0 and config.val_every and self.rank == 0:
            self._log_row(None, self.validate(), float("nan"))
        bar = None
        if self.progress and self.rank == 0 and self.step < target:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=self.step, desc=f"train {config.name or ''}".strip(),
                       dynamic_ncols=True)
        data = self._loader() if self.step < target else iter(())
        window: dict[str, list] = {}
        grad_norm = float("nan")
        t_last = time.perf_counter()
        while self.step < target:
            batch = next(data)
            noise = sample_noise(batch, config.seed, self.step, self.noise_ladder, self.score_ladder,
                                 rotate=self.augment_rotations)
            losses = self.net(batch, noise, config.score_weight, config.detach_latent, config.property_weight)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if self.world > 1:
                _average_gradients(self.net, self.world)
            grad_norm = float(nn.utils.clip_grad_norm_(self.net.main_parameters(), config.grad_clip))
            if self.net.property is not None:  # clipped on its own: it cannot scale the others' step
                nn.utils.clip_grad_norm_(self.net.property.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            values = torch.stack([v.detach() for v in losses.values()])
            if self.world > 1:
                torch.distributed.all_reduce(values)
                values /= self.world
            for key, value in zip(losses, values.tolist()):
                window.setdefault(key, []).append(value)
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v[-1]:.3g}" for k, v in window.items()}, refresh=False)
            do_val = config.val_every and (self.step % config.val_every == 0 or self.step == config.steps)
            do_log = self.step % max(1, config.log_every) == 0 or do_val or self.step == target
            if do_log and self.rank == 0:
                val = self.validate() if do_val else {}
                train = {k: float(np.mean(v)) for k, v in window.items()}
                self._log_row(train, val, grad_norm)
                _write_metrics(self.out / "metrics.csv", self.rows)
                chosen_by = self.selection_metric
                if chosen_by in self.rows[-1] and float(self.rows[-1][chosen_by]) < self._best_val():
                    self.save_checkpoint(best=True)
                t_last = time.perf_counter()
            if do_log:
                window = {}
            if self.step % max(1, config.checkpoint_every) == 0 or self.step == target:
                self.save_checkpoint()
                if self.rank == 0:
                    _write_metrics(self.out / "metrics.csv", self.rows)
                    plot_metrics(self.rows, self.out / "loss_curves.png")
                t_last = time.perf_counter()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            _write_metrics(self.out / "metrics.csv", self.rows)
            if not (self.out / "checkpoints" / "last.pt").exists():
                self.save_checkpoint()
            if self.step >= config.steps and config.exclusion_calibration and self.validator is not None:
                self.calibrate_exclusion()
        if self.world > 1:
            torch.distributed.barrier()
        return {"step": self.step, "metrics": self.rows, "out": self.out,
                "checkpoint": self.out / "checkpoints" / "last.pt"}

    def calibrate_exclusion(self, seeds: int = 2) -> dict[str, Any] | None:
        """Choose the exported model and its distance limits together, by rollout
        validation with the limits on: candidates are best.pt and every step checkpoint of
        the second half of training; each is rolled out (the trainer's rollout settings,
        ``seeds`` rollout seeds) at each quantile q of ``exclusion_calibration`` (excluded
        volume at the q quantile of nearest-non-bonded distances, bond-length limit at the
        1 - q quantile of CG bond lengths; 0: neither). The pair with the lowest mean
        rollout score becomes best.pt (what ``cgml export`` exports), with its limits; the
        table goes to ``exclusion_calibration.csv``. Validation systems only: held-out
        test systems play no part. Done once per run (best.pt records it).

        Why not only during training: selection there runs with the initial limits, and
        the limits change which checkpoint rolls out best (a checkpoint whose chains
        swelled by +413 % without a bond-length limit came to -34 % with one).
        """
        import re

        from openmm_cgml.validation import RolloutValidator

        directory = self.out / "checkpoints"
        best = directory / "best.pt"
        candidates = {}
        if best.exists():
            best_ckpt = load_checkpoint(best)
            if best_ckpt.get("exclusion_calibration"):
                return best_ckpt["exclusion_calibration"]
            candidates[int(best_ckpt["step"])] = best
        for path in directory.glob("step_*.pt"):
            match = re.fullmatch(r"step_(\d+)\.pt", path.name)
            if match and int(match.group(1)) >= self.config.steps // 2:
                candidates.setdefault(int(match.group(1)), path)
        if not candidates:
            return None
        rollout = self.config.rollout
        validators = [RolloutValidator(self.val_set, self.config.dilation, rollout["steps"], rollout["starts"],
                                       rollout["systems"], self.config.seed + k, False) for k in range(seeds)]
        limits, pools = {}, distance_pools(self.train_set)
        for quantile in self.config.exclusion_calibration:
            limits[quantile] = ((exclusion_distance(self.train_set, quantile, pools=pools),
                                 bond_length_limit(self.train_set, quantile, pools=pools)) if quantile > 0 else (0.0, 0.0))
        rows = []
        for step in sorted(candidates):
            net = build_models_from_checkpoint(load_checkpoint(candidates[step])).eval()
            for quantile, (distance, limit) in limits.items():
                net.dynamics.exclusion_distance, net.dynamics.bond_length_limit = distance, limit
                results = [validator.evaluate(net) for validator in validators]
                row = {"step": step, "quantile": float(quantile), "distance_nm": distance, "bond_limit_nm": limit}
                row.update({k: float(np.mean([r[k] for r in results])) for k in results[0]})
                rows.append(row)
                if self.progress:
                    print(f"step {step}, limits quantile {quantile:g} (exclusion {distance:.3f} nm, bonds <= "
                          f"{limit:.3f} nm): score {row['rollout_score']:.4f}, Rg^2 bias "
                          f"{row['rollout_rg2_bias']:+.3f}, relaxation error {row['rollout_relaxation_error']:+.3f}, "
                          f"collisions {row['rollout_collisions']:.4f} (reference {row['reference_collisions']:.4f})",
                          flush=True)
        chosen = min(rows, key=lambda r: r["rollout_score"])
        with open(self.out / "exclusion_calibration.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + ["chosen"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "chosen": row is chosen})
        ckpt = load_checkpoint(candidates[chosen["step"]])
        ckpt["exclusion_distance"] = chosen["distance_nm"]
        ckpt["bond_length_limit"] = chosen["bond_limit_nm"]
        ckpt["exclusion_calibration"] = {"chosen_step": chosen["step"], "chosen_quantile": chosen["quantile"],
                                         "rows": rows, "seeds": seeds, "rollout": dict(rollout)}
        ckpt["metrics"] = {**ckpt.get("metrics", {}), **{f"val_{k}": v for k, v in chosen.items()
                                                         if k.startswith("rollout_") or k == "reference_collisions"}}
        _write_atomic(ckpt, best)
        return ckpt["exclusion_calibration"]

    def close(self) -> None:
        """Destroy the process group this trainer created, and wait for gloo's worker
        threads to end, while the interpreter is fully alive.

        Why: a gloo worker can hold the last reference to a tensor that Python created
        (a collective's input) a moment after the collective completed. If that reference
        drops while the interpreter is finalizing, freeing the tensor needs the GIL, the
        thread is torn down by ``pthread_exit`` inside a noexcept destructor, and the
        process aborts with "terminate called without an active exception" (a rank dying
        at exit, more often on a loaded machine). The group's destructor joins the
        workers (releasing the GIL), but only once nothing references the group any more;
        that is why gradients are averaged here rather than by DistributedDataParallel,
        whose construction leaves references to the group behind for the process's life."""
        if not self._owns_process_group or not torch.distributed.is_initialized():
            return
        torch.distributed.destroy_process_group()
        gc.collect()
        self._owns_process_group = False
        alive = gloo_worker_threads()
        if alive:
            warnings.warn(f"rank {self.rank}: {alive} gloo worker threads still running after the process "
                          "group was destroyed; the process may abort at exit", RuntimeWarning, stacklevel=2)

    def _log_row(self, train: dict | None, val: dict, grad_norm: float) -> None:
        row = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "time_s": round(self.elapsed, 4),
               "cpu_s": round(time.process_time() - self._cpu0, 3)}
        for key, value in (train or {}).items():
            row[f"train_{key}"] = value
        for key, value in val.items():
            row[f"val_{key}"] = value
        self.rows.append(row)


def train(config: TrainConfig | str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, stop_after: int | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns {"step", "metrics" (rows), "out", "checkpoint"}."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        data = config.to_dict()
        for key, value in overrides.items():
            _set_nested(data, key, value)
        config = TrainConfig.from_dict(data)
    trainer = Trainer(config, out_dir, resume=resume, progress=progress)
    try:
        return trainer.run(stop_after=stop_after)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- CLI
def _parse_set(values) -> dict[str, Any]:
    import yaml

    out = {}
    for item in values or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            out[key.strip()] = text  # not YAML: the text itself (the config check judges it)
    return out


def _run_train(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.steps is not None:
        overrides["steps"] = args.steps
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / (config.name or Path(args.config).stem)
    trainer = Trainer(config, out, resume=args.resume, progress=not args.no_progress)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if trainer.rank == 0:
        last = result["metrics"][-1] if result["metrics"] else {}
        summary = {k: last.get(k) for k in ("step", "train_dynamics", "train_score", "val_dynamics", "val_score",
                                            *(PROPERTY_COLUMNS if config.property_weight > 0 else ()))}
        print(f"trained to step {result['step']}: {json.dumps(summary)}\ncheckpoint: {result['checkpoint']}")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the embedding, dynamics and score GNNs",
        description="Train from a YAML/TOML config (or a preset name: chain-tiny, chain-demo, "
                    "chain-full, electrolyte-demo, electrolyte-full). Data-parallel under "
                    "`torchrun --nproc_per_node N -m openmm_cgml.cli train ...`.")
    parser.add_argument("config", help="config file or preset name")
    parser.add_argument("--out", help="run directory (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    parser.add_argument("--data-dir", help="override data_dir")
    parser.add_argument("--steps", type=int, help="override steps")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override any config field, dotted for nested (model.backbone=et)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_train)
