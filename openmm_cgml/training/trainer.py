"""The training loop (``cgml train CONFIG``): ``Trainer(config, out).run()``.

Training scheme (decided here): the three networks are trained *jointly* with one Adam
optimiser on ``loss = NLL_dynamics + score_weight * DSM_score``. With ``detach_latent``
(default) the score loss does not flow into the dynamics GNN, so the dynamics GNN and the
embedding GNN see exactly the gradients they would get when trained alone; the score GNN
learns on the (moving) dynamics latent. ``models: dynamics`` trains without the score.

The property head (``property_weight`` > 0) predicts each molecule's fine-level Rg^2
from the target frame's CG positions and the (detached) bead features; its loss
(mean squared relative error, ``models.losses.property_loss``) is added as
``+ property_weight * property``. It sees no gradient path into the other networks and
its gradients are clipped on their own, so the embedding, dynamics and score GNNs train
exactly as without it. Its no-learning baselines on the same windows (the CG Rg^2 alone,
and a constant ratio fitted on the training windows) are printed, written to
``property_baselines.json`` and logged beside its validation loss.

Randomness: model initialisation uses ``seed``. Every random draw of a training step
(position-noise level and noise, DSM level and noise, the augmenting rotation; all in
``openmm_cgml.models.losses``) comes from a generator seeded by
(seed, step, system, start frame) of each sample, so a step's loss does not depend on
the number of DDP ranks nor on where a run was resumed. The window order is
``DistributedSampler``'s (seed, epoch) permutation; a global batch of B windows is the
same set of windows for any number of ranks dividing B.

Outputs in ``--out`` (default: ``runs/<config name>``)::

    config.yaml          the resolved config
    metrics.csv          step, epoch, train_dynamics, train_score, train_property,
                         train_total, val_dynamics, val_score, val_property,
                         val_property_zero_residual, val_property_constant_ratio
                         (the baselines on the same validation windows),
                         val_rollout_* (score, rg2_bias,
                         collisions, relaxation_error, failures),
                         val_reference_collisions, lr, grad_norm, time_s (wall
                         seconds in training steps, excluding validation and
                         checkpoints), cpu_s (process CPU seconds since start)
    loss_curves.png
    exclusion_calibration.csv  with exclusion_calibration: the rollout validation of each
                         candidate checkpoint at each quantile, and the pair best.pt keeps
    property_baselines.json  the property head's baselines: {"train": {...}, "val": {...}}
                         each {"zero_residual", "constant_ratio", "ratio", "pairs"}
    checkpoints/step_<N>.pt, checkpoints/last.pt, checkpoints/best.pt (lowest rollout
                         score, or validation dynamics NLL without rollouts; what
                         `cgml export RUN` exports unless --last)

Where the parts live: the config keys in :mod:`~openmm_cgml.training.config`, the
checkpoint format in :mod:`~openmm_cgml.training.checkpoint`, the losses in
:mod:`openmm_cgml.models.losses` (wrapped by :class:`openmm_cgml.models.net.CGMLNet`),
data statistics and distance limits in :mod:`~openmm_cgml.training.data`, data
parallelism in :mod:`~openmm_cgml.training.distributed`, the log in
:mod:`~openmm_cgml.training.metrics`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openmm_cgml.analysis import evenly_spaced
from openmm_cgml.files import write_atomic
from openmm_cgml.models.net import CGMLNet
from openmm_cgml.runtime import parse_overrides, versions
from openmm_cgml.training.checkpoint import (CHECKPOINT_FORMAT, build_models_from_checkpoint, find_resume_checkpoint,
                                             load_checkpoint, rng_state, save_checkpoint, seed_everything,
                                             set_rng_state)
from openmm_cgml.training.config import TrainConfig, load_config, set_nested
from openmm_cgml.training.data import (bond_length_limit, build_datasets, data_statistics, distance_pools,
                                       exclusion_distance)
from openmm_cgml.training.distributed import (SkipSampler, average_gradients, broadcast_parameters,
                                              distributed_setup, gloo_worker_threads)
from openmm_cgml.training.metrics import PROPERTY_COLUMNS, plot_metrics, read_metrics, write_metrics
from openmm_cgml.training.optim import lr_factor, make_optimizer


class Trainer:
    """One training run (see the module docstring). ``Trainer(config, out).run()``."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
                 progress: bool = True):
        self.config = config
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.rank, self.world, self._owns_process_group = distributed_setup()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} ranks")
        if config.num_threads:
            torch.set_num_threads(int(config.num_threads))

    # -- setup ---------------------------------------------------------------------------
    def _setup(self) -> None:
        config = self.config
        seed_everything(config.seed)
        # rank 0 coarse-grains first (and writes the CG caches); the others then read them
        if self.world > 1 and self.rank != 0:
            torch.distributed.barrier()
        self.train_set, self.val_set = build_datasets(config)
        if self.world > 1 and self.rank == 0:
            torch.distributed.barrier()
        trajectories = self.train_set.trajectories
        intervals = {round(t.record_interval_ps, 9) for t in trajectories}
        if len(intervals) != 1:
            raise ValueError(f"training trajectories have different record intervals {sorted(intervals)}")
        self.record_interval_ps = float(trajectories[0].record_interval_ps)
        self.step_size_ps = config.dilation * self.record_interval_ps
        self.stats = data_statistics(self.train_set, config.dilation)
        self.model_config = config.model_config(self.step_size_ps)
        if config.score_ladder_from_data is not None:
            top, bottom = config.score_ladder_from_data
            spread = self.stats["acceleration_std"]
            self.model_config = dataclasses.replace(self.model_config, score_sigma_max=top * spread,
                                                    score_sigma_min=bottom * spread)
        self.property_config = None
        if config.property_weight > 0:
            self.property_config = {"hidden_dim": int(config.property_hidden_dim), "hidden_layers": 2}
        self.net = CGMLNet(self.model_config, len(self.train_set.atom_vocabulary),
                           len(self.train_set.bond_vocabulary), with_score=config.models == "both",
                           property_config=self.property_config)
        if self.property_config:
            self.property_config["num_features"] = int(self.net.embedding.num_features)
        num_features = self.net.embedding.num_features
        feature_mean = torch.zeros(num_features)
        feature_std = torch.ones(num_features)
        feature_mean[-1] = self.stats["mass_mean"]
        feature_std[-1] = self.stats["mass_std"]
        self.net.dynamics.set_normalization(self.stats["velocity_std"], self.stats["acceleration_std"],
                                            feature_mean, feature_std)
        self.property_baselines = self._setup_property(feature_mean, feature_std)
        self.distance_pools = distance_pools(self.train_set)  # read again by calibrate_exclusion
        self.net.dynamics.exclusion_distance = exclusion_distance(self.train_set, config.exclusion_quantile,
                                                                  pools=self.distance_pools)
        self.net.dynamics.bond_length_limit = bond_length_limit(self.train_set, config.bond_limit_quantile,
                                                                pools=self.distance_pools)
        if self.rank == 0 and self.progress:
            print(f"distance limits from the training data: excluded volume "
                  f"{self.net.dynamics.exclusion_distance:.4g} nm, bond-length limit "
                  f"{self.net.dynamics.bond_length_limit:.4g} nm (0: off)")
        if self.net.score is not None:
            self.net.score.set_normalization(self.stats["mass_mean"], self.stats["mass_std"])
        self.augment_rotations = (config.augment_rotations if config.augment_rotations is not None
                                  else self.model_config.backbone != "et")
        self.noise_ladder = self.model_config.noise_sigmas() if config.dynamics_noise else None
        self.score_ladder = self.net.score.sigmas.clone() if self.net.score is not None else None
        self.optimizer = make_optimizer(self.net.parameters(), config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(config.schedule, s, config.steps))
        if self.world > 1:
            broadcast_parameters(self.net)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.rows: list[dict] = []
        self.elapsed = 0.0
        self._cpu0 = time.process_time()
        self.periodic = any(s.periodic for s in self.train_set.systems)
        self.validator = None
        rollout = config.rollout
        if rollout["enabled"] and config.val_every and len(self.val_set) and self.rank == 0:
            from openmm_cgml.validation import RolloutValidator

            self.validator = RolloutValidator(self.val_set, config.dilation, rollout["steps"], rollout["starts"],
                                              rollout["systems"], config.seed, rollout["score"]) or None
        self.bond_type_of_pair = self.train_set.bond_type_of_pair

    def _setup_property(self, feature_mean: torch.Tensor, feature_std: torch.Tensor) -> dict[str, Any]:
        """Normalise the property head from the training windows and measure its
        no-learning baselines (train: every training window; val: the windows
        ``validate`` uses). Returns {"train": {...}, "val": {...}} ({} without a head)."""
        from openmm_cgml.models.property import baseline_losses

        if self.net.property is None:
            return {}
        cg, fine = self.train_set.rg2_pairs()
        keep = np.isfinite(fine) & (fine > 0)
        residual = float(np.mean(fine[keep] - cg[keep])) if keep.any() else 1.0
        reference = float(np.mean(cg[keep])) if keep.any() else 1.0
        self.net.property.set_normalization(feature_mean, feature_std, residual, reference)
        train = {**baseline_losses(cg, fine), "pairs": int(keep.sum())}
        baselines: dict[str, Any] = {"train": train, "residual_scale_nm2": residual, "rg2_reference_nm2": reference}
        if len(self.val_set):
            vcg, vfine = self.val_set.rg2_pairs(evenly_spaced(len(self.val_set), self.config.val_max_windows))
            vkeep = np.isfinite(vfine) & (vfine > 0)
            baselines["val"] = {**baseline_losses(vcg, vfine, train["ratio"]), "pairs": int(vkeep.sum())}
        if self.rank == 0 and self.progress:
            text = "; ".join(f"{split}: zero residual {b['zero_residual']:.4g}, constant ratio "
                             f"{b['constant_ratio']:.4g} (c = {b['ratio']:.4g})"
                             for split, b in baselines.items() if isinstance(b, dict))
            print(f"property head baselines (mean squared relative error of fine Rg^2) {text}")
        return baselines

    def _checkpoint_dict(self) -> dict[str, Any]:
        config = self.config
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed,
            "config": config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "atom_vocabulary": list(self.train_set.atom_vocabulary),
            "bond_vocabulary": list(self.train_set.bond_vocabulary),
            "bond_type_of_pair": dict(self.bond_type_of_pair),
            "mapping_options": {"cg_level": float(config.cg_level),
                                "small_molecules_as_beads": bool(config.small_molecules_as_beads),
                                "small_molecule_max_atoms": int(config.small_molecule_max_atoms),
                                "seed": 0},
            "record_interval_ps": self.record_interval_ps,
            "step_size_ps": self.step_size_ps,
            "kind": config.system,
            "periodic": bool(self.periodic),
            "data_statistics": dict(self.stats),
            "exclusion_distance": float(self.net.dynamics.exclusion_distance),
            "bond_length_limit": float(self.net.dynamics.bond_length_limit),
            "train_systems": [s.name for s in self.train_set.systems],
            "val_systems": [s.name for s in self.val_set.systems],
            "embedding": self.net.embedding.state_dict(),
            "dynamics": self.net.dynamics.state_dict(),
            "score": self.net.score.state_dict() if self.net.score is not None else None,
            "property": self.net.property.state_dict() if self.net.property is not None else None,
            "property_config": dict(self.property_config) if self.property_config else None,
            "property_baselines": copy.deepcopy(self.property_baselines),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "metrics": dict(self.rows[-1]) if self.rows else {},
            "selected_by": self.selection_metric,
            "versions": versions(),
        }

    @property
    def selection_metric(self) -> str:
        """The metrics column that chooses best.pt (lower is better)."""
        return "val_rollout_score" if self.validator is not None else "val_dynamics"

    def _best_val(self) -> float:
        """Lowest selection metric logged before the newest row, over trained steps: the
        untrained step-0 networks are logged as a baseline but have no checkpoint (the
        demo's step-0 rollouts once scored best, so no best.pt was ever written)."""
        key = self.selection_metric
        values = [float(r[key]) for r in self.rows[:-1] if r.get(key) not in (None, "") and int(r["step"]) > 0]
        return min(values) if values else float("inf")

    def save_checkpoint(self, best: bool = False) -> Path | None:
        """``checkpoints/step_<N>.pt`` + ``last.pt``; with ``best``, ``best.pt`` only
        (the lowest ``selection_metric`` so far)."""
        if self.rank != 0:
            return None
        directory = self.out / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpoint_dict()
        if best:
            save_checkpoint(ckpt, directory / "best.pt")
            return directory / "best.pt"
        path = directory / f"step_{self.step:07d}.pt"
        save_checkpoint(ckpt, path)
        write_atomic(directory / "last.pt", lambda tmp: shutil.copyfile(path, tmp))
        return path

    def _restore(self, path: Path, ckpt: dict[str, Any] | None = None) -> None:
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if ckpt["model_config"] != self.model_config.to_dict():
            raise ValueError(f"{path}: its model config differs from this config's; cannot resume")
        if (ckpt.get("property") is None) != (self.net.property is None):
            have = "has no property head" if ckpt.get("property") is None else "has a property head"
            raise ValueError(f"{path}: the checkpoint {have} but this config's property_weight is "
                             f"{self.config.property_weight}; resume with the property_weight it was trained with")
        self.net.embedding.load_state_dict(ckpt["embedding"])
        self.net.dynamics.load_state_dict(ckpt["dynamics"])
        if self.net.score is not None:
            self.net.score.load_state_dict(ckpt["score"])
        if self.net.property is not None:
            self.net.property.load_state_dict(ckpt["property"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.elapsed = float(ckpt.get("elapsed_s", 0.0))
        self.rows = read_metrics(self.out / "metrics.csv", self.step)

    # -- data --------------------------------------------------------------------------
    def _loader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        per_rank = self.config.batch_size // self.world
        sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.config.seed, drop_last=True)
        batches_per_epoch = len(sampler) // per_rank
        if batches_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training windows cannot fill one batch of "
                             f"{self.config.batch_size}")
        while True:
            sampler.set_epoch(self.epoch)
            skip = self.batch_in_epoch * per_rank
            loader = DataLoader(self.train_set, batch_size=per_rank, sampler=SkipSampler(sampler, skip),
                                collate_fn=self.train_set.collate, drop_last=True, num_workers=0)
            for batch in loader:
                self.batch_in_epoch += 1  # counted before use: a checkpoint after it skips it
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean losses over a fixed subset of validation windows: clean history (no
        position noise), DSM noise drawn with a fixed key, so values are comparable."""
        from openmm_cgml.models.losses import sample_noise

        if len(self.val_set) == 0:
            return {}
        self.net.eval()
        indices = evenly_spaced(len(self.val_set), self.config.val_max_windows)
        per_rank = max(1, self.config.batch_size // self.world)
        totals: dict[str, float] = {}
        weight = 0
        for start in range(0, len(indices), per_rank):
            batch = self.val_set.collate([self.val_set[i] for i in indices[start:start + per_rank]])
            noise = sample_noise(batch, self.config.seed, -1, None, self.score_ladder, rotate=False)
            losses = self.net(batch, noise, self.config.score_weight, True, self.config.property_weight)
            n = int(batch["system"].numel())
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value) * n
            weight += n
        result = {k: v / weight for k, v in totals.items()}
        if "val" in self.property_baselines:
            result["property_zero_residual"] = self.property_baselines["val"]["zero_residual"]
            result["property_constant_ratio"] = self.property_baselines["val"]["constant_ratio"]
        if self.net.score is not None and self.rank == 0:
            self._log_dsm_levels(indices[:64])
        if self.validator is not None:
            result.update(self.validator.evaluate(self.net))
        self.net.train()
        return result

    @torch.no_grad()
    def _log_dsm_levels(self, indices: list[int]) -> None:
        """Validation DSM loss at each level of the ladder, appended to dsm_levels.csv
        beside its no-information value (1.5: a zero score): where the level lies below
        the data's own next-step spread, little more is learnable."""
        from openmm_cgml.models.losses import sample_noise, score_loss

        batch = self.val_set.collate([self.val_set[i] for i in indices])
        noise = sample_noise(batch, self.config.seed, -1, None, self.score_ladder)
        features = self.net.bead_features(batch)
        _, _, latent = self.net.dynamics.forward_batch(batch["history"], batch["box"], features, batch["cg_bonds"],
                                                       batch["batch"])
        path = self.out / "dsm_levels.csv"
        kept = []  # rows of earlier steps (a resumed run rewrites what came after its checkpoint)
        if path.exists():
            with open(path, newline="") as handle:
                kept = [r for r in csv.reader(handle)][1:]
            kept = [r for r in kept if int(r[0]) < self.step]
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "level", "sigma_nm", "val_dsm", "no_information"])
            writer.writerows(kept)
            for level, sigma in enumerate(self.score_ladder.tolist()):
                value = score_loss(self.net.score, batch["target"], latent, batch["box"], features,
                                   batch["cg_bonds"], batch["batch"], torch.full_like(noise["score_sigma"], sigma),
                                   noise["score_z"])
                writer.writerow([self.step, level, f"{sigma:.6g}", f"{float(value):.6g}", 1.5])

    # -- loop ----------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train up to ``config.steps`` (or stop once ``stop_after`` steps are done,
        checkpointing there: an interruption that ``--resume`` continues exactly)."""
        from openmm_cgml.models.losses import sample_noise

        config = self.config
        last = self.out / "checkpoints" / "last.pt"
        if not self.resume and last.exists():  # every rank: each then stops with this message
            raise FileExistsError(f"{self.out} already holds a run; use --resume or another --out")
        self._setup()
        if self.resume:
            self._restore(*find_resume_checkpoint(last))
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            if self.property_baselines:
                (self.out / "property_baselines.json").write_text(json.dumps(self.property_baselines, indent=1))
        target = config.steps if stop_after is None else min(config.steps, int(stop_after))
        self.net.train()
        if self.step == 0 and config.val_every and self.rank == 0:
            self._log_row(None, self.validate(), float("nan"))
        bar = None
        if self.progress and self.rank == 0 and self.step < target:
            from tqdm.auto import tqdm

            bar = tqdm(total=target, initial=self.step, desc=f"train {config.name or ''}".strip(),
                       dynamic_ncols=True)
        data = self._loader() if self.step < target else iter(())
        window: dict[str, list] = {}
        grad_norm = float("nan")
        t_last = time.perf_counter()
        while self.step < target:
            batch = next(data)
            noise = sample_noise(batch, config.seed, self.step, self.noise_ladder, self.score_ladder,
                                 rotate=self.augment_rotations)
            losses = self.net(batch, noise, config.score_weight, config.detach_latent, config.property_weight)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if self.world > 1:
                average_gradients(self.net, self.world)
            grad_norm = float(nn.utils.clip_grad_norm_(self.net.main_parameters(), config.grad_clip))
            if self.net.property is not None:  # clipped on its own: it cannot scale the others' step
                nn.utils.clip_grad_norm_(self.net.property.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            values = torch.stack([v.detach() for v in losses.values()])
            if self.world > 1:
                torch.distributed.all_reduce(values)
                values /= self.world
            for key, value in zip(losses, values.tolist()):
                window.setdefault(key, []).append(value)
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v[-1]:.3g}" for k, v in window.items()}, refresh=False)
            do_val = config.val_every and (self.step % config.val_every == 0 or self.step == config.steps)
            do_log = self.step % max(1, config.log_every) == 0 or do_val or self.step == target
            if do_log and self.rank == 0:
                val = self.validate() if do_val else {}
                train = {k: float(np.mean(v)) for k, v in window.items()}
                self._log_row(train, val, grad_norm)
                write_metrics(self.out / "metrics.csv", self.rows)
                chosen_by = self.selection_metric
                if chosen_by in self.rows[-1] and float(self.rows[-1][chosen_by]) < self._best_val():
                    self.save_checkpoint(best=True)
                t_last = time.perf_counter()
            if do_log:
                window = {}
            if self.step % max(1, config.checkpoint_every) == 0 or self.step == target:
                self.save_checkpoint()
                if self.rank == 0:
                    write_metrics(self.out / "metrics.csv", self.rows)
                    plot_metrics(self.rows, self.out / "loss_curves.png")
                t_last = time.perf_counter()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            write_metrics(self.out / "metrics.csv", self.rows)
            if not (self.out / "checkpoints" / "last.pt").exists():
                self.save_checkpoint()
            if self.step >= config.steps and config.exclusion_calibration and self.validator is not None:
                self.calibrate_exclusion()
        if self.world > 1:
            torch.distributed.barrier()
        return {"step": self.step, "metrics": self.rows, "out": self.out,
                "checkpoint": self.out / "checkpoints" / "last.pt"}

    def calibrate_exclusion(self, seeds: int = 2) -> dict[str, Any] | None:
        """Choose the exported model and its distance limits together, by rollout
        validation with the limits on: candidates are best.pt and every step checkpoint of
        the second half of training; each is rolled out (the trainer's rollout settings,
        ``seeds`` rollout seeds) at each quantile q of ``exclusion_calibration`` (excluded
        volume at the q quantile of nearest-non-bonded distances, bond-length limit at the
        1 - q quantile of CG bond lengths; 0: neither). The pair with the lowest mean
        rollout score becomes best.pt (what ``cgml export`` exports), with its limits; the
        table goes to ``exclusion_calibration.csv``. Validation systems only: held-out
        test systems play no part. Done once per run (best.pt records it).

        Why not only during training: selection there runs with the initial limits, and
        the limits change which checkpoint rolls out best (a checkpoint whose chains
        swelled by +413 % without a bond-length limit came to -34 % with one).
        """
        from openmm_cgml.validation import RolloutValidator

        directory = self.out / "checkpoints"
        best = directory / "best.pt"
        candidates = {}
        if best.exists():
            best_ckpt = load_checkpoint(best)
            if best_ckpt.get("exclusion_calibration"):
                return best_ckpt["exclusion_calibration"]
            candidates[int(best_ckpt["step"])] = best
        for path in directory.glob("step_*.pt"):
            match = re.fullmatch(r"step_(\d+)\.pt", path.name)
            if match and int(match.group(1)) >= self.config.steps // 2:
                candidates.setdefault(int(match.group(1)), path)
        if not candidates:
            return None
        rollout = self.config.rollout
        validators = [RolloutValidator(self.val_set, self.config.dilation, rollout["steps"], rollout["starts"],
                                       rollout["systems"], self.config.seed + k, False) for k in range(seeds)]
        limits, pools = {}, self.distance_pools
        for quantile in self.config.exclusion_calibration:
            limits[quantile] = ((exclusion_distance(self.train_set, quantile, pools=pools),
                                 bond_length_limit(self.train_set, quantile, pools=pools)) if quantile > 0 else (0.0, 0.0))
        rows = []
        for step in sorted(candidates):
            net = build_models_from_checkpoint(load_checkpoint(candidates[step])).eval()
            for quantile, (distance, limit) in limits.items():
                net.dynamics.exclusion_distance, net.dynamics.bond_length_limit = distance, limit
                results = [validator.evaluate(net) for validator in validators]
                row = {"step": step, "quantile": float(quantile), "distance_nm": distance, "bond_limit_nm": limit}
                row.update({k: float(np.mean([r[k] for r in results])) for k in results[0]})
                rows.append(row)
                if self.progress:
                    print(f"step {step}, limits quantile {quantile:g} (exclusion {distance:.3f} nm, bonds <= "
                          f"{limit:.3f} nm): score {row['rollout_score']:.4f}, Rg^2 bias "
                          f"{row['rollout_rg2_bias']:+.3f}, relaxation error {row['rollout_relaxation_error']:+.3f}, "
                          f"collisions {row['rollout_collisions']:.4f} (reference {row['reference_collisions']:.4f})",
                          flush=True)
        chosen = min(rows, key=lambda r: r["rollout_score"])
        with open(self.out / "exclusion_calibration.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + ["chosen"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "chosen": row is chosen})
        ckpt = load_checkpoint(candidates[chosen["step"]])
        ckpt["exclusion_distance"] = chosen["distance_nm"]
        ckpt["bond_length_limit"] = chosen["bond_limit_nm"]
        ckpt["exclusion_calibration"] = {"chosen_step": chosen["step"], "chosen_quantile": chosen["quantile"],
                                         "rows": rows, "seeds": seeds, "rollout": dict(rollout)}
        ckpt["metrics"] = {**ckpt.get("metrics", {}), **{f"val_{k}": v for k, v in chosen.items()
                                                         if k.startswith("rollout_") or k == "reference_collisions"}}
        save_checkpoint(ckpt, best)
        return ckpt["exclusion_calibration"]

    def close(self) -> None:
        """Destroy the process group this trainer created, and wait for gloo's worker
        threads to end, while the interpreter is fully alive.

        Why: a gloo worker can hold the last reference to a tensor that Python created
        (a collective's input) a moment after the collective completed. If that reference
        drops while the interpreter is finalizing, freeing the tensor needs the GIL, the
        thread is torn down by ``pthread_exit`` inside a noexcept destructor, and the
        process aborts with "terminate called without an active exception" (a rank dying
        at exit, more often on a loaded machine). The group's destructor joins the
        workers (releasing the GIL), but only once nothing references the group any more;
        that is why gradients are averaged here rather than by DistributedDataParallel,
        whose construction leaves references to the group behind for the process's life."""
        if not self._owns_process_group or not torch.distributed.is_initialized():
            return
        torch.distributed.destroy_process_group()
        gc.collect()
        self._owns_process_group = False
        alive = gloo_worker_threads()
        if alive:
            warnings.warn(f"rank {self.rank}: {alive} gloo worker threads still running after the process "
                          "group was destroyed; the process may abort at exit", RuntimeWarning, stacklevel=2)

    def _log_row(self, train: dict | None, val: dict, grad_norm: float) -> None:
        row = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "time_s": round(self.elapsed, 4),
               "cpu_s": round(time.process_time() - self._cpu0, 3)}
        for key, value in (train or {}).items():
            row[f"train_{key}"] = value
        for key, value in val.items():
            row[f"val_{key}"] = value
        self.rows.append(row)


def train(config: TrainConfig | str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, stop_after: int | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns {"step", "metrics" (rows), "out", "checkpoint"}."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        data = config.to_dict()
        for key, value in overrides.items():
            set_nested(data, key, value)
        config = TrainConfig.from_dict(data)
    trainer = Trainer(config, out_dir, resume=resume, progress=progress)
    try:
        return trainer.run(stop_after=stop_after)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- CLI
def _run_train(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.steps is not None:
        overrides["steps"] = args.steps
    config = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / (config.name or Path(args.config).stem)
    trainer = Trainer(config, out, resume=args.resume, progress=not args.no_progress)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if trainer.rank == 0:
        last = result["metrics"][-1] if result["metrics"] else {}
        summary = {k: last.get(k) for k in ("step", "train_dynamics", "train_score", "val_dynamics", "val_score",
                                            *(PROPERTY_COLUMNS if config.property_weight > 0 else ()))}
        print(f"trained to step {result['step']}: {json.dumps(summary)}\ncheckpoint: {result['checkpoint']}")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the embedding, dynamics and score GNNs",
        description="Train from a YAML/TOML config (or a preset name: chain-tiny, chain-demo, "
                    "chain-full, electrolyte-demo, electrolyte-full). Data-parallel under "
                    "`torchrun --nproc_per_node N -m openmm_cgml.cli train ...`.")
    parser.add_argument("config", help="config file or preset name")
    parser.add_argument("--out", help="run directory (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    parser.add_argument("--data-dir", help="override data_dir")
    parser.add_argument("--steps", type=int, help="override steps")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override any config field, dotted for nested (model.backbone=et)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_train)
