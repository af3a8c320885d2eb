"""TorchScript export: both modules script, save, reload in a fresh process that never
imports openmm_cgml or torchmd-net, and give the same outputs; custom ops are refused."""
import os
import subprocess
import sys

import pytest
import torch

from openmm_cgml.models import (ExportError, ModelConfig, build_dynamics_model, build_score_model,
                                export_dynamics, export_models, find_custom_ops, verify_archive)
from openmm_cgml.models.gns import GNSDynamics

torch.set_num_threads(1)
NUM_FEATURES = 5


def small_config(backbone):
    return ModelConfig(backbone=backbone, seq_len=3, cutoff=0.5, latent_dim=16, hidden_dim=16, rounds=2,
                       num_heads=2, num_rbf=8, edge_type_dim=4, step_size_ps=12.5, langevin_steps=7)


def periodic_inputs(seq_len, latent_dim, n=40):
    g = torch.Generator().manual_seed(1)
    box = torch.tensor([[1.6, 0.0, 0.0], [0.2, 1.5, 0.0], [-0.3, 0.1, 1.7]])
    history = torch.rand(n, 3, generator=g) * 1.6 + torch.cumsum(0.01 * torch.randn(seq_len, n, 3, generator=g), 0)
    features = torch.randn(n, NUM_FEATURES, generator=g)
    features[:, -1] = 30.0
    bonds = torch.tensor([[0, 1], [1, 2], [5, 30]])
    latent = torch.randn(n, latent_dim, generator=g)
    dyn = (history, box, features, bonds)
    score = (history[-1], latent, box, features, bonds, torch.tensor(0.02))
    return dyn, score


CHILD = r"""
import sys, torch
results = []
for dyn_path, score_path, inputs_path in zip(*[iter(sys.argv[1:-1])] * 3):
    d = torch.jit.load(dyn_path)
    s = torch.jit.load(score_path)
    assert d.seq_len == 3 and isinstance(d.seq_len, int) and d.step_size_ps == 12.5
    assert s.langevin_steps == 7 and isinstance(s.langevin_step_size, float)
    assert s.sigmas.dtype == torch.float32 and s.sigmas.dim() == 1
    assert bool((s.sigmas[1:] < s.sigmas[:-1]).all())
    h, box, f, b, x, lat, sig = torch.load(inputs_path)
    mean, std, latent = d(h, box, f, b)
    results.append((mean, std, latent, s(x, latent, box, f, b, sig)))
leaked = [k for k in sys.modules if k.startswith(("openmm_cgml", "torchmdnet", "warp"))]
assert not leaked, leaked
torch.save(results, sys.argv[-1])
"""


def test_export_roundtrip_in_fresh_process(tmp_path):
    models, args = {}, []
    for backbone in ("gns", "et"):
        torch.manual_seed(0)
        config = small_config(backbone)
        dynamics = build_dynamics_model(config, NUM_FEATURES)
        score = build_score_model(config, NUM_FEATURES)
        dynamics.set_normalization(0.01, 0.002, torch.zeros(NUM_FEATURES), 2 * torch.ones(NUM_FEATURES))
        dynamics.train()
        dyn_inputs, score_inputs = periodic_inputs(config.seq_len, dynamics.latent_dim)
        # export_models itself reloads both archives in an isolated child and compares
        # outputs; once is enough here (each child pays a torch import)
        dyn_path, score_path = export_models(dynamics, score, tmp_path / backbone, dyn_inputs, score_inputs,
                                             verify=backbone == "gns")
        assert dynamics.training, "export must not switch the caller's model to eval"
        inputs_path = tmp_path / f"{backbone}_inputs.pt"
        torch.save((*dyn_inputs, score_inputs[0], score_inputs[1], score_inputs[5]), inputs_path)
        models[backbone] = (dynamics, score, dyn_inputs, score_inputs)
        args += [str(dyn_path), str(score_path), str(inputs_path)]

    # independent check: one bare `python -I` child that imports only torch
    out_path = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, *args, str(out_path)],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    for (dynamics, score, dyn_inputs, score_inputs), got in zip(models.values(), torch.load(out_path)):
        dynamics.eval()
        with torch.no_grad():
            mean, std, latent = dynamics(*dyn_inputs)
            want = (mean, std, latent, score(score_inputs[0], latent, *score_inputs[2:]))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
        assert bool((got[1] > 0).all())


def test_scripted_module_rejects_bad_input():
    dynamics = build_dynamics_model(small_config("gns"), NUM_FEATURES)
    scripted = torch.jit.script(dynamics)
    (history, box, features, bonds), _ = periodic_inputs(3, 16)
    with pytest.raises(ValueError, match="seq_len=3"):
        dynamics(history[1:], box, features, bonds)
    with pytest.raises(torch.jit.Error, match="seq_len=3"):
        scripted(history[1:], box, features, bonds)
    with pytest.raises(ValueError, match="features must be"):
        dynamics(history, box, features[:, :-1], bonds)


# a custom op, as torchmd-net 3.x registers them: plain libtorch cannot resolve it
_lib = torch.library.Library("cgml_test", "DEF")
_lib.define("scaled(Tensor x) -> Tensor")
_lib.impl("scaled", lambda x: 2.0 * x, "CPU")


class CustomOpDynamics(GNSDynamics):
    def normalized_features(self, features: torch.Tensor) -> torch.Tensor:
        return torch.ops.cgml_test.scaled((features - self.feature_shift) / self.feature_scale)


def test_export_refuses_custom_ops(tmp_path):
    model = CustomOpDynamics(NUM_FEATURES, seq_len=3, cutoff=0.5, latent_dim=16, hidden_dim=16, rounds=1)
    scripted = torch.jit.script(model)
    assert any("cgml_test" in op for op in find_custom_ops(scripted))
    with pytest.raises(ExportError, match="custom ops"):
        export_dynamics(model, tmp_path / "dyn.pt")
    assert not (tmp_path / "dyn.pt").exists()

    # the fresh-process check catches it on its own too (op unknown in the child)
    scripted.save(str(tmp_path / "raw.pt"))
    inputs, _ = periodic_inputs(3, 16)
    with pytest.raises(ExportError, match="fresh process"):
        verify_archive(tmp_path / "raw.pt", inputs, model(*inputs), ["seq_len"])


def test_langevin_schedule_travels_from_config_to_the_integrator(tmp_path):
    """model.langevin_schedule becomes the score archive's attribute, which is the
    integrator's default schedule (docs/contract.md)."""
    from openmm_cgml.integrator import CGMLIntegrator
    from openmm_cgml.models import export_models

    for schedule in ("ncsn", "constant"):
        cfg = ModelConfig(latent_dim=8, hidden_dim=8, rounds=1, embedding_out_dim=4, seq_len=3,
                          langevin_schedule=schedule)
        dynamics, score = build_dynamics_model(cfg), build_score_model(cfg)
        assert score.langevin_schedule == schedule
        paths = export_models(dynamics, score, tmp_path / schedule, verify=False)
        assert torch.jit.load(str(paths[1])).langevin_schedule == schedule
        assert CGMLIntegrator(*paths).getLangevinSchedule() == schedule
    with pytest.raises(ValueError, match="langevin_schedule"):
        ModelConfig(langevin_schedule="linear")
