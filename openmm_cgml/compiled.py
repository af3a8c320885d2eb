"""The compiled score network: torch.export + AOTInductor, built on this machine.

A refined step calls the score model 20 times (the shipped electrolyte), and on a CPU
most of each call is the network's many small per-edge kernels. The TorchScript archive
stays the model (it loads anywhere, in plain libtorch); this module compiles the same
network, with the graph as an input, into an AOTInductor package (``.pt2``) that the
integrator runs instead of the archive's network (``CGMLIntegrator.setCompiledScoreModel``).
The graph is still built by the archive (its ``build_graph`` method): building it
branches on the data, which torch.export cannot capture.

A package holds machine code for the CPU that compiled it, so it is never shipped: it
is compiled on first use (~30-60 s, needs a C++ compiler) into a cache keyed by the
archive's bytes, the torch version and the CPU, and checked against the archive before
it is used. The cache is ``$OPENMM_CGML_CACHE`` or ``~/.cache/openmm-cgml``.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

#: outputs of the compiled network and the archive must agree to this (relative to the
#: largest score component): float32 round-off of fused kernels, far below any signal
TOLERANCE = 1e-4


class ScoreOnGraph(nn.Module):
    """The score model's ``score_on_graph`` as a module (what torch.export exports)."""

    def __init__(self, score: nn.Module):
        super().__init__()
        self.score = score

    def forward(self, latent, features, sigma, senders, receivers, edge_vec, edge_type):
        return self.score.score_on_graph(latent, features, sigma, senders, receivers, edge_vec, edge_type)


def cache_dir() -> Path:
    return Path(os.environ.get("OPENMM_CGML_CACHE") or Path.home() / ".cache" / "openmm-cgml")


def cpu_signature() -> str:
    """The CPU's model name and instruction-set flags (what compiled code depends on)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    text += "\n" + line.strip()
                if key == "flags" or key == "Features":
                    break
    except OSError:
        text += "\n" + platform.processor()
    return text


def package_key(archive_bytes: bytes, num_beads: int) -> str:
    """Cache key: the archive, the torch version, the CPU and the system's size class
    (the compiler picks its loops for the size it is shown: a package made on a 23-bead
    chain ran a 122-bead box 2x slower than one made on the box itself)."""
    digest = hashlib.sha256()
    digest.update(archive_bytes)
    digest.update(torch.__version__.encode())
    digest.update(cpu_signature().encode())
    return f"{digest.hexdigest()[:32]}-n{size_class(num_beads)}"


def size_class(num_beads: int) -> int:
    """The power of two nearest ``num_beads`` (systems within ~1.4x share a package)."""
    return 1 << max(1, round(math.log2(max(2, num_beads))))


def eager_score_model(score_archive: str | os.PathLike, model_config: dict) -> nn.Module:
    """The PyTorch module of an exported score archive: built from the manifest's model
    configuration, with the archive's weights and buffers."""
    from .models import ModelConfig, build_score_model

    scripted = torch.jit.load(str(score_archive), map_location="cpu")
    if not hasattr(scripted, "build_graph"):
        raise ValueError(f"{score_archive} has no build_graph method: it was exported before the compiled route "
                         "existed; export the checkpoint again with `cgml export`")
    config = ModelConfig.from_dict(model_config)
    model = build_score_model(config, int(scripted.num_features), int(scripted.latent_dim))
    model.load_state_dict(scripted.state_dict())
    for name in ("langevin_steps", "langevin_step_size", "langevin_schedule"):
        setattr(model, name, getattr(scripted, name))
    return model.eval()


def _example(model: nn.Module, num_beads: int, seed: int) -> tuple:
    """Network inputs on a chain of ``num_beads`` beads: (latent, features, sigma, graph...)."""
    from .models.torchscript import example_inputs

    x, latent, box, features, bonds, sigma = example_inputs("score", model, num_beads, seed)
    return (latent, features, sigma, *model.build_graph(x, box, bonds))


def system_example(model: nn.Module, positions, box, features, bonds, seed: int = 0) -> tuple:
    """Network inputs on a real system (positions [N, 3] nm, box [3, 3] or None, bead
    features [N, F], CG bonds [E, 2]) with a random latent: the shapes to compile for."""
    x = torch.as_tensor(np_float32(positions))
    box = torch.zeros(3, 3) if box is None else torch.as_tensor(np_float32(box))
    features = torch.as_tensor(np_float32(features))
    bonds = torch.as_tensor(bonds, dtype=torch.int64).reshape(-1, 2)
    latent = torch.randn(x.shape[0], int(model.latent_dim), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        graph = model.build_graph(x, box, bonds)
    return (latent, features, model.sigmas[-1].clone(), *graph)


def np_float32(values):
    import numpy as np

    return np.ascontiguousarray(values, dtype=np.float32)


def compile_score(score_archive: str | os.PathLike, model_config: dict, example: tuple | None = None,
                  directory: str | os.PathLike | None = None, log=print) -> Path:
    """Path of the compiled score network of ``score_archive`` (a ``.pt2`` package) for
    systems the size of ``example`` (:func:`system_example`; default a 23-bead chain):
    from the cache if it is there, else compiled, checked against the archive (on the
    example and on chains of other sizes), and stored. RuntimeError if the compiled
    network disagrees with the archive."""
    archive_bytes = Path(score_archive).read_bytes()
    model = eager_score_model(score_archive, model_config)
    example = _example(model, 23, 0) if example is None else example
    target = Path(directory or cache_dir()) / package_key(archive_bytes, example[0].shape[0]) / "score.pt2"
    if target.is_file():
        return target
    scripted = torch.jit.load(str(score_archive), map_location="cpu").eval()
    net = ScoreOnGraph(model).eval()
    beads, edges = torch.export.Dim("beads", min=2), torch.export.Dim("edges", min=2)
    dynamic = ({0: beads}, {0: beads}, None, {0: edges}, {0: edges}, {0: edges}, {0: edges})
    if log:
        log(f"compiling the score network for this CPU (once; cached in {target.parent}) ...")
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(net, example, dynamic_shapes=dynamic)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / "score.pt2"
        torch._inductor.aoti_compile_and_package(exported, package_path=str(staged))
        check_package(staged, scripted, model, example)
        os.replace(staged, target)  # atomic: a concurrent reader sees no half-written package
    if log:
        log(f"compiled in {time.perf_counter() - start:.0f} s: {target}")
    return target


def check_package(package: str | os.PathLike, scripted, model: nn.Module, example: tuple) -> float:
    """Largest relative difference between the package and the archive's network on
    ``example`` and on chains of 17 and 41 beads; RuntimeError above TOLERANCE."""
    compiled = torch._inductor.aoti_load_package(str(package))
    worst = 0.0
    with torch.no_grad():
        for inputs in (example, _example(model, 17, 1), _example(model, 41, 2)):
            want = scripted.score_on_graph(*inputs)
            got = compiled(*inputs)
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-30)))
    if not worst <= TOLERANCE:
        raise RuntimeError(f"the compiled score network differs from the archive by {worst:.2e} (relative; "
                           f"tolerance {TOLERANCE:g}); it was not cached")
    return worst


def clear_cache(directory: str | os.PathLike | None = None) -> None:
    shutil.rmtree(Path(directory or cache_dir()), ignore_errors=True)
