"""Compiled networks (openmm_cgml.compiled; CGMLIntegrator.setCompiledDynamicsModel /
setCompiledScoreModel): AOTInductor packages of the archives' networks, run by the C++
step with the archives' graphs. They must give the archives' rollout (to float32
round-off), be cached, refuse what they cannot run, and not travel with the
integrator's XML."""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import time
import zipfile

import numpy as np
import openmm
import pytest
import torch
from openmm import app

import openmm_cgml
from openmm_cgml import compiled
from openmm_cgml.integrator import CGMLIntegrator
from openmm_cgml.trajectories import list_trajectories, load_trajectory

from toy_models import GaussianScore, HarmonicDynamics, save

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("compiled_cache")
        patch.setenv("OPENMM_CGML_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="module")
def case(exported_tiny_model, chain_data_dir, cache):
    """The tiny exported model, a CG system of the held-out chain, its history, and the
    packages compiled for it (timed: compiling is the slow part of this module)."""
    sim = openmm_cgml.LearnedSimulator.load(exported_tiny_model)
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = sim.coarseGrain(record)
    history = cg.map_trajectory(record.positions)
    start = time.perf_counter()
    integrator = sim.createIntegrator(cg, compiled=True)
    packages = {"dynamics": integrator.getCompiledDynamicsModel(), "score": integrator.getCompiledScoreModel()}
    return sim, cg, history, packages, time.perf_counter() - start


def test_packages_are_single_threaded(case, tmp_path):
    """Compiled under 2 torch threads for a system large enough that the compiler would
    parallelise (1,000 beads), the kernels have no OpenMP parallel regions: parallel
    packages were slower at these sizes, and the thread count would be baked in."""
    sim = case[0]
    model = compiled.eager_model("score", sim.scorePath, sim.manifest["model_config"])
    torch.set_num_threads(2)
    try:
        package = compiled.compile_network("score", sim.scorePath, sim.manifest["model_config"],
                                           example=compiled.chain_example("score", model, 1000, 0), directory=tmp_path,
                                           log=None)
    finally:
        torch.set_num_threads(1)
    with zipfile.ZipFile(package) as archive:
        kernels = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".cpp")]
    assert kernels and not any("omp parallel" in source for source in kernels)


def positions_after(sim, cg, history, steps, packages=None, deterministic=False, seed=4, score=True):
    integrator = sim.createIntegrator(cg, deterministic=deterministic, seed=seed, score=score)
    packages = packages or {}
    if packages.get("dynamics"):
        integrator.setCompiledDynamicsModel(packages["dynamics"])
    if packages.get("score"):
        integrator.setCompiledScoreModel(packages["score"])
    simulation = app.Simulation(cg.topology, cg.system, integrator)
    integrator.setHistory(history[-integrator.getSequenceLength():])
    simulation.step(steps)
    return simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value


def test_compiled_rollout_matches_the_archives(case):
    sim, cg, history, packages, _ = case
    assert packages["dynamics"].endswith("dynamics.pt2") and packages["score"].endswith("score.pt2")
    for deterministic in (True, False):  # the mean + refinement; and with the same noise draws
        archive = positions_after(sim, cg, history, 5, deterministic=deterministic)
        for chosen in ({"dynamics": packages["dynamics"]}, {"score": packages["score"]}, packages):
            fused = positions_after(sim, cg, history, 5, chosen, deterministic=deterministic)
            assert np.isfinite(fused).all()
            np.testing.assert_allclose(fused, archive, rtol=0, atol=1e-4, err_msg=str(sorted(chosen)))
    # the refinement does act: without the score model the result differs
    bare = positions_after(sim, cg, history, 5, {"dynamics": packages["dynamics"]}, deterministic=True, score=False)
    assert np.abs(bare - positions_after(sim, cg, history, 5, packages, deterministic=True)).max() > 1e-3


def test_packages_are_cached_per_archive_cpu_and_size(case, cache, monkeypatch):
    sim, cg, history, packages, _ = case

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load, export or compile anything")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(compiled, "_eager_from", refuse)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    again = sim.createIntegrator(cg, compiled=True)
    assert again.getCompiledScoreModel() == packages["score"]
    assert again.getCompiledDynamicsModel() == packages["dynamics"]
    score_bytes = sim.scorePath.read_bytes()
    key = compiled.package_key(score_bytes, cg.n_beads)
    assert packages["score"].startswith(str(cache)) and key in packages["score"]
    assert compiled.package_key(sim.dynamicsPath.read_bytes(), cg.n_beads) in packages["dynamics"]
    assert key != compiled.package_key(score_bytes, 64 * cg.n_beads)
    assert key != compiled.package_key(score_bytes + b"x", cg.n_beads)
    assert compiled.size_class(100) == compiled.size_class(120) == 128 and compiled.size_class(3) == 4
    with pytest.raises(ValueError, match="at least 2 beads"):
        compiled.compile_network("score", sim.scorePath, sim.manifest["model_config"],
                                 (np.zeros((1, 3)), None, cg.features[:1], np.zeros((0, 2))))


def test_archive_fingerprint_is_crc32_and_non_finite_packages_are_refused(case, monkeypatch):
    assert compiled.archive_fingerprint(b"123456789") == "9:cbf43926"  # the CRC-32 check value
    sim, cg, history, packages, _ = case
    model = compiled.eager_model("score", sim.scorePath, sim.manifest["model_config"])
    scripted = torch.jit.load(str(sim.scorePath))
    example = compiled.chain_example("score", model, 12, 0)
    assert compiled.check_package("score", packages["score"], scripted, model, example) <= compiled.TOLERANCE
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path: lambda *inputs: torch.full((inputs[0].shape[0], 3), float("nan")))
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled.check_package("score", packages["score"], scripted, model, example)


def test_a_package_that_disagrees_is_refused_and_not_cached_and_the_step_runs_the_package(case, tmp_path,
                                                                                           monkeypatch):
    """A package of another network (the decoder's weights x 1.5) fails the check against
    the archive and is not cached; set anyway, it changes the rollout: the C++ step does
    run the package, not the archive's network."""
    sim, cg, history, packages, _ = case
    real_eager, real_check = compiled._eager_from, compiled.check_package
    kept = tmp_path / "other.pt2"

    def other_network(*args):
        model = real_eager(*args)
        with torch.no_grad():
            for weight in model.gnn.decoder.parameters():
                weight.mul_(1.5)
        return model

    def keep_then_check(kind, staged, *args):
        shutil.copy(staged, kept)
        return real_check(kind, staged, *args)

    monkeypatch.setattr(compiled, "_eager_from", other_network)
    monkeypatch.setattr(compiled, "check_package", keep_then_check)
    with pytest.raises(RuntimeError, match="differs from the archive .* not cached"):
        compiled.compile_network("score", sim.scorePath, sim.manifest["model_config"], directory=tmp_path / "cache",
                                 log=None)
    assert kept.is_file() and not list((tmp_path / "cache").rglob("*.pt2"))
    monkeypatch.undo()
    good = positions_after(sim, cg, history, 3, packages, deterministic=True)
    other = positions_after(sim, cg, history, 3, {"dynamics": packages["dynamics"], "score": str(kept)},
                            deterministic=True)
    assert np.abs(other - good).max() > 1e-3


def test_route_switches_and_refusals(case, tmp_path):
    sim, cg, history, packages, _ = case
    integrator = sim.createIntegrator(cg)
    assert integrator.getCompiledScoreModel() == "" and integrator.getCompiledDynamicsModel() == ""
    integrator.setCompiledScoreModel(packages["score"])
    integrator.setCompiledDynamicsModel(packages["dynamics"])
    assert integrator.getCompiledScoreModel() == packages["score"]
    # copies in this process keep the routes; XML and pickles do not (machine code for this CPU)
    clone = copy.copy(integrator)
    assert (clone.getCompiledDynamicsModel(), clone.getCompiledScoreModel()) == (packages["dynamics"],
                                                                                 packages["score"])
    xml = openmm.XmlSerializer.serialize(integrator)
    assert ".pt2" not in xml
    for restored in (CGMLIntegrator.deserialize(xml), pickle.loads(pickle.dumps(integrator))):
        assert restored.getCompiledScoreModel() == "" and restored.getCompiledDynamicsModel() == ""
    integrator.setCompiledScoreModel(None)
    assert integrator.getCompiledScoreModel() == ""
    with pytest.raises(ValueError, match="cannot load the compiled score network"):
        integrator.setCompiledScoreModel(tmp_path / "missing.pt2")
    with pytest.raises(ValueError, match="cannot load the compiled dynamics network"):
        integrator.setCompiledDynamicsModel(tmp_path / "missing.pt2")
    assert integrator.getCompiledDynamicsModel() == packages["dynamics"]  # the route in use is kept
    # a package runs only with the network and archive it was compiled from
    with pytest.raises(ValueError, match="is a compiled score network, not dynamics"):
        integrator.setCompiledDynamicsModel(packages["score"])
    shipped = openmm_cgml.LearnedSimulator.pretrained("chain")
    other = CGMLIntegrator(shipped.dynamicsPath)
    with pytest.raises(ValueError, match="compiled from another dynamics archive"):
        other.setCompiledDynamicsModel(packages["dynamics"])
    assert integrator.getCompiledDynamicsModel() == packages["dynamics"] and other.getCompiledDynamicsModel() == ""
    bare = sim.createIntegrator(cg, score=False)
    with pytest.raises(ValueError, match="needs a score model"):
        bare.setCompiledScoreModel(packages["score"])
    # archives without build_graph (exported before the compiled route, or hand-written)
    toy = CGMLIntegrator(save(HarmonicDynamics(), tmp_path / "d.pt"), save(GaussianScore(), tmp_path / "s.pt"))
    with pytest.raises(ValueError, match="no build_graph method"):
        toy.setCompiledScoreModel(packages["score"])
    with pytest.raises(ValueError, match="no build_graph method"):
        toy.setCompiledDynamicsModel(packages["dynamics"])
    with pytest.raises(ValueError, match="no build_graph method"):
        compiled.eager_model("score", tmp_path / "s.pt", sim.manifest["model_config"])
    with pytest.raises(ValueError, match="kind must be one of"):
        compiled.eager_model("embedding", sim.scorePath, sim.manifest["model_config"])


@pytest.mark.parametrize("name", ["chain", "electrolyte"])
def test_shipped_archives_split_into_graph_and_network(name):
    """The compiled route needs build_graph in the archives: the shipped ones have it, and
    their manifests build the same networks."""
    sim = openmm_cgml.LearnedSimulator.pretrained(name)
    config = json.loads((sim.directory / "simulator.json").read_text())["model_config"]
    gen = torch.Generator().manual_seed(0)
    n = 30
    box = torch.eye(3) * 3.0 if sim.periodic else torch.zeros(3, 3)
    x = torch.rand(n, 3, generator=gen) * 3.0
    bonds = torch.tensor([[0, 1], [1, 2]])
    dynamics = torch.jit.load(str(sim.dynamicsPath))
    features = torch.randn(n, int(dynamics.num_features), generator=gen)
    history = x + 0.01 * torch.randn(int(dynamics.seq_len), n, 3, generator=gen)
    with torch.no_grad():
        eager = compiled.eager_model("dynamics", sim.dynamicsPath, config)
        graph = dynamics.build_graph(history[-1], box, bonds)
        for a, b in zip(eager.predict(history, features, *graph), dynamics(history, box, features, bonds)):
            torch.testing.assert_close(a, b)
        if sim.scorePath is not None:
            score = torch.jit.load(str(sim.scorePath))
            latent = torch.randn(n, int(score.latent_dim), generator=gen)
            sigma = score.sigmas[-1].clone()
            eager = compiled.eager_model("score", sim.scorePath, config)
            torch.testing.assert_close(eager.score_on_graph(latent, features, sigma, *score.build_graph(x, box, bonds)),
                                       score(x, latent, box, features, bonds, sigma))


def test_evaluate_runs_every_learned_run_compiled(case, exported_tiny_model, chain_data_dir, tmp_path, monkeypatch):
    """``cgml evaluate --compiled``: each learned run (refined and the ablations) gets its
    networks compiled (from the cache here) and the report records it."""
    from openmm_cgml import evaluate

    packages = case[3]
    calls, attached = [], []
    real = compiled.compile_network
    monkeypatch.setattr(compiled, "compile_network", lambda kind, *a, **k: calls.append(kind) or real(kind, *a, **k))
    for kind in ("Dynamics", "Score"):
        setter = getattr(CGMLIntegrator, f"setCompiled{kind}Model")
        monkeypatch.setattr(CGMLIntegrator, f"setCompiled{kind}Model",
                            lambda self, path, setter=setter, kind=kind: attached.append((kind, str(path)))
                            or setter(self, path))
    evaluate.run_evaluation({"tiny": exported_tiny_model}, chain_data_dir, tmp_path / "report", rollout_factor=1.0,
                            sl_baseline=False, progress=False, measure_md=False, compiled=True)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["context"]["compiled"] is True
    runs = metrics["systems"][0]["runs"]
    learned = [label for label in runs if label.startswith("tiny")]
    assert len(learned) >= 2 and all("failure" not in runs[label] for label in learned)
    # one dynamics package per learned run, a score package for the refined one only
    assert calls.count("dynamics") == len(learned) and calls.count("score") == 1
    assert sorted(set(attached)) == sorted({("Dynamics", packages["dynamics"]), ("Score", packages["score"])})
