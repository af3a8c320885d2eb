"""Snapshot unfinished electrolyte trajectories as a complete data set, for preliminary
training while `cgml generate` is still running (issue 13).

Copies the production chunks recorded so far (``<name>/production/chunk_*.npz``) of
every trajectory of SRC into DST as complete trajectories (metadata says how many
frames and where they came from; no spec fingerprint, so `cgml generate` never resumes
them). The topology is rebuilt from the spec (deterministic for a given seed).

    python benchmarks/snapshot_partial.py data/electrolyte-pretrain data/electrolyte-partial
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from openmm_cgml.systems import get_system_module
    from openmm_cgml.systems.base import SystemSpec
    from openmm_cgml.trajectories import METADATA_FILE, WORK_DIR, write_trajectory

    src, dst = (Path(a) for a in (argv or sys.argv[1:]))
    dst.mkdir(parents=True, exist_ok=True)
    for directory in sorted(p for p in src.iterdir() if (p / METADATA_FILE).is_file()):
        meta = json.loads((directory / METADATA_FILE).read_text())
        chunks = [np.load(c) for c in sorted((directory / WORK_DIR).glob("chunk_*.npz"))]
        if not chunks:
            print(f"{directory.name}: no production frames yet, skipped")
            continue
        n_frames = sum(len(c["positions"]) for c in chunks)
        meta = dict(meta, n_frames=n_frames, complete=True, source=f"partial snapshot of {directory}")
        meta.pop("spec_fingerprint", None)
        built = get_system_module(meta["kind"]).build(
            SystemSpec(meta["kind"], meta["name"], meta["split"], meta["seed"], meta["composition"]))
        write_trajectory(dst / meta["name"], built.topology, [(c["positions"], c["boxes"]) for c in chunks], meta)
        print(f"{meta['name']}: {n_frames} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
