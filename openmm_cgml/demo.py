"""``cgml demo``: the whole pipeline, small, on the embedded chain system.

1. reference MD: bead-spring chains, class I sequences for training and class II
   (blocky, never seen) for testing, with the test references longer than the training
   trajectories (``cgml generate chain --preset demo``);
2. training of the embedding, dynamics and score GNNs (``cgml train chain-demo``);
3. TorchScript export (``cgml export``);
4. learned simulation of the held-out chains through ``CGMLIntegrator`` in an
   ``app.Simulation``, 10x longer than the training trajectories, 4 replicas per chain
   from different reference windows, and the evaluation report against reference MD
   (``cgml evaluate --replicas 4``);
5. the same evaluation of the pretrained chain model shipped with the package
   (``LearnedSimulator.pretrained("chain")``, trained on far more data), so the small
   demo model and the pretrained one are compared on the same held-out chains;
   ``summary.md`` holds both reports.

Every stage resumes: a rerun skips finished trajectories and a finished training run.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

# Annealed Langevin refinement at demo size: 10 noise levels x 2 steps per learned step.
DEMO_TRAINING = {"steps": 1200, "model.score_levels": 10, "model.langevin_steps": 2}
# Rollouts per held-out chain, from start windows spread over its reference, batched in
# one integrator call. One rollout's <Rg^2> is a noisy estimate: on one demo model one
# rollout gave a 5.7 % error and 4 pooled replicas 11.3 % (the Rg^2 relaxation error
# 103 -> 26 ps), the single rollout being the lucky draw; the 4 batched replicas of
# these 8-bead chains took 1.0-1.5x one rollout's wall time.
DEMO_REPLICAS = 4


def run_demo(out: str | Path = "runs/demo", seed: int = 0, rollout_factor: float = 10.0,
             train_steps: int | None = None, progress: bool = True, replicas: int = DEMO_REPLICAS) -> Path:
    from openmm_cgml.evaluate import check_replicas, check_rollout_factor, check_seed, run_evaluation
    from openmm_cgml.packaging import export_checkpoint
    from openmm_cgml.generate import generate_dataset
    from openmm_cgml.simulator import PRETRAINED_DIR, LearnedSimulator
    from openmm_cgml.training import train

    # refuse bad options now, not after minutes of reference MD
    check_rollout_factor(rollout_factor)
    check_replicas(replicas)
    check_seed(seed)
    check_seed(seed + 1)  # the evaluation's seed
    if train_steps is not None and (isinstance(train_steps, bool) or not isinstance(train_steps, int)
                                    or train_steps < 1):
        raise ValueError(f"train steps must be an integer >= 1, got {train_steps!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    data, run, model, report = out / "data", out / "train", out / "model", out / "report"
    timings = {}

    def stage(name):
        print(f"\n== {name} ==", flush=True)
        timings[name] = time.perf_counter()

    stage("1/5 reference MD (chain, class I train / class II test)")
    generate_dataset("chain", "demo", data, seed=seed, progress=progress)  # sizes: systems/chain.py PRESETS
    stage("2/5 training (embedding + dynamics + score GNNs)")
    overrides = dict(DEMO_TRAINING, data_dir=str(data), seed=seed)
    if train_steps is not None:
        overrides["steps"] = train_steps
    last = run / "checkpoints" / "last.pt"
    train("chain-demo", run, resume=last.exists(), progress=progress, overrides=overrides)
    stage("3/5 TorchScript export")
    export_checkpoint(run, model)
    stage("4/5 learned simulation in OpenMM + evaluation")
    path = run_evaluation({"learned (gns)": model}, data, report, rollout_factor=rollout_factor, seed=seed + 1,
                          progress=progress, replicas=replicas)
    stage("5/5 the shipped pretrained chain model on the same held-out chains")
    reports = [("the demo's model, trained in this run", path)]
    if "chain" in LearnedSimulator.available_pretrained():
        pretrained = run_evaluation({"pretrained (chain)": PRETRAINED_DIR / "chain"}, data, out / "report-pretrained",
                                    rollout_factor=rollout_factor, seed=seed + 1, sl_baseline=False,
                                    progress=progress, measure_md=False, replicas=replicas)
        reports.append(("the shipped pretrained chain model (openmm_cgml/pretrained/chain/MODEL_CARD.md)", pretrained))
    else:
        print("no pretrained chain model in this installation: skipped")
    summary = out / "summary.md"
    summary.write_text("# cgml demo\n\n" + "\n\n".join(
        f"## {title}\n\n({report_path})\n\n" + re.sub(r"^(#+) ", r"##\1 ", Path(report_path).read_text(), flags=re.M)
        for title, report_path in reports))
    timings["end"] = time.perf_counter()
    names = list(timings)
    print("\nstage times: " + ", ".join(f"{names[i].split()[0]} {timings[names[i + 1]] - timings[names[i]]:.0f} s"
                                       for i in range(len(names) - 1)))
    print(f"report: {path}\nplots:  {report}/<system>/*.png\nsummary of both models: {summary}")
    return path


def _run(args) -> int:
    run_demo(args.out, seed=args.seed, rollout_factor=args.rollout_factor, train_steps=args.train_steps,
             progress=not args.no_progress, replicas=args.replicas)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate, train, export, simulate and evaluate (small, ~20 min)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rollout-factor", type=float, default=10.0)
    p.add_argument("--train-steps", type=int, help="override the number of training steps")
    p.add_argument("--replicas", type=int, default=DEMO_REPLICAS,
                   help=f"rollouts per held-out chain in the evaluation (default {DEMO_REPLICAS})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)
