"""Model configuration (defaults = docs/method.md's electrolyte configuration, lengths in nm)
and the factories that build the three networks from it."""
from __future__ import annotations

import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

ANGSTROM = 0.1  # nm


# ------------------------------------------------------------------- config value checks
class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a mapping", "list": "a list", "None": "null"}
# YAML 1.1 (PyYAML) reads ``1e-4`` (no decimal point) as a string; such text is a number here
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def check_value(key: str, value: Any, annotation: str) -> Any:
    """``value`` checked against a type annotation (``"int"``, ``"float | None"``, ``"dict"``,
    ...); returns it, with integers (and YAML 1.1 number text such as ``1e-4``) given for a
    ``float`` field converted to float. Booleans are not integers here. Raises
    :class:`ConfigError` ("config key seq_len: expected an integer, got 'three'")."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
    else:
        is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy bool too
        for kind in kinds:
            if kind == "bool" and is_bool:
                return bool(value)
            if kind == "int" and isinstance(value, numbers.Integral) and not is_bool:
                return int(value)
            if kind == "float" and not is_bool:
                if isinstance(value, numbers.Real):
                    return float(value)
                if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
                    return float(value)
            if kind == "str" and isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
            if kind == "dict" and isinstance(value, dict):
                return value
            if kind == "list" and isinstance(value, (list, tuple)):
                return list(value)
    wanted = " or ".join(_KIND_WORDS.get(k, k) for k in kinds)
    got = "null" if value is None else repr(value)
    raise ConfigError(f"config key {key}: expected {wanted}, got {got}")


def check_fields(obj, prefix: str = "") -> None:
    """Type-check (and normalise, see :func:`check_value`) every field of a dataclass."""
    for f in fields(obj):
        setattr(obj, f.name, check_value(prefix + f.name, getattr(obj, f.name), f.type))


def require(condition: bool, key: str, value: Any, what: str) -> None:
    """Raise ConfigError "config key KEY: must be WHAT, got VALUE" unless ``condition``."""
    if not condition:
        raise ConfigError(f"config key {key}: must be {what}, got {value!r}")


def check_mapping(key: str, data: dict, schema: dict[str, str]) -> dict:
    """A nested config mapping: no unknown keys, each value checked against ``schema``."""
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError(f"config key {key}: unknown keys {unknown} (known: {sorted(schema)})")
    return {k: check_value(f"{key}.{k}", v, schema[k]) for k, v in data.items()}


def geometric_ladder(largest: float, smallest: float, levels: int) -> torch.Tensor:
    """``levels`` values from ``largest`` down to ``smallest``, equal ratios (float32)."""
    if levels < 1 or largest <= 0 or smallest <= 0 or smallest > largest:
        raise ValueError("need levels >= 1 and 0 < smallest <= largest")
    if levels == 1:
        return torch.tensor([largest], dtype=torch.float32)
    return torch.exp(torch.linspace(torch.log(torch.tensor(largest)), torch.log(torch.tensor(smallest)), levels)).float()


@dataclass
class ModelConfig:
    backbone: str = "gns"  # "gns" or "et"
    seq_len: int = 20
    step_size_ps: float = 200.0  # dilation x record interval (100 x 2 ps)
    cutoff: float = 6 * ANGSTROM
    # dynamics / score GNNs
    latent_dim: int = 128
    hidden_dim: int = 128
    hidden_layers: int = 2
    rounds: int = 7
    edge_type_dim: int = 16
    min_std: float = 0.05  # in units of acceleration_scale (network units)
    activation: str = "silu"
    # et only
    num_heads: int = 8
    num_rbf: int = 32
    # embedding GNN (fine graph)
    type_dim: int = 32
    embedding_latent_dim: int = 64
    embedding_hidden_dim: int = 64
    embedding_rounds: int = 7
    embedding_out_dim: int = 128
    # score ladder (NCSN): 10 -> 0.01 A, 20 levels; Langevin K and eps (5e-5 A^2)
    score_sigma_max: float = 10 * ANGSTROM
    score_sigma_min: float = 0.01 * ANGSTROM
    score_levels: int = 20
    langevin_steps: int = 5
    langevin_step_size: float = 5e-7  # 5e-5 A^2, in nm^2
    score_sigma_input: bool = True  # the score GNN is told log sigma (the authors' is not)
    langevin_schedule: str = "constant"  # Langevin step per level: eps, or "ncsn": eps sigma_i^2 / sigma_L^2
    # dynamics training noise: 0.1 -> 0.01 A, 10 levels
    noise_sigma_max: float = 0.1 * ANGSTROM
    noise_sigma_min: float = 0.01 * ANGSTROM
    noise_levels: int = 10
    graph_method: str = "auto"

    def __post_init__(self):
        check_fields(self, "model.")
        if self.backbone not in ("gns", "et"):
            raise ConfigError(f"config key model.backbone: backbone must be 'gns' or 'et', got {self.backbone!r}")
        from .layers import ACTIVATIONS

        require(self.activation in ACTIVATIONS, "model.activation", self.activation, f"one of {sorted(ACTIVATIONS)}")
        methods = ("auto", "all_pairs", "cell_list")
        require(self.graph_method in methods, "model.graph_method", self.graph_method, f"one of {list(methods)}")
        require(self.seq_len >= 2, "model.seq_len", self.seq_len, ">= 2")
        for name in ("step_size_ps", "cutoff", "score_sigma_max", "score_sigma_min", "noise_sigma_max",
                     "noise_sigma_min", "langevin_step_size"):
            value = getattr(self, name)
            require(value > 0 and value != float("inf"), f"model.{name}", value, "a positive finite number")
        require(self.min_std >= 0, "model.min_std", self.min_std, ">= 0")
        for name in ("latent_dim", "hidden_dim", "hidden_layers", "rounds", "edge_type_dim", "num_heads", "num_rbf",
                     "type_dim", "embedding_latent_dim", "embedding_hidden_dim", "embedding_rounds",
                     "embedding_out_dim", "score_levels", "noise_levels"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), ">= 1")
        require(self.langevin_steps >= 0, "model.langevin_steps", self.langevin_steps, ">= 0")
        require(self.langevin_schedule in ("constant", "ncsn"), "model.langevin_schedule", self.langevin_schedule,
                "'constant' or 'ncsn'")
        for kind in ("score", "noise"):
            low, high = getattr(self, f"{kind}_sigma_min"), getattr(self, f"{kind}_sigma_max")
            require(low <= high, f"model.{kind}_sigma_min", low, f"<= {kind}_sigma_max ({high})")

    @property
    def num_features(self) -> int:
        return self.embedding_out_dim + 1

    def score_sigmas(self) -> torch.Tensor:
        return geometric_ladder(self.score_sigma_max, self.score_sigma_min, self.score_levels)

    def noise_sigmas(self) -> torch.Tensor:
        return geometric_ladder(self.noise_sigma_max, self.noise_sigma_min, self.noise_levels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)


def build_embedding_model(config: ModelConfig, num_atom_types: int, num_bond_types: int):
    from .embedding import AtomEmbeddingGNN

    return AtomEmbeddingGNN(
        num_atom_types, num_bond_types, config.type_dim, config.embedding_latent_dim,
        config.embedding_hidden_dim, config.hidden_layers, config.embedding_rounds,
        config.embedding_out_dim, config.activation,
    )


def build_dynamics_model(config: ModelConfig, num_features: int | None = None):
    num_features = config.num_features if num_features is None else num_features
    if config.backbone == "gns":
        from .gns import GNSDynamics

        return GNSDynamics(
            num_features, config.seq_len, config.cutoff, config.step_size_ps, config.latent_dim,
            config.hidden_dim, config.hidden_layers, config.rounds, config.edge_type_dim,
            config.min_std, config.activation, config.graph_method,
        )
    from .et import ETDynamics

    return ETDynamics(
        num_features, config.seq_len, config.cutoff, config.step_size_ps, config.latent_dim,
        config.rounds, config.num_heads, config.num_rbf, config.edge_type_dim, config.min_std,
        config.activation, config.graph_method,
    )


def build_score_model(config: ModelConfig, num_features: int | None = None, latent_dim: int | None = None):
    """``latent_dim`` = the dynamics model's latent width (config.latent_dim by default)."""
    num_features = config.num_features if num_features is None else num_features
    latent_dim = config.latent_dim if latent_dim is None else latent_dim
    if config.backbone == "gns":
        from .gns import GNSScore

        score = GNSScore(
            latent_dim, num_features, config.score_sigmas(), config.cutoff, config.langevin_steps,
            config.langevin_step_size, config.latent_dim, config.hidden_dim, config.hidden_layers,
            config.rounds, config.edge_type_dim, config.activation, config.graph_method,
            config.score_sigma_input,
        )
    else:
        from .et import ETScore

        score = ETScore(
            latent_dim, num_features, config.score_sigmas(), config.cutoff, config.langevin_steps,
            config.langevin_step_size, config.latent_dim, config.rounds, config.num_heads, config.num_rbf,
            config.edge_type_dim, config.activation, config.graph_method, config.score_sigma_input,
        )
    score.langevin_schedule = config.langevin_schedule
    return score
