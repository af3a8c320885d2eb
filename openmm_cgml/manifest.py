"""The model-directory format (``simulator.json`` + the files it names): the one module
that writes and reads it. ``cgml export`` (:mod:`openmm_cgml.packaging`) writes model
directories through :func:`build_manifest` / :func:`save_embedding`;
:class:`openmm_cgml.LearnedSimulator` reads them through :func:`read_manifest` /
:func:`load_embedding_state`.

A model directory::

    dynamics.pt      TorchScript dynamics module (docs/contract.md)
    score.pt         TorchScript score module (absent if the run trained no score model)
    property.pt      TorchScript property head (fine-level Rg^2 per molecule; optional)
    embedding.pt     embedding GNN: {"format", "state_dict", "model_config",
                     "num_atom_types", "num_bond_types"} (torch.save, weights_only-safe)
    simulator.json   manifest: format, versions, model/training config, step_size_ps,
                     record_interval_ps, seq_len, dilation, cg options (cg_level, small
                     molecule rule, METIS seed), atom/bond type vocabularies, the bond type
                     of each atom-type pair seen in training, the atom-type rule, kind,
                     periodic, files, distance limits and their calibration, checkpoint step
                     and last metrics, and ``property`` (the head's quantity, unit, config
                     and training baselines) or null

The manifest is not trusted: :func:`read_manifest` validates its format, required keys
and their types, and keeps every file it names inside the model directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from openmm_cgml.files import contained_path, save_torch_atomic
from openmm_cgml.runtime import versions

MANIFEST = "simulator.json"
MANIFEST_FORMAT = "openmm-cgml-simulator/1"
EMBEDDING_FILE = "embedding.pt"
EMBEDDING_FORMAT = "openmm-cgml-embedding/1"
PROPERTY_FILE = "property.pt"
#: the files an export writes (other files in an existing model directory are carried over)
MODEL_FILES = ("dynamics.pt", "score.pt", PROPERTY_FILE, EMBEDDING_FILE, MANIFEST)

#: how atom types are obtained for a new topology (documented in the manifest)
ATOM_TYPE_RULE = ("metadata atom_types for generated/imported data (TrajectoryRecord); for an "
                  "OpenMM topology the element symbol, or the atom name when there is no element")


def build_manifest(ckpt: dict[str, Any], dynamics, score, property_head) -> dict[str, Any]:
    """The manifest of a model exported from training checkpoint ``ckpt`` (its metadata;
    the weights come from the in-memory modules)."""
    config = dict(ckpt["config"])
    model_config = dict(ckpt["model_config"])
    return {
        "format": MANIFEST_FORMAT,
        "versions": {**versions(), "trained_with": ckpt.get("versions", {})},
        "files": {"dynamics": "dynamics.pt", "score": "score.pt" if score is not None else None,
                  "embedding": EMBEDDING_FILE,
                  "property": PROPERTY_FILE if property_head is not None else None},
        "property": None if property_head is None else {
            "quantity": "fine-level mass-weighted Rg^2 per molecule with >= min_beads beads",
            "unit": "nm^2", "min_beads": int(property_head.min_beads),
            "inputs": "positions [N,3] or [F,N,3] nm, bead features [N,F], molecule [N] int64",
            "config": dict(ckpt.get("property_config") or {}),
            "baselines": ckpt.get("property_baselines") or {}},
        "kind": ckpt.get("kind"),
        "periodic": bool(ckpt.get("periodic", False)),
        "step_size_ps": float(ckpt["step_size_ps"]),
        "record_interval_ps": float(ckpt["record_interval_ps"]),
        "seq_len": int(model_config["seq_len"]),
        "dilation": int(config["dilation"]),
        "backbone": model_config["backbone"],
        "cg": dict(ckpt["mapping_options"]),
        "atom_vocabulary": list(ckpt["atom_vocabulary"]),
        "bond_vocabulary": list(ckpt["bond_vocabulary"]),
        "bond_type_of_pair": dict(ckpt.get("bond_type_of_pair", {})),
        "atom_type_rule": ATOM_TYPE_RULE,
        "num_features": int(dynamics.num_features),
        "langevin_steps": int(score.langevin_steps) if score is not None else 0,
        "langevin_step_size_nm2": float(score.langevin_step_size) if score is not None else 0.0,
        "sigmas_nm": score.sigmas.tolist() if score is not None else [],
        "exclusion_distance_nm": float(dynamics.exclusion_distance),
        "bond_length_limit_nm": float(dynamics.bond_length_limit),
        "exclusion_calibration": ckpt.get("exclusion_calibration"),
        "model_config": model_config,
        "training_config": config,
        "checkpoint": {"step": int(ckpt.get("step", 0)), "metrics": ckpt.get("metrics", {}),
                       "train_systems": ckpt.get("train_systems", []),
                       "val_systems": ckpt.get("val_systems", [])},
    }


def save_embedding(path: str | os.PathLike, embedding, model_config: dict[str, Any], num_atom_types: int,
                   num_bond_types: int) -> None:
    save_torch_atomic({"format": EMBEDDING_FORMAT, "state_dict": embedding.state_dict(),
                       "model_config": dict(model_config), "num_atom_types": int(num_atom_types),
                       "num_bond_types": int(num_bond_types)}, path)


def load_embedding_state(path: Path, manifest: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    """The saved embedding dict, checked against the manifest's vocabularies."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / not a torch file
        raise ValueError(f"{path}: cannot read the embedding file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(saved, dict) or saved.get("format") != EMBEDDING_FORMAT:
        raise ValueError(f"{path}: not an openmm-cgml embedding file (expected format {EMBEDDING_FORMAT!r})")
    for key, vocabulary in (("num_atom_types", "atom_vocabulary"), ("num_bond_types", "bond_vocabulary")):
        if saved.get(key) != len(manifest[vocabulary]):
            raise ValueError(f"{manifest_path}: {vocabulary} has {len(manifest[vocabulary])} types but "
                             f"{path.name} was trained with {saved.get(key)}")
    return saved


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


#: required manifest keys: (check, what it must be)
_MANIFEST_SCHEMA = {
    "format": (lambda v: isinstance(v, str), "a string"),
    "files": (lambda v: isinstance(v, dict), "an object"),
    "periodic": (lambda v: isinstance(v, bool), "a bool (true/false)"),
    "step_size_ps": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "record_interval_ps": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "seq_len": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "dilation": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "cg": (lambda v: isinstance(v, dict), "an object"),
    "atom_vocabulary": (lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                        "a non-empty list of strings"),
    "bond_vocabulary": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
}
_CG_SCHEMA = {
    "cg_level": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "small_molecules_as_beads": (lambda v: isinstance(v, bool), "a bool"),
    "small_molecule_max_atoms": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """Check a model manifest's format, required keys and their types (ValueError naming
    ``path`` and every problem). Returns the manifest."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: a model manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r} (this openmm-cgml "
                         f"reads {MANIFEST_FORMAT!r}); re-export the model with this version")
    problems = [f"missing key {key!r}" for key in _MANIFEST_SCHEMA if key not in manifest]
    problems += [f"{key!r} must be {what}, got {manifest[key]!r}" for key, (ok, what) in _MANIFEST_SCHEMA.items()
                 if key in manifest and not ok(manifest[key])]
    if isinstance(manifest.get("cg"), dict):
        cg = manifest["cg"]
        problems += [f"missing key 'cg.{key}'" for key in _CG_SCHEMA if key not in cg]
        problems += [f"'cg.{key}' must be {what}, got {cg[key]!r}" for key, (ok, what) in _CG_SCHEMA.items()
                     if key in cg and not ok(cg[key])]
        if "seed" in cg and not _is_int(cg["seed"]):
            problems.append(f"'cg.seed' must be an int, got {cg['seed']!r}")
    if isinstance(manifest.get("files"), dict):
        files = manifest["files"]
        for key in ("dynamics", "embedding"):
            if not isinstance(files.get(key), str) or not files.get(key):
                problems.append(f"'files.{key}' must be a file name, got {files.get(key)!r}")
        for key in ("score", "property"):
            if files.get(key) is not None and not isinstance(files[key], str):
                problems.append(f"'files.{key}' must be a file name or null, got {files[key]!r}")
    if "bond_type_of_pair" in manifest and not isinstance(manifest["bond_type_of_pair"], dict):
        problems.append(f"'bond_type_of_pair' must be an object, got {manifest['bond_type_of_pair']!r}")
    if not problems and abs(manifest["step_size_ps"] - manifest["dilation"] * manifest["record_interval_ps"]) \
            > 1e-6 * manifest["step_size_ps"]:
        problems.append(f"step_size_ps {manifest['step_size_ps']} is not dilation x record_interval_ps "
                        f"({manifest['dilation']} x {manifest['record_interval_ps']})")
    if problems:
        raise ValueError(f"{path}: invalid model manifest: " + "; ".join(problems))
    return manifest


def read_manifest(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Path]]:
    """The validated manifest of a model directory and the paths of the files it names
    (each inside ``directory`` and present)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export a checkpoint with `cgml export CKPT -o DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid JSON model manifest ({err})") from None
    validate_manifest(manifest, path)
    files = {key: contained_path(directory, name, f"{path}: files.{key}", "the model directory")
             for key, name in manifest["files"].items() if name is not None}
    for key, file in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"{path}: files.{key} names {file}, which does not exist")
    return manifest, files
