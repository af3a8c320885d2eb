"""What score refinement buys, and what it costs, on a held-out periodic system
(issues 11 and 13): one exported model, several refinement settings, several seeds,
measured side by side in one run.

For every setting (``none``: dynamics only; ``K[:schedule[:eps[:levels]]]``: K Langevin
steps per noise level of the model's ladder, optionally with another schedule, step size,
or only the smallest ``levels`` noise levels) and seed, the learned simulator runs ``--steps`` steps through
CGMLIntegrator in an app.Simulation from the held-out reference's first frames. Each
rollout and the reference are analysed by the evaluation's own functions
(:mod:`openmm_cgml.evaluate`), and the table gives, over seeds, the mean, its standard
error and the range (min-max):

  ms/step       wall time per learned step (``--threads`` torch threads)
  collisions    mean bead collisions per bead (threshold: the reference's 1 % quantile
                of nearest non-bonded distances, as in ``cgml evaluate``)
  peak shift    largest |first-peak position - reference| over the bead-species RDFs
                whose reference first peak rises above g = 1.5 (nm)
  height err    mean |first-peak height / reference - 1| over those RDFs
  Rg2 ratio     <Rg^2> of the polymer chains (CG, mass-weighted) / the reference's
  MSD ratio     per species, MSD(learned) / MSD(reference) at half the reference's
                length (the longest lag with many time origins in both)

The reference and the short MD (the reference cut to the training length) are scored
the same way. Targets of issue 13: shift <= 0.05 nm, height error <= 15 %, collisions
<= the reference's, MSD ratios within [1/1.5, 1.5].

    python benchmarks/refinement_scan.py MODEL_DIR [--data data/electrolyte-pretrain]
        [--settings none 1 2] [--seeds 1 2 3] [--steps 500] [--threads 1] [--compiled]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def msd_at(result, lag_ps: float) -> float:
    return float(np.interp(lag_ps, result.lag_times, result.msd))


def score_run(obs, ref_obs, ref_peaks, lag_ps) -> dict:
    from openmm_cgml import analysis

    errors = list(analysis.rdf_peak_errors(ref_peaks, obs.rdf_first_peaks()).values())
    shift = max(e[0] for e in errors) if errors else float("nan")
    height = float(np.mean([e[1] for e in errors])) if errors else float("nan")
    ratios = {s: msd_at(obs.msd[s], lag_ps) / msd_at(ref_obs.msd[s], lag_ps) for s in ref_obs.msd if s in obs.msd}
    rg2 = obs.rg2_mean / ref_obs.rg2_mean if obs.rg2_mean is not None and ref_obs.rg2_mean else float("nan")
    return {"collisions": float(np.mean(obs.collision)), "shift": shift, "height": height, "msd": ratios,
            "rg2": rg2}


def spread(values) -> str:
    """Mean, and with several seeds its standard error and the range: 'm ±se (min-max)'."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.3g}"
    return f"{v.mean():.3g} ±{v.std(ddof=1) / np.sqrt(len(v)):.2g} ({v.min():.3g}-{v.max():.3g})"


def parse_setting(setting: str) -> dict:
    """'none' -> {}; 'K[:schedule[:eps[:levels]]]' -> createIntegrator's Langevin overrides
    (an empty field keeps the model's default)."""
    if setting == "none":
        return {}
    parts = setting.split(":")
    out = {"langevinSteps": int(parts[0])}
    if len(parts) > 1 and parts[1]:
        out["langevinSchedule"] = parts[1]
    if len(parts) > 2 and parts[2]:
        out["langevinStepSize"] = float(parts[2])
    if len(parts) > 3 and parts[3]:
        out["langevinLevels"] = int(parts[3])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default="data/electrolyte-pretrain")
    parser.add_argument("--settings", nargs="+", default=["none", "1", "2"],
                        help="'none' (no refinement) or K[:schedule[:eps[:levels]]]: Langevin steps per "
                             "level, optionally the schedule (constant, ncsn), step size eps (nm^2) and the "
                             "number of (smallest) noise levels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compiled", action="store_true",
                        help="run every setting with the networks compiled for this CPU "
                             "(openmm_cgml.compiled; the same settings, a faster route)")
    args = parser.parse_args(argv)

    from openmm_cgml import analysis
    from openmm_cgml.evaluate import bead_species, compute_observables, molecule_groups, training_length_ps
    from openmm_cgml.simulator import CGRun, LearnedSimulator
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    torch.set_num_threads(args.threads)
    learned = LearnedSimulator.load(args.model)
    record = load_trajectory(list_trajectories(args.data, split="test")[0])
    if not record.periodic:
        raise SystemExit("refinement_scan needs a periodic held-out system (RDFs, MSDs)")
    cg = learned.coarseGrain(record)
    mapping = cg.mapping
    dilation, seq_len = learned.dilation, learned.seqLen
    step_ps = dilation * record.record_interval_ps
    reference = mapping.map_positions(record.positions).astype(np.float32)[::dilation]
    box = record.box[-1]
    masses = np.asarray(mapping.bead_masses, dtype=np.float64)
    groups = molecule_groups(mapping)
    species = bead_species(record, mapping)
    bonds = np.asarray(mapping.cg_bonds)
    names = sorted(set(species))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i:]]
    threshold = analysis.collision_threshold(reference, boxes=box, bonds=bonds)
    train_ps = training_length_ps(args.data)
    lag_ps = 0.5 * (len(reference) - 1) * step_ps

    def observe(label, frames):
        return compute_observables(CGRun(label, frames, step_ps, box), masses, groups, species, bonds, threshold,
                                   True, pairs)

    ref_obs = observe("reference MD", reference)
    ref_peaks = ref_obs.rdf_first_peaks()
    short = reference[: int(round(train_ps / step_ps)) + 1]
    print(f"{record.name}: {mapping.n_beads} beads, step {step_ps:g} ps, reference {(len(reference) - 1) * step_ps:g} ps,"
          f" rollouts {args.steps} steps ({args.steps * step_ps / 1000:g} ns = "
          f"{args.steps * step_ps / train_ps:.3g}x the training trajectories); {args.threads} torch thread(s)")
    print(f"collision threshold {threshold:.3f} nm; MSD ratios at {lag_ps:g} ps; seeds {args.seeds}")
    print(f"reference first peaks compared (above g = {analysis.RDF_PEAK_MIN_HEIGHT:g}; nm, height): "
          + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.2f}" for k, v in ref_peaks.items() if v[1] > analysis.RDF_PEAK_MIN_HEIGHT))
    rows = [("reference MD", None, [score_run(ref_obs, ref_obs, ref_peaks, lag_ps)], [])]
    if len(short) > 4:
        rows.append(("short MD", None, [score_run(observe("short MD", short), ref_obs, ref_peaks, lag_ps)], []))
    start = reference[:seq_len].astype(np.float64)
    for setting in args.settings:
        scores, times, failures = [], [], 0
        for seed in args.seeds:
            run = learned.rollout(cg, start, args.steps, score=setting != "none", seed=seed,
                                  langevin=parse_setting(setting), compiled=args.compiled)
            failures += run.failed_at_step is not None
            times.append(run.wall_seconds / max(1, len(run.positions) - 1) * 1000)
            scores.append(score_run(observe(setting, run.positions), ref_obs, ref_peaks, lag_ps))
            print(f"  {setting} seed {seed}: {times[-1]:.3g} ms/step, collisions {scores[-1]['collisions']:.3g}"
                  + (f", failed at step {run.failed_at_step}" if run.failed_at_step else ""),
                  file=sys.stderr, flush=True)
        label = ("no refinement" if setting == "none" else f"refined {setting}") + (" compiled" if args.compiled else "")
        rows.append((label, times, scores, failures))

    species_names = sorted(ref_obs.msd)
    head = (f"{'run':<16} {'ms/step':>24} {'collisions':>30} {'peak shift nm':>30} {'height err':>30} "
            f"{'Rg2 ratio':>30}")
    print("\n" + head + "".join(f" {'MSD ' + s:>30}" for s in species_names) + "  failures")
    for label, times, scores, failures in rows:
        line = (f"{label:<16} {spread(times) if times else '-':>24} {spread([s['collisions'] for s in scores]):>30} "
                f"{spread([s['shift'] for s in scores]):>30} {spread([s['height'] for s in scores]):>30} "
                f"{spread([s['rg2'] for s in scores]):>30}")
        line += "".join(f" {spread([s['msd'].get(n, np.nan) for s in scores]):>30}" for n in species_names)
        print(line + (f"  {failures}" if times else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
