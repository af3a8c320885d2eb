"""Export the dynamics and score modules as TorchScript archives for the C++ integrator,
and verify that each archive loads and runs in a fresh process that imports only torch.

An archive that needs custom ops (``torch.ops.<ns>`` outside aten/prim) would fail to
load in plain libtorch ("Unknown builtin op"), so export refuses it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

ALLOWED_OP_NAMESPACES = frozenset({"aten", "prim"})

DYNAMICS_ATTRIBUTES = {"seq_len": int, "step_size_ps": float}
SCORE_ATTRIBUTES = {"langevin_steps": int, "langevin_step_size": float, "langevin_schedule": str}
#: the property head (``models.property``; read by LearnedSimulator, not by the integrator)
PROPERTY_ATTRIBUTES = {"min_beads": int, "num_features": int}
_ATTRIBUTES = {"dynamics": DYNAMICS_ATTRIBUTES, "score": SCORE_ATTRIBUTES, "property": PROPERTY_ATTRIBUTES}


class ExportError(RuntimeError):
    """The module cannot be exported for the C++ integrator."""


def find_custom_ops(scripted: torch.jit.ScriptModule) -> list[str]:
    """Ops of ``scripted`` (all methods of all submodules) outside aten/prim, as
    'namespace::name' where the graph shows them or 'ops.namespace.name' from the code."""
    offending: set[str] = set()
    modules = [scripted] + [m for _, m in scripted.named_modules()]
    for module in modules:
        for method_name in module._c._method_names():
            graph = module._c._get_method(method_name).graph
            for node_kind in _all_node_kinds(graph):
                namespace = node_kind.split("::", 1)[0]
                if namespace not in ALLOWED_OP_NAMESPACES:
                    offending.add(node_kind)
        try:
            code = module.code
        except (RuntimeError, AttributeError):
            code = ""
        for namespace, name in re.findall(r"\bops\.(\w+)\.(\w+)", code):
            if namespace not in ALLOWED_OP_NAMESPACES:
                offending.add(f"ops.{namespace}.{name}")
    return sorted(offending)


def _all_node_kinds(graph) -> list[str]:
    kinds: list[str] = []

    def visit(nodes):
        for node in nodes:
            kinds.append(node.kind())
            for block in node.blocks():
                visit(block.nodes())

    visit(graph.nodes())
    return kinds


def _check_contract_attributes(scripted, kind: str) -> None:
    expected = _ATTRIBUTES[kind]
    for name, typ in expected.items():
        if not hasattr(scripted, name):
            raise ExportError(f"{kind} module lacks the contract attribute '{name}'")
        if not isinstance(getattr(scripted, name), typ):
            raise ExportError(f"{kind} attribute '{name}' must be {typ.__name__}")
    if kind == "score":
        sigmas = getattr(scripted, "sigmas", None)
        if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.dtype != torch.float32:
            raise ExportError("score module needs 'sigmas', a 1-D float32 tensor")


def example_inputs(kind: str, model: nn.Module, num_beads: int = 12, seed: int = 0) -> tuple:
    """Small non-periodic chain inputs matching ``model``'s contract (float32)."""
    gen = torch.Generator().manual_seed(seed)
    n = num_beads
    cutoff = float(model.cutoff)
    base = torch.arange(n, dtype=torch.float32).unsqueeze(1) * torch.tensor([0.6, 0.3, 0.1]) * cutoff
    base = base + 0.05 * cutoff * torch.randn(n, 3, generator=gen)
    features = torch.randn(n, model.num_features, generator=gen)
    features[:, -1] = 10.0 + 40.0 * torch.rand(n, generator=gen)
    bonds = torch.stack([torch.arange(n - 1), torch.arange(1, n)], dim=1)
    box = torch.zeros(3, 3)
    if kind == "dynamics":
        steps = 0.01 * cutoff * torch.randn(model.seq_len, n, 3, generator=gen)
        history = base + torch.cumsum(steps, dim=0)
        return (history, box, features, bonds)
    latent = torch.randn(n, model.latent_dim, generator=gen)
    return (base, latent, box, features, bonds, model.sigmas[len(model.sigmas) // 2].clone())


_CHILD = r"""
import json, sys, torch
leaked_before = sorted(k for k in sys.modules if k.split(".")[0] in ("openmm_cgml", "torchmdnet", "warp"))
for job in json.loads(sys.argv[1]):
    m = torch.jit.load(job["archive"], map_location="cpu")
    m.eval()
    inputs = torch.load(job["inputs"])
    with torch.no_grad():
        out = m(*inputs)
    attrs = {name: getattr(m, name) for name in job["attributes"]}
    torch.save({"outputs": out if isinstance(out, tuple) else (out,), "attributes": attrs}, job["outputs"])
leaked = sorted(k for k in sys.modules if k.split(".")[0] in ("openmm_cgml", "torchmdnet", "warp"))
if leaked:
    raise SystemExit("verification process imported " + ", ".join(leaked))
"""


def verify_archives(jobs: Sequence[tuple], rtol: float = 1e-4, atol: float = 1e-5,
                    timeout: float = 300.0) -> list[dict]:
    """``verify_archive`` for several (path, inputs, expected, attributes) in one fresh
    process (one torch import)."""
    with tempfile.TemporaryDirectory(prefix="cgml_verify_") as tmp:
        spec = []
        for k, (path, inputs, _, attributes) in enumerate(jobs):
            inputs_file = os.path.join(tmp, f"inputs{k}.pt")
            torch.save(tuple(t.detach() for t in inputs), inputs_file)
            spec.append({"archive": str(Path(path).resolve()), "inputs": inputs_file,
                         "outputs": os.path.join(tmp, f"outputs{k}.pt"), "attributes": list(attributes)})
        cmd = [sys.executable, "-I", "-c", _CHILD, json.dumps(spec)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired as err:
            raise ExportError(f"fresh-process check timed out after {timeout} s") from err
        if proc.returncode != 0:
            names = ", ".join(str(j[0]) for j in jobs)
            raise ExportError(
                f"{names}: does not load/run in a fresh process without the model code "
                f"(custom ops or Python-only code?):\n{proc.stderr.strip()[-2000:]}"
            )
        results = [torch.load(s["outputs"]) for s in spec]
    for (path, _, expected, _), result in zip(jobs, results):
        outputs = result["outputs"]
        if len(outputs) != len(expected):
            raise ExportError(f"{path}: fresh process returned {len(outputs)} outputs, expected {len(expected)}")
        for i, (got, want) in enumerate(zip(outputs, expected)):
            want = want.detach()
            if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
                diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
                raise ExportError(f"{path}: output {i} differs in the fresh process (max abs diff {diff})")
    return [r["attributes"] for r in results]


def verify_archive(path: str | os.PathLike, inputs: Sequence[Tensor], expected: Sequence[Tensor],
                   attributes: Iterable[str] = (), rtol: float = 1e-4, atol: float = 1e-5,
                   timeout: float = 300.0) -> dict:
    """Load ``path`` in a fresh Python that imports only torch (isolated mode: no
    PYTHONPATH, no current directory on sys.path), run it on ``inputs`` and compare with
    ``expected``. Returns the named attributes as seen there. Raises ExportError."""
    return verify_archives([(path, inputs, expected, attributes)], rtol, atol, timeout)[0]


def script_checked(model: nn.Module, kind: str) -> tuple[nn.Module, torch.jit.ScriptModule]:
    if kind not in _ATTRIBUTES:
        raise ValueError("kind must be 'dynamics', 'score' or 'property'")
    # a copy: exporting must not switch the caller's (training) model to eval/float32
    model = copy.deepcopy(model).cpu().float().eval()
    try:
        scripted = torch.jit.script(model)
    except Exception as err:  # scripting failures come as many exception types
        raise ExportError(f"{kind} module does not compile to TorchScript: {err}") from err
    custom = find_custom_ops(scripted)
    if custom:
        raise ExportError(
            f"{kind} module uses custom ops {custom}; plain libtorch cannot load them. "
            "Use pure-torch building blocks."
        )
    _check_contract_attributes(scripted, kind)
    return model, scripted


def _attribute_names(kind: str) -> list[str]:
    return list(_ATTRIBUTES[kind]) + (["sigmas"] if kind == "score" else [])


def _verification_job(model, scripted, kind, path, inputs):
    inputs = tuple(inputs) if inputs is not None else example_inputs(kind, model)
    with torch.no_grad():
        expected = model(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return (path, inputs, expected, _attribute_names(kind))


def _compare_attributes(scripted, path, names, attrs):
    for name in names:
        mine, theirs = getattr(scripted, name), attrs[name]
        same = torch.equal(mine, theirs) if isinstance(mine, Tensor) else mine == theirs
        if not same:
            raise ExportError(f"{path}: attribute '{name}' differs after reload")


def export_module(model: nn.Module, path: str | os.PathLike, kind: str,
                  inputs: Optional[Sequence[Tensor]] = None, verify: bool = True) -> torch.jit.ScriptModule:
    """Script ``model`` (a dynamics or score module), check it (TorchScript, no custom
    ops, contract attributes), save it to ``path`` and verify the archive in a fresh
    process. ``kind``: "dynamics" or "score"."""
    model, scripted = script_checked(model, kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    if verify:
        job = _verification_job(model, scripted, kind, path, inputs)
        _compare_attributes(scripted, path, job[3], verify_archive(*job))
    return scripted


def export_dynamics(model: nn.Module, path: str | os.PathLike, inputs: Optional[Sequence[Tensor]] = None,
                    verify: bool = True) -> torch.jit.ScriptModule:
    return export_module(model, path, "dynamics", inputs, verify)


def export_models(dynamics: nn.Module, score: nn.Module, directory: str | os.PathLike,
                  dynamics_inputs: Optional[Sequence[Tensor]] = None,
                  score_inputs: Optional[Sequence[Tensor]] = None, verify: bool = True) -> tuple[Path, Path]:
    """Export both modules as ``dynamics.pt`` and ``score.pt`` in ``directory`` and
    verify both in one fresh process (custom ops are refused even with verify=False)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "dynamics.pt", directory / "score.pt")
    export_archives([(dynamics, "dynamics", paths[0], dynamics_inputs), (score, "score", paths[1], score_inputs)],
                    verify=verify)
    return paths


def export_archives(entries: Sequence[tuple], verify: bool = True) -> list[Path]:
    """Export several modules, each (model, kind, path, inputs) with kind "dynamics",
    "score" or "property" (``inputs`` required for "property"), and verify them all in
    one fresh process (custom ops are refused even with verify=False)."""
    jobs, scripted_modules, paths = [], [], []
    for model, kind, path, inputs in entries:
        if kind == "property" and inputs is None:
            raise ValueError("a property module needs example inputs")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model, scripted = script_checked(model, kind)
        scripted.save(str(path))
        jobs.append(_verification_job(model, scripted, kind, path, inputs))
        scripted_modules.append(scripted)
        paths.append(path)
    if verify and jobs:
        for scripted, job, attrs in zip(scripted_modules, jobs, verify_archives(jobs)):
            _compare_attributes(scripted, job[0], job[3], attrs)
    return paths
