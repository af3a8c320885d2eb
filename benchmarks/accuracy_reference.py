"""Long reference MD for the chain accuracy benchmark, and its stored summary.

The benchmark compares learned rollouts on *held-out* class-II (blocky) chains of two
lengths with MD long enough that the reference's own error is small (>= 100 Rg^2
relaxation times). That MD takes about an hour on one core, so it is run once by

    python benchmarks/accuracy_reference.py generate --data data/accuracy-reference   # resumable
    python benchmarks/accuracy_reference.py summarize --data data/accuracy-reference

and only its summary is committed: ``benchmarks/accuracy_reference.json`` (per chain:
sequence, seed, length, MD settings, fine-level and CG-level <Rg^2>, its blocking
error, std, relaxation time, histogram, and per cg_level the collision threshold and
rate) and ``benchmarks/accuracy_reference.npz`` (the Rg^2 series at every recorded
frame, fine and CG for each candidate cg_level, and the first ``START_FRAMES`` fine
frames that rollouts start from; float32), so that short-MD baselines of any length
and new observables can be computed without rerunning MD. Chains: 3 x 40 and 3 x 60 monomers, class II, 50,000 tau each after
2,000 tau of equilibration, one frame every 5 tau (the two sets can run in parallel:
``generate --set len40`` and ``generate --set len60``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SUMMARY_JSON = HERE / "accuracy_reference.json"
SERIES_NPZ = HERE / "accuracy_reference.npz"
# (dataset name, monomers, seed): seeds chosen apart from every preset's training seeds
SETS = [("len40", 40, 4040), ("len60", 60, 6060)]
N_CHAINS = 3
N_FRAMES = 10_000            # x 5 tau = 50,000 tau
EQUILIBRATION_TAU = 2_000.0
CG_LEVELS = (5, 10, 20)      # candidate atoms per bead, summarised side by side
START_FRAMES = 40            # fine frames stored for rollout starts (>= any seq_len used)


def generate(data: Path, threads: int, progress: bool, only: str | None = None) -> None:
    from openmm_cgml.generate import generate_dataset

    for name, monomers, seed in SETS:
        if only is not None and name != only:
            continue
        generate_dataset("chain", "full", data / name, seed=seed,
                         overrides={"n_train": 0, "n_test": N_CHAINS, "n_monomers": monomers,
                                    "n_frames_test": N_FRAMES, "equilibration_tau": EQUILIBRATION_TAU},
                         platform="CPU", threads=threads, progress=progress)


def _series_summary(series: np.ndarray, dt_ps: float) -> dict:
    from openmm_cgml import analysis

    mean, error = analysis.mean_with_error(series)
    tau = analysis.relaxation_time(analysis.autocorrelation(series, max_lag=min(len(series) // 4, 2000)), dt_ps)
    hist, edges = np.histogram(series, bins=40)
    return {"mean": float(mean), "mean_error": float(error), "std": float(series.std()),
            "relaxation_ps": float(tau.tau_integral), "relaxation_ps_exp": float(tau.tau_exp),
            "n_relaxation_times": float(len(series) * dt_ps / tau.tau_integral),
            "histogram": {"edges": edges.round(6).tolist(), "counts": hist.tolist()}}


def summarize(data: Path, allow_partial: bool = False) -> None:
    from openmm_cgml import analysis
    from openmm_cgml.dataset import mapping_for_trajectory
    from openmm_cgml.trajectories import list_trajectories, load_trajectory, read_metadata

    chains, series = [], {}
    for name, monomers, seed in SETS:
        directories = list_trajectories(data / name, split="test") if (data / name).is_dir() else []
        if len(directories) != N_CHAINS and not allow_partial:
            sys.exit(f"{data / name}: {len(directories)} complete trajectories, expected {N_CHAINS}; "
                     "run `generate` to completion first (or summarize --allow-partial)")
        for directory in directories:
            record = load_trajectory(directory)
            metadata = read_metadata(directory)
            x = record.positions.astype(np.float64)
            masses = np.asarray(metadata["masses_amu"], dtype=np.float64)
            key = f"{name}/{Path(directory).name}"
            entry = {"key": key, "monomers": monomers, "set_seed": seed, "seed": metadata.get("seed"),
                     "sequence": metadata["composition"]["sequence"], "frames": int(x.shape[0]),
                     "record_interval_ps": float(record.record_interval_ps),
                     "duration_ps": float(record.record_interval_ps * (x.shape[0] - 1))}
            fine = analysis.radius_of_gyration_squared(x, masses)
            series[f"{key}/fine"] = fine.astype(np.float32)
            series[f"{key}/start_positions"] = record.positions[:START_FRAMES].astype(np.float32)
            entry["masses_amu"] = masses.tolist()
            entry["fine"] = _series_summary(fine, record.record_interval_ps)
            entry["cg"] = {}
            for level in CG_LEVELS:
                mapping = mapping_for_trajectory(directory, level)
                cg = mapping.map_positions(record.positions).astype(np.float64)
                rg2 = analysis.radius_of_gyration_squared(cg, np.asarray(mapping.bead_masses, dtype=np.float64))
                series[f"{key}/cg{level}"] = rg2.astype(np.float32)
                bonds = np.asarray(mapping.cg_bonds, dtype=np.int64).reshape(-1, 2)
                threshold = analysis.collision_threshold(cg, bonds=bonds)
                frames = np.linspace(0, len(cg) - 1, 2000).astype(int)
                entry["cg"][str(level)] = {
                    "n_beads": int(mapping.n_beads), "collision_threshold_nm": threshold,
                    "collisions_per_bead": float(analysis.collision_rate(cg[frames], threshold, bonds=bonds).mean()),
                    **_series_summary(rg2, record.record_interval_ps)}
            chains.append(entry)
            print(f"{key}: {monomers} monomers, {entry['duration_ps']:.0f} tau, fine <Rg^2> "
                  f"{entry['fine']['mean']:.3f} +- {entry['fine']['mean_error']:.3f} nm^2, relaxation "
                  f"{entry['fine']['relaxation_ps']:.0f} tau ({entry['fine']['n_relaxation_times']:.0f} times)")
    summary = {"description": __doc__.strip().splitlines()[0], "n_frames": N_FRAMES,
               "complete": len(chains) == N_CHAINS * len(SETS),
               "equilibration_tau": EQUILIBRATION_TAU, "cg_levels": list(CG_LEVELS), "chains": chains}
    SUMMARY_JSON.write_text(json.dumps(summary, indent=1) + "\n")
    np.savez_compressed(SERIES_NPZ, **series)
    print(f"wrote {SUMMARY_JSON} and {SERIES_NPZ}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="run (or resume) the reference MD")
    g.add_argument("--data", type=Path, default=Path("data/accuracy-reference"))
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--set", choices=[name for name, _, _ in SETS], help="only this set of chains")
    s = sub.add_parser("summarize", help="write the committed summary from finished MD")
    s.add_argument("--data", type=Path, default=Path("data/accuracy-reference"))
    s.add_argument("--allow-partial", action="store_true",
                   help="summarise the chains that are complete (the summary says it is partial)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args.data, args.threads, not args.no_progress, args.set)
    else:
        summarize(args.data, args.allow_partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
