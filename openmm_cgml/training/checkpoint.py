"""The training checkpoint format: the one module that writes and reads it.

Checkpoint format (``torch.save`` dict; only tensors and plain types, so it loads with
``torch.load(path, weights_only=True)``)::

    format "openmm-cgml-checkpoint/1", step, epoch, batch_in_epoch, config (dict),
    model_config (dict), atom_vocabulary, bond_vocabulary, bond_type_of_pair (dict
    "A|B" -> bond type), mapping_options (dict), record_interval_ps, step_size_ps,
    kind, periodic, embedding / dynamics / score (state dicts; score None if not
    trained), property (state dict or None), property_config, property_baselines,
    optimizer, scheduler (state dicts), rng {torch, numpy, python},
    metrics (last logged row), versions.

Checkpoints are written atomically (:func:`save_checkpoint`); :func:`find_resume_checkpoint`
falls back to the newest readable ``step_N.pt`` when ``last.pt`` is missing or corrupt.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openmm_cgml.files import save_torch_atomic
from openmm_cgml.models.net import CGMLNet

CHECKPOINT_FORMAT = "openmm-cgml-checkpoint/1"


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a checkpoint dict (a kill never leaves half a file)."""
    save_torch_atomic(ckpt, path)


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


def find_resume_checkpoint(last: Path) -> tuple[Path, dict[str, Any]]:
    """``last.pt`` and its contents; if it is missing or unreadable (a warning says
    so, with its path), the newest readable ``checkpoints/step_N.pt`` (a warning
    names it, and every newer one skipped as unreadable)."""
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


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
