"""Rollout validation: rank models by what users need, not by the one-step loss.

A one-step NLL barely separates models whose long rollouts differ completely (a model
at NLL 0.999 let chains collapse where one at 1.10 did not). During training, the
current networks are scripted and run through the real integrator (``CGMLIntegrator``,
the C++ step, as a user runs them) from a few reference windows of each validation
system, and the rollouts are compared with that system's own trajectory:

- ``rollout_rg2_bias``: signed relative error of <Rg^2> (mean over molecules of at least
  two beads), averaged over systems; its absolute value enters the score;
- ``rollout_collisions`` / ``reference_collisions``: non-bonded bead pairs closer than
  the reference's 1 % quantile of nearest-non-bonded distances, per bead and frame
  (``analysis.collision_rate``), pooled over systems;
- ``rollout_relaxation_error``: relative error of the Rg^2 relaxation time (integral of
  the ACF), each rollout against the reference segment that follows its start, cut to
  the same length (the estimator's short-series bias then cancels);
- ``rollout_failures``: rollouts that ended early (NaN, ...).

``rollout_score`` = mean |rg2 bias| + |relaxation error| (the accuracy benchmark's two
targets, both relative; lower is better; a failed rollout scores infinity). The
trainer keeps the checkpoint with the lowest score as ``best.pt``. Collisions are
logged and plotted but not scored: in the demo they grew while the Rg^2 bias fell
(1.63 -> -0.04 over training, collisions 0.028 -> 0.136 per bead against 0.005), and a
score that counted their relative error chose the step-200 model whose chains then grew
30-fold over 3,000 steps. Excluded volume is refinement's job, not model selection's.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from openmm_cgml import analysis


@dataclass
class _System:
    name: str
    masses: np.ndarray         # [N] amu
    bonds: np.ndarray          # [E, 2]
    groups: list               # bead indices of molecules with >= 2 beads
    starts: list               # [seq_len, N, 3] reference windows, one step apart
    start_frames: list         # index (in reference_rg2) of each window's newest frame
    periodic: bool
    box: np.ndarray | None     # [3, 3]
    reference_rg2: np.ndarray  # [F] per reference frame at the learned step
    threshold: float           # collision distance, nm
    reference_collisions: float
    graph: dict                # the fine graph, for the embedding GNN


def _script_bytes(module: torch.nn.Module, kind: str) -> bytes:
    from openmm_cgml.models.torchscript import script_checked

    buffer = io.BytesIO()
    torch.jit.save(script_checked(module, kind)[1], buffer)
    return buffer.getvalue()


class RolloutValidator:
    """Short rollouts of the validation systems of a ``WindowDataset``.

    ``n_starts`` windows per system, evenly spaced over its trajectory, each rolled out
    for ``n_steps`` learned steps; ``score``: refine with the score model too."""

    def __init__(self, dataset, dilation: int, n_steps: int = 100, n_starts: int = 4, max_systems: int = 4,
                 seed: int = 0, score: bool = False):
        if n_steps < 2 or n_starts < 1 or max_systems < 1:
            raise ValueError("need n_steps >= 2, n_starts >= 1, max_systems >= 1")
        self.n_steps, self.seed, self.score = int(n_steps), int(seed), bool(score)
        self.systems: list[_System] = []
        seq_len = dataset.seq_len
        for trajectory, graph in list(zip(dataset.trajectories, dataset.systems))[:max_systems]:
            frames = trajectory.positions[::dilation].astype(np.float64)  # one learned step apart
            if frames.shape[0] < seq_len + 1:
                continue
            mapping = trajectory.mapping
            groups = [np.flatnonzero(mapping.molecule_of_bead == m) for m in np.unique(mapping.molecule_of_bead)]
            groups = [g for g in groups if len(g) >= 2]
            if not groups:
                continue
            box = trajectory.box[::dilation] if trajectory.box is not None else None
            first = np.linspace(0, frames.shape[0] - seq_len, n_starts).round().astype(int)
            threshold = analysis.collision_threshold(frames, boxes=box, bonds=graph.cg_bonds)
            self.systems.append(_System(
                name=trajectory.name, masses=np.asarray(graph.bead_masses, dtype=np.float64),
                bonds=np.asarray(graph.cg_bonds), groups=groups,
                starts=[frames[s:s + seq_len] for s in sorted(set(first.tolist()))],
                start_frames=[s + seq_len - 1 for s in sorted(set(first.tolist()))],
                periodic=bool(graph.periodic), box=None if box is None else np.asarray(box[-1], dtype=np.float64),
                reference_rg2=self._rg2(frames, graph.bead_masses, groups), threshold=threshold,
                reference_collisions=float(analysis.collision_rate(frames, threshold, box, graph.cg_bonds).mean()),
                graph={k: torch.from_numpy(np.asarray(getattr(graph, k))) for k in
                       ("atom_type", "atom_masses", "fine_bonds", "bond_type", "bead_of_atom")}))

    @staticmethod
    def _rg2(positions, masses, groups) -> np.ndarray:
        per_group = analysis.radius_of_gyration_squared(positions, masses, groups)
        return per_group.mean(axis=1) if per_group.ndim == 2 else per_group

    def __bool__(self) -> bool:
        return bool(self.systems)

    @torch.no_grad()
    def evaluate(self, net) -> dict[str, float]:
        """Roll out ``net`` (a ``CGMLNet``) and compare with the references (see module docs)."""
        dynamics = _script_bytes(net.dynamics, "dynamics")
        score = _script_bytes(net.score, "score") if self.score and net.score is not None else None
        rollouts, failures = [], 0
        for k, system in enumerate(self.systems):
            g = system.graph
            features = net.embedding.bead_features(g["atom_type"], g["atom_masses"], g["fine_bonds"],
                                                   g["bond_type"], g["bead_of_atom"], len(system.masses))
            runs = [self._rollout(system, dynamics, score, features, start, 1 + self.seed * 1000 + k * 100 + j)
                    for j, start in enumerate(system.starts)]
            failures += sum(failed for _, failed in runs)
            rollouts.append([frames for frames, _ in runs])
        return self.compare(rollouts, failures)

    def _rollout(self, system: _System, dynamics: bytes, score: bytes | None, features: torch.Tensor,
                 start: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
        """(frames [n+1, N, 3] from the newest start frame on, whether a step failed)."""
        import openmm
        from openmm import unit

        from openmm_cgml.integrator import CGMLIntegrator

        omm_system = openmm.System()
        for mass in system.masses:
            omm_system.addParticle(float(mass))
        if system.periodic:
            omm_system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in system.box])
        integrator = CGMLIntegrator(dynamics, score)
        integrator.setBeadFeatures(features.float().numpy())
        integrator.setBonds(system.bonds)
        integrator.setUsesPeriodicBoundaryConditions(system.periodic)
        integrator.setRandomNumberSeed(seed)
        context = openmm.Context(omm_system, integrator, openmm.Platform.getPlatformByName("Reference"))
        integrator.setHistory(start)
        frames = [start[-1]]
        try:
            for _ in range(self.n_steps):
                integrator.step(1)
                frames.append(context.getState(getPositions=True).getPositions(asNumpy=True)
                              .value_in_unit(unit.nanometer))
        except openmm.OpenMMException:
            return np.asarray(frames), True
        return np.asarray(frames), False

    def compare(self, rollouts: list, failures: int = 0) -> dict[str, float]:
        """Metrics of ``rollouts`` (per system, a list of [F, N, 3] arrays, nm) against
        each system's reference (see the module docstring)."""
        if len(rollouts) != len(self.systems):
            raise ValueError(f"rollouts for {len(rollouts)} systems, the validator has {len(self.systems)}")
        biases, relax_errors, collisions, reference_collisions = [], [], [], []
        for system, runs in zip(self.systems, rollouts):
            rg2 = np.concatenate([self._rg2(r, system.masses, system.groups) for r in runs])
            reference = float(system.reference_rg2.mean())
            biases.append((float(rg2.mean()) - reference) / reference)
            for r in runs:
                boxes = np.broadcast_to(system.box, (len(r), 3, 3)) if system.periodic else None
                collisions.append(float(analysis.collision_rate(r, system.threshold, boxes, system.bonds).mean()))
            reference_collisions.append(system.reference_collisions)
            relax_errors.append(self._relaxation_error(system, runs))
        c_roll, c_ref = float(np.mean(collisions)), float(np.mean(reference_collisions))
        finite = [e for e in relax_errors if e is not None]
        relaxation = float(np.mean(np.abs(finite))) if finite else 0.0
        score = float(np.mean(np.abs(biases))) + relaxation if failures == 0 else math.inf
        return {"rollout_score": score, "rollout_rg2_bias": float(np.mean(biases)), "rollout_collisions": c_roll,
                "reference_collisions": c_ref, "rollout_failures": float(failures),
                "rollout_relaxation_error": float(np.mean(finite)) if finite else float("nan")}

    def _relaxation_error(self, system: _System, rollouts) -> float | None:
        """Relative error of the Rg^2 relaxation time (ACF integral, in steps), each
        rollout against the reference segment that follows its start, cut to the same
        length: the estimator is biased on short series, alike for both."""
        def tau(series):
            if len(series) < 8 or np.std(series) == 0:
                return None
            value = analysis.relaxation_time(analysis.autocorrelation(series), 1.0).tau_integral
            return value if np.isfinite(value) and value > 0 else None

        rollout_taus, reference_taus = [], []
        for frames, first in zip(rollouts, system.start_frames):
            reference = system.reference_rg2[first:first + len(frames)]
            pair = tau(self._rg2(frames[:len(reference)], system.masses, system.groups)), tau(reference)
            if None not in pair:
                rollout_taus.append(pair[0])
                reference_taus.append(pair[1])
        if not rollout_taus:
            return None
        return float(np.mean(rollout_taus)) / float(np.mean(reference_taus)) - 1.0
