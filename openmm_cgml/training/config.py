"""Training configuration: the one definition of every training key, its type and range.

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
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def set_nested(data: dict, dotted: str, value) -> None:
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
        set_nested(data, key, value)
    try:
        config = TrainConfig.from_dict(data)
        config.check_system_filter()
    except ValueError as error:
        from openmm_cgml.models.config import ConfigError

        kind = ConfigError if isinstance(error, ConfigError) else ValueError
        raise kind(f"{resolve_config_path(path)}: {error}") from error
    return config
