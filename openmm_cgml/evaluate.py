"""Evaluation against reference MD, and the end-to-end demo.

For every held-out system of a data set, the learned simulator starts from ``seq_len``
frames of the system's reference MD (mapped to CG) and runs *through CGMLIntegrator in
an app.Simulation* for ``rollout_factor`` times the length of the training
trajectories. Its trajectory and the reference are analysed by the same functions
(:mod:`openmm_cgml.analysis`) and compared with:

* the long reference MD of that system (ground truth);
* "short MD": the same reference cut to the training-trajectory length;
* the learned simulator without score refinement, and without score refinement and
  distance limits (excluded volume, bond-length limit) (ablations of the first model);
* a supervised GNN that predicts the mean property from the graph (``baselines``);
* every model directory given (e.g. the ``gns`` and ``et`` backbones).

Observables: Rg^2 (per molecule with more than one bead, mass-weighted, CG level) with
its distribution, mean, autocorrelation and relaxation time (integral to the first zero
crossing); for periodic systems, RDFs between bead species and diffusivities per
species from the MSD; bead collision rate over time; a free-energy surface on the
first two principal components of the CG coordinates (single-molecule systems).
Fine-level Rg^2 (the paper's property, per molecule with more than one bead, mean over
molecules and frames): the true value from the atoms for the reference and short MD,
and for each learned run the model's property head (``LearnedSimulator.fineRg2``)
applied to its rollout frames (models exported without a head get none); the head on
the reference's own CG frames is reported too, which separates the head's error from
the rollout's.
The report is a directory with ``report.md``, ``metrics.json`` and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from openmm import app
from tqdm.auto import tqdm

from openmm_cgml import analysis, plots
from openmm_cgml.simulator import CGRun
from openmm_cgml.trajectories import TrajectoryRecord, list_trajectories, load_trajectory, read_metadata


# -------------------------------------------------------------------------- observables
def bead_species(record: TrajectoryRecord, mapping) -> np.ndarray:
    """Species of each bead: the residue name of the first atom of its molecule."""
    residue_of_atom = np.array([atom.residue.name for atom in record.topology.atoms()])
    molecules = np.asarray(mapping.molecule_of_atom)
    first_atom_of_molecule = {}
    for atom in range(len(molecules) - 1, -1, -1):
        first_atom_of_molecule[int(molecules[atom])] = atom
    return np.array([residue_of_atom[first_atom_of_molecule[int(m)]] for m in mapping.molecule_of_bead])


def molecule_groups(mapping, min_beads: int = 2) -> list[np.ndarray]:
    """Bead indices of every molecule with at least ``min_beads`` beads (for Rg^2)."""
    groups = [np.flatnonzero(mapping.molecule_of_bead == m) for m in np.unique(mapping.molecule_of_bead)]
    return [g for g in groups if len(g) >= min_beads]


def fine_rg2_series(fine_positions: np.ndarray, mapping) -> np.ndarray | None:
    """Mean over molecules (those with >= 2 beads) of the true fine-level Rg^2 per frame,
    nm^2, from the atoms [F, n, 3]; None without such molecules."""
    from openmm_cgml.models.property import fine_rg2

    per_molecule = fine_rg2(fine_positions, mapping)
    return per_molecule.mean(axis=1) if per_molecule.shape[1] else None


def predicted_fine_rg2_series(learned, cg, positions: np.ndarray) -> np.ndarray | None:
    """Mean over molecules of the property head's fine Rg^2 per CG frame, or None (no
    head, or no molecule with >= 2 beads)."""
    if not getattr(learned, "hasPropertyHead", False) or len(positions) == 0:
        return None
    per_molecule = learned.fineRg2(cg, positions)
    return per_molecule.mean(axis=1) if per_molecule.shape[1] else None


def rg2_series(positions: np.ndarray, masses: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """Mean over molecules of the mass-weighted CG Rg^2 per frame, nm^2."""
    per_group = analysis.radius_of_gyration_squared(positions, masses, groups)
    return per_group.mean(axis=1) if per_group.ndim == 2 else per_group


@dataclass
class Observables:
    rg2: np.ndarray | None = None
    rg2_mean: float | None = None
    rg2_sem: float | None = None
    acf_time: np.ndarray | None = None
    acf: np.ndarray | None = None
    relaxation: Any = None
    collision: np.ndarray | None = None
    rdfs: dict = field(default_factory=dict)
    msd: dict = field(default_factory=dict)
    diffusion: dict = field(default_factory=dict)

    def rdf_first_peaks(self) -> dict[str, tuple[float, float]]:
        """{"A-B": (position nm, height)} of each RDF's first peak, for the RDFs that have one."""
        peaks = {f"{a}-{b}": analysis.rdf_first_peak(*curve) for (a, b), curve in self.rdfs.items()}
        return {pair: peak for pair, peak in peaks.items() if peak is not None}


def compute_observables(run: CGRun, masses: np.ndarray, groups: list[np.ndarray], species: np.ndarray,
                        bonds: np.ndarray, collision_threshold: float, periodic: bool,
                        rdf_pairs: Sequence[tuple[str, str]] = (), max_acf_lag: int | None = None) -> Observables:
    obs = Observables()
    x = run.positions
    if groups and len(x) > 2:
        obs.rg2 = rg2_series(x, masses, groups)
        if len(obs.rg2) >= 8:  # blocking needs 8 samples; shorter runs get no error bar
            obs.rg2_mean, obs.rg2_sem = analysis.mean_with_error(obs.rg2)
        else:
            obs.rg2_mean = float(obs.rg2.mean())
        lag = min(max_acf_lag or len(x) // 2, len(x) - 1)
        obs.acf = analysis.autocorrelation(obs.rg2, max_lag=lag)
        obs.acf_time = np.arange(len(obs.acf)) * run.dt_ps
        obs.relaxation = analysis.relaxation_time(obs.acf, run.dt_ps)
    box = run.box if periodic else None
    obs.collision = analysis.collision_rate(x, collision_threshold, boxes=box, bonds=bonds)
    if periodic and len(x) > 4:
        for a, b in rdf_pairs:
            ia, ib = np.flatnonzero(species == a), np.flatnonzero(species == b)
            if len(ia) and len(ib) and not (a == b and len(ia) < 2):
                stride = max(1, len(x) // 50)
                obs.rdfs[(a, b)] = analysis.rdf(x, box, ia, ib, n_bins=80, stride=stride)
        for name in np.unique(species):
            idx = np.flatnonzero(species == name)
            result = analysis.mean_squared_displacement(x, run.dt_ps, indices=idx, masses=masses)
            obs.msd[str(name)] = result
            obs.diffusion[str(name)] = analysis.fit_diffusion(result)
    return obs


def pooled_replicas(observations: Sequence[Observables]) -> list[int]:
    """Indices of the replicas a pooled result uses: those that ran the longest (the
    whole rollout, unless every replica failed)."""
    longest = max(len(o.collision) for o in observations)
    return [i for i, o in enumerate(observations) if len(o.collision) == longest]


def pool_observables(observations: Sequence[Observables], dt_ps: float) -> Observables:
    """One set of observables from independent replicas of a run, all from the replicas
    that ran the whole rollout (:func:`pooled_replicas`; a replica that failed early is
    left out of every observable, and its failure is reported).

    The Rg^2 distribution pools their frames; <Rg^2> is its mean (equal-length replicas:
    the mean of the replica means) and its error the standard error of the replica
    means (the blocking error of the one series when one replica is pooled). Rg^2
    autocorrelation, collisions per frame and MSD are averaged over the replicas, RDFs
    averaged on the shared bins, and diffusivities fitted to the averaged MSD with every
    replica's per-bead slopes as independent units."""
    observations = list(observations)
    full = [observations[i] for i in pooled_replicas(observations)]
    if len(full) == 1:
        return full[0]
    out = Observables()
    series = [o.rg2 for o in full if o.rg2 is not None]
    if series:
        out.rg2 = np.concatenate(series)
        out.rg2_mean = float(out.rg2.mean())
        means = np.array([s.mean() for s in series])
        out.rg2_sem = float(means.std(ddof=1) / np.sqrt(len(means)))
        acfs = [o.acf for o in full if o.acf is not None]
        if acfs:
            out.acf = np.mean([a[: min(map(len, acfs))] for a in acfs], axis=0)
            out.acf_time = np.arange(len(out.acf)) * dt_ps
            out.relaxation = analysis.relaxation_time(out.acf, dt_ps)
    out.collision = np.mean([o.collision for o in full], axis=0)
    for pair in full[0].rdfs:
        curves = [o.rdfs[pair] for o in full if pair in o.rdfs]
        out.rdfs[pair] = (curves[0][0], np.mean([g for _, g in curves], axis=0))
    for name in full[0].msd:
        results = [o.msd[name] for o in full if name in o.msd]
        first = results[0]
        out.msd[name] = analysis.MSDResult(first.lag_times, np.mean([r.msd for r in results], axis=0),
                                           np.concatenate([r.per_unit_slope for r in results]), first.fit_window)
        out.diffusion[name] = analysis.fit_diffusion(out.msd[name])
    return out


def start_histories(reference: np.ndarray, seq_len: int, dilation: int, replicas: int) -> np.ndarray:
    """[K, seq_len, N, 3] start histories for K replicas: windows of ``seq_len`` frames
    ``dilation`` recorded frames apart, their starts evenly spaced over ``reference``
    [F, N, 3] (the first at frame 0)."""
    span = check_start_windows(len(reference), seq_len, dilation, replicas)
    starts = analysis.evenly_spaced(len(reference) - span + 1, replicas)
    return np.stack([reference[s: s + span: dilation] for s in starts]).astype(np.float64)


def centre_drift_rms(frames: np.ndarray, masses: np.ndarray, dt_ps: float, duration_ps: float) -> float:
    """Expected rms displacement (nm) of the mass-weighted centre of ``frames`` [F, N, 3]
    over ``duration_ps``: its mean square displacement at half the trajectory's length,
    extrapolated as diffusion."""
    if len(frames) < 3:
        return 0.0
    centre = np.einsum("fnk,n->fk", np.asarray(frames, dtype=np.float64), masses) / masses.sum()
    lag = len(centre) // 2
    msd = float(np.mean(np.sum((centre[lag:] - centre[:-lag]) ** 2, axis=1)))
    return float(np.sqrt(msd * duration_ps / (lag * dt_ps)))


def check_start_windows(n_frames: int, seq_len: int, dilation: int, replicas: int, name: str = "the reference") -> int:
    """Refuse more replicas than ``n_frames`` recorded frames have distinct start windows;
    returns the window's span in recorded frames."""
    span = (seq_len - 1) * dilation + 1
    available = max(n_frames - span + 1, 0)
    if not 1 <= replicas <= available:
        raise ValueError(f"{replicas} replicas need {replicas} distinct start windows of {span} recorded frames, "
                         f"but {name} has {n_frames} frames ({available} windows)")
    return span


def learned_rollouts(learned, cg, histories: np.ndarray, n_steps: int, *, label: str, seed: int,
                     progress: bool, dcd_stem: Path | None = None,
                     **options) -> tuple[list[CGRun], float, list[str]]:
    """Rollouts of ``learned`` from each of the [K, T, N, 3] ``histories``: one rollout for
    K = 1; K replicas advanced together in one integrator call for a non-periodic system
    (``LearnedSimulator.rollout_replicas``); K rollouts one after another (seeds seed,
    seed + 1, ...) for a periodic one, whose box holds one copy. A failure ends a batched
    call for all its replicas. ``dcd_stem``: write each rollout's frames (the start
    frame, then one per model step) to ``<stem>.dcd`` (K = 1) or
    ``<stem>_replica<r>.dcd``. Returns the runs, the wall time of them all (s) and the
    warnings that replicas drifted together (all warnings are re-raised)."""
    k = len(histories)
    notes: list[str] = []
    if k == 1:
        runs = [learned.rollout(cg, histories[0], n_steps, seed=seed, label=label, progress=progress, **options)]
        wall = float(runs[0].wall_seconds)
    elif cg.periodic:
        runs = [learned.rollout(cg, h, n_steps, seed=seed + r, label=f"{label} replica {r}", progress=progress,
                                **options) for r, h in enumerate(histories)]
        wall = float(sum(r.wall_seconds for r in runs))
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = learned.rollout_replicas(cg, histories, n_steps, seed=seed, progress=progress, **options)
        for warning in caught:  # said again; replicas that drifted within a cutoff are also reported
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            if str(warning.message).startswith("replicas came within"):
                notes.append(str(warning.message))
        wall = float(runs[0].wall_seconds)
    if dcd_stem:
        for r, run in enumerate(runs):
            write_dcd(Path(f"{dcd_stem}.dcd" if k == 1 else f"{dcd_stem}_replica{r}.dcd"), cg.topology, run)
    return runs, wall, notes


def write_dcd(path: Path, topology, run: CGRun) -> None:
    """``run``'s frames (unwrapped, nm) as a DCD file: its first frame, then one per model
    step."""
    from openmm import unit

    box = None if run.box is None else np.asarray(run.box) * unit.nanometer
    with open(path, "wb") as handle:
        dcd = app.DCDFile(handle, topology, run.dt_ps * unit.picosecond)
        for frame in run.positions:
            dcd.writeModel(frame.astype(np.float64) * unit.nanometer, periodicBoxVectors=box)


# --------------------------------------------------------------------------- evaluation
def training_length_ps(data_dir: Path) -> float:
    """Longest training trajectory (the "short MD" length), ps."""
    lengths = [meta["n_frames"] * meta["record_interval_ps"]
               for meta in map(read_metadata, list_trajectories(data_dir, split="train"))]
    if not lengths:
        raise ValueError(f"no training trajectories in {data_dir}")
    return float(max(lengths))


def md_speed_ns_per_day(record: TrajectoryRecord, min_seconds: float = 2.0) -> float | None:
    """The reference MD's speed for this system (CPU platform), from its last frame."""
    from openmm_cgml.generate import md_speed
    from openmm_cgml.systems import get_system_module
    from openmm_cgml.systems.base import SystemSpec

    meta = record.metadata
    try:
        module = get_system_module(meta["kind"])
        built = module.build(SystemSpec(meta["kind"], meta["name"], meta["split"], meta["seed"],
                                        meta.get("composition", {})))
    except Exception:  # user-imported data: no builder to time
        return None
    box = record.box[-1] if record.box is not None else None
    return md_speed(built, record.positions[-1], box, min_seconds=min_seconds) * 86400 / 1000


def _js(a, b):
    return analysis.jensen_shannon_divergence(a, b) if a is not None and b is not None and len(b) > 2 else None


def evaluate_system(record: TrajectoryRecord, models: dict[str, Any], train_ps: float, rollout_factor: float,
                    out_dir: Path, *, seed: int = 1, progress: bool = True, sl_prediction: float | None = None,
                    ablation_model: str | None = None, measure_md: bool = True, cg=None,
                    replicas: int = 1, langevin: dict[str, Any] | None = None, compiled: bool = False) -> dict:
    """Evaluate every model on one held-out system; write its plots; return its metrics.
    ``cg``: the system coarse-grained by the first model, if already computed. Every
    model runs on its own coarse-graining (its embedding GNN makes its bead features);
    the models must share the CG mapping, which the observables are computed on.
    ``replicas``: K rollouts per learned run, from K start windows evenly spaced over
    the reference (:func:`learned_rollouts`), their observables pooled
    (:func:`pool_observables`). ``langevin``: refinement settings of the refined runs
    (``LearnedSimulator.rollout``'s, e.g. ``{"langevinLevels": 3, "langevinSteps": 3}``).
    ``compiled``: every learned run with its networks compiled for this CPU
    (:mod:`openmm_cgml.compiled`; the same model and settings, faster)."""
    check_replicas(replicas)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(models.values()))
    cg = first.coarseGrain(record) if cg is None else cg
    mapping = cg.mapping
    cg_of = {label: cg if learned is first else learned.coarseGrain(record) for label, learned in models.items()}
    for label, own in cg_of.items():
        if own.n_beads != cg.n_beads or not np.array_equal(own.mapping.bead_of_atom, mapping.bead_of_atom):
            raise ValueError(f"model {label!r} maps {record.name} onto other beads than model "
                             f"{next(iter(models))!r} (its CG settings differ); evaluate them separately")
    reference = mapping.map_positions(record.positions).astype(np.float32)
    interval = record.record_interval_ps
    dilation = first.dilation
    step_ps = dilation * interval
    seq_len = first.seqLen
    masses = np.asarray(mapping.bead_masses, dtype=np.float64)
    groups = molecule_groups(mapping)
    species = bead_species(record, mapping)
    periodic = bool(record.periodic)
    box = record.box[-1] if periodic else None
    bonds = np.asarray(mapping.cg_bonds)
    names = sorted(set(species))
    rdf_pairs = [(a, b) for i, a in enumerate(names) for b in names[i:]] if periodic else []

    # reference at the model's step (what the learned simulator is compared against frame by frame)
    long_ref = CGRun("reference MD", reference[::dilation], step_ps, box)
    short_frames = max(int(round(train_ps / step_ps)) + 1, seq_len + 2)
    short_ref = CGRun("short MD", reference[::dilation][:short_frames], step_ps, box)
    threshold = analysis.collision_threshold(long_ref.positions, boxes=box, bonds=bonds)
    n_steps = int(math.ceil(rollout_factor * train_ps / step_ps))
    histories = start_histories(reference, seq_len, dilation, replicas)
    # batched replicas are laid out far enough apart for the drift the reference shows
    spacing = {} if periodic or replicas == 1 else {"drift": centre_drift_rms(
        reference, masses, interval, n_steps * step_ps)}

    runs = {long_ref.label: [long_ref], short_ref.label: [short_ref]}  # label -> its replicas
    wall = {}  # label -> wall seconds of all its replicas
    notes = {}  # label -> warnings its rollouts raised
    model_of_run = {}  # run label -> the label of the model that made it
    for label, learned in models.items():
        own = cg_of[label]
        # the refinement settings apply to models that refine
        variants = [(label, {"langevin": langevin} if langevin and learned.scorePath is not None else {})]
        if label == ablation_model and learned.scorePath is not None:
            variants.append((f"{label} (no score)", {"score": False}))
        if label == ablation_model and (learned.manifest.get("exclusion_distance_nm", 0.0) > 0
                                        or learned.manifest.get("bond_length_limit_nm", 0.0) > 0):
            plain = f"{label} (no score, no limits)" if learned.scorePath is not None else f"{label} (no limits)"
            variants.append((plain, {"score": False, "limits": False}))
        for run_label, options in variants:
            stem = out_dir / label.replace(" ", "_") if run_label == label else None
            runs[run_label], wall[run_label], notes[run_label] = learned_rollouts(
                learned, own, histories, n_steps, label=run_label, seed=seed, progress=progress, dcd_stem=stem,
                compiled=compiled, **options, **spacing)
            model_of_run[run_label] = label
    # fine-level Rg^2: true (atoms) for the MD runs, the property head's for learned runs
    fine_ref = fine_rg2_series(record.positions[::dilation], mapping)
    fine = {}
    if fine_ref is not None:
        fine[long_ref.label] = fine_ref
        fine[short_ref.label] = fine_ref[:short_frames]
    max_lag = max(2, int(len(long_ref.positions) // 2))
    observed = {label: [compute_observables(r, masses, groups, species, bonds, threshold, periodic, rdf_pairs,
                                            max_acf_lag=max_lag) for r in replica_runs]
                for label, replica_runs in runs.items()}
    pooled = {label: pooled_replicas(obs) for label, obs in observed.items()}  # replicas the results use
    results = {label: pool_observables(obs, step_ps) for label, obs in observed.items()}
    if fine_ref is not None:
        for run_label, label in model_of_run.items():
            predicted = [predicted_fine_rg2_series(models[label], cg_of[label], runs[run_label][i].positions)
                         for i in pooled[run_label]]
            if all(p is not None for p in predicted):
                fine[run_label] = np.concatenate(predicted)

    metrics: dict[str, Any] = {
        "system": record.name, "n_beads": int(mapping.n_beads), "n_atoms": int(mapping.n_atoms),
        "step_ps": step_ps, "reference_ps": long_ref.duration_ps, "training_ps": train_ps,
        "rollout_steps": n_steps, "replicas": replicas, "collision_threshold_nm": threshold, "runs": {},
    }
    if fine_ref is not None:
        head_on_reference = {label: predicted_fine_rg2_series(learned, cg_of[label], long_ref.positions)
                             for label, learned in models.items()}
        metrics["fine_rg2_head_on_reference"] = {label: float(np.mean(v)) for label, v in head_on_reference.items()
                                                 if v is not None}
    ref_obs = results["reference MD"]
    for label, replica_runs in runs.items():
        obs = results[label]
        run = replica_runs[0]
        entry: dict[str, Any] = {"duration_ps": max(r.duration_ps for r in replica_runs),
                                 "frames": int(max(len(r.positions) for r in replica_runs))}  # per replica
        if label in wall:
            entry["replicas"] = len(replica_runs)
        if wall.get(label):
            # throughput of all replicas together
            simulated_ps = sum(r.duration_ps for r in replica_runs)
            entry["wall_seconds"] = wall[label]
            entry["simulated_ns_per_day"] = simulated_ps / 1000 / wall[label] * 86400
            entry["steps_per_second"] = sum(len(r.positions) - 1 for r in replica_runs) / wall[label]
        if label in wall:
            entry["pooled_replicas"] = len(pooled[label])
        failed = [r for r in replica_runs if r.failure]
        if failed:
            entry["failed_at_step"], entry["failure"] = failed[0].failed_at_step, failed[0].failure
            entry["failed_replicas"] = len(failed)  # a failure ends every replica of a batched call
        if notes.get(label):
            entry["warnings"] = notes[label]
        if obs.rg2 is not None:
            entry["rg2_mean"], entry["rg2_sem"] = obs.rg2_mean, obs.rg2_sem
            entry["rg2_js_vs_reference"] = _js(ref_obs.rg2, obs.rg2) if run is not long_ref else 0.0
            entry["relaxation_ps_integral"] = obs.relaxation.tau_integral
            entry["relaxation_ps_exp"] = obs.relaxation.tau_exp
        if label in fine:
            entry["fine_rg2_mean"] = float(np.mean(fine[label]))
            entry["fine_rg2_source"] = "atoms" if run is long_ref or run is short_ref else "property head"
        entry["collision_rate_mean"] = float(np.mean(obs.collision)) if len(obs.collision) else None
        if obs.diffusion:
            entry["diffusivity_nm2_per_ps"] = {k: [v.D, v.D_err] for k, v in obs.diffusion.items()}
        peaks = obs.rdf_first_peaks()
        if peaks:
            entry["rdf_first_peak_nm_height"] = {k: list(v) for k, v in peaks.items()}
        metrics["runs"][label] = entry
    if sl_prediction is not None:
        metrics["runs"]["SL GNN"] = {"rg2_mean": sl_prediction}
    if measure_md:
        metrics["md_ns_per_day"] = md_speed_ns_per_day(record)

    # the plots see one run per label: its replicas' frames one after another (the
    # frame-wise panels use the pooled observables)
    merged = [rs[0] if len(rs) == 1 else
              CGRun(label, np.concatenate([rs[i].positions for i in pooled[label]]), step_ps, box)
              for label, rs in runs.items()]
    _plot_system(record.name, merged, results, out_dir, periodic, masses, groups)
    return metrics


def _plot_system(name, runs, results, out_dir: Path, periodic: bool, masses, groups) -> dict:
    """Write the system's PNG plots; returns {file name: matplotlib Figure} of those written."""
    labels = [r.label for r in runs]
    figures = {}
    if results[labels[0]].rg2 is not None:
        # bins span the reference's range (x2.5): a run that drifts far off stays out of view
        upper = 2.5 * float(np.percentile(results[labels[0]].rg2, 99.5))
        figures["rg2_hist.png"] = plots.plot_rg2_histograms(
            {l: results[l].rg2 for l in labels if results[l].rg2 is not None},
            range=(0.0, upper), path=out_dir / "rg2_hist.png",
            title=f"{name}: CG Rg$^2$ (axis: 0-2.5x reference range)")
        with_acf = [l for l in labels if results[l].acf is not None]
        figures["rg2_acf.png"] = plots.plot_acfs(
            {l: (results[l].acf_time, results[l].acf) for l in with_acf},
            relaxation={l: results[l].relaxation for l in with_acf},
            path=out_dir / "rg2_acf.png", title=f"{name}: Rg$^2$ autocorrelation")
    figures["collisions.png"] = plots.plot_collision_rate(
        {l: (np.arange(len(results[l].collision)) * r.dt_ps, results[l].collision) for l, r in zip(labels, runs)},
        path=out_dir / "collisions.png", title=f"{name}: bead collisions")
    if len(groups) == 1 and not periodic:
        learned = [r for r in runs[2:] if len(r.positions) > 10]
        if learned:
            _, surfaces = analysis.pca_free_energy_surfaces(
                runs[0].positions, [r.positions for r in learned], labels=[runs[0].label] + [r.label for r in learned],
                masses=masses, bins=30)
            figures["fes_pca.png"] = plots.plot_free_energy_surfaces(surfaces, path=out_dir / "fes_pca.png")
    if periodic:
        pairs = sorted({p for l in labels for p in results[l].rdfs})
        if pairs:
            data = {f"{a}-{b}": {l: results[l].rdfs[(a, b)] for l in labels if (a, b) in results[l].rdfs}
                    for a, b in pairs}
            figures["rdfs.png"] = plots.plot_rdfs(data, path=out_dir / "rdfs.png")
        species = sorted({s for l in labels for s in results[l].msd})
        data = {s: {l: results[l].msd[s] for l in labels if s in results[l].msd} for s in species}
        fits = {f"{s}/{l}": results[l].diffusion[s] for s in species for l in labels if s in results[l].diffusion}
        if data:
            figures["msd.png"] = plots.plot_msd(data, fits=fits, path=out_dir / "msd.png")
    return figures


# ------------------------------------------------------------------------------- report
def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def summarise(all_metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Errors against the long reference, per method, over systems."""
    methods = sorted({m for s in all_metrics for m in s["runs"] if m != "reference MD"})
    summary = {}
    for method in methods:
        rows = [(s["runs"]["reference MD"], s["runs"][method]) for s in all_metrics if method in s["runs"]]
        out = {}
        pairs = [(r.get("rg2_mean"), m.get("rg2_mean")) for r, m in rows]
        pairs = [(r, m) for r, m in pairs if r is not None and m is not None]
        if pairs:
            ref, est = np.array(pairs).T
            out["rg2_mae_nm2"] = analysis.mean_absolute_error(est, ref)
            out["rg2_mean_relative_error"] = float(np.mean(np.abs(analysis.relative_error(est, ref))))
        pairs = [(r.get("relaxation_ps_integral"), m.get("relaxation_ps_integral")) for r, m in rows]
        pairs = [(r, m) for r, m in pairs if r is not None and m is not None]
        if pairs:
            ref, est = np.array(pairs).T
            out["relaxation_mae_ps"] = analysis.mean_absolute_error(est, ref)
        pairs = [(r.get("fine_rg2_mean"), m.get("fine_rg2_mean")) for r, m in rows]
        pairs = [(r, m) for r, m in pairs if r is not None and m is not None]
        if pairs:
            ref, est = np.array(pairs).T
            out["fine_rg2_mean_relative_error"] = float(np.mean(np.abs(analysis.relative_error(est, ref))))
        js = [m["rg2_js_vs_reference"] for _, m in rows if m.get("rg2_js_vs_reference") is not None]
        if js:
            out["rg2_js_divergence_mean"] = float(np.mean(js))
        diffs = [(r.get("diffusivity_nm2_per_ps", {}), m.get("diffusivity_nm2_per_ps", {})) for r, m in rows]
        for species in sorted({k for r, _ in diffs for k in r}):
            pairs = [(r[species][0], m[species][0]) for r, m in diffs if species in r and species in m]
            if pairs:
                ref, est = np.array(pairs).T
                out[f"D_{species}_mean_relative_error"] = float(np.mean(np.abs(analysis.relative_error(est, ref))))
        errors = [e for r, m in rows for e in analysis.rdf_peak_errors(
            r.get("rdf_first_peak_nm_height", {}), m.get("rdf_first_peak_nm_height", {})).values()]
        shifts, heights = [e[0] for e in errors], [e[1] for e in errors]
        if shifts:
            out["rdf_peak_shift_max_nm"] = float(np.max(shifts))
            out["rdf_peak_height_relative_error_mean"] = float(np.mean(heights))
        coll = [m["collision_rate_mean"] for _, m in rows if m.get("collision_rate_mean") is not None]
        if coll:
            out["collision_rate_mean"] = float(np.mean(coll))
        summary[method] = out
    return summary


def write_report(all_metrics: list[dict], out_dir: Path, context: dict) -> Path:
    summary = summarise(all_metrics)
    (out_dir / "metrics.json").write_text(json.dumps({"context": context, "systems": all_metrics,
                                                      "summary": summary}, indent=2, default=float))
    lines = ["# openmm-cgml evaluation report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "All numbers below were computed by `cgml evaluate` from the trajectories in this run. "
              "Rg² is the mass-weighted radius of gyration of the CG beads (nm²); relaxation times are "
              "the integral of the Rg² autocorrelation to its first zero crossing. "
              "\"short MD\" is the reference cut to the training-trajectory length. "
              "Fine Rg² is the atomistic Rg² (nm²): from the atoms for the MD runs, predicted by the "
              "model's property head from the CG frames for learned runs (– : no head).", ""]
    lines += ["## Summary (errors against the long reference MD, over held-out systems)", "",
              "| method | Rg² MAE (nm²) | Rg² mean rel. error | relaxation MAE (ps) | Rg² JS div. | collisions/bead "
              "| fine Rg² mean rel. error |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary.items():
        lines.append(f"| {method} | {_fmt(s.get('rg2_mae_nm2'))} | {_fmt(s.get('rg2_mean_relative_error'))} | "
                     f"{_fmt(s.get('relaxation_mae_ps'))} | {_fmt(s.get('rg2_js_divergence_mean'))} | "
                     f"{_fmt(s.get('collision_rate_mean'))} | {_fmt(s.get('fine_rg2_mean_relative_error'))} |")
    d_keys = sorted({k for s in summary.values() for k in s if k.startswith("D_")})
    if d_keys:
        lines += ["", "| method | " + " | ".join(d_keys) + " |", "| --- |" + " --- |" * len(d_keys)]
        for method, s in summary.items():
            lines.append(f"| {method} | " + " | ".join(_fmt(s.get(k)) for k in d_keys) + " |")
    if any("rdf_peak_shift_max_nm" in s for s in summary.values()):
        lines += ["", "RDF first peaks (bead species pairs; the first local maximum above 1 of the 3-bin "
                  "smoothed g(r)), against the reference's, over the pairs whose reference peak rises above "
                  f"g = {analysis.RDF_PEAK_MIN_HEIGHT:g}:", "",
                  "| method | largest peak shift (nm) | mean peak-height relative error |", "| --- | --- | --- |"]
        for method, s in summary.items():
            if "rdf_peak_shift_max_nm" in s:
                lines.append(f"| {method} | {_fmt(s['rdf_peak_shift_max_nm'])} | "
                             f"{_fmt(s['rdf_peak_height_relative_error_mean'])} |")
    lines += ["", "## Per system", ""]
    for m in all_metrics:
        lines += [f"### {m['system']}", "",
                  f"{m['n_atoms']} atoms -> {m['n_beads']} beads; learned step {m['step_ps']:g} ps; "
                  f"reference {m['reference_ps']:g} ps; training trajectories {m['training_ps']:g} ps; "
                  f"rollouts {m['rollout_steps']} steps ({m['rollout_steps'] * m['step_ps']:g} ps)"
                  + (f", {m['replicas']} replicas each from start windows evenly spaced over the reference "
                     "(observables pooled over the replicas that ran the whole rollout; ± is the standard error "
                     "of their means; speed counts all replicas)" if m.get("replicas", 1) > 1 else "")
                  + ".", "",
                  "| run | duration (ps) | <Rg²> (nm²) | ± | relaxation (ps) | JS vs ref | collisions/bead | speed (ns/day) "
                  "| fine <Rg²> (nm²) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in m["runs"].items():
            lines.append(f"| {label} | {_fmt(r.get('duration_ps'), 5)} | {_fmt(r.get('rg2_mean'))} | "
                         f"{_fmt(r.get('rg2_sem'), 2)} | {_fmt(r.get('relaxation_ps_integral'))} | "
                         f"{_fmt(r.get('rg2_js_vs_reference'))} | {_fmt(r.get('collision_rate_mean'))} | "
                         f"{_fmt(r.get('simulated_ns_per_day'))} | {_fmt(r.get('fine_rg2_mean'))} |")
            if r.get("failure"):
                lines.append(f"|  | failed at step {r['failed_at_step']}: {r['failure'][:120]} | | | | | | | |")
            for note in r.get("warnings", []):
                lines.append(f"|  | warning: {note[:160]} | | | | | | | |")
        if m.get("fine_rg2_head_on_reference"):
            ref_fine = m["runs"].get("reference MD", {}).get("fine_rg2_mean")
            parts = [f"{label} {_fmt(v)} nm²" for label, v in m["fine_rg2_head_on_reference"].items()]
            lines += ["", f"Property head on the reference's own CG frames: {', '.join(parts)} (true fine "
                          f"<Rg²> {_fmt(ref_fine)} nm²; reference CG <Rg²> "
                          f"{_fmt(m['runs'].get('reference MD', {}).get('rg2_mean'))} nm²)."]
        if m.get("md_ns_per_day"):
            fastest = max((r.get("simulated_ns_per_day") or 0) for r in m["runs"].values())
            together = " (all its replicas together)" if m.get("replicas", 1) > 1 else ""
            lines += ["", f"Reference MD of the fine system runs at {m['md_ns_per_day']:.3g} ns/day here; "
                          f"the fastest learned run at {fastest:.3g} ns/day{together} "
                          f"({fastest / m['md_ns_per_day']:.3g}x)."]
        sysdir = m["system"]
        lines += [""] + [f"![{p}]({sysdir}/{p})" for p in ("rg2_hist.png", "rg2_acf.png", "fes_pca.png",
                                                           "collisions.png", "rdfs.png", "msd.png")
                         if (out_dir / sysdir / p).exists()] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- driver
def run_evaluation(model_dirs: dict[str, str | os.PathLike], data_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, *, rollout_factor: float = 10.0, seed: int = 1,
                   sl_baseline: bool = True, progress: bool = True, measure_md: bool = True,
                   replicas: int = 1, langevin: dict[str, Any] | None = None, compiled: bool = False) -> Path:
    """Evaluate the models on every held-out (split="test") system of ``data_dir``;
    ``replicas``, ``langevin``, ``compiled``: see :func:`evaluate_system`."""
    check_rollout_factor(rollout_factor)
    check_seed(seed)
    check_replicas(replicas)
    check_seed(seed + replicas - 1)  # periodic systems' replicas run with seeds seed, seed + 1, ...
    if not model_dirs:
        raise ValueError("no model to evaluate: give at least one exported model directory")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; make it with `cgml generate`")
    train_ps = training_length_ps(data_dir)
    tests = list_trajectories(data_dir, split="test")
    if not tests:
        raise ValueError(f"no held-out (split='test') trajectories in {data_dir}")
    models = {label: load_model(path) for label, path in model_dirs.items()}
    check_langevin(models, langevin or {})
    first = next(iter(models.values()))
    for directory in tests:  # before any work: every held-out reference has the start windows
        n_frames = read_metadata(directory).get("n_frames")
        if n_frames is not None:
            check_start_windows(int(n_frames), first.seqLen, first.dilation, replicas, f"the reference {directory.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sl = fit_sl_baseline(first, data_dir) if sl_baseline else None
    all_metrics = []
    for directory in tqdm(tests, desc="held-out systems", disable=not progress):
        record = load_trajectory(directory)
        cg = first.coarseGrain(record)
        prediction = None
        if sl is not None:
            from openmm_cgml.baselines import FineGraph

            try:
                prediction = sl.predict(FineGraph.from_mapping(cg.mapping))
            except ValueError:
                prediction = None
        all_metrics.append(evaluate_system(record, models, train_ps, rollout_factor, out_dir / record.name,
                                           seed=seed, progress=progress, sl_prediction=prediction,
                                           ablation_model=next(iter(models)), measure_md=measure_md, cg=cg,
                                           replicas=replicas, langevin=langevin, compiled=compiled))
    context = {"data": str(data_dir), "models": {k: str(v) for k, v in model_dirs.items()},
               "rollout_factor": rollout_factor, "replicas": replicas, "training_trajectory_ps": train_ps,
               **({"refinement": langevin} if langevin else {}), **({"compiled": True} if compiled else {}),
               "held_out_systems": len(all_metrics)}
    return write_report(all_metrics, out_dir, context)


def check_rollout_factor(value) -> float:
    """The rollout length factor: a finite number > 0 (0 would evaluate an empty rollout)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"rollout factor must be a positive number (rollout length in units of the "
                         f"training-trajectory length), got {value!r}")
    return float(value)


def refinement_settings(langevin_steps: int | None = None, langevin_levels: int | None = None) -> dict[str, int]:
    """The refinement overrides that are set, as ``LearnedSimulator.rollout``'s ``langevin``."""
    return {key: value for key, value in (("langevinSteps", langevin_steps), ("langevinLevels", langevin_levels))
            if value is not None}


def check_langevin(models: dict[str, Any], langevin: dict[str, Any]) -> None:
    """Refuse refinement settings the models with a score model cannot run, before any work."""
    steps, levels = langevin.get("langevinSteps"), langevin.get("langevinLevels")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"Langevin steps must be an integer >= 0, got {steps!r}")
    for label, learned in models.items():
        ladder = len(learned.manifest.get("sigmas_nm") or [])
        if levels is not None and learned.scorePath is not None and not 1 <= levels <= ladder:
            raise ValueError(f"Langevin levels must be in [1, {ladder}] (model {label!r}'s noise ladder), "
                             f"got {levels!r}")


def check_replicas(value) -> int:
    """The number of replicas per learned run: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {value!r}")
    return int(value)


def check_seed(value) -> int:
    """A random seed the integrator accepts: an integer in [0, 2**31)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2147483647], got {value!r}")
    return value


def load_model(path: str | os.PathLike):
    """``LearnedSimulator.load``, with errors that name the model directory."""
    import pickle

    from openmm_cgml.simulator import LearnedSimulator

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (write one with `cgml export CKPT -o DIR`)")
    try:
        return LearnedSimulator.load(path)
    except FileNotFoundError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"{path}: cannot load the exported model: {first}") from error


def fit_sl_baseline(learned, data_dir: Path):
    """Fit the SL GNN on the training systems' mean CG Rg^2 (systems with molecules to measure)."""
    from openmm_cgml.baselines import FineGraph, SupervisedBaseline

    graphs, targets = [], []
    for directory in list_trajectories(data_dir, split="train"):
        record = load_trajectory(directory)
        cg = learned.coarseGrain(record)
        groups = molecule_groups(cg.mapping)
        if not groups:
            continue
        x = cg.mapping.map_positions(record.positions)
        graphs.append(FineGraph.from_mapping(cg.mapping))
        targets.append(float(rg2_series(x, cg.mapping.bead_masses, groups).mean()))
    return SupervisedBaseline().fit(graphs, targets) if graphs else None


def _run_evaluate(args) -> int:
    models = {}
    for item in args.model:
        label, _, path = item.rpartition("=")
        if not path:
            raise ValueError(f"--model {item!r}: no model directory (expected DIR or LABEL=DIR)")
        label = label or Path(path).name
        if label in models:
            raise ValueError(f"--model: label {label!r} given twice (use LABEL=DIR to tell the models apart)")
        models[label] = path
    report = run_evaluation(models, args.data, args.out, rollout_factor=args.rollout_factor, seed=args.seed,
                            sl_baseline=not args.no_sl, progress=not args.no_progress,
                            measure_md=not args.no_md_timing, replicas=args.replicas,
                            langevin=refinement_settings(args.langevin_steps, args.langevin_levels),
                            compiled=args.compiled)
    print(f"report: {report}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate exported models against reference MD",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="exported model directory, optionally LABEL=DIR; repeat for several backbones")
    p.add_argument("--data", required=True, help="data directory written by `cgml generate`")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--rollout-factor", type=float, default=10.0,
                   help="learned rollout length in units of the training-trajectory length (default 10)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1,
                   help="rollouts per learned run, from start windows evenly spaced over the reference; "
                        "advanced together in one integrator call for non-periodic systems (default 1)")
    p.add_argument("--langevin-steps", type=int, default=None,
                   help="Langevin steps per noise level of the refined runs (default: each model's)")
    p.add_argument("--langevin-levels", type=int, default=None,
                   help="refine over the N smallest noise levels only (default: each model's whole ladder)")
    p.add_argument("--compiled", action="store_true",
                   help="run the learned models with their networks compiled for this CPU (AOTInductor; the same "
                        "results to float32 round-off, faster; compiled once, ~15 s per network, then cached)")
    p.add_argument("--no-sl", action="store_true", help="skip the supervised GNN baseline")
    p.add_argument("--no-md-timing", action="store_true", help="skip timing the reference MD")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_evaluate)
