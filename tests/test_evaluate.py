"""cgml evaluate end to end on tiny data: rollouts through CGMLIntegrator, report, plots."""
import json
import math
import warnings

import numpy as np
import pytest

from openmm_cgml import evaluate
from openmm_cgml.cli import main as cgml
from openmm_cgml.trajectories import list_trajectories, load_trajectory
from openmm_cgml.simulator import LearnedSimulator

DPI = 120  # plots._finish saves at this resolution


@pytest.fixture
def recorded_figures(monkeypatch):
    """Every {file name: Figure} that evaluate._plot_system wrote, per system directory."""
    recorded = {}
    original = evaluate._plot_system

    def record(name, *args, **kwargs):
        figures = original(name, *args, **kwargs)
        recorded[name] = figures
        return figures

    monkeypatch.setattr(evaluate, "_plot_system", record)
    return recorded


def assert_png_matches_figure(path, figure):
    """The PNG decodes, has the figure's pixel size at the saving DPI, and is not blank."""
    from matplotlib.image import imread

    image = imread(path)
    width, height = figure.get_size_inches()
    assert image.shape[:2] == (round(height * DPI), round(width * DPI)), path
    pixels = image.reshape(-1, image.shape[-1])
    assert len(np.unique(pixels, axis=0)) > 20, f"{path} is (nearly) uniform"


def series(figure, panel=0):
    """{legend label: Line2D} of one panel of a figure (labels up to the first ':')."""
    ax = figure.axes[panel]
    return {line.get_label().split(":")[0]: line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_evaluate_writes_report_with_all_methods(exported_tiny_model, chain_data_dir, tmp_path, recorded_figures):
    out = tmp_path / "report"
    assert cgml(["evaluate", "--model", f"tiny={exported_tiny_model}", "--data", str(chain_data_dir),
                 "--out", str(out), "--rollout-factor", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (system,) = metrics["systems"]
    runs = system["runs"]
    # the ablations of the first model: no score refinement, and neither score nor distance limits
    assert set(runs) == {"reference MD", "short MD", "tiny", "tiny (no score)", "tiny (no score, no limits)", "SL GNN"}
    train_ps = evaluate.training_length_ps(chain_data_dir)
    step_ps = system["step_ps"]
    # the learned rollouts ran through the integrator, without failing, for 2x the training length
    assert system["rollout_steps"] == math.ceil(2 * train_ps / step_ps)
    for label in ("tiny", "tiny (no score)", "tiny (no score, no limits)"):
        assert "failure" not in runs[label], runs[label].get("failure")
        assert runs[label]["frames"] == system["rollout_steps"] + 1
        assert runs[label]["duration_ps"] == pytest.approx(system["rollout_steps"] * step_ps)
        assert runs[label]["duration_ps"] >= 2 * train_ps
        assert runs[label]["steps_per_second"] > 0 and runs[label]["rg2_mean"] > 0
    # the rollout's frames are on disk: the start frame, then one per step
    import mdtraj

    learned_cg = LearnedSimulator.load(exported_tiny_model).coarseGrain(
        load_trajectory(list_trajectories(chain_data_dir, split="test")[0]))
    dcd = mdtraj.load_dcd(str(out / system["system"] / "tiny.dcd"), top=mdtraj.Topology.from_openmm(learned_cg.topology))
    assert len(dcd) == system["rollout_steps"] + 1
    # short MD is the reference cut to the training length (here the held-out reference is
    # no longer than the training trajectories, so it is the whole reference)
    assert runs["short MD"]["duration_ps"] == pytest.approx(
        min(runs["reference MD"]["duration_ps"], round(train_ps / step_ps) * step_ps))
    assert runs["reference MD"]["rg2_mean"] > 0 and runs["SL GNN"]["rg2_mean"] > 0
    assert set(metrics["summary"]) == {"short MD", "tiny", "tiny (no score)", "tiny (no score, no limits)", "SL GNN"}
    report = (out / "report.md").read_text()
    for label in ("short MD", "tiny", "tiny (no score)", "SL GNN"):
        assert f"| {label} |" in report

    # fine-level Rg^2: true (from the atoms) for MD, the property head's for the learned runs
    from openmm_cgml.models.property import fine_rg2

    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    learned = LearnedSimulator.load(exported_tiny_model)
    cg = learned.coarseGrain(record)
    true_fine = fine_rg2(record.positions[::learned.dilation], cg.mapping)[:, 0]
    assert runs["reference MD"]["fine_rg2_mean"] == pytest.approx(float(true_fine.mean()))
    assert runs["reference MD"]["fine_rg2_source"] == "atoms" and runs["short MD"]["fine_rg2_source"] == "atoms"
    assert runs["reference MD"]["fine_rg2_mean"] > runs["reference MD"]["rg2_mean"]
    for label in ("tiny", "tiny (no score)"):
        assert runs[label]["fine_rg2_source"] == "property head" and runs[label]["fine_rg2_mean"] > 0
    assert "fine_rg2_mean" not in runs["SL GNN"]
    for method in ("short MD", "tiny", "tiny (no score)"):
        ref, est = runs["reference MD"]["fine_rg2_mean"], runs[method]["fine_rg2_mean"]
        assert metrics["summary"][method]["fine_rg2_mean_relative_error"] == pytest.approx(abs(est - ref) / ref)
    head_on_reference = system["fine_rg2_head_on_reference"]["tiny"]
    cg_frames = cg.mapping.map_positions(record.positions)[::learned.dilation]
    assert head_on_reference == pytest.approx(float(learned.fineRg2(cg, cg_frames).mean()))
    assert "fine Rg² mean rel. error" in report and "fine <Rg²> (nm²)" in report
    assert "Property head on the reference's own CG frames" in report

    # plots: each PNG is the figure evaluate drew, and each figure shows this system's data
    figures = recorded_figures[system["system"]]
    assert set(figures) == {"rg2_hist.png", "rg2_acf.png", "collisions.png", "fes_pca.png"}
    for name, figure in figures.items():
        assert f"![{name}]({system['system']}/{name})" in report
        assert_png_matches_figure(out / system["system"] / name, figure)
    rollouts = ("reference MD", "short MD", "tiny", "tiny (no score)", "tiny (no score, no limits)")
    collisions = series(figures["collisions.png"])
    assert set(collisions) == set(rollouts)
    for label in rollouts:
        times, rate = collisions[label].get_data()
        assert times[-1] == pytest.approx(runs[label]["duration_ps"])
        assert np.mean(rate) == pytest.approx(runs[label]["collision_rate_mean"])
    acfs = series(figures["rg2_acf.png"])
    assert set(rollouts) <= set(acfs)
    for label in rollouts:
        lags, acf = acfs[label].get_data()
        assert acf[0] == pytest.approx(1.0) and lags[0] == 0
    hist_ax = figures["rg2_hist.png"].axes[0]
    stairs = [p for p in hist_ax.patches if not p.get_label().startswith("_")]
    assert [p.get_label().split(":")[0] for p in stairs] == list(rollouts)
    for patch in stairs:  # densities on shared bins inside the plotted range
        values, edges, _ = patch.get_data()
        assert np.all(values >= 0) and np.sum(values * np.diff(edges)) <= 1 + 1e-9
    assert np.sum(stairs[0].get_data()[0] * np.diff(stairs[0].get_data()[1])) > 0.9  # the reference is in view
    fes_panels = [ax for ax in figures["fes_pca.png"].axes if ax.get_title()]
    assert [ax.get_title() for ax in fes_panels] == list(rollouts[:1] + rollouts[2:])


def test_reference_observables_match_direct_computation(exported_tiny_model, chain_data_dir):
    learned = LearnedSimulator.load(exported_tiny_model)
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = learned.coarseGrain(record)
    x = cg.mapping.map_positions(record.positions)
    groups = evaluate.molecule_groups(cg.mapping)
    assert len(groups) == 1 and len(groups[0]) == cg.mapping.n_beads  # one chain
    rg2 = evaluate.rg2_series(x, cg.mapping.bead_masses, groups)
    m = np.asarray(cg.mapping.bead_masses)
    centre = (x * m[None, :, None]).sum(1) / m.sum()
    direct = ((((x - centre[:, None]) ** 2).sum(-1)) * m).sum(1) / m.sum()
    np.testing.assert_allclose(rg2, direct, rtol=1e-5)
    species = evaluate.bead_species(record, cg.mapping)
    assert species.shape == (cg.mapping.n_beads,) and len(set(species)) == 1


def test_start_histories_are_evenly_spaced_windows():
    reference = np.arange(20, dtype=np.float64)[:, None, None] * np.ones((1, 2, 3))
    windows = evaluate.start_histories(reference, seq_len=3, dilation=2, replicas=4)  # span 5: 16 windows
    assert windows.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(windows[:, :, 0, 0], [[0, 2, 4], [5, 7, 9], [10, 12, 14], [15, 17, 19]])
    np.testing.assert_array_equal(evaluate.start_histories(reference, 3, 2, 1)[0, :, 0, 0], [0, 2, 4])
    with pytest.raises(ValueError, match="17 replicas need 17 distinct start windows of 5 recorded frames, but the "
                                         "reference has 20 frames"):
        evaluate.start_histories(reference, 3, 2, 17)


def test_centre_drift_extrapolates_the_reference_centre_motion():
    # the centre moves 1 nm per frame along x: at half of 11 frames (lag 5) the msd is 25
    # nm^2, and 20 ps extrapolated diffusively from 5 ps gives sqrt(25 * 20 / 5) = 10 nm
    frames = np.zeros((11, 3, 3))
    frames[:, :, 0] = np.arange(11)[:, None]
    frames[:, 1, 1] = 2.0  # a fixed shape around the moving centre
    masses = np.array([1.0, 2.0, 3.0])
    assert evaluate.centre_drift_rms(frames, masses, dt_ps=1.0, duration_ps=20.0) == pytest.approx(10.0)
    assert evaluate.centre_drift_rms(frames[:, :, :] * 0, masses, 1.0, 20.0) == 0.0


def test_pool_observables_pools_distributions_and_averages_lagged_quantities():
    from openmm_cgml import analysis

    rng = np.random.default_rng(0)
    t = np.arange(6) * 2.0
    parts = []
    for k in range(3):
        rg2 = 1.0 + k + 0.1 * rng.standard_normal(12)
        acf = np.exp(-t / (2.0 + k))
        msd = analysis.MSDResult(t, (k + 1) * t, np.full(4, float(k)), (2.0, 6.0))
        parts.append(evaluate.Observables(rg2=rg2, acf=acf, collision=np.full(6, 0.1 * k),
                                          rdfs={("A", "B"): (np.arange(3.0), np.array([0.0, 2.0 + k, 1.0]))},
                                          msd={"A": msd}))
    pooled = evaluate.pool_observables(parts, 2.0)
    np.testing.assert_array_equal(pooled.rg2, np.concatenate([p.rg2 for p in parts]))
    means = [p.rg2.mean() for p in parts]
    assert pooled.rg2_mean == pytest.approx(np.mean(means))
    assert pooled.rg2_sem == pytest.approx(np.std(means, ddof=1) / np.sqrt(3))
    np.testing.assert_allclose(pooled.acf, np.mean([p.acf for p in parts], axis=0))
    assert pooled.relaxation.tau_integral == pytest.approx(analysis.relaxation_time(pooled.acf, 2.0).tau_integral)
    np.testing.assert_allclose(pooled.collision, np.full(6, 0.1))
    np.testing.assert_allclose(pooled.rdfs[("A", "B")][1], [0.0, 3.0, 1.0])
    np.testing.assert_allclose(pooled.msd["A"].msd, 2 * t)
    assert pooled.msd["A"].per_unit_slope.size == 12  # every replica's beads are independent units
    assert pooled.diffusion["A"].D == pytest.approx(2.0 / 6.0)
    # a replica that failed early is left out of every pooled observable
    short = evaluate.Observables(rg2=np.full(3, 9.0), acf=np.ones(2), collision=np.ones(3), rdfs={}, msd={})
    assert evaluate.pooled_replicas(parts + [short]) == [0, 1, 2]
    pooled = evaluate.pool_observables(parts + [short], 2.0)
    assert pooled.rg2.size == 36 and pooled.rg2_mean == pytest.approx(np.mean(means))
    np.testing.assert_allclose(pooled.collision, np.full(6, 0.1))
    # one replica pooled: its own result, blocking error and all
    assert evaluate.pool_observables(parts[:1], 2.0) is parts[0]
    assert evaluate.pool_observables([parts[0], short], 2.0) is parts[0]


def test_evaluate_with_replicas(exported_tiny_model, chain_data_dir, tmp_path, monkeypatch):
    """K replicas of a non-periodic system run in one integrator call per learned run,
    from K different reference windows; the metrics pool the replicas' own frames."""
    import mdtraj

    learned = LearnedSimulator.load(exported_tiny_model)
    calls = []
    original = LearnedSimulator.rollout_replicas

    def spy(self, cg, histories, *args, **kwargs):
        calls.append(np.array(histories))
        return original(self, cg, histories, *args, **kwargs)

    monkeypatch.setattr(LearnedSimulator, "rollout_replicas", spy)
    out = tmp_path / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cgml(["evaluate", "--model", f"tiny={exported_tiny_model}", "--data", str(chain_data_dir),
                     "--out", str(out), "--rollout-factor", "1", "--replicas", "3", "--no-progress", "--no-sl",
                     "--no-md-timing"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (system,) = metrics["systems"]
    # replicas that drift together (this barely trained model's do) are said in the metrics and report
    said = sorted(str(w.message) for w in caught if "replicas came within" in str(w.message))
    assert said == sorted(n for entry in system["runs"].values() for n in entry.get("warnings", []))
    assert all(f"warning: {n[:160]}" in (out / "report.md").read_text() for n in said)
    assert metrics["context"]["replicas"] == 3 and system["replicas"] == 3
    runs = system["runs"]
    learned_labels = ("tiny", "tiny (no score)", "tiny (no score, no limits)")
    assert len(calls) == len(learned_labels)  # one batched rollout per learned run
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    cg = learned.coarseGrain(record)
    reference = cg.mapping.map_positions(record.positions)
    expected = evaluate.start_histories(reference, learned.seqLen, learned.dilation, 3)
    for histories in calls:
        np.testing.assert_allclose(histories, expected)
        assert not np.allclose(histories[0], histories[1])
    for label in learned_labels:
        assert runs[label]["replicas"] == runs[label]["pooled_replicas"] == 3 and "failure" not in runs[label]
        assert runs[label]["frames"] == system["rollout_steps"] + 1
        assert runs[label]["steps_per_second"] == pytest.approx(3 * system["rollout_steps"]
                                                                / runs[label]["wall_seconds"])
    assert "replicas" not in runs["reference MD"]
    # the first run's replicas are on disk, each starting where its window ends; the
    # reported <Rg^2> is the mean over all their frames
    groups = evaluate.molecule_groups(cg.mapping)
    series = []
    for r in range(3):
        frames = mdtraj.load_dcd(str(out / system["system"] / f"tiny_replica{r}.dcd"), top=mdtraj.Topology.from_openmm(
            cg.topology)).xyz
        assert len(frames) == system["rollout_steps"] + 1  # the start frame, then one per step
        np.testing.assert_allclose(frames[0], expected[r, -1], atol=1e-4)
        series.append(evaluate.rg2_series(frames.astype(np.float64), cg.mapping.bead_masses, groups))
    assert runs["tiny"]["rg2_mean"] == pytest.approx(float(np.mean(np.concatenate(series))), rel=1e-4)
    assert "3 replicas each" in (out / "report.md").read_text()


def test_evaluate_refinement_settings_reach_the_refined_runs(exported_tiny_model, chain_data_dir, tmp_path,
                                                             monkeypatch):
    """--langevin-levels / --langevin-steps set the refined runs' integrators (batched
    replicas too), not the ablations without refinement, and are recorded."""
    created = []
    original = LearnedSimulator.createIntegrator

    def spy(self, cg, score=True, **kwargs):
        created.append((score, kwargs.get("langevinLevels"), kwargs.get("langevinSteps")))
        return original(self, cg, score=score, **kwargs)

    monkeypatch.setattr(LearnedSimulator, "createIntegrator", spy)
    out = tmp_path / "report"
    assert cgml(["evaluate", "--model", f"tiny={exported_tiny_model}", "--data", str(chain_data_dir),
                 "--out", str(out), "--rollout-factor", "0.2", "--replicas", "2", "--langevin-levels", "1",
                 "--langevin-steps", "3", "--no-progress", "--no-sl", "--no-md-timing"]) == 0
    assert (True, 1, 3) in created
    assert all(levels is None and steps is None for score, levels, steps in created if not score)
    assert all((levels, steps) == (1, 3) for score, levels, steps in created if score)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["context"]["refinement"] == {"langevinSteps": 3, "langevinLevels": 1}


def test_summary_errors():
    systems = [{"runs": {"reference MD": {"rg2_mean": 2.0, "relaxation_ps_integral": 10.0},
                         "a": {"rg2_mean": 3.0, "relaxation_ps_integral": 12.0, "rg2_js_vs_reference": 0.1}}},
               {"runs": {"reference MD": {"rg2_mean": 4.0, "relaxation_ps_integral": 20.0},
                         "a": {"rg2_mean": 3.0, "relaxation_ps_integral": 14.0, "rg2_js_vs_reference": 0.3}}}]
    s = evaluate.summarise(systems)["a"]
    assert s["rg2_mae_nm2"] == pytest.approx(1.0)
    assert s["rg2_mean_relative_error"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["relaxation_mae_ps"] == pytest.approx(4.0)
    assert s["rg2_js_divergence_mean"] == pytest.approx(0.2)
    assert "fine_rg2_mean_relative_error" not in s  # no fine-level entries given
    systems[0]["runs"]["reference MD"]["fine_rg2_mean"] = 4.0
    systems[0]["runs"]["a"]["fine_rg2_mean"] = 5.0
    assert evaluate.summarise(systems)["a"]["fine_rg2_mean_relative_error"] == pytest.approx(0.25)


@pytest.mark.parametrize("factor", [0, -1.0, float("nan"), float("inf")])
def test_rollout_factor_must_be_positive(exported_tiny_model, chain_data_dir, tmp_path, factor):
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="rollout factor must be a positive number"):
        evaluate.run_evaluation({"tiny": exported_tiny_model}, chain_data_dir, out, rollout_factor=factor,
                                sl_baseline=False, progress=False, measure_md=False)
    assert not out.exists()  # no empty report claiming zero collisions


def test_evaluate_periodic_electrolyte(tmp_path, recorded_figures):
    """The periodic path: tiny PEO/LiTFSI data, a briefly trained model, RDFs and diffusivities."""
    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.generate import generate_dataset
    from openmm_cgml.training import load_config, train

    data = tmp_path / "data"
    generate_dataset("electrolyte", "tiny", data, seed=0, overrides={"n_frames_train": 12, "n_frames_test": 12},
                     platform="CPU", threads=1, progress=False)
    config = load_config("electrolyte-demo", {
        "data_dir": str(data), "seq_len": 3, "dilation": 2, "steps": 4, "batch_size": 1, "val_every": 0,
        "checkpoint_every": 4, "val_fraction": 0.0, "num_threads": 1, "model.latent_dim": 16,
        "model.hidden_dim": 16, "model.rounds": 1, "model.embedding_rounds": 1, "model.score_levels": 2,
        "model.langevin_steps": 1})
    train(config, tmp_path / "run", progress=False)
    model = export_checkpoint(tmp_path / "run", tmp_path / "model")
    # two replicas: a periodic box holds one copy, so they run one after the other
    report = evaluate.run_evaluation({"tiny": model}, data, tmp_path / "report", rollout_factor=1.0,
                                     sl_baseline=False, progress=False, measure_md=False, replicas=2)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    (system,) = metrics["systems"]
    runs = system["runs"]
    assert "failure" not in runs["tiny"], runs["tiny"].get("failure")
    assert runs["tiny"]["frames"] == system["rollout_steps"] + 1 >= 2
    assert runs["tiny"]["replicas"] == 2
    assert all((tmp_path / "report" / system["system"] / f"tiny_replica{r}.dcd").stat().st_size > 0 for r in (0, 1))
    # one diffusivity per bead species of the held-out system, for the reference and the rollout
    learned = LearnedSimulator.load(model)
    record = load_trajectory(list_trajectories(data, split="test")[0])
    species = set(evaluate.bead_species(record, learned.coarseGrain(record).mapping).tolist())
    assert len(species) >= 2
    for label in ("reference MD", "tiny"):
        diffusivity = runs[label]["diffusivity_nm2_per_ps"]
        assert set(diffusivity) == species
        assert all(np.isfinite(d) for d, _ in diffusivity.values())
    # RDF first peaks: per species pair for the reference; summarised against it per method
    peaks = runs["reference MD"].get("rdf_first_peak_nm_height", {})
    assert peaks and all(0 < r_peak and height > 1 for r_peak, height in peaks.values())
    short = metrics["summary"]["short MD"]
    assert short["rdf_peak_shift_max_nm"] >= 0 and short["rdf_peak_height_relative_error_mean"] >= 0
    assert "RDF first peaks" in report.read_text()
    figures = recorded_figures[system["system"]]
    assert {"rdfs.png", "msd.png", "collisions.png"} <= set(figures)
    for name in ("rdfs.png", "msd.png"):
        assert_png_matches_figure(report.parent / system["system"] / name, figures[name])
    msd_panels = [ax.get_title() for ax in figures["msd.png"].axes]
    assert sorted(msd_panels) == sorted(species)
    for panel in range(len(figures["rdfs.png"].axes)):
        assert set(series(figures["rdfs.png"], panel)) <= {"reference MD", "short MD", "tiny", "tiny (no score)",
                                                           "tiny (no score, no limits)"}
        assert "reference MD" in series(figures["rdfs.png"], panel)


def test_every_model_runs_on_its_own_bead_features(exported_tiny_model, chain_data_dir, tmp_path, monkeypatch):
    """Two models with different embedding GNNs: each rollout gets the features of its
    own model (a model given another's features simulates a different system)."""
    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.training import load_config, train

    run = tmp_path / "other"
    config = load_config("chain-tiny", {"data_dir": str(chain_data_dir), "steps": 2, "val_every": 0,
                                        "checkpoint_every": 2, "num_threads": 1, "seed": 7})
    train(config, run, progress=False)
    models = {"a": LearnedSimulator.load(exported_tiny_model),
              "b": LearnedSimulator.load(export_checkpoint(run, run / "exported"))}
    record = load_trajectory(list_trajectories(chain_data_dir, split="test")[0])
    own = {label: m.coarseGrain(record).features for label, m in models.items()}
    assert not np.allclose(own["a"], own["b"])
    seen = {}
    for label, learned in models.items():
        original = learned.rollout

        def spy(cg, *args, _label=label, _original=original, **kwargs):
            seen.setdefault(_label, []).append(np.array(cg.features))
            return _original(cg, *args, **kwargs)

        monkeypatch.setattr(learned, "rollout", spy)
    evaluate.evaluate_system(record, models, 20.0, 1.0, tmp_path / "report", progress=False, measure_md=False,
                             ablation_model="a")
    for label in models:
        assert seen[label] and all(np.array_equal(f, own[label]) for f in seen[label])
