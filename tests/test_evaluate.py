"""cgml evaluate end to end on tiny data: rollouts through CGMLIntegrator, report, plots."""
import json

import numpy as np
import pytest

from openmm_cgml import evaluate
from openmm_cgml.cli import main as cgml
from openmm_cgml.generate import list_trajectories, load_trajectory
from openmm_cgml.simulator import LearnedSimulator


def test_evaluate_writes_report_with_all_methods(exported_tiny_model, chain_data_dir, tmp_path):
    out = tmp_path / "report"
    assert cgml(["evaluate", "--model", f"tiny={exported_tiny_model}", "--data", str(chain_data_dir),
                 "--out", str(out), "--rollout-factor", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (system,) = metrics["systems"]
    runs = system["runs"]
    assert set(runs) == {"reference MD", "short MD", "tiny", "tiny (no score)", "SL GNN"}
    train_ps = evaluate.training_length_ps(chain_data_dir)
    # the learned rollout is 2x the training length and ran through the integrator
    assert runs["tiny"]["duration_ps"] == pytest.approx(2 * train_ps, rel=0.05) or "failure" in runs["tiny"]
    assert runs["short MD"]["duration_ps"] <= train_ps + system["step_ps"]
    assert runs["reference MD"]["rg2_mean"] > 0 and runs["tiny"]["steps_per_second"] > 0
    assert set(metrics["summary"]) >= {"short MD", "tiny", "SL GNN"}
    report = (out / "report.md").read_text()
    assert "| short MD |" in report and "rg2_hist.png" in report
    for name in ("rg2_hist.png", "rg2_acf.png", "collisions.png", "fes_pca.png"):
        assert (out / system["system"] / name).stat().st_size > 10_000


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


def test_evaluate_periodic_electrolyte(tmp_path):
    """The periodic path: tiny PEO/LiTFSI data, a briefly trained model, RDFs and diffusivities."""
    from openmm_cgml.export import export_checkpoint
    from openmm_cgml.generate import generate_dataset
    from openmm_cgml.train import load_config, train

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
    report = evaluate.run_evaluation({"tiny": model}, data, tmp_path / "report", rollout_factor=1.0,
                                     sl_baseline=False, progress=False, measure_md=False)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    (system,) = metrics["systems"]
    reference = system["runs"]["reference MD"]
    assert set(reference["diffusivity_nm2_per_ps"]) >= {"LI"} or len(reference["diffusivity_nm2_per_ps"]) >= 3
    assert system["runs"]["tiny"]["frames"] >= 2
    directory = report.parent / system["system"]
    assert (directory / "rdfs.png").stat().st_size > 10_000 and (directory / "msd.png").stat().st_size > 10_000
