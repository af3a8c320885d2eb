"""TorchScript against torch.export + AOTInductor for the shipped score network, side by
side in one run (issue 11: "a model format with a future, which is also faster").

TorchScript is deprecated upstream; torch.export is its successor and AOTInductor
(``.pt2``) its C++ route. The exported networks cannot keep the in-model graph builder
(it branches on data: all pairs vs cell list, bond checks), so this probe exports the
score network *with the graph as an input* (senders, receivers, edge vectors, edge
types; dynamic bead and edge counts) and compares, on the held-out electrolyte box:

  torchscript        the shipped score.pt (graph built inside), one call
  torchscript net    the same archive's ``predict`` on a prebuilt graph
  graph              the graph builder alone (what a graph-as-input contract moves out)
  eager net          the PyTorch module's network on the prebuilt graph
  aoti net           the AOTInductor package of that network, loaded in this process

and checks that every route gives the same score. The integrator's compiled route
(``createIntegrator(compiled=True)``, :mod:`openmm_cgml.compiled`) is this package,
compiled for the system at hand; ``speed.py`` times it in the integrator.

    python benchmarks/export_formats.py [--model DIR] [--data DIR] [--threads 1] [--seconds 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def per_call_ms(fn, seconds: float) -> float:
    """Milliseconds per call of ``fn`` (after 5 warm-up calls), by the project's timing loop."""
    from openmm_cgml.runtime import timed

    for _ in range(5):
        fn()
    calls, wall = timed(lambda n: [fn() for _ in range(n)], seconds)
    return wall / calls * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="exported model directory (default: the shipped electrolyte)")
    parser.add_argument("--data", default="data/electrolyte-pretrain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)

    from openmm_cgml.compiled import ScoreOnGraph
    from openmm_cgml.models import ModelConfig, build_score_model
    from openmm_cgml.models.graph import build_graph
    from openmm_cgml.simulator import LearnedSimulator
    from openmm_cgml.trajectories import list_trajectories, load_trajectory

    torch.set_num_threads(args.threads)
    learned = LearnedSimulator.load(args.model) if args.model else LearnedSimulator.pretrained("electrolyte")
    if learned.scorePath is None:
        raise SystemExit("the model has no score network")
    record = load_trajectory(list_trajectories(args.data, split="test")[0])
    cg = learned.coarseGrain(record)
    x = torch.tensor(cg.mapping.map_positions(record.positions[-1:])[0], dtype=torch.float32)
    box = torch.tensor(record.box[-1], dtype=torch.float32)
    features = torch.tensor(cg.features)
    bonds = torch.tensor(cg.bonds, dtype=torch.int64)
    scripted = torch.jit.load(str(learned.scorePath)).eval()
    dynamics = torch.jit.load(str(learned.dynamicsPath)).eval()
    config = ModelConfig.from_dict(learned.manifest["model_config"])
    eager = build_score_model(config, features.shape[1], int(scripted.latent_dim))
    eager.load_state_dict(scripted.state_dict())
    eager.eval()
    cutoff = float(scripted.cutoff)
    with torch.no_grad():
        _, _, latent = dynamics(torch.stack([x] * learned.seqLen), box, features, bonds)
        sigma = scripted.sigmas[-1].clone()
        graph = build_graph(x, box, bonds, cutoff, "all_pairs")
        senders, receivers, edge_vec, edge_type = graph
        net_inputs = (latent, features, sigma, senders, receivers, edge_vec, edge_type)
        net = ScoreOnGraph(eager).eval()
        reference = scripted(x, latent, box, features, bonds, sigma)
        print(f"{record.name}: {cg.n_beads} beads, {senders.numel()} edges; {args.threads} thread(s)")
        rows = {
            "torchscript": per_call_ms(lambda: scripted(x, latent, box, features, bonds, sigma), args.seconds),
            "torchscript net": per_call_ms(lambda: scripted.predict(latent, scripted.conditions(features, sigma),
                                                                    senders, receivers, edge_vec, edge_type),
                                           args.seconds),
            "graph": per_call_ms(lambda: build_graph(x, box, bonds, cutoff, "all_pairs"), args.seconds),
            "eager net": per_call_ms(lambda: net(*net_inputs), args.seconds),
        }
        outputs = {"eager net": net(*net_inputs)}

    n_dim, e_dim = torch.export.Dim("beads", min=2), torch.export.Dim("edges", min=2)
    dynamic = ({0: n_dim}, {0: n_dim}, None, {0: e_dim}, {0: e_dim}, {0: e_dim}, {0: e_dim})
    start = time.perf_counter()
    exported = torch.export.export(net, net_inputs, dynamic_shapes=dynamic)
    export_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / "score.pt2"))
        compile_s = time.perf_counter() - start
        size_mb = Path(package).stat().st_size / 1e6
        compiled = torch._inductor.aoti_load_package(package)
        with torch.no_grad():
            outputs["aoti net"] = compiled(*net_inputs)
            rows["aoti net"] = per_call_ms(lambda: compiled(*net_inputs), args.seconds)
            # another system size through the same package (dynamic shapes)
            half = cg.n_beads // 2
            keep = (senders < half) & (receivers < half)
            small = (latent[:half], features[:half], sigma, senders[keep], receivers[keep], edge_vec[keep],
                     edge_type[keep])
            size_diff = float((compiled(*small) - net(*small)).abs().max())
    print(f"torch.export {export_s:.1f} s, AOTInductor compile {compile_s:.1f} s, package {size_mb:.2f} MB")
    scale = float(reference.abs().max())
    for name, out in outputs.items():
        print(f"max |{name} - torchscript| = {float((out - reference).abs().max()):.2e} (score scale {scale:.3g})")
    print(f"max |aoti - eager| at {half} beads (another size, same package) = {size_diff:.2e}")
    print(f"\n{'route':<18} {'ms/call':>8} {'vs torchscript':>15}")
    for name, ms in rows.items():
        print(f"{name:<18} {ms:>8.3f} {rows['torchscript'] / ms:>14.2f}x")
    graph_then_aoti = rows["graph"] + rows["aoti net"]
    print(f"export formats: score call {rows['torchscript']:.2f} ms TorchScript, "
          f"{graph_then_aoti:.2f} ms graph + AOTInductor network ({rows['torchscript'] / graph_then_aoti:.2f}x), "
          f"network alone {rows['torchscript net']:.2f} -> {rows['aoti net']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
