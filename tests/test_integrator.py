"""CGMLIntegrator: the C++ learned integrator inside unmodified OpenMM objects."""
from __future__ import annotations

import copy
import pickle
import threading
import time

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_cgml import CGMLIntegrator
from toy_models import BadShapeDynamics, GaussianScore, HarmonicDynamics, InputEcho, save

PLATFORMS = ["Reference", "CPU"]


def make_system(n: int, box_nm: float | None = None, mass: float = 2.0):
    system = openmm.System()
    topology = app.Topology()
    residue = topology.addResidue("CG", topology.addChain())
    for _ in range(n):
        system.addParticle(mass)
        topology.addAtom("B", None, residue)
    if box_nm is not None:
        vectors = [openmm.Vec3(box_nm, 0, 0), openmm.Vec3(0, box_nm, 0), openmm.Vec3(0, 0, box_nm)]
        system.setDefaultPeriodicBoxVectors(*vectors)
        topology.setPeriodicBoxVectors(vectors)
    return topology, system


def simulation(integrator, n=6, platform="Reference", positions=None, box_nm=None, seed=1):
    topology, system = make_system(n, box_nm)
    sim = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(platform))
    rng = np.random.default_rng(seed)
    sim.context.setPositions(rng.uniform(-1, 1, (n, 3)) if positions is None else positions)
    return sim


def state_arrays(context):
    state = context.getState(getPositions=True, getVelocities=True)
    return (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))


def harmonic_recurrence(x0, v0, k, steps, seq_len, dt):
    """docs/method.md step 4 in NumPy, with the model's float32 arithmetic for the mean."""
    history = [x0 - (seq_len - 1 - i) * dt * v0 for i in range(seq_len)]
    for _ in range(steps):
        xt, xprev = history[-1], history[-2]
        mean = (np.float32(-k) * xt.astype(np.float32)).astype(np.float64)
        history.append(xt + (xt - xprev) + mean)
    return np.array(history)


@pytest.fixture
def harmonic(tmp_path):
    return save(HarmonicDynamics(k=0.1), tmp_path / "dynamics.pt")


# --- the exact algorithm ---------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
def test_deterministic_trajectory_equals_numpy_recurrence(harmonic, platform):
    integrator = CGMLIntegrator(harmonic)
    integrator.setDeterministic(True)
    assert isinstance(integrator, openmm.Integrator)
    sim = simulation(integrator, n=8, platform=platform)
    x0, _ = state_arrays(sim.context)
    v0 = np.random.default_rng(3).normal(0, 0.05, x0.shape)
    sim.context.setVelocities(v0)
    expected = harmonic_recurrence(x0, v0, 0.1, 1000, seq_len=3, dt=0.5)
    for block in range(10):
        sim.step(100)
        x, v = state_arrays(sim.context)
        t = 3 + 100 * (block + 1) - 1
        np.testing.assert_allclose(x, expected[t], atol=1e-5)
        np.testing.assert_allclose(v, (expected[t] - expected[t - 1]) / 0.5, atol=1e-5)
    state = sim.context.getState()
    assert state.getStepCount() == 1000
    assert state.getTime().value_in_unit(unit.picosecond) == pytest.approx(500.0)
    np.testing.assert_allclose(integrator.getHistory().value_in_unit(unit.nanometer), expected[-3:], atol=1e-5)


def test_default_platform_and_step_size_from_model(harmonic):
    integrator = CGMLIntegrator(harmonic)
    assert integrator.getStepSize() == 0.5 * unit.picosecond
    assert integrator.getModelStepSize() == 0.5 * unit.picosecond
    assert integrator.getSequenceLength() == 3
    topology, system = make_system(4)
    sim = app.Simulation(topology, system, integrator)  # default platform
    sim.context.setPositions(np.zeros((4, 3)))
    sim.step(3)
    assert sim.context.getState().getStepCount() == 3


def test_sampled_accelerations_have_model_mean_and_std(tmp_path):
    drift, std = (0.01, -0.02, 0.0), 0.05
    path = save(HarmonicDynamics(k=0.0, std=std, seq_len=2, drift=drift), tmp_path / "d.pt")
    integrator = CGMLIntegrator(path)
    integrator.setRandomNumberSeed(11)
    n, steps = 200, 60
    sim = simulation(integrator, n=n)
    frames = []
    for _ in range(steps):
        sim.step(1)
        frames.append(state_arrays(sim.context)[0])
    frames = np.array(frames)
    accel = frames[2:] - 2 * frames[1:-1] + frames[:-2]  # [steps-2, n, 3]
    samples = accel.reshape(-1, 3)
    count = samples.shape[0]
    # mean within 5 standard errors, std within 5 standard errors of a Gaussian's std
    assert np.all(np.abs(samples.mean(0) - drift) < 5 * std / np.sqrt(count))
    assert np.all(np.abs(samples.std(0) - std) < 5 * std / np.sqrt(2 * count))


def test_deterministic_mode_ignores_std(tmp_path):
    path = save(HarmonicDynamics(k=0.1, std=1.0), tmp_path / "d.pt")
    integrator = CGMLIntegrator(path)
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=5)
    x0, v0 = state_arrays(sim.context)
    sim.step(20)
    np.testing.assert_allclose(state_arrays(sim.context)[0], harmonic_recurrence(x0, v0, 0.1, 20, 3, 0.5)[-1], atol=1e-5)


def test_score_refinement_follows_annealed_langevin_deterministically(tmp_path):
    tau, eps, steps, sigmas = 0.5, 1e-2, 4, (0.3, 0.1)
    dyn = save(HarmonicDynamics(k=0.0), tmp_path / "d.pt")
    score = save(GaussianScore(tau=tau, centre=0.0, sigmas=sigmas, langevin_steps=steps, langevin_step_size=eps),
                 tmp_path / "s.pt")
    integrator = CGMLIntegrator(dyn, score)
    assert integrator.getLangevinSteps() == steps and integrator.getLangevinStepSize() == pytest.approx(eps)
    np.testing.assert_allclose(integrator.getSigmas().value_in_unit(unit.nanometer), sigmas, rtol=1e-6)
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=5)
    x0, _ = state_arrays(sim.context)  # zero velocity: the dynamics step keeps x
    sim.step(1)
    # each Langevin step multiplies x - centre by (1 - eps / tau^2)
    factor = (1 - eps / tau**2) ** (steps * len(sigmas))
    np.testing.assert_allclose(state_arrays(sim.context)[0], x0 * factor, rtol=1e-5, atol=1e-7)


def test_score_refinement_samples_langevin_stationary_distribution(tmp_path):
    tau, eps = 0.1, 2e-3
    dyn = save(HarmonicDynamics(k=0.0, seq_len=1), tmp_path / "d.pt")
    score = save(GaussianScore(tau=tau, centre=0.3, sigmas=(1.0,) * 10, langevin_steps=30,
                               langevin_step_size=eps), tmp_path / "s.pt")
    integrator = CGMLIntegrator(dyn, score)
    integrator.setRandomNumberSeed(5)
    n = 400
    sim = simulation(integrator, n=n)
    sim.step(2)  # 600 Langevin steps: relaxation time tau^2/eps = 5 steps
    x, _ = state_arrays(sim.context)
    # discretised Ornstein-Uhlenbeck: x' = r x + sqrt(2 eps) z, r = 1 - eps/tau^2
    r = 1 - eps / tau**2
    variance = 2 * eps / (1 - r**2)
    samples = (x - 0.3).ravel()
    assert abs(samples.mean()) < 5 * np.sqrt(variance / samples.size)
    assert abs(samples.var() / variance - 1) < 5 * np.sqrt(2 / samples.size)


# --- inputs reach the models ---------------------------------------------------------
def test_features_bonds_and_box_reach_the_model(tmp_path):
    integrator = CGMLIntegrator(save(InputEcho(), tmp_path / "echo.pt"))
    integrator.setDeterministic(True)
    integrator.setUsesPeriodicBoundaryConditions(True)
    n = 4
    features = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    bonds = np.array([[0, 1], [1, 2]])
    integrator.setBeadFeatures(features)
    integrator.setBonds(bonds)
    np.testing.assert_array_equal(integrator.getBeadFeatures(), features)
    np.testing.assert_array_equal(integrator.getBonds(), bonds)
    sim = simulation(integrator, n=n, box_nm=3.0, positions=np.zeros((n, 3)))
    sim.step(1)
    x, _ = state_arrays(sim.context)
    expected = np.stack([features[:, 0], [1, 2, 1, 0], [3.0] * n], axis=1) * 1e-3
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_non_periodic_box_is_zero(tmp_path):
    integrator = CGMLIntegrator(save(InputEcho(), tmp_path / "echo.pt"))
    sim = simulation(integrator, n=3, box_nm=3.0, positions=np.zeros((3, 3)))  # System has no periodic force
    sim.step(1)
    assert np.all(state_arrays(sim.context)[0][:, 2] == 0)


# --- history -------------------------------------------------------------------------------
def test_history_built_from_positions_and_velocities(harmonic):
    integrator = CGMLIntegrator(harmonic)
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=3)
    x0, _ = state_arrays(sim.context)
    v0 = np.full((3, 3), 0.2)
    sim.context.setVelocities(v0)
    assert integrator.getHistory() is None
    sim.step(1)
    history = integrator.getHistory().value_in_unit(unit.nanometer)
    np.testing.assert_allclose(history[:2], [x0 - 0.5 * v0, x0], atol=1e-12)
    # new positions from the user: the history is rebuilt from them
    sim.context.setPositions(np.ones((3, 3)))
    sim.context.setVelocities(np.zeros((3, 3)))
    sim.step(1)
    np.testing.assert_allclose(integrator.getHistory().value_in_unit(unit.nanometer)[:2], np.ones((2, 3, 3)))


def test_set_history_before_and_after_context(harmonic):
    frames = np.random.default_rng(0).normal(size=(5, 4, 3))
    integrator = CGMLIntegrator(harmonic)
    integrator.setDeterministic(True)
    integrator.setHistory(frames * unit.angstrom)  # Quantity accepted; only the last 3 kept
    np.testing.assert_allclose(integrator.getHistory().value_in_unit(unit.nanometer), frames[2:] / 10)
    sim = simulation(integrator, n=4)  # positions set to something else before the first step
    sim.step(1)
    expected = harmonic_recurrence(frames[-1] / 10, (frames[-1] - frames[-2]) / 10 / 0.5, 0.1, 1, 3, 0.5)
    np.testing.assert_allclose(state_arrays(sim.context)[0], expected[-1], atol=1e-6)
    # set while bound: positions and velocities of the context follow at once
    integrator.setHistory(frames)
    x, v = state_arrays(sim.context)
    np.testing.assert_allclose(x, frames[-1])
    np.testing.assert_allclose(v, (frames[-1] - frames[-2]) / 0.5)


# --- reproducibility, checkpoints, state, serialization ---------------------------------
def stochastic_integrator(tmp_path, seed=42):
    dyn = save(HarmonicDynamics(k=0.05, std=0.01), tmp_path / "dyn.pt")
    score = save(GaussianScore(tau=1.0, sigmas=(0.2, 0.05), langevin_steps=2, langevin_step_size=1e-4),
                 tmp_path / "score.pt")
    integrator = CGMLIntegrator(dyn, score)
    integrator.setRandomNumberSeed(seed)
    return integrator


def test_same_seed_same_trajectory(tmp_path):
    runs = []
    for seed in (42, 42, 43):
        sim = simulation(stochastic_integrator(tmp_path, seed), n=10)
        sim.step(15)
        runs.append(state_arrays(sim.context)[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_context_checkpoint_continues_bit_identically(tmp_path, platform):
    sim = simulation(stochastic_integrator(tmp_path), n=10, platform=platform)
    sim.step(5)
    checkpoint = sim.context.createCheckpoint()
    sim.step(7)
    reference = state_arrays(sim.context)
    sim.context.loadCheckpoint(checkpoint)
    sim.step(7)
    after = state_arrays(sim.context)
    np.testing.assert_array_equal(after[0], reference[0])
    np.testing.assert_array_equal(after[1], reference[1])
    # and into a fresh Simulation with a fresh integrator of another seed
    other = simulation(stochastic_integrator(tmp_path, seed=7), n=10, platform=platform)
    other.context.loadCheckpoint(checkpoint)
    other.step(7)
    np.testing.assert_array_equal(state_arrays(other.context)[0], reference[0])


def test_simulation_checkpoint_file(tmp_path):
    sim = simulation(stochastic_integrator(tmp_path), n=6)
    sim.step(3)
    path = str(tmp_path / "run.chk")
    sim.saveCheckpoint(path)
    sim.step(4)
    reference = state_arrays(sim.context)[0]
    fresh = simulation(stochastic_integrator(tmp_path, seed=99), n=6, seed=5)
    fresh.loadCheckpoint(path)
    fresh.step(4)
    np.testing.assert_array_equal(state_arrays(fresh.context)[0], reference)
    assert fresh.context.getState().getStepCount() == 7


def test_save_and_load_state(tmp_path):
    # seq_len 2 in deterministic mode: the history rebuilt from (x, v) is the true one
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1, seq_len=2), tmp_path / "d.pt"))
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=5)
    sim.step(4)
    path = str(tmp_path / "state.xml")
    sim.saveState(path)
    sim.step(6)
    reference = state_arrays(sim.context)[0]
    sim.step(3)
    sim.loadState(path)
    assert sim.context.getState().getStepCount() == 4
    sim.step(6)
    np.testing.assert_allclose(state_arrays(sim.context)[0], reference, atol=1e-9)


def test_reinitialize_keeps_history(harmonic):
    integrator = CGMLIntegrator(harmonic)
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=5)
    x0, v0 = state_arrays(sim.context)
    sim.step(10)
    sim.context.reinitialize(preserveState=True)
    sim.step(10)
    # seq_len 3: a rebuilt history would differ; the kept one continues the recurrence
    np.testing.assert_allclose(state_arrays(sim.context)[0], harmonic_recurrence(x0, v0, 0.1, 20, 3, 0.5)[-1], atol=1e-6)


def test_xml_round_trip_is_self_contained_and_continues(tmp_path):
    integrator = stochastic_integrator(tmp_path)
    integrator.setBeadFeatures(np.ones((6, 2)))
    integrator.setBonds([[0, 1]])
    sim = simulation(integrator, n=6)
    sim.step(4)
    xml = openmm.XmlSerializer.serialize(integrator)
    state = sim.context.getState(getPositions=True, getVelocities=True)
    sim.step(5)
    reference = state_arrays(sim.context)[0]
    (tmp_path / "dyn.pt").unlink()  # the model bytes travel inside the XML
    (tmp_path / "score.pt").unlink()
    for restored in (openmm.XmlSerializer.deserialize(xml), CGMLIntegrator.deserialize(xml)):
        topology, system = make_system(6)
        context = openmm.Context(system, restored, openmm.Platform.getPlatformByName("Reference"))
        context.setState(state)
        restored.step(5)
        np.testing.assert_array_equal(state_arrays(context)[0], reference)
    full = CGMLIntegrator.deserialize(xml)
    np.testing.assert_array_equal(full.getBonds(), [[0, 1]])
    assert full.getRandomNumberSeed() == 42 and full.getStepSize() == integrator.getStepSize()


def test_copy_and_pickle(tmp_path):
    integrator = stochastic_integrator(tmp_path)
    integrator.setLangevinSteps(3)
    for clone in (copy.deepcopy(integrator), copy.copy(integrator), pickle.loads(pickle.dumps(integrator))):
        assert isinstance(clone, CGMLIntegrator)
        assert clone.getLangevinSteps() == 3 and clone.getRandomNumberSeed() == 42
        sim = simulation(clone, n=3)
        sim.step(2)


def test_integrator_can_move_to_a_new_context_and_objects_are_freed(harmonic):
    integrator = CGMLIntegrator(harmonic)
    for _ in range(3):
        sim = simulation(integrator, n=3)
        sim.step(2)
        del sim
    for _ in range(20):  # create and drop many: the C++ object must be deleted exactly once
        simulation(CGMLIntegrator(harmonic), n=3).step(1)


# --- reporters ---------------------------------------------------------------------------------
def test_reporters(tmp_path, harmonic):
    import mdtraj

    integrator = CGMLIntegrator(harmonic)
    sim = simulation(integrator, n=5)
    log = tmp_path / "log.csv"
    sim.reporters.append(app.StateDataReporter(str(log), 2, step=True, time=True, speed=True,
                                               kineticEnergy=True))
    sim.reporters.append(app.DCDReporter(str(tmp_path / "traj.dcd"), 2))
    sim.step(10)
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 6 and "ns/day" in lines[0]
    last = lines[-1].split(",")
    assert int(last[0]) == 10 and float(last[1]) == pytest.approx(5.0)
    assert float(last[3]) > 0  # learned-simulator speed in ns/day
    pdb = tmp_path / "top.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(sim.topology, np.zeros((5, 3)) * unit.nanometer, handle)
    traj = mdtraj.load(str(tmp_path / "traj.dcd"), top=str(pdb))
    assert traj.n_frames == 5
    np.testing.assert_allclose(traj.xyz[-1], state_arrays(sim.context)[0], atol=1e-5)


def test_kinetic_energy_uses_learned_velocities(harmonic):
    sim = simulation(CGMLIntegrator(harmonic), n=4)
    sim.step(3)
    _, v = state_arrays(sim.context)
    energy = sim.context.getState(getEnergy=True).getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert energy == pytest.approx(0.5 * 2.0 * np.sum(v**2), rel=1e-9)


def test_gil_is_released_while_stepping(tmp_path):
    class Slow(HarmonicDynamics):
        pass

    path = save(HarmonicDynamics(k=0.1), tmp_path / "d.pt")
    sim = simulation(CGMLIntegrator(path), n=20000)
    counter = {"n": 0, "stop": False}

    def spin():
        while not counter["stop"]:
            counter["n"] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.05)
    before = counter["n"]
    start = time.perf_counter()
    sim.step(30)
    elapsed = time.perf_counter() - start
    during = counter["n"] - before
    counter["stop"] = True
    thread.join()
    assert elapsed > 0.02
    assert during > 1000  # the Python thread kept running while C++ stepped


# --- bad input --------------------------------------------------------------------------------
def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dynamics model file not found"):
        CGMLIntegrator(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="could not load the dynamics model"):
        CGMLIntegrator(corrupt)
    dyn = save(HarmonicDynamics(), tmp_path / "d.pt")
    with pytest.raises(ValueError, match="could not load the score model"):
        CGMLIntegrator(dyn, corrupt)
    with pytest.raises(FileNotFoundError, match="score model"):
        CGMLIntegrator(dyn, tmp_path / "missing.pt")


def test_model_without_contract_attributes(tmp_path):
    class NoSeqLen(torch_module()):
        def forward(self, x):
            return x

    path = tmp_path / "m.pt"
    import torch

    torch.jit.script(NoSeqLen()).save(str(path))
    with pytest.raises(ValueError, match="no attribute 'seq_len'"):
        CGMLIntegrator(path)
    dyn = save(HarmonicDynamics(), tmp_path / "d.pt")
    with pytest.raises(ValueError, match="score model has no attribute 'sigmas'"):
        CGMLIntegrator(dyn, dyn)


def torch_module():
    import torch

    return torch.nn.Module


@pytest.mark.parametrize("mode,match", [("shape", r"mean has shape/dtype \[6, 2\]"),
                                        ("dtype", "mean has shape/dtype .* Double")])
def test_model_outputs_of_wrong_shape_or_dtype(tmp_path, mode, match):
    sim = simulation(CGMLIntegrator(save(BadShapeDynamics(mode), tmp_path / "bad.pt")), n=6)
    with pytest.raises(openmm.OpenMMException, match=f"step 1: the dynamics model's {match}"):
        sim.step(1)


def test_nan_raises_with_step_number_and_keeps_last_good_state(tmp_path):
    integrator = CGMLIntegrator(save(BadShapeDynamics("nan-after-3"), tmp_path / "nan.pt"))
    sim = simulation(integrator, n=3, positions=np.zeros((3, 3)))
    with pytest.raises(openmm.OpenMMException, match="step 3: .*non-finite"):
        sim.step(10)
    x, v = state_arrays(sim.context)
    # steps 1 and 2 happened (x = 1, then 3 with a = 1, v = 2): step 3 was refused
    assert sim.context.getState().getStepCount() == 2
    np.testing.assert_allclose(x, 3.0)
    np.testing.assert_allclose(v, 2.0)
    assert np.all(np.isfinite(integrator.getHistory().value_in_unit(unit.nanometer)))


def test_inputs_inconsistent_with_the_system(harmonic):
    integrator = CGMLIntegrator(harmonic)
    integrator.setBeadFeatures(np.zeros((5, 2)))
    topology, system = make_system(4)
    with pytest.raises(openmm.OpenMMException, match="bead features have 5 rows but the System has 4"):
        openmm.Context(system, integrator)
    integrator = CGMLIntegrator(harmonic)
    integrator.setBonds([[0, 7]])
    with pytest.raises(openmm.OpenMMException, match="bond index 7 is out of range"):
        openmm.Context(system, integrator)
    integrator = CGMLIntegrator(harmonic)
    integrator.setHistory(np.zeros((3, 9, 3)))
    with pytest.raises(openmm.OpenMMException, match="history has 9 beads but the System has 4"):
        openmm.Context(system, integrator)
    sim = simulation(CGMLIntegrator(harmonic), n=4)
    bound = sim.integrator
    with pytest.raises(ValueError, match="3 rows but the System has 4"):
        bound.setBeadFeatures(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
        bound.setBonds([[1, 4]])
    with pytest.raises(ValueError, match="joins bead 2 to itself"):
        bound.setBonds([[2, 2]])
    with pytest.raises(ValueError, match="history has 2 frames but the dynamics model needs seq_len = 3"):
        bound.setHistory(np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="shape"):
        bound.setHistory(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        bound.setHistory(np.full((3, 4, 3), np.nan))
    with pytest.raises(ValueError, match="features"):
        bound.setBeadFeatures(np.zeros(4))
    with pytest.raises(ValueError, match="integer"):
        bound.setBonds(np.array([[0.5, 1.0]]))


def test_step_size_must_match_the_model_unless_overridden(harmonic):
    with pytest.raises(ValueError, match="differs from the dynamics model's step_size_ps 0.5"):
        CGMLIntegrator(harmonic, stepSize=1.0)
    integrator = CGMLIntegrator(harmonic, stepSize=500 * unit.femtosecond)  # same step, other unit
    assert integrator.getStepSize() == 0.5 * unit.picosecond
    with pytest.raises(openmm.OpenMMException, match="differs"):
        integrator.setStepSize(0.25)
    overridden = CGMLIntegrator(harmonic, stepSize=0.25, allowStepSizeOverride=True)
    assert overridden.getStepSize() == 0.25 * unit.picosecond
    with pytest.raises(TypeError, match="compatible"):
        CGMLIntegrator(harmonic, stepSize=1 * unit.nanometer)
    integrator.setLangevinSteps(2)
    with pytest.raises(ValueError):
        integrator.setLangevinSteps(-1)
    with pytest.raises(ValueError):
        integrator.setLangevinStepSize(0.0)


def test_step_before_context_is_an_error(harmonic):
    with pytest.raises(openmm.OpenMMException, match="not bound to a context"):
        CGMLIntegrator(harmonic).step(1)


# --- issue 10: restore, XML and input validation ---------------------------------------------
import torch  # noqa: E402  (the models below are scripted from this module)


class WidthDynamics(HarmonicDynamics):
    """A harmonic model that declares the bead-feature width it expects (``num_features``),
    as openmm_cgml's exported models do."""

    def __init__(self, num_features: int = 7):
        super().__init__()
        self.num_features = num_features


class NegativeStdDynamics(HarmonicDynamics):
    def forward(self, history, box, features, bonds):
        x = history[-1]
        return torch.zeros_like(x), -torch.ones_like(x), torch.zeros_like(x)


class TakesSevenFeatures(HarmonicDynamics):
    """Needs 7 feature columns but does not say so: fails inside TorchScript otherwise."""

    def forward(self, history, box, features, bonds):
        x = history[-1]
        return features @ torch.ones(7, 3), torch.zeros_like(x), torch.zeros_like(x)


def checkpoint_of(tmp_path, seq_len, n=4, steps=2, name="c"):
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1, seq_len=seq_len), tmp_path / f"{name}{seq_len}.pt"))
    sim = simulation(integrator, n=n)
    sim.step(steps)
    return sim.context.createCheckpoint()


@pytest.mark.parametrize("written,loaded", [(3, 5), (5, 3)])
def test_checkpoint_from_another_seq_len_is_refused_and_state_kept(tmp_path, written, loaded):
    checkpoint = checkpoint_of(tmp_path, written)
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1, seq_len=loaded), tmp_path / "other.pt"))
    sim = simulation(integrator, n=4)
    sim.step(1)
    before = integrator.getHistory().value_in_unit(unit.nanometer)
    with pytest.raises(openmm.OpenMMException,
                       match=f"history has {written} frames but the dynamics model's seq_len is {loaded}"):
        sim.context.loadCheckpoint(checkpoint)
    after = integrator.getHistory().value_in_unit(unit.nanometer)
    assert after.shape == (loaded, 4, 3)
    np.testing.assert_array_equal(after, before)


def test_truncated_checkpoint_is_refused_and_state_kept(tmp_path):
    checkpoint = checkpoint_of(tmp_path, 3)
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1, seq_len=3), tmp_path / "same.pt"))
    sim = simulation(integrator, n=4)
    sim.step(1)
    before = integrator.getHistory().value_in_unit(unit.nanometer)
    start = checkpoint.find(b"CGMLCKP1")
    assert start > 0
    for cut in (start + 4, start + 12, start + 30, start + 200, len(checkpoint) - 1):
        with pytest.raises(openmm.OpenMMException, match="CGMLIntegrator checkpoint"):
            sim.context.loadCheckpoint(checkpoint[:cut])
        np.testing.assert_array_equal(integrator.getHistory().value_in_unit(unit.nanometer), before)


def test_history_sizes_larger_than_the_checkpoint_are_refused(tmp_path):
    checkpoint = bytearray(checkpoint_of(tmp_path, 3))
    sizes = checkpoint.find(b"CGMLCKP1") + 8 + 1 + 8  # magic, has-history flag, dims
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1, seq_len=3), tmp_path / "same.pt"))
    sim = simulation(integrator, n=4)
    # beads = 2^40: must be refused before anything that large is allocated
    checkpoint[sizes + 8:sizes + 16] = (1 << 40).to_bytes(8, "little")
    with pytest.raises(openmm.OpenMMException, match="history has 1099511627776 beads"):
        sim.context.loadCheckpoint(bytes(checkpoint))
    assert integrator.getHistory() is None


def xml_with(xml: str, element: str, data: bytes) -> str:
    import base64
    import re

    return re.sub(rf'(<{element}\b[^>]*\bbase64=")[^"]*(")', lambda m: m.group(1) + base64.b64encode(data).decode()
                  + m.group(2), xml, count=1)


def test_xml_with_partial_elements_or_bad_base64_is_refused(tmp_path):
    integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1), tmp_path / "d.pt"))
    integrator.setBeadFeatures(np.ones((4, 2)))
    integrator.setBonds([[0, 1], [2, 3]])
    xml = openmm.XmlSerializer.serialize(integrator)
    feature_bytes = np.ones((4, 2), np.float32).tobytes()
    bond_bytes = np.array([[0, 1], [2, 3]], np.int64).tobytes()
    cases = [("BeadFeatures", b"abc", "BeadFeatures .*3 bytes"),
             ("BeadFeatures", feature_bytes + b"\0", "BeadFeatures .*33 bytes"),
             ("BeadFeatures", feature_bytes[:-4], "BeadFeatures .*28 bytes"),
             ("Bonds", b"1234567", "Bonds .*7 bytes"),
             ("Bonds", bond_bytes + b"\0\0\0", "Bonds .*35 bytes")]
    for element, data, match in cases:
        bad = xml_with(xml, element, data)
        for load in (openmm.XmlSerializer.deserialize, CGMLIntegrator.deserialize):
            with pytest.raises(Exception, match=match):
                load(bad)
    bad = xml.replace('<Bonds base64="', '<Bonds base64="!!!!', 1)
    with pytest.raises(Exception, match="Bonds.*base64"):
        CGMLIntegrator.deserialize(bad)
    # a valid round trip still works
    np.testing.assert_array_equal(CGMLIntegrator.deserialize(xml).getBonds(), [[0, 1], [2, 3]])


@pytest.mark.parametrize("value", ["-0.5", "0", "inf", "nan"])
def test_xml_step_size_must_be_positive_and_finite(tmp_path, value):
    import re

    xml = openmm.XmlSerializer.serialize(CGMLIntegrator(save(HarmonicDynamics(k=0.1), tmp_path / "d.pt")))
    bad = re.sub(r'stepSize="[^"]*"', f'stepSize="{value}"', xml, count=1)
    assert bad != xml
    with pytest.raises(Exception, match="stepSize"):
        CGMLIntegrator.deserialize(bad)


def test_bonds_must_be_e_by_2_integer_pairs(harmonic):
    integrator = CGMLIntegrator(harmonic)
    shape = r"bonds must have shape \[E, 2\].*got "
    with pytest.raises(ValueError, match=shape + r"\(2, 3\)"):
        integrator.setBonds(np.array([[0, 1, 2], [1, 2, 3]]))  # a [2, E] edge index
    with pytest.raises(ValueError, match=shape + r"\(4, 3\)"):
        integrator.setBonds(np.arange(12).reshape(4, 3))  # an [E, 3] array
    with pytest.raises(ValueError, match=shape + r"\(4,\)"):
        integrator.setBonds([0, 1, 1, 2])
    with pytest.raises(ValueError, match=shape + r"\(0, 3\)"):
        integrator.setBonds(np.zeros((0, 3), np.int64))
    # the pybind11 layer refuses the same, for callers that bypass the Python face
    with pytest.raises(ValueError, match=r"shape \[E, 2\]"):
        integrator._impl.setBonds(np.array([[0, 1, 2], [1, 2, 3]]))
    with pytest.raises(ValueError, match="integer"):
        integrator._impl.setBonds(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="integer"):
        integrator.setBonds([[0, 1.5]])
    with pytest.raises(ValueError, match="integer"):
        integrator.setBonds([["a", "b"]])
    with pytest.raises(ValueError, match="negative"):
        integrator.setBonds([[0, -1]])
    integrator.setBonds(np.array([[0.0, 1.0]]))  # integer-valued floats are fine
    np.testing.assert_array_equal(integrator.getBonds(), [[0, 1]])
    for empty in ([], np.zeros((0, 2), np.int64)):
        integrator.setBonds(empty)
        assert integrator.getBonds().shape == (0, 2)


def test_bead_features_must_be_2d_float_of_the_models_width(tmp_path):
    integrator = CGMLIntegrator(save(WidthDynamics(num_features=7), tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="bead features have 5 columns, the dynamics model expects 7"):
        integrator.setBeadFeatures(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"2-D .*got shape \(4, 7, 1\)"):
        integrator.setBeadFeatures(np.zeros((4, 7, 1)))
    with pytest.raises(ValueError, match="numbers"):
        integrator.setBeadFeatures(np.array([["a"] * 7] * 4))
    integrator.setBeadFeatures(np.zeros((4, 7)))
    # no features at all while the model expects 7: refused when the Context is made
    topology, system = make_system(4)
    fresh = CGMLIntegrator(save(WidthDynamics(num_features=7), tmp_path / "w2.pt"))
    with pytest.raises(openmm.OpenMMException, match="dynamics model expects 7 feature columns"):
        openmm.Context(system, fresh, openmm.Platform.getPlatformByName("Reference"))


def test_feature_width_error_without_declared_width_names_the_widths(tmp_path):
    integrator = CGMLIntegrator(save(TakesSevenFeatures(), tmp_path / "t7.pt"))
    integrator.setBeadFeatures(np.zeros((4, 5)))
    sim = simulation(integrator, n=4)
    with pytest.raises(openmm.OpenMMException, match=r"bead features \[4, 5\]"):
        sim.step(1)


def particle_system(kind):
    topology, system = make_system(3)
    if kind == "constraint":
        system.addConstraint(0, 1, 0.1)
    elif kind == "massless":
        system.setParticleMass(2, 0.0)
    elif kind == "virtual site":
        system.setParticleMass(2, 0.0)
        system.setVirtualSite(2, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    return system


@pytest.mark.parametrize("kind,match", [("constraint", "1 constraint"), ("massless", "particle 2 has zero mass"),
                                        ("virtual site", "particle 2 is a virtual site")])
def test_systems_the_learned_step_cannot_honour_are_refused(harmonic, kind, match):
    with pytest.raises(openmm.OpenMMException, match=match):
        openmm.Context(particle_system(kind), CGMLIntegrator(harmonic), openmm.Platform.getPlatformByName("Reference"))


def test_negative_std_from_the_model_is_refused(tmp_path):
    sim = simulation(CGMLIntegrator(save(NegativeStdDynamics(), tmp_path / "neg.pt")), n=3)
    x0, _ = state_arrays(sim.context)
    with pytest.raises(openmm.OpenMMException, match="step 1: the dynamics model's std is negative"):
        sim.step(1)
    np.testing.assert_array_equal(state_arrays(sim.context)[0], x0)


@pytest.mark.parametrize("step_size", [float("inf"), float("nan"), 0.0, -1.0])
def test_model_step_size_must_be_positive_and_finite(tmp_path, step_size):
    path = save(HarmonicDynamics(step_size_ps=step_size), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="step_size_ps must be positive and finite"):
        CGMLIntegrator(path)


def test_step_size_override_must_be_finite(harmonic):
    integrator = CGMLIntegrator(harmonic, allowStepSizeOverride=True)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(Exception, match="positive and finite"):
            integrator.setStepSize(bad)
    assert integrator.getStepSize() == 0.5 * unit.picosecond


@pytest.mark.parametrize("seq_len", [0, -3, 10001, 2**31 - 1])
def test_absurd_seq_len_is_refused(tmp_path, seq_len):
    path = save(HarmonicDynamics(seq_len=seq_len), tmp_path / "q.pt")
    with pytest.raises(ValueError, match=r"seq_len must be in \[1, 10000\]"):
        CGMLIntegrator(path)


def test_forced_pbc_needs_a_box_that_was_set(tmp_path):
    echo = save(InputEcho(), tmp_path / "echo.pt")
    integrator = CGMLIntegrator(echo)
    integrator.setUsesPeriodicBoundaryConditions(True)
    topology, system = make_system(3)  # no box set: OpenMM's default 2 nm cube
    with pytest.raises(openmm.OpenMMException, match="periodic boundary conditions .* no periodic box"):
        openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    # the LearnedSimulator way: a CG System with its box set, PBC forced on the integrator
    sim = simulation(integrator, n=3, box_nm=2.5, positions=np.zeros((3, 3)))
    sim.step(1)
    np.testing.assert_allclose(state_arrays(sim.context)[0][:, 2], 2.5e-3, rtol=1e-6)
    # following the System (the default) or forcing PBC off needs no box
    for mode in (None, False):
        other = CGMLIntegrator(echo)
        other.setUsesPeriodicBoundaryConditions(mode)
        openmm.Context(make_system(3)[1], other, openmm.Platform.getPlatformByName("Reference"))


# --- Langevin step-size schedule (constant / NCSN) ---------------------------------------------
class ScheduledGaussianScore(GaussianScore):
    """GaussianScore that names its Langevin schedule (the optional ``langevin_schedule``)."""

    def __init__(self, schedule="ncsn", **kwargs):
        super().__init__(**kwargs)
        self.langevin_schedule = schedule


class SigmaScore(GaussianScore):
    """Score of N(0, sigma^2): -x / sigma^2. Under NCSN every level contracts x by the same
    factor 1 - eps / sigma_L^2 per Langevin step (alpha_i / sigma_i^2 = eps / sigma_L^2)."""

    def forward(self, x: torch.Tensor, latent: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -x / (sigma * sigma)


class LevelScore(GaussianScore):
    """-(x - centre) / tau^2 at the noise level ``level`` of the ladder, 0 at the others:
    the refinement then moves x only at that level, so its step size can be read off."""

    def __init__(self, level: int, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("target", self.sigmas[level].clone())

    def forward(self, x: torch.Tensor, latent: torch.Tensor, box: torch.Tensor, features: torch.Tensor,
                bonds: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        score = -(x - self.centre) / (self.tau * self.tau)
        return torch.where(sigma == self.target, score, torch.zeros_like(score))


def ncsn_step_sizes(eps, sigmas):
    """alpha_i = eps sigma_i^2 / sigma_L^2 with the model's float32 sigmas."""
    s = np.asarray(sigmas, np.float32).astype(np.float64)
    return eps * (s / s.min()) ** 2


def annealed_langevin_reference(x0, v0, k, steps, seq_len, dt, tau, centre, sigmas, langevin_steps, alphas):
    """Deterministic learned steps in NumPy: the harmonic dynamics step, then for each level i
    K times x += alpha_i * score(x) with the toy model's float32 score."""
    history = [x0 - (seq_len - 1 - i) * dt * v0 for i in range(seq_len)]
    for _ in range(steps):
        xt = history[-1]
        xprev = history[-2] if seq_len > 1 else xt
        x = xt + (xt - xprev) + (np.float32(-k) * xt.astype(np.float32)).astype(np.float64)
        for alpha in alphas:
            for _ in range(langevin_steps):
                score = -(x.astype(np.float32) - np.float32(centre)) / np.float32(tau * tau)
                x = x + alpha * score.astype(np.float64)
        history.append(x)
    return np.array(history)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("source", ["setter", "model attribute"])
def test_ncsn_schedule_equals_numpy_reference_recurrence(tmp_path, platform, source):
    k, tau, centre, sigmas, steps, eps = 0.1, 0.5, 0.1, (0.4, 0.2, 0.1), 3, 2e-3
    dyn = save(HarmonicDynamics(k=k), tmp_path / "d.pt")
    kwargs = dict(tau=tau, centre=centre, sigmas=sigmas, langevin_steps=steps, langevin_step_size=eps)
    if source == "setter":
        integrator = CGMLIntegrator(dyn, save(GaussianScore(**kwargs), tmp_path / "s.pt"))
        assert integrator.getLangevinSchedule() == "constant"  # no attribute: as before
        integrator.setLangevinSchedule("ncsn")
    else:
        integrator = CGMLIntegrator(dyn, save(ScheduledGaussianScore("ncsn", **kwargs), tmp_path / "s.pt"))
    assert integrator.getLangevinSchedule() == "ncsn"
    alphas = ncsn_step_sizes(eps, sigmas)
    np.testing.assert_allclose(alphas, [16 * eps, 4 * eps, eps], rtol=1e-12)
    np.testing.assert_allclose(integrator.getLangevinStepSizes(), alphas, rtol=1e-15)
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=8, platform=platform)
    x0, _ = state_arrays(sim.context)
    v0 = np.random.default_rng(3).normal(0, 0.05, x0.shape)
    sim.context.setVelocities(v0)
    expected = annealed_langevin_reference(x0, v0, k, 20, 3, 0.5, tau, centre, sigmas, steps, alphas)
    constant = annealed_langevin_reference(x0, v0, k, 20, 3, 0.5, tau, centre, sigmas, steps, [eps] * 3)
    for block in range(4):
        sim.step(5)
        x, v = state_arrays(sim.context)
        t = 3 + 5 * (block + 1) - 1
        np.testing.assert_allclose(x, expected[t], rtol=0, atol=1e-6)
        np.testing.assert_allclose(v, (expected[t] - expected[t - 1]) / 0.5, rtol=0, atol=1e-5)
    assert np.abs(expected[-1] - constant[-1]).max() > 1e-2  # the schedules differ by far more than the tolerance


@pytest.mark.parametrize("schedule", ["constant", "ncsn"])
def test_step_of_each_level_scales_as_sigma_squared_under_ncsn(tmp_path, schedule):
    # Only level `level` moves x, once (K = 1): x = centre + (x0 - centre)(1 - alpha_level / tau^2),
    # so alpha_level = tau^2 (1 - (x - centre) / (x0 - centre)) is measured for each level.
    tau, eps, sigmas = 0.5, 1e-3, (0.4, 0.2, 0.1)
    dyn = save(HarmonicDynamics(k=0.0), tmp_path / "d.pt")
    expected = ncsn_step_sizes(eps, sigmas) if schedule == "ncsn" else np.full(3, eps)
    positions = np.random.default_rng(2).uniform(0.5, 1.0, (5, 3))
    for level in range(3):
        score = save(LevelScore(level, tau=tau, sigmas=sigmas, langevin_steps=1, langevin_step_size=eps),
                     tmp_path / f"level{level}.pt")
        integrator = CGMLIntegrator(dyn, score)
        integrator.setLangevinSchedule(schedule)
        integrator.setDeterministic(True)
        sim = simulation(integrator, n=5, positions=positions)  # zero velocity: the dynamics step keeps x
        sim.step(1)
        x, _ = state_arrays(sim.context)
        alpha = tau**2 * (1 - x / positions)
        np.testing.assert_allclose(alpha, expected[level], rtol=2e-4)
    if schedule == "ncsn":
        np.testing.assert_allclose(expected / expected[-1], (np.asarray(sigmas) / sigmas[-1]) ** 2, rtol=1e-6)


def assert_one_step_scales_positions(integrator, factor):
    """One deterministic step of 5 beads multiplies every position by ``factor``."""
    integrator.setDeterministic(True)
    sim = simulation(integrator, n=5)
    x0, _ = state_arrays(sim.context)
    sim.step(1)
    np.testing.assert_allclose(state_arrays(sim.context)[0], x0 * factor, rtol=1e-5, atol=1e-7)


def test_ncsn_contraction_of_a_sigma_score_is_the_same_at_every_level(tmp_path):
    # score -x / sigma_i^2: under NCSN each Langevin step multiplies x by 1 - eps / sigma_L^2 at
    # every level (x_final = x0 (1 - eps/sigma_L^2)^(K L)); constant: prod_i (1 - eps/sigma_i^2)^K
    eps, sigmas, steps = 1e-3, (0.4, 0.2, 0.1), 2
    dyn = save(HarmonicDynamics(k=0.0), tmp_path / "d.pt")
    score = save(SigmaScore(sigmas=sigmas, langevin_steps=steps, langevin_step_size=eps), tmp_path / "s.pt")
    s = np.asarray(sigmas, np.float32).astype(np.float64)
    factors = {"ncsn": (1 - eps / s.min()**2) ** (steps * len(s)), "constant": np.prod((1 - eps / s**2) ** steps)}
    assert abs(factors["ncsn"] - factors["constant"]) > 0.1
    for schedule, factor in factors.items():
        integrator = CGMLIntegrator(dyn, score)
        integrator.setLangevinSchedule(schedule)
        assert_one_step_scales_positions(integrator, factor)


def test_ncsn_score_refinement_samples_langevin_stationary_distribution(tmp_path):
    # the last level uses alpha_L = eps: the discretised OU process of the constant-schedule test
    tau, eps, centre = 0.1, 2e-3, 0.3
    dyn = save(HarmonicDynamics(k=0.0, seq_len=1), tmp_path / "d.pt")
    # the first level's alpha = 4 eps: r = 1 - 4 eps / tau^2 = 0.2, still stable
    score = save(ScheduledGaussianScore("ncsn", tau=tau, centre=centre, sigmas=(0.2, 0.1), langevin_steps=100,
                                        langevin_step_size=eps), tmp_path / "s.pt")
    integrator = CGMLIntegrator(dyn, score)
    np.testing.assert_allclose(integrator.getLangevinStepSizes(), [4 * eps, eps], rtol=1e-12)
    integrator.setRandomNumberSeed(5)
    n = 400
    sim = simulation(integrator, n=n)
    sim.step(2)  # 100 Langevin steps at the last level: relaxation time tau^2/eps = 5 steps
    x, _ = state_arrays(sim.context)
    r = 1 - eps / tau**2
    variance = 2 * eps / (1 - r**2)
    samples = (x - centre).ravel()
    assert abs(samples.mean()) < 5 * np.sqrt(variance / samples.size)
    assert abs(samples.var() / variance - 1) < 5 * np.sqrt(2 / samples.size)


@pytest.mark.parametrize("schedule", ["constant", "ncsn"])
def test_noise_of_each_level_has_variance_two_alpha(tmp_path, schedule):
    # Level 0 scores -(x - c)/tau^2 with tau^2 = alpha_0 = 4 eps (NCSN): one step forgets x
    # (x - c = sqrt(2 alpha_0) z); level 1 scores 0 and adds sqrt(2 alpha_1) z'. So under NCSN
    # x - c is exactly N(0, 2 alpha_0 + 2 alpha_1) = N(0, 10 eps), whatever x was.
    eps, centre = 1e-3, 0.3
    tau = float(np.sqrt(4 * eps))
    dyn = save(HarmonicDynamics(k=0.0, seq_len=1), tmp_path / "d.pt")
    score = save(LevelScore(0, tau=tau, centre=centre, sigmas=(0.2, 0.1), langevin_steps=1, langevin_step_size=eps),
                 tmp_path / "s.pt")
    integrator = CGMLIntegrator(dyn, score)
    integrator.setLangevinSchedule(schedule)
    integrator.setRandomNumberSeed(9)
    n = 1000
    positions = np.random.default_rng(4).uniform(-1, 1, (n, 3))
    sim = simulation(integrator, n=n, positions=positions)
    sim.step(1)
    x, _ = state_arrays(sim.context)
    if schedule == "ncsn":
        samples, variance = (x - centre).ravel(), 10 * eps
    else:  # alpha = eps at both levels: x - c = (1 - eps/tau^2)(x0 - c) + sqrt(2 eps) z + sqrt(2 eps) z'
        samples, variance = (x - centre - 0.75 * (positions - centre)).ravel(), 4 * eps
    assert abs(samples.mean()) < 5 * np.sqrt(variance / samples.size)
    assert abs(samples.var() / variance - 1) < 5 * np.sqrt(2 / samples.size)


def test_langevin_schedule_round_trips_through_xml_copy_and_pickle(tmp_path):
    dyn = save(HarmonicDynamics(k=0.1), tmp_path / "d.pt")
    plain = save(GaussianScore(), tmp_path / "s.pt")
    named = save(ScheduledGaussianScore("ncsn"), tmp_path / "n.pt")
    integrator = CGMLIntegrator(dyn, plain)
    integrator.setLangevinSchedule("ncsn")
    xml = openmm.XmlSerializer.serialize(integrator)
    assert 'langevinSchedule="ncsn"' in xml
    for clone in (CGMLIntegrator.deserialize(xml), copy.copy(integrator), copy.deepcopy(integrator),
                  pickle.loads(pickle.dumps(integrator))):
        assert clone.getLangevinSchedule() == "ncsn"
    assert 'langevinSchedule="ncsn"' in openmm.XmlSerializer.serialize(openmm.XmlSerializer.deserialize(xml))
    # the setter wins over the model's attribute, in the XML too
    overridden = CGMLIntegrator(dyn, named)
    assert overridden.getLangevinSchedule() == "ncsn"
    overridden.setLangevinSchedule("constant")
    assert CGMLIntegrator.deserialize(openmm.XmlSerializer.serialize(overridden)).getLangevinSchedule() == "constant"
    # a deserialized integrator continues the same deterministic trajectory
    integrator.setDeterministic(True)
    clone = copy.deepcopy(integrator)
    runs = []
    for each in (integrator, clone):
        sim = simulation(each, n=4)
        sim.step(3)
        runs.append(state_arrays(sim.context)[0])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_xml_of_format_version_1_loads_with_the_constant_schedule(tmp_path):
    import re

    dyn = save(HarmonicDynamics(k=0.1), tmp_path / "d.pt")
    integrator = CGMLIntegrator(dyn, save(ScheduledGaussianScore("ncsn"), tmp_path / "n.pt"))
    xml = openmm.XmlSerializer.serialize(integrator)
    assert re.search(r'<Integrator [^>]*version="4"', xml)
    # what version 1 wrote: no langevinSchedule (nor exclusionDistance, added in version 3,
    # nor langevinLevels, version 4); its integrator ran the constant schedule
    old = re.sub(r' (langevinSchedule|exclusionDistance|langevinLevels)="[^"]*"', "", xml, count=3)
    old = re.sub(r'(<Integrator [^>]*)version="4"', r'\1version="1"', old, count=1)
    assert "langevinSchedule" not in old and 'version="1"' in old
    assert CGMLIntegrator.deserialize(old).getLangevinSchedule() == "constant"
    # versions >= 2 must carry it
    missing = re.sub(r' langevinSchedule="[^"]*"', "", xml, count=1)
    with pytest.raises(Exception, match="langevinSchedule"):
        CGMLIntegrator.deserialize(missing)
    bad = xml.replace('langevinSchedule="ncsn"', 'langevinSchedule="cosine"')
    for load in (CGMLIntegrator.deserialize, openmm.XmlSerializer.deserialize):
        with pytest.raises(Exception, match='Langevin schedule must be "constant" or "ncsn", got "cosine"'):
            load(bad)


def test_langevin_levels_keep_the_smallest_sigmas(tmp_path):
    # score -x / sigma_i^2, constant schedule: each Langevin step at level i multiplies x by
    # 1 - eps / sigma_i^2, so refining over the last n levels gives the product over those
    eps, sigmas, steps = 1e-3, (0.4, 0.2, 0.1), 2
    dyn = save(HarmonicDynamics(k=0.0), tmp_path / "d.pt")
    score = save(SigmaScore(sigmas=sigmas, langevin_steps=steps, langevin_step_size=eps), tmp_path / "s.pt")
    s = np.asarray(sigmas, np.float32).astype(np.float64)
    integrator = CGMLIntegrator(dyn, score)
    assert integrator.getNumNoiseLevels() == 3 and integrator.getLangevinLevels() == 3  # default: the whole ladder
    for levels in (3, 2, 1):
        integrator = CGMLIntegrator(dyn, score)
        integrator.setLangevinLevels(levels)
        assert_one_step_scales_positions(integrator, np.prod((1 - eps / s[3 - levels:] ** 2) ** steps))
    # the levels kept are the last of the ladder, so the ladder must run largest first
    with pytest.raises(ValueError, match="'sigmas' must be ordered largest first"):
        CGMLIntegrator(dyn, save(SigmaScore(sigmas=(0.1, 0.4, 0.2), langevin_steps=steps, langevin_step_size=eps),
                                 tmp_path / "ascending.pt"))
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match=r"Langevin levels must be in \[1, 3\]"):
            integrator.setLangevinLevels(bad)
    with pytest.raises(TypeError, match="must be an int"):
        integrator.setLangevinLevels(1.5)
    assert integrator.getLangevinLevels() == 1  # unchanged by the refused values
    bare = CGMLIntegrator(dyn)
    assert bare.getNumNoiseLevels() == 0 and bare.getLangevinLevels() == 0
    with pytest.raises(ValueError, match="no score model"):
        bare.setLangevinLevels(1)
    # configuration: it travels in XML and copies; XML of version 3 (before it) runs the whole ladder
    import re

    xml = openmm.XmlSerializer.serialize(integrator)
    assert 'langevinLevels="1"' in xml
    for clone in (CGMLIntegrator.deserialize(xml), copy.deepcopy(integrator), pickle.loads(pickle.dumps(integrator))):
        assert clone.getLangevinLevels() == 1
    old = re.sub(r'(<Integrator [^>]*)version="4"', r'\1version="3"', re.sub(r' langevinLevels="1"', "", xml), count=1)
    assert CGMLIntegrator.deserialize(old).getLangevinLevels() == 3
    with pytest.raises(Exception, match=r"Langevin levels must be in \[1, 3\]"):
        CGMLIntegrator.deserialize(xml.replace('langevinLevels="1"', 'langevinLevels="7"'))


def test_unknown_langevin_schedule_is_refused(tmp_path):
    dyn = save(HarmonicDynamics(k=0.1), tmp_path / "d.pt")
    integrator = CGMLIntegrator(dyn, save(GaussianScore(), tmp_path / "s.pt"))
    for bad in ("geometric", "NCSN", "", "ncsn "):
        with pytest.raises(ValueError, match='must be "constant" or "ncsn"'):
            integrator.setLangevinSchedule(bad)
        with pytest.raises(ValueError, match='must be "constant" or "ncsn"'):
            integrator._impl.setLangevinSchedule(bad)
    with pytest.raises(TypeError, match="must be a str"):
        integrator.setLangevinSchedule(1)
    assert integrator.getLangevinSchedule() == "constant"  # unchanged by the refused values
    with pytest.raises(ValueError, match="'langevin_schedule' must be \"constant\" or \"ncsn\", got \"cosine\""):
        CGMLIntegrator(dyn, save(ScheduledGaussianScore("cosine"), tmp_path / "c.pt"))
    with pytest.raises(ValueError, match="'langevin_schedule' must be a str"):
        CGMLIntegrator(dyn, save(ScheduledGaussianScore(3), tmp_path / "i.pt"))
    # without a score model the schedule is accepted and has nothing to act on
    bare = CGMLIntegrator(dyn)
    bare.setLangevinSchedule("ncsn")
    assert bare.getLangevinSchedule() == "ncsn" and bare.getLangevinStepSizes().size == 0


def test_num_threads_sets_libtorch_threads_for_the_step_and_round_trips(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        integrator = CGMLIntegrator(save(HarmonicDynamics(k=0.1), tmp_path / "d.pt"))
        assert integrator.getNumThreads() == 0
        sim = simulation(integrator, n=4)
        torch.set_num_threads(2)
        sim.step(1)
        assert torch.get_num_threads() == 2  # 0: the integrator leaves libtorch's setting alone
        integrator.setNumThreads(1)
        sim.step(1)
        assert torch.get_num_threads() == 1  # the plugin and Python share one libtorch
        xml = openmm.XmlSerializer.serialize(integrator)
        assert 'numThreads="1"' in xml and CGMLIntegrator.deserialize(xml).getNumThreads() == 1
        with pytest.raises(ValueError, match="number of threads must be >= 0"):
            integrator.setNumThreads(-1)
        with pytest.raises(TypeError, match="must be an int"):
            integrator.setNumThreads(1.5)
    finally:
        torch.set_num_threads(before)
