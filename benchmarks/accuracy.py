"""Chain accuracy benchmark: learned rollouts on held-out chains against long MD.

Reads the committed reference summary (``benchmarks/accuracy_reference.{json,npz}``,
made by ``accuracy_reference.py``: class-II chains of 40 and 60 monomers, 50,000 tau
of MD each), rolls each chain out with a model (``cgml export`` directory) from the
reference's first frames, for ``--seeds`` rollout seeds, with and without score
refinement, and prints side by side with MD as long as the training data ("short
MD", the first ``--train-tau`` of each reference):

- <Rg^2> relative error (CG level, the model's cg_level) and, with a property head,
  the fine-level <Rg^2> relative error;
- Rg^2 relaxation time relative error (ACF integral; rollout and reference series of
  the same length, so the estimator's bias cancels);
- Jensen-Shannon distance of the Rg^2 distribution (the reference's histogram bins);
- collisions per bead (the reference's 1 % nearest-non-bonded quantile) against the
  reference's own rate;
- failures (a rollout that stopped: NaN, ...).

    python benchmarks/accuracy.py --model runs/demo/model [--steps 20000] [--seeds 3]

Targets (issue 9): mean |<Rg^2> error| <= 5 % and below short MD's, no systematic
sign; relaxation within 25 %; collisions <= 2x the reference's; stable over 10^5 steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from accuracy_reference import SERIES_NPZ, SUMMARY_JSON  # noqa: E402


def _tau(series: np.ndarray, dt: float) -> float:
    from openmm_cgml import analysis

    return float(analysis.relaxation_time(analysis.autocorrelation(series, max_lag=min(len(series) // 4, 2000)),
                                          dt).tau_integral)


def _reference_tau(series: np.ndarray, length: int, dt: float) -> float:
    """Mean relaxation time of up to 20 non-overlapping reference segments of ``length``
    frames: the same estimator on the same length as the series it is compared with."""
    starts = range(0, len(series) - length + 1, length)
    taus = [_tau(series[s:s + length], dt) for s in list(starts)[:20]]
    return float(np.mean(taus))


def _js(values: np.ndarray, histogram: dict) -> float:
    edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"], dtype=float)
    mine, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    p, q = counts / counts.sum(), mine / max(mine.sum(), 1)
    m = 0.5 * (p + q)
    kl = lambda a, b: float(np.sum(a[a > 0] * np.log2(a[a > 0] / b[a > 0])))  # noqa: E731
    return float(np.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m)))


def chain_spec(entry: dict):
    """The reference chain's spec, rebuilt exactly as accuracy_reference.py made it."""
    from accuracy_reference import EQUILIBRATION_TAU, N_CHAINS, N_FRAMES

    from openmm_cgml.systems import chain

    specs = chain.make_specs("full", entry["set_seed"], n_train=0, n_test=N_CHAINS, n_monomers=entry["monomers"],
                             n_frames_test=N_FRAMES, equilibration_tau=EQUILIBRATION_TAU)
    (spec,) = [s for s in specs if s.name == entry["key"].split("/")[1]]
    if spec.composition["sequence"] != entry["sequence"]:
        raise RuntimeError(f"{entry['key']}: the rebuilt spec's sequence differs from the summary's")
    return spec


def rollout(learned, entry: dict, starts: np.ndarray, steps: int, seed: int, score: bool,
            limits: bool = True) -> dict:
    from openmm import unit

    from openmm_cgml import analysis
    from openmm_cgml.systems import chain

    built = chain.build(chain_spec(entry))
    cg = learned.coarseGrain(built.topology, starts[-1], masses=np.asarray(entry["masses_amu"]))
    run = learned.rollout(cg, cg.map_trajectory(starts).value_in_unit(unit.nanometer), steps, score=score, seed=seed,
                          limits=limits)
    positions = run.positions.astype(np.float64)
    done = len(positions) - 1
    masses = np.asarray(cg.mapping.bead_masses, dtype=np.float64)
    out = {"steps": done, "failure": run.failure.splitlines()[0] if run.failure else None,
           "seconds": run.wall_seconds, "corrections_per_bead_step": run.limit_corrections / max(done * cg.n_beads, 1),
           "rg2": analysis.radius_of_gyration_squared(positions, masses), "positions": positions,
           "bonds": np.asarray(cg.bonds)}
    if learned.property_model is not None:  # the fine-level Rg^2 the head predicts (one chain)
        out["fine_rg2"] = np.asarray(learned.fineRg2(cg, positions)).reshape(len(positions), -1).mean(axis=1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported model directory")
    parser.add_argument("--steps", type=int, default=20_000, help="learned steps per rollout (default 20,000)")
    parser.add_argument("--score-steps", type=int, default=2_000,
                        help="steps per rollout with refinement (slower; default 2,000)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-tau", type=float, nargs="+", default=[1_500.0],
                        help="training trajectory length(s), one short-MD baseline each (default 1,500 tau)")
    parser.add_argument("--sl-data", type=Path,
                        help="a data set (e.g. the model's training data) to fit the SL GNN baseline on")
    parser.add_argument("--chains", nargs="+", help="only these reference chains (keys, e.g. len40/chain_test_000)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    args = parser.parse_args(argv)

    from openmm_cgml import analysis
    from openmm_cgml.simulator import LearnedSimulator

    if not SUMMARY_JSON.is_file():
        sys.exit(f"no {SUMMARY_JSON}: run accuracy_reference.py generate and summarize first")
    summary = json.loads(SUMMARY_JSON.read_text())
    series = np.load(SERIES_NPZ)
    learned = LearnedSimulator.load(args.model)
    level = learned.manifest["cg"]["cg_level"]
    if str(int(level)) not in summary["chains"][0]["cg"] or int(level) != level:
        sys.exit(f"the model's cg_level {level} is not summarised (have {summary['cg_levels']})")
    level = str(int(level))
    dt = float(learned.manifest["step_size_ps"])
    # (label, score refinement, steps, the model's distance limits on)
    variants = [("learned", True, args.score_steps, True)] if learned.manifest["files"].get("score") else []
    variants.append(("learned (no score)", False, args.steps, True))
    if learned.manifest.get("exclusion_distance_nm", 0.0) > 0 or learned.manifest.get("bond_length_limit_nm", 0.0) > 0:
        variants.append(("learned (no score, no limits)", False, args.steps, False))
    short_labels = [f"short MD ({tau:,.0f} tau)" for tau in args.train_tau]
    sl = None
    if args.sl_data is not None:
        from openmm_cgml.evaluate import fit_sl_baseline

        sl = fit_sl_baseline(learned, args.sl_data)
    rows = []
    chains = [c for c in summary["chains"] if not args.chains or c["key"] in args.chains]
    if not chains:
        sys.exit(f"--chains {args.chains}: none of {[c['key'] for c in summary['chains']]}")
    for entry in chains:
        ref = entry["cg"][level]
        ref_series = series[f"{entry['key']}/cg{level}"].astype(np.float64)
        record_dt = entry["record_interval_ps"]
        stride = max(1, int(round(dt / record_dt)))
        row = {"chain": entry["key"], "monomers": entry["monomers"], "reference_rg2": ref["mean"],
               "reference_rg2_error": ref["mean_error"], "reference_relaxation_ps": ref["relaxation_ps"],
               "reference_collisions": ref["collisions_per_bead"]}
        for label, train_tau in zip(short_labels, args.train_tau):
            n_short = int(train_tau / record_dt) + 1
            short = ref_series[:n_short]
            short_fine = series[f"{entry['key']}/fine"][:n_short].astype(np.float64)
            row[label] = {"rg2_error": short.mean() / ref["mean"] - 1,
                          "fine_rg2_error": short_fine.mean() / entry["fine"]["mean"] - 1,
                          "relaxation_error": _tau(short, record_dt) / _reference_tau(ref_series, n_short, record_dt)
                          - 1,
                          "js": _js(short, ref["histogram"])}
        starts = series[f"{entry['key']}/start_positions"].astype(np.float64)  # map_trajectory picks every dilation-th
        if sl is not None:
            from openmm_cgml.baselines import FineGraph
            from openmm_cgml.systems import chain

            cg = learned.coarseGrain(chain.build(chain_spec(entry)).topology, starts[-1], masses=np.asarray(entry["masses_amu"]))
            graph = FineGraph.from_mapping(cg.mapping)
            row["SL GNN"] = {"rg2_error": sl.predict(graph) / ref["mean"] - 1}
        for label, score, steps, limits in variants:
            runs = [rollout(learned, entry, starts, steps, seed, score, limits) for seed in range(1, args.seeds + 1)]
            per_seed = []
            for run in runs:
                rg2 = run["rg2"]
                n = min(len(rg2), len(ref_series[::stride]))
                relax = _tau(rg2[:n], dt) / _reference_tau(ref_series[::stride], n, dt) - 1 if n > 8 else float("nan")
                collisions = analysis.collision_rate(run["positions"][::max(1, len(rg2) // 2000)],
                                                     ref["collision_threshold_nm"], bonds=run["bonds"]).mean()
                result = {"rg2_error": rg2.mean() / ref["mean"] - 1, "relaxation_error": relax,
                          "js": _js(rg2, ref["histogram"]), "collisions": float(collisions),
                          "steps": run["steps"], "failure": run["failure"],
                          "corrections_per_bead_step": run["corrections_per_bead_step"],
                          "min_distance_nm": float(np.nanmin(analysis.nearest_nonbonded_distances(
                              run["positions"], bonds=run["bonds"],
                              frames=np.arange(0, len(rg2), max(1, len(rg2) // 2000))))),
                          "steps_per_second": run["steps"] / max(run["seconds"], 1e-9)}
                if "fine_rg2" in run:
                    result["fine_rg2_error"] = run["fine_rg2"].mean() / entry["fine"]["mean"] - 1
                per_seed.append(result)
            row[label] = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]
                          if isinstance(per_seed[0][k], (int, float))}
            row[label]["seed_spread_rg2_error"] = float(np.std([r["rg2_error"] for r in per_seed]))
            row[label]["failures"] = sum(r["failure"] is not None for r in per_seed)
        rows.append(row)
        print(f"{entry['key']}: done", flush=True)

    labels = short_labels + (["SL GNN"] if sl is not None else []) + [label for label, _, _, _ in variants]
    print("\n| method | mean abs <Rg2> error | mean signed | fine <Rg2> error | relaxation error | JS | "
          "collisions / reference | closest approach (nm) | failures | seed spread of <Rg2> error |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def mean_of(label, key, absolute=False):
        values = [r[label][key] for r in rows if key in r[label] and np.isfinite(r[label][key])]
        values = np.abs(values) if absolute else values
        return float(np.mean(values)) if len(values) else float("nan")

    for label in labels:
        collisions = [r[label]["collisions"] / r["reference_collisions"] for r in rows if "collisions" in r[label]]
        closest = min((r[label]["min_distance_nm"] for r in rows if "min_distance_nm" in r[label]), default=np.nan)
        print(f"| {label} | {mean_of(label, 'rg2_error', True):.1%} | {mean_of(label, 'rg2_error'):+.1%} | "
              f"{mean_of(label, 'fine_rg2_error', True):.1%} | {mean_of(label, 'relaxation_error', True):.0%} | "
              f"{mean_of(label, 'js'):.3f} | {(f'{np.mean(collisions):.1f}x' if collisions else '-')} | "
              f"{(f'{closest:.2f}' if collisions else '-')} | "
              f"{sum(r[label].get('failures', 0) for r in rows)} | "
              f"{mean_of(label, 'seed_spread_rg2_error'):.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
