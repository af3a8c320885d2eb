"""Package a training checkpoint for simulation (``cgml export CKPT -o DIR``).

The directory holds everything :class:`openmm_cgml.LearnedSimulator` needs to simulate a
*new* system (no training data required)::

    dynamics.pt      TorchScript dynamics module (docs/contract.md), verified to load and
                     run in a fresh process that imports only torch
    score.pt         TorchScript score module (absent if the run trained no score model)
    property.pt      TorchScript property head (``models.property``: fine-level Rg^2 per
                     molecule from CG positions; absent if the run trained none), verified
                     in the same fresh process; read by LearnedSimulator.fineRg2, not by the
                     C++ integrator
    embedding.pt     embedding GNN: {"format", "state_dict", "model_config",
                     "num_atom_types", "num_bond_types"} (torch.save, weights_only-safe);
                     run once per system by LearnedSimulator to make the bead features
    simulator.json   manifest: format, versions, model/training config, step_size_ps,
                     record_interval_ps, seq_len, dilation, cg options (cg_level, small
                     molecule rule, METIS seed), atom/bond type vocabularies, the bond type
                     of each atom-type pair seen in training, the atom-type rule, kind,
                     periodic, files, checkpoint step and last metrics, and ``property``
                     (the head's quantity, unit, config and training baselines) or null

Why TorchScript for the property head (rather than a state dict like embedding.pt): it
is a model output users may want outside Python (next to the integrator, in libtorch),
the archive is self-contained (an exported model keeps its head even if the Python class
changes later), and it reuses the export checks (no custom ops, fresh-process parity).
Model directories exported before the head existed have no ``files.property`` and load
as before.

Export refuses (:class:`openmm_cgml.models.ExportError`) a model that does not compile
to TorchScript, uses custom ops (torch.ops outside aten/prim, e.g. torchmd-net 3.x's
warp kernels) or whose archive does not reproduce the in-process outputs in a fresh
process.

The package is built in a sibling directory and moved into place only when complete and
verified: a failed or killed export leaves the previous model in the directory intact.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

MANIFEST = "simulator.json"
MANIFEST_FORMAT = "openmm-cgml-simulator/1"
EMBEDDING_FILE = "embedding.pt"
EMBEDDING_FORMAT = "openmm-cgml-embedding/1"
#: the files an export writes (other files in an existing model directory are carried over)
PROPERTY_FILE = "property.pt"
MODEL_FILES = ("dynamics.pt", "score.pt", PROPERTY_FILE, EMBEDDING_FILE, MANIFEST)
_TMP_TAG, _OLD_TAG = ".export-tmp-", ".export-old-"

#: how atom types are obtained for a new topology (documented in the manifest)
ATOM_TYPE_RULE = ("metadata atom_types for generated/imported data (TrajectoryRecord); for an "
                  "OpenMM topology the element symbol, or the atom name when there is no element")


def _cutoff(model) -> float:
    builder = getattr(model, "graph_builder", None) or getattr(model, "graph")
    return float(builder.cutoff)


def _example_inputs(dynamics, score, embedding, ckpt: dict[str, Any]):
    """Realistic inputs for the fresh-process check: a straight chain of beads at the
    data's velocity scale, with bead features from the embedding GNN."""
    from openmm_cgml.models.export import example_inputs

    dyn_inputs = list(example_inputs("dynamics", dynamics))
    n = dyn_inputs[0].size(1)
    stats = ckpt.get("data_statistics") or {}
    gen = torch.Generator().manual_seed(0)
    spacing = 0.5 * _cutoff(dynamics) / n
    base = torch.arange(n, dtype=torch.float32).unsqueeze(1) * torch.tensor([spacing, 0.3 * spacing, 0.0])
    v = float(stats.get("velocity_std", 0.01 * spacing))
    history = base + torch.cumsum(v * torch.randn(dynamics.seq_len, n, 3, generator=gen), 0)
    with torch.no_grad():
        atom_types = torch.zeros(2 * n, dtype=torch.long)
        masses = torch.full((2 * n,), 0.5 * float(stats.get("mass_mean", 2.0)))
        bonds = torch.stack([torch.arange(2 * n - 1), torch.arange(1, 2 * n)], 1)
        features = embedding.bead_features(atom_types, masses, bonds, torch.zeros(2 * n - 1, dtype=torch.long),
                                           torch.arange(2 * n) // 2, n).float()
    dyn_inputs = (history, dyn_inputs[1], features, dyn_inputs[3])
    score_inputs = None
    if score is not None:
        was_training = dynamics.training
        with torch.no_grad():
            _, _, latent = dynamics.eval()(*dyn_inputs)
        dynamics.train(was_training)
        score_inputs = (history[-1], latent, dyn_inputs[1], features, dyn_inputs[3],
                        score.sigmas[len(score.sigmas) // 2].clone())
    return dyn_inputs, score_inputs


def _property_inputs(dyn_inputs) -> tuple:
    """Property head inputs: the dynamics example's frames [T, n, 3] and features, its
    beads split into two molecules."""
    history, _, features, _ = dyn_inputs
    n = history.size(1)
    molecule = (torch.arange(n) >= n // 2).long()
    return (history, features, molecule)


def _write_package(embedding, dynamics, score, ckpt: dict[str, Any], out: Path, verify: bool,
                   property_head=None) -> None:
    """Write the model files into the (new, empty) directory ``out``."""
    from openmm_cgml.models.export import export_archives

    embedding = embedding.cpu().float().eval()
    dyn_inputs, score_inputs = _example_inputs(dynamics, score, embedding, ckpt)
    entries = [(dynamics, "dynamics", out / "dynamics.pt", dyn_inputs)]
    if score is not None:
        entries.append((score, "score", out / "score.pt", score_inputs))
    if property_head is not None:
        if int(property_head.num_features) != int(dynamics.num_features):
            raise ValueError(f"the property head reads {property_head.num_features} bead features, the "
                             f"dynamics model {dynamics.num_features}")
        entries.append((property_head, "property", out / PROPERTY_FILE, _property_inputs(dyn_inputs)))
    export_archives(entries, verify=verify)
    model_config = dict(ckpt["model_config"])
    torch.save({"format": EMBEDDING_FORMAT, "state_dict": embedding.state_dict(),
                "model_config": model_config, "num_atom_types": len(ckpt["atom_vocabulary"]),
                "num_bond_types": len(ckpt["bond_vocabulary"])}, out / EMBEDDING_FILE)
    config = dict(ckpt["config"])
    import openmm

    import openmm_cgml

    manifest = {
        "format": MANIFEST_FORMAT,
        "versions": {"openmm_cgml": openmm_cgml.__version__, "torch": str(torch.__version__),
                     "openmm": openmm.__version__, "trained_with": ckpt.get("versions", {})},
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=float))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out: Path) -> None:
    """Clean up after an export that was killed: its unfinished ``.NAME.export-tmp-PID``
    directory is removed; a ``.NAME.export-old-PID`` (the previous model, moved aside just
    before the new one took its place) is put back if NAME is missing, else removed."""
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        for tag in (_TMP_TAG, _OLD_TAG):
            prefix = f".{out.name}{tag}"
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue  # another export of the same directory is running
            if tag == _OLD_TAG and not out.exists():
                os.rename(entry, out)
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and not (out / MANIFEST).exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES)
        if others:
            raise FileExistsError(f"{out} exists and is not an exported model (no {MANIFEST}; holds "
                                  f"{others[:5]}); refusing to replace it: choose another --out")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False
    when the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(new: Path, out: Path) -> None:
    """Make the complete directory ``new`` the model at ``out``; the previous model is
    replaced only here (atomically where the OS can swap directories, else moved aside
    to ``.NAME.export-old-PID`` for the instant between two renames)."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):  # ``new`` now holds the previous model
        shutil.rmtree(new, ignore_errors=True)
        return
    old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def export_simulator(embedding, dynamics, score, ckpt: dict[str, Any], out_dir: str | os.PathLike,
                     verify: bool = True, property_head=None) -> Path:
    """Write the simulator directory from in-memory models and checkpoint metadata
    (``ckpt``: a training checkpoint dict; its weights are not used). Returns out_dir.

    Nothing is written into ``out_dir`` until the new model is complete: it is built in a
    sibling directory ``.NAME.export-tmp-PID``, its archives verified (``verify``: in a
    fresh process) and the whole package loaded with :class:`LearnedSimulator`, and only
    then moved into place. ``property_head``: the optional property head
    (``models.property.PropertyHead``), written as property.pt. A failed or killed export leaves the previous model as it was
    (files in ``out_dir`` that are not model files are carried over). A non-empty
    directory that is not an exported model is never replaced."""
    from openmm_cgml.simulator import LearnedSimulator

    out = Path(out_dir)
    _recover(out)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    try:
        _write_package(embedding, dynamics, score, ckpt, new, verify, property_head)
        LearnedSimulator.load(new)  # the complete package loads and is consistent
        if out.is_dir():
            for entry in out.iterdir():
                if entry.name not in MODEL_FILES:
                    copy = shutil.copytree if entry.is_dir() else shutil.copy2
                    copy(entry, new / entry.name)
        _move_into_place(new, out)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return out


def run_checkpoint(run_dir: str | os.PathLike, last: bool = False) -> Path:
    """The checkpoint of a training run directory to export: ``checkpoints/best.pt`` (the
    one its model selection chose, by rollout validation when it ran) unless ``last``
    or the run has none, then ``checkpoints/last.pt``."""
    directory = Path(run_dir) / "checkpoints"
    best = directory / "best.pt"
    return best if best.is_file() and not last else directory / "last.pt"


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, verify: bool = True,
                      last: bool = False) -> Path:
    """Export a training checkpoint file, or a run directory's (``run_checkpoint``)."""
    from openmm_cgml.train import build_models_from_checkpoint, load_checkpoint

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = run_checkpoint(checkpoint, last)
    ckpt = load_checkpoint(checkpoint)
    net = build_models_from_checkpoint(ckpt)
    return export_simulator(net.embedding, net.dynamics, net.score, ckpt, out_dir, verify=verify,
                            property_head=net.property)


def _run_export(args: argparse.Namespace) -> int:
    from openmm_cgml.models import ExportError

    try:
        out = export_checkpoint(args.checkpoint, args.out, last=args.last)
    except (ExportError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"cgml export: cannot export {args.checkpoint}: {err} (nothing was written to {args.out})",
              file=sys.stderr)
        return 2
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"exported {args.checkpoint} -> {out} (seq_len {manifest['seq_len']}, step "
          f"{manifest['step_size_ps']} ps, score: {'yes' if manifest['files']['score'] else 'no'}, "
          f"property head: {'yes' if manifest['files'].get('property') else 'no'})")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="package a checkpoint for simulation (TorchScript + embedding + manifest)",
        description="Write dynamics.pt / score.pt (verified in a fresh process), embedding.pt "
                    "and simulator.json for openmm_cgml.LearnedSimulator.")
    parser.add_argument("checkpoint", help="checkpoint file, or a run directory (its checkpoints/best.pt, "
                                           "chosen by rollout validation; --last for checkpoints/last.pt)")
    parser.add_argument("--last", action="store_true",
                        help="with a run directory: export its last checkpoint instead of its best")
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.set_defaults(func=_run_export)
