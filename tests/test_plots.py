"""Every plot helper writes a non-trivial PNG with the expected axes/lines."""
import numpy as np
import pytest

from openmm_cgml import analysis as A
from openmm_cgml import plots as P

MIN_BYTES = 15_000


def _rng(seed=0):
    return np.random.default_rng(seed)


def _check_png(path, min_bytes=MIN_BYTES):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_bytes, len(data)


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_rg2_histograms(tmp_path):
    rng = _rng()
    out = tmp_path / "sub" / "rg2.png"
    fig = P.plot_rg2_histograms({"Reference MD": rng.gamma(5, 0.2, 3000),
                                 "Learned CG": rng.gamma(4, 0.25, 3000)}, path=out, title="Rg²")
    _check_png(out)
    (ax,) = fig.axes
    assert len(ax.patches) == 2  # two step histograms
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("Reference MD: mean") and legend[1].startswith("Learned CG")
    assert "nm" in ax.get_xlabel()


def test_acfs_with_relaxation_fits(tmp_path):
    rng = _rng(1)
    t = np.arange(100) * 5.0
    series, rts = {}, {}
    for lab, tau in [("Reference MD", 60.0), ("Learned CG", 45.0)]:
        acf = np.exp(-t / tau) + 0.01 * rng.normal(size=t.size)
        acf[0] = 1.0
        series[lab] = (t, acf)
        rts[lab] = A.relaxation_time(acf, dt=5.0)
    out = tmp_path / "acf.png"
    fig = P.plot_acfs(series, rts, path=out)
    _check_png(out)
    (ax,) = fig.axes
    assert len(ax.lines) == 2 + 2 + 1  # ACFs, exponential fits, zero line
    assert "ps" in ax.get_xlabel()


def test_rdfs_one_panel_per_pair(tmp_path):
    r = np.linspace(0.01, 1.5, 150)
    g1 = 1 + np.exp(-((r - 0.4) / 0.05) ** 2) * 2
    g2 = 1 + np.exp(-((r - 0.45) / 0.06) ** 2) * 1.5
    data = {"Li–Li": {"Reference MD": (r, g1), "Learned CG": (r, g2)},
            "Li–TFSI": {"Reference MD": (r, g2), "Learned CG": (r, g1)},
            "Li–polymer": {"Reference MD": (r, g1), "Learned CG": (r, g1 * 1.1)}}
    out = tmp_path / "rdf.png"
    fig = P.plot_rdfs(data, path=out)
    _check_png(out)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == list(data)
    assert all(len(ax.lines) == 3 for ax in fig.axes)  # 2 curves + g = 1


def test_msd_loglog_with_fit(tmp_path):
    rng = _rng(2)
    data, fits = {}, {}
    for lab, s in [("Reference MD", 0.05), ("Learned CG", 0.06)]:
        x = np.cumsum(rng.normal(scale=s, size=(400, 50, 3)), axis=0)
        res = A.mean_squared_displacement(x, dt=2.0)
        data[lab], fits[lab] = res, A.fit_diffusion(res)
    out = tmp_path / "msd.png"
    fig = P.plot_msd(data, fits, path=out)
    _check_png(out)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 4  # 2 MSD curves + 2 fitted lines
    assert "D =" in ax.get_legend().get_texts()[1].get_text()


def test_collision_rate(tmp_path):
    rng = _rng(3)
    t = np.arange(300) * 200.0  # ps -> shown in ns
    out = tmp_path / "coll.png"
    fig = P.plot_collision_rate({"Reference MD": (t, 0.01 + 0.002 * rng.random(300)),
                                 "Learned CG": (t, 0.01 + 1e-7 * t)}, threshold=0.3, path=out)
    _check_png(out)
    (ax,) = fig.axes
    assert len(ax.lines) == 2 and "ns" in ax.get_xlabel()


def test_free_energy_surfaces_shared_colour_scale(tmp_path):
    rng = _rng(4)
    fes = A.free_energy_surface([rng.normal(size=(20000, 2)), rng.normal(0.3, 1.2, size=(20000, 2))],
                                bins=40, labels=["Reference MD", "Learned CG"])
    out = tmp_path / "fes.png"
    fig = P.plot_free_energy_surfaces(fes, path=out)
    _check_png(out, 30_000)
    axes = _data_axes(fig)
    assert len(axes) == 2 and len(fig.axes) == 3  # two panels + one colour bar
    meshes = [ax.collections[0] for ax in axes]
    assert meshes[0].norm.vmax == meshes[1].norm.vmax and meshes[0].norm.vmin == 0
    assert [ax.get_title() for ax in axes] == ["Reference MD", "Learned CG"]


def test_loss_curves_from_csv(tmp_path):
    csv = tmp_path / "loss.csv"
    rows = ["step,train_nll,val_nll,score_loss"]
    for s in range(0, 5000, 50):
        val = f"{np.exp(-s / 900) - 0.9:.5f}" if s % 500 == 0 else ""
        rows.append(f"{s},{np.exp(-s / 1000) - 1:.5f},{val},{0.5 * np.exp(-s / 2000) + 0.1:.5f}")
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "loss.png"
    fig = P.plot_loss_curves(csv, path=out)
    _check_png(out)
    (ax,) = fig.axes
    assert len(ax.lines) == 3
    assert ax.get_yscale() == "linear"  # NLL goes negative -> no log scale
    assert len(ax.lines[1].get_xdata()) == 10  # blank validation entries skipped
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.csv"
        bad.write_text("epoch,loss\n1,2\n2,1\n")
        P.plot_loss_curves(bad)


def test_bad_data_raises():
    with pytest.raises(ValueError):
        P.plot_rdfs({})
    with pytest.raises(ValueError):
        P.plot_rdfs({"a": (np.arange(3.0), np.arange(4.0))})
