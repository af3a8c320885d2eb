"""Compiled networks: torch.export + AOTInductor, built on this machine.

On a CPU most of a model call is the network's many small per-edge kernels (a refined
electrolyte step makes 20 score calls and one dynamics call). The TorchScript archives
stay the model (they load anywhere, in plain libtorch); this module compiles the same
networks, with the graph as an input, into AOTInductor packages (``.pt2``) that the
integrator runs instead of the archives' networks (``CGMLIntegrator.
setCompiledDynamicsModel`` / ``setCompiledScoreModel``). The graph is still built by the
archive (its ``build_graph`` method): building it branches on the data, which
torch.export cannot capture.

A package holds machine code for the CPU that compiled it, so it is never shipped: it
is compiled on first use (~10-15 s per network here, needs a C++ compiler; Inductor's
kernels single-threaded, faster at these sizes) into a cache keyed by the archive's
bytes, the torch version, the CPU and the system's size class, and checked against the
archive before it is cached. The cache is ``$OPENMM_CGML_CACHE`` or
``~/.cache/openmm-cgml``.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: compiled and archive outputs must agree to this, relative to each output's largest
#: component: float32 round-off of fused kernels, far below any signal
TOLERANCE = 1e-4
KINDS = ("dynamics", "score")
#: what else decides a package's code (part of the cache key)
COMPILE_SETTINGS = "aoti cpp.threads=1 metadata=kind,archive"


class DynamicsOnGraph(nn.Module):
    """A dynamics model's ``predict`` (history, features, graph) -> (mean, std, latent)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, history, features, senders, receivers, edge_vec, edge_type):
        return self.model.predict(history, features, senders, receivers, edge_vec, edge_type)


class ScoreOnGraph(nn.Module):
    """A score model's ``score_on_graph`` (latent, features, sigma, graph) -> score."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latent, features, sigma, senders, receivers, edge_vec, edge_type):
        return self.model.score_on_graph(latent, features, sigma, senders, receivers, edge_vec, edge_type)


def cache_dir() -> Path:
    return Path(os.environ.get("OPENMM_CGML_CACHE") or Path.home() / ".cache" / "openmm-cgml")


def cpu_signature() -> str:
    """The first processor's block of /proc/cpuinfo (model, instruction-set flags; on
    ARM also the part number), without the lines that change while it runs."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                if line.split(":")[0].strip() not in ("cpu MHz", "bogomips", "BogoMIPS", "processor", "core id",
                                                       "apicid", "initial apicid"):
                    text += "\n" + line.strip()
    except OSError:
        text += "\n" + platform.processor()
    return text


def size_class(num_beads: int) -> int:
    """The power of two nearest ``num_beads`` (systems within ~1.4x share a package)."""
    return 1 << max(1, round(math.log2(max(2, num_beads))))


def package_key(archive_bytes: bytes, num_beads: int) -> str:
    """Cache key: the archive, the torch version, the CPU and the system's size class
    (the compiler picks its loops for the size it is shown: a score package made on a
    23-bead chain ran a 122-bead box 2x slower than one made on the box itself)."""
    digest = hashlib.sha256()
    digest.update(COMPILE_SETTINGS.encode())
    digest.update(archive_bytes)
    digest.update(torch.__version__.encode())
    digest.update(cpu_signature().encode())
    return f"{digest.hexdigest()[:32]}-n{size_class(num_beads)}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def eager_model(kind: str, archive: str | os.PathLike, model_config: dict) -> nn.Module:
    """The PyTorch module of an exported archive: built from the manifest's model
    configuration, with the archive's weights and buffers."""
    return _eager_from(kind, torch.jit.load(str(archive), map_location="cpu"), archive, model_config)


def _eager_from(kind: str, scripted, archive, model_config: dict) -> nn.Module:
    from .models import ModelConfig, build_dynamics_model, build_score_model

    _check_kind(kind)
    if not hasattr(scripted, "build_graph"):
        raise ValueError(f"{archive} has no build_graph method: it was exported before the compiled route "
                         "existed; export the checkpoint again with `cgml export`")
    config = ModelConfig.from_dict(model_config)
    if kind == "dynamics":
        model = build_dynamics_model(config, int(scripted.num_features))
    else:
        model = build_score_model(config, int(scripted.num_features), int(scripted.latent_dim))
    model.load_state_dict(scripted.state_dict())
    return model.eval()


def _on_graph(kind: str, model: nn.Module) -> nn.Module:
    return (DynamicsOnGraph if kind == "dynamics" else ScoreOnGraph)(model).eval()


def _network_inputs(kind: str, model: nn.Module, contract_inputs: tuple) -> tuple:
    """The network's inputs from the archive's forward inputs: the graph built, then
    (history, features, graph...) or (latent, features, sigma, graph...)."""
    with torch.no_grad():
        if kind == "dynamics":
            history, box, features, bonds = contract_inputs
            return (history, features, *model.build_graph(history[-1], box, bonds))
        x, latent, box, features, bonds, sigma = contract_inputs
        return (latent, features, sigma, *model.build_graph(x, box, bonds))


def chain_example(kind: str, model: nn.Module, num_beads: int, seed: int) -> tuple:
    """Network inputs on a chain of ``num_beads`` beads."""
    from .models.torchscript import example_inputs

    return _network_inputs(kind, model, example_inputs(kind, model, num_beads, seed))


def system_example(kind: str, model: nn.Module, positions, box, features, bonds, seed: int = 0) -> tuple:
    """Network inputs on a real system (positions [N, 3] nm, box [3, 3] or None, bead
    features [N, F], CG bonds [E, 2]), with a random history or latent: the shapes to
    compile for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.ascontiguousarray(positions, dtype=np.float32))
    box = torch.zeros(3, 3) if box is None else torch.as_tensor(np.ascontiguousarray(box, dtype=np.float32))
    features = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32))
    bonds = torch.as_tensor(np.asarray(bonds, dtype=np.int64).reshape(-1, 2))
    if kind == "dynamics":
        steps = 0.01 * float(model.cutoff) * torch.randn(model.seq_len, x.shape[0], 3, generator=gen)
        history = x + torch.cumsum(steps, dim=0) - steps.sum(dim=0)  # ends at x
        return _network_inputs(kind, model, (history, box, features, bonds))
    latent = torch.randn(x.shape[0], int(model.latent_dim), generator=gen)
    return _network_inputs(kind, model, (x, latent, box, features, bonds, model.sigmas[-1].clone()))


def _dynamic_shapes(kind: str) -> tuple:
    beads, edges = torch.export.Dim("beads", min=2), torch.export.Dim("edges", min=2)
    graph = ({0: edges}, {0: edges}, {0: edges}, {0: edges})
    if kind == "dynamics":
        return ({1: beads}, {0: beads}, *graph)
    return ({0: beads}, {0: beads}, None, *graph)


def archive_fingerprint(archive_bytes: bytes) -> str:
    """``"<bytes>:<crc32 hex>"`` of an archive: written into each package's metadata and
    compared by the C++ step (LearnedStep::archiveFingerprint), so a package runs only
    with the archive it was compiled from (not a guard against a malicious author)."""
    return f"{len(archive_bytes)}:{zlib.crc32(archive_bytes):08x}"


def compile_network(kind: str, archive: str | os.PathLike, model_config: dict, system: tuple | None = None,
                    example: tuple | None = None, directory: str | os.PathLike | None = None, log=print) -> Path:
    """Path of the compiled network of ``archive`` (a ``.pt2`` package; ``kind``
    "dynamics" or "score") for ``system`` = (positions [N, 3] nm, box or None, bead
    features, CG bonds), or for the network inputs ``example``, or else for a 23-bead
    chain: from the cache if it is there (nothing else is loaded then), else compiled,
    checked against the archive (on the example and on chains of two other sizes), and
    stored. RuntimeError if the compiled network disagrees with the archive; ValueError
    for fewer than 2 beads."""
    _check_kind(kind)
    if system is not None:
        num_beads = len(system[0])
    elif example is not None:
        num_beads = example[0].shape[1 if kind == "dynamics" else 0]
    else:
        num_beads = 23
    if num_beads < 2:
        raise ValueError(f"compiled networks need at least 2 beads, the system has {num_beads}")
    archive_bytes = Path(archive).read_bytes()
    target = Path(directory or cache_dir()) / package_key(archive_bytes, num_beads) / f"{kind}.pt2"
    if target.is_file():
        return target
    scripted = torch.jit.load(str(archive), map_location="cpu").eval()
    model = _eager_from(kind, scripted, archive, model_config)
    if example is None:
        example = system_example(kind, model, *system) if system is not None else chain_example(kind, model, 23, 0)
    if log:
        log(f"compiling the {kind} network for this CPU (once; cached in {target.parent}) ...")
    start = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(_on_graph(kind, model), example, dynamic_shapes=_dynamic_shapes(kind))
    target.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        # Inductor's kernels single-threaded, whatever this process's torch setting (the
        # ATen matmuls they call still follow it): kernels for two threads ran the
        # 122-bead score network 2x slower on one thread and 1.3x slower on two than
        # serial ones (2.1 ms), and the setting would otherwise be baked into whichever
        # package reached the cache first
        "cpp.threads": 1,
        # what the C++ step checks before it runs the package
        "aot_inductor.metadata": {"openmm_cgml_kind": kind,
                                  "openmm_cgml_archive": archive_fingerprint(archive_bytes)},
    }
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        torch._inductor.aoti_compile_and_package(exported, package_path=str(staged), inductor_configs=settings)
        check_package(kind, staged, scripted, model, example)
        os.replace(staged, target)  # atomic: a concurrent reader sees no half-written package
    if log:
        log(f"compiled in {time.perf_counter() - start:.0f} s: {target}")
    return target


def check_package(kind: str, package: str | os.PathLike, scripted, model: nn.Module, example: tuple) -> float:
    """Largest relative difference between the package and the archive's network on
    ``example`` and on chains of 17 and 41 beads; RuntimeError above TOLERANCE or for
    any non-finite output."""
    compiled = torch._inductor.aoti_load_package(str(package))
    reference = scripted.predict if kind == "dynamics" else scripted.score_on_graph
    worst = 0.0
    with torch.no_grad():
        for inputs in (example, chain_example(kind, model, 17, 1), chain_example(kind, model, 41, 2)):
            want, got = reference(*inputs), compiled(*inputs)
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, (tuple, list)) else (got,)
            if len(got) != len(want):
                raise RuntimeError(f"the compiled {kind} network returns {len(got)} outputs, the archive {len(want)}")
            for a, b in zip(got, want):
                difference = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                if not math.isfinite(difference):  # max() would drop a NaN
                    raise RuntimeError(f"the compiled {kind} network gives non-finite outputs; it was not cached")
                worst = max(worst, difference)
    if not worst <= TOLERANCE:
        raise RuntimeError(f"the compiled {kind} network differs from the archive by {worst:.2e} (relative; "
                           f"tolerance {TOLERANCE:g}); it was not cached")
    return worst
