"""The compiled score network (openmm_cgml.compiled; CGMLIntegrator.setCompiledScoreModel):
an AOTInductor package of the archive's network, run by the C++ step with the archive's
graph. It must give the archive's rollout (to float32 round-off), be cached, refuse what
it cannot run, and not travel with the integrator's XML."""
from __future__ import annotations

import copy
import json
import pickle
import shutil
import time

import numpy as np
import pytest
import openmm
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
    package compiled for it (the compile is timed: it is the slow part of this module)."""
    sim = openmm_cgml.LearnedSimulator.load(exported_tiny_model)
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = sim.coarseGrain(record)
    history = cg.map_trajectory(record.positions)
    start = time.perf_counter()
    integrator = sim.createIntegrator(cg, compiled=True)
    package = integrator.getCompiledScoreModel()
    return sim, cg, history, package, time.perf_counter() - start


def positions_after(sim, cg, history, steps, package=None, deterministic=False, seed=4):
    integrator = sim.createIntegrator(cg, deterministic=deterministic, seed=seed)
    if package:
        integrator.setCompiledScoreModel(package)
    simulation = app.Simulation(cg.topology, cg.system, integrator)
    integrator.setHistory(history[-integrator.getSequenceLength():])
    simulation.step(steps)
    return simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value


def test_compiled_rollout_matches_the_archive(case):
    sim, cg, history, package, _ = case
    assert package and package.endswith("score.pt2")
    for deterministic in (True, False):  # mean + refinement; with the same noise draws
        archive = positions_after(sim, cg, history, 5, deterministic=deterministic)
        fused = positions_after(sim, cg, history, 5, package, deterministic=deterministic)
        assert np.isfinite(fused).all()
        np.testing.assert_allclose(fused, archive, rtol=0, atol=1e-4)
    # and the refinement does act: without the score model the result differs
    integrator = sim.createIntegrator(cg, score=False, deterministic=True)
    simulation = app.Simulation(cg.topology, cg.system, integrator)
    integrator.setHistory(history[-integrator.getSequenceLength():])
    simulation.step(5)
    bare = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)._value
    assert np.abs(bare - positions_after(sim, cg, history, 5, package, deterministic=True)).max() > 1e-3


def test_package_is_cached_per_archive_cpu_and_size(case, cache):
    sim, cg, history, package, first_seconds = case
    start = time.perf_counter()
    again = sim.createIntegrator(cg, compiled=True).getCompiledScoreModel()
    assert again == package and time.perf_counter() - start < first_seconds / 3
    key = compiled.package_key(sim.scorePath.read_bytes(), cg.n_beads)
    assert str(cache) in package and key in package
    assert key != compiled.package_key(sim.scorePath.read_bytes(), 64 * cg.n_beads)
    assert key != compiled.package_key(sim.scorePath.read_bytes() + b"x", cg.n_beads)
    assert compiled.size_class(100) == compiled.size_class(120) == 128 and compiled.size_class(3) == 4


def test_a_package_that_disagrees_is_refused_and_not_cached_and_the_step_runs_the_package(case, tmp_path,
                                                                                           monkeypatch):
    """A package of another network (the decoder's weights x 1.5) fails the check against
    the archive and is not cached; set anyway, it changes the rollout: the C++ step does
    run the package, not the archive's network."""
    sim, cg, history, package, _ = case
    real_eager, real_check = compiled.eager_score_model, compiled.check_package
    kept = tmp_path / "other.pt2"

    def other_network(*args):
        model = real_eager(*args)
        with torch.no_grad():
            for weight in model.gnn.decoder.parameters():
                weight.mul_(1.5)
        return model

    def keep_then_check(staged, *args):
        shutil.copy(staged, kept)
        return real_check(staged, *args)

    monkeypatch.setattr(compiled, "eager_score_model", other_network)
    monkeypatch.setattr(compiled, "check_package", keep_then_check)
    with pytest.raises(RuntimeError, match="differs from the archive .* not cached"):
        compiled.compile_score(sim.scorePath, sim.manifest["model_config"], directory=tmp_path / "cache", log=None)
    assert kept.is_file() and not list((tmp_path / "cache").rglob("*.pt2"))
    monkeypatch.undo()
    good = positions_after(sim, cg, history, 3, package, deterministic=True)
    other = positions_after(sim, cg, history, 3, str(kept), deterministic=True)
    assert np.abs(other - good).max() > 1e-3


def test_route_switches_and_refusals(case, tmp_path):
    sim, cg, history, package, _ = case
    integrator = sim.createIntegrator(cg)
    assert integrator.getCompiledScoreModel() == ""
    integrator.setCompiledScoreModel(package)
    assert integrator.getCompiledScoreModel() == package
    # copies in this process keep the route; XML and pickles do not (machine code for this CPU)
    assert copy.copy(integrator).getCompiledScoreModel() == package
    xml = openmm.XmlSerializer.serialize(integrator)
    assert "score.pt2" not in xml
    assert CGMLIntegrator.deserialize(xml).getCompiledScoreModel() == ""
    assert pickle.loads(pickle.dumps(integrator)).getCompiledScoreModel() == ""
    integrator.setCompiledScoreModel(None)
    assert integrator.getCompiledScoreModel() == ""
    with pytest.raises(ValueError, match="cannot load the compiled score network"):
        integrator.setCompiledScoreModel(tmp_path / "missing.pt2")
    assert integrator.getCompiledScoreModel() == ""  # the route in use is kept
    bare = sim.createIntegrator(cg, score=False)
    with pytest.raises(ValueError, match="needs a score model"):
        bare.setCompiledScoreModel(package)
    # an archive without build_graph (exported before the compiled route, or hand-written)
    toy = CGMLIntegrator(save(HarmonicDynamics(), tmp_path / "d.pt"), save(GaussianScore(), tmp_path / "s.pt"))
    with pytest.raises(ValueError, match="no build_graph method"):
        toy.setCompiledScoreModel(package)
    with pytest.raises(ValueError, match="no build_graph method"):
        compiled.eager_score_model(tmp_path / "s.pt", sim.manifest["model_config"])


def test_shipped_archives_carry_the_graph_method():
    """The compiled route needs build_graph in the archive: the shipped electrolyte model
    (the one with a score model) has it, and its manifest builds the same network."""
    sim = openmm_cgml.LearnedSimulator.pretrained("electrolyte")
    scripted = torch.jit.load(str(sim.scorePath))
    assert hasattr(scripted, "build_graph") and hasattr(scripted, "score_on_graph")
    model = compiled.eager_score_model(sim.scorePath, json.loads((sim.directory / "simulator.json").read_text())
                                       ["model_config"])
    x = torch.rand(30, 3) * 2.0
    box = torch.eye(3) * 2.0
    features = torch.randn(30, int(scripted.num_features))
    bonds = torch.tensor([[0, 1], [1, 2]])
    latent = torch.randn(30, int(scripted.latent_dim))
    sigma = scripted.sigmas[-1].clone()
    with torch.no_grad():
        graph = scripted.build_graph(x, box, bonds)
        torch.testing.assert_close(model.score_on_graph(latent, features, sigma, *graph),
                                   scripted(x, latent, box, features, bonds, sigma))
