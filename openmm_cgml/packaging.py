"""Package a training checkpoint for simulation (``cgml export CKPT -o DIR``).

The model directory (format: :mod:`openmm_cgml.manifest`) holds everything
:class:`openmm_cgml.LearnedSimulator` needs to simulate a *new* system (no training data
required). Each TorchScript archive is verified to load and run in a fresh process that
imports only torch.

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

from openmm_cgml.files import write_json_atomic
from openmm_cgml.manifest import (EMBEDDING_FILE, MANIFEST, MODEL_FILES, PROPERTY_FILE, build_manifest,
                                  save_embedding)

_TMP_TAG, _OLD_TAG = ".export-tmp-", ".export-old-"  # sibling directories of an export in progress
def _cutoff(model) -> float:
    builder = getattr(model, "graph_builder", None) or getattr(model, "graph")
    return float(builder.cutoff)


def _example_inputs(dynamics, score, embedding, ckpt: dict[str, Any]):
    """Realistic inputs for the fresh-process check: a straight chain of beads at the
    data's velocity scale, with bead features from the embedding GNN."""
    from openmm_cgml.models.torchscript import example_inputs

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
    from openmm_cgml.models.torchscript import export_archives

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
    save_embedding(out / EMBEDDING_FILE, embedding, ckpt["model_config"], len(ckpt["atom_vocabulary"]),
                   len(ckpt["bond_vocabulary"]))
    manifest = build_manifest(ckpt, dynamics, score, property_head)
    write_json_atomic(out / MANIFEST, json.loads(json.dumps(manifest, default=float)))


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


def keep_smallest_levels(score, levels: int) -> None:
    """Anneal over only the ``levels`` smallest noise levels of the score model's trained
    ladder. The network still reads each sigma standardised over the trained ladder, so
    its input is what it was trained on; the manifest's ``sigmas_nm`` records the ladder
    used, ``model_config`` keeps the trained one."""
    total = int(score.sigmas.numel())
    if isinstance(levels, bool) or int(levels) != levels or not 1 <= levels <= total:
        raise ValueError(f"Langevin levels must be an integer from 1 to the ladder's {total}, got {levels!r}")
    score.sigmas = score.sigmas[total - int(levels):].clone()


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, verify: bool = True,
                      last: bool = False, langevin_steps: int | None = None,
                      langevin_step_size: float | None = None, langevin_schedule: str | None = None,
                      langevin_levels: int | None = None) -> Path:
    """Export a training checkpoint file, or a run directory's (``run_checkpoint``).

    ``langevin_steps`` / ``langevin_step_size`` / ``langevin_schedule`` replace the score
    model's Langevin defaults (what the integrator starts from) in the model config the
    models are built from, which checks them; ``langevin_levels`` keeps only the smallest
    noise levels (:func:`keep_smallest_levels`). They are inference settings: training
    does not use them, so they may be chosen after training by rollouts
    (``benchmarks/refinement_scan.py``)."""
    from openmm_cgml.training.checkpoint import build_models_from_checkpoint, load_checkpoint

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = run_checkpoint(checkpoint, last)
    ckpt = load_checkpoint(checkpoint)
    overrides = {key: value for key, value in (("langevin_steps", langevin_steps),
                                               ("langevin_step_size", langevin_step_size),
                                               ("langevin_schedule", langevin_schedule)) if value is not None}
    if (overrides or langevin_levels is not None) and ckpt["score"] is None:
        raise ValueError("the checkpoint has no score model: Langevin settings do not apply")
    ckpt["model_config"] = {**ckpt["model_config"], **overrides}
    net = build_models_from_checkpoint(ckpt)
    if langevin_levels is not None:
        keep_smallest_levels(net.score, langevin_levels)
    return export_simulator(net.embedding, net.dynamics, net.score, ckpt, out_dir, verify=verify,
                            property_head=net.property)


def _run_export(args: argparse.Namespace) -> int:
    from openmm_cgml.models import ExportError

    try:
        out = export_checkpoint(args.checkpoint, args.out, last=args.last, langevin_steps=args.langevin_steps,
                                langevin_step_size=args.langevin_step_size, langevin_schedule=args.langevin_schedule,
                                langevin_levels=args.langevin_levels)
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
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="Langevin steps per noise level the integrator starts from (default: as trained)")
    parser.add_argument("--langevin-step-size", type=float, default=None,
                        help="Langevin step size eps, nm^2 (default: as trained)")
    parser.add_argument("--langevin-schedule", default=None,
                        help="step size over the noise ladder, constant or ncsn (default: as trained)")
    parser.add_argument("--langevin-levels", type=int, default=None,
                        help="anneal over only this many of the smallest noise levels (default: the whole ladder)")
    parser.set_defaults(func=_run_export)
