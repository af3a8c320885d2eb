"""Figures comparing learned CG trajectories with reference MD (matplotlib, headless).

Figures are built with ``matplotlib.figure.Figure`` directly (Agg rendering, no pyplot
state, no display, the global backend is left alone).  Every function returns the
Figure and, when ``path`` is given, also writes a PNG there.

Data convention: ``data`` is a mapping ``{label: values}`` drawn in one panel, the
*first* label being the reference (black), the others (learned models, baselines)
in colour; or a mapping ``{panel title: {label: values}}`` for several panels side
by side (e.g. one per RDF pair or per species).  Units: nm, ps, nm^2, kT.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from . import analysis as _an

__all__ = [
    "plot_rg2_histograms",
    "plot_acfs",
    "plot_rdfs",
    "plot_msd",
    "plot_collision_rate",
    "plot_free_energy_surfaces",
    "plot_loss_curves",
    "plot_training_curves",
]

_REF_STYLE = dict(color="black", lw=2.0)
_PALETTE = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]


def _style(i: int) -> dict:
    if i == 0:
        return dict(_REF_STYLE)
    return dict(color=_PALETTE[(i - 1) % len(_PALETTE)], lw=1.6, ls="--" if i == 1 else "-.")


def _panels(data) -> list:
    """Normalise data to [(panel_title or None, {label: values}), ...]."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError("data must be a non-empty mapping {label: values} "
                         "or {panel title: {label: values}}")
    vals = list(data.values())
    if all(isinstance(v, Mapping) for v in vals):
        if any(not v for v in vals):
            raise ValueError("empty panel in data")
        return [(str(k), v) for k, v in data.items()]
    if any(isinstance(v, Mapping) for v in vals):
        raise ValueError("data mixes panels and series")
    return [(None, data)]


def _figure(n_panels: int, width: float = 5.0, height: float = 4.0):
    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig: Figure, path, title=None) -> Figure:
    if title:
        fig.suptitle(title)
    if path is not None:
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _xy(v, what: str):
    if isinstance(v, tuple) and len(v) == 2:
        x, y = (np.asarray(a, dtype=np.float64) for a in v)
    else:
        raise ValueError(f"{what}: expected a tuple (x, y), got {type(v).__name__}")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{what}: x and y must be 1-D of equal length, got {x.shape}, {y.shape}")
    return x, y


def plot_rg2_histograms(data, bins: int = 50, range=None, path=None, title=None,
                        xlabel: str = r"$R_g^2$ (nm$^2$)") -> Figure:
    """Rg^2 distributions on shared bins: {label: samples (nm^2)} (or panels thereof).

    Legend shows each sample mean with its blocking standard error (nm^2).
    """
    panels = _panels(data)
    fig, axes = _figure(len(panels))
    for ax, (ptitle, series) in zip(axes, panels):
        labels = list(series)
        samples = [np.ravel(np.asarray(series[k], dtype=np.float64)) for k in labels]
        edges, hists = _an.shared_histogram(samples, bins=bins, range=range)
        for i, (lab, s, h) in enumerate(zip(labels, samples, hists)):
            if s.size >= 8:
                mu, err = _an.mean_with_error(s)
                lab = f"{lab}: mean {mu:.3g} ± {err:.2g}"
            st = _style(i)
            ax.stairs(h, edges, label=lab, color=st["color"], lw=st["lw"], ls=st.get("ls", "-"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"probability density (nm$^{-2}$)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        if ptitle:
            ax.set_title(ptitle)
    return _finish(fig, path, title)


def plot_acfs(data, relaxation: Mapping | None = None, path=None, title=None,
              xlabel: str = "lag time (ps)", log_x: bool = False) -> Figure:
    """Normalised ACFs: {label: (lag_times ps, acf)} (or panels).

    relaxation: optional {label: analysis.RelaxationTime}; its tau_integral and
    tau_exp (ps) are shown in the legend and the exponential fit is drawn dotted.
    """
    panels = _panels(data)
    fig, axes = _figure(len(panels))
    for ax, (ptitle, series) in zip(axes, panels):
        fit_labelled = False
        for i, (lab, v) in enumerate(series.items()):
            t, c = _xy(v, f"acf {lab!r}")
            st = _style(i)
            rt = (relaxation or {}).get(lab)
            text = lab
            if rt is not None:
                text = f"{lab}: τ_int {rt.tau_integral:.3g} ps, τ_exp {rt.tau_exp:.3g} ps"
            ax.plot(t, c, label=text, **st)
            if rt is not None and np.isfinite(rt.tau_exp):
                tf = t[t <= 3 * rt.tau_exp] if log_x is False else t
                ax.plot(tf, rt.amplitude * np.exp(-tf / rt.tau_exp), color=st["color"], lw=1.2,
                        ls=":", label=None if fit_labelled else "dotted: A exp(-t/τ_exp) fits")
                fit_labelled = True
        ax.axhline(0.0, color="0.6", lw=0.8)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("autocorrelation (normalised)")
        ax.legend(fontsize=8)
        if ptitle:
            ax.set_title(ptitle)
    return _finish(fig, path, title)


def plot_rdfs(data, path=None, title=None) -> Figure:
    """g(r): {label: (r nm, g)} or {pair name: {label: (r, g)}} (one panel per pair).

    A grey dashed line marks g = 1; the panel title and legend say which is which.
    """
    panels = _panels(data)
    fig, axes = _figure(len(panels), width=4.5)
    for ax, (ptitle, series) in zip(axes, panels):
        for i, (lab, v) in enumerate(series.items()):
            r, g = _xy(v, f"rdf {lab!r}")
            ax.plot(r, g, label=lab, **_style(i))
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("r (nm)")
        ax.set_ylabel("g(r)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        if ptitle:
            ax.set_title(ptitle)
    return _finish(fig, path, title)


def plot_msd(data, fits: Mapping | None = None, path=None, title=None) -> Figure:
    """Log-log MSD: {label: MSDResult or (lag_times ps, msd nm^2)} (or panels, e.g.
    one per species).

    fits: optional {label: analysis.DiffusionFit} (same labels; for panels, keys
    "panel/label" or plain label); the fitted 6 D t + b is drawn dotted over its
    window and D ± error is given in nm^2/ps and 1e-5 cm^2/s.  Lag 0 is omitted.
    """
    panels = _panels(data)
    fig, axes = _figure(len(panels))
    fits = fits or {}
    for ax, (ptitle, series) in zip(axes, panels):
        first = next((fits.get(f"{ptitle}/{k}", fits.get(k)) for k in series
                      if fits.get(f"{ptitle}/{k}", fits.get(k)) is not None), None)
        if first is not None:  # the reference's window if it has a fit
            ax.axvspan(*first.fit_window, color="0.92", zorder=0, label="fit window")
        for i, (lab, v) in enumerate(series.items()):
            if isinstance(v, _an.MSDResult):
                t, y = v.lag_times, v.msd
            else:
                t, y = _xy(v, f"msd {lab!r}")
            ok = (t > 0) & (y > 0)
            st = _style(i)
            fit = fits.get(f"{ptitle}/{lab}", fits.get(lab))
            text = lab
            if fit is not None:
                cgs = _an.nm2_per_ps_to_1e5_cm2_per_s(fit.D)
                cgs_err = _an.nm2_per_ps_to_1e5_cm2_per_s(fit.D_err)
                text = (f"{lab}\nD = {fit.D:.3g} ± {fit.D_err:.2g} nm²/ps"
                        f" = {cgs:.3g} ± {cgs_err:.2g}·10⁻⁵ cm²/s")
            ax.plot(t[ok], y[ok], label=text, **st)
            if fit is not None:
                tf = np.geomspace(max(fit.fit_window[0], t[ok][0]), fit.fit_window[1], 50)
                yf = 6 * fit.D * tf + fit.intercept
                good = yf > 0
                ax.plot(tf[good], yf[good], color=st["color"], lw=1.0, ls="-", alpha=0.9,
                        marker="|", markevery=[0, int(good.sum()) - 1] if good.sum() else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("lag time (ps)")
        ax.set_ylabel(r"MSD (nm$^2$)")
        ax.legend(fontsize=7, loc="upper left")
        if ptitle:
            ax.set_title(ptitle)
    return _finish(fig, path, title)


def plot_collision_rate(data, threshold: float | None = None, path=None, title=None) -> Figure:
    """Collisions per bead over simulation time: {label: (times ps, rate)} (or panels).

    Times are shown in ns if they exceed 10^4 ps.  threshold (nm) goes in the title.
    """
    panels = _panels(data)
    fig, axes = _figure(len(panels), width=6.0)
    for ax, (ptitle, series) in zip(axes, panels):
        tmax = max(np.max(_xy(v, "collision")[0]) for v in series.values())
        scale, unit = (1e-3, "ns") if tmax > 1e4 else (1.0, "ps")
        for i, (lab, v) in enumerate(series.items()):
            t, rate = _xy(v, f"collision {lab!r}")
            ax.plot(t * scale, rate, label=f"{lab}: mean {np.mean(rate):.3g}", **_style(i))
        ax.set_xlabel(f"simulation time ({unit})")
        ax.set_ylabel("collisions per bead")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        sub = ptitle or ""
        if threshold is not None:
            sub = (sub + "  " if sub else "") + f"(non-bonded pairs closer than {threshold:.3g} nm)"
        if sub:
            ax.set_title(sub, fontsize=10)
    return _finish(fig, path, title)


def plot_free_energy_surfaces(fes: _an.FreeEnergySurface, vmax: float | None = None,
                              path=None, title=None, contours: bool = False,
                              axis_labels=("PC 1 (nm)", "PC 2 (nm)")) -> Figure:
    """One panel per surface of an analysis.FreeEnergySurface, shared colour scale.

    Colour = F in kT (0 at each surface's minimum), clipped at vmax (default: the
    largest finite value over all surfaces); unsampled bins are left white.
    contours=True adds white iso-lines every 1 kT (useful for well-sampled surfaces).
    """
    if not fes.free_energy:
        raise ValueError("FreeEnergySurface has no surfaces")
    finite = [f[np.isfinite(f)] for f in fes.free_energy]
    if vmax is None:
        vmax = max(float(f.max()) for f in finite if f.size) if any(f.size for f in finite) else 1.0
    norm = mcolors.Normalize(vmin=0.0, vmax=vmax)
    n = len(fes.free_energy)
    fig = Figure(figsize=(4.6 * n + 1.0, 4.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
    labels = fes.labels or [f"surface {i}" for i in range(n)]
    mesh = None
    xc = 0.5 * (fes.x_edges[1:] + fes.x_edges[:-1])
    yc = 0.5 * (fes.y_edges[1:] + fes.y_edges[:-1])
    levels = np.arange(1.0, vmax, 1.0)
    for ax, fe, lab in zip(axes, fes.free_energy, labels):
        mesh = ax.pcolormesh(fes.x_edges, fes.y_edges, np.clip(fe, 0, vmax).T, cmap="viridis",
                             norm=norm, shading="flat")
        if contours and levels.size and np.isfinite(fe).sum() > 4:
            ax.contour(xc, yc, np.where(np.isfinite(fe), fe, vmax).T, levels=levels,
                       colors="white", linewidths=0.4, alpha=0.6)
        ax.set_title(lab)
        ax.set_xlabel(axis_labels[0])
    axes[0].set_ylabel(axis_labels[1])
    fig.colorbar(mesh, ax=list(axes), label="free energy (kT)")
    return _finish(fig, path, title)


def plot_loss_curves(csv_path, path=None, title=None, logy: bool | None = None) -> Figure:
    """Training curves from a CSV with a header: a ``step`` column plus any number of
    loss columns (blank/NaN entries, e.g. validation every k steps, are skipped); see
    :func:`plot_training_curves`."""
    arr = np.genfromtxt(csv_path, delimiter=",", names=True, dtype=np.float64,
                        encoding="utf-8", invalid_raise=True)
    names = arr.dtype.names
    if not names or "step" not in names:
        raise ValueError(f"{csv_path}: needs a header with a 'step' column, got {names}")
    arr = np.atleast_1d(arr)
    columns = {c: arr[c] for c in names if c != "step"}
    if not columns:
        raise ValueError(f"{csv_path}: no loss columns")
    return plot_training_curves(arr["step"], columns, path=path, title=title, logy=logy)


def plot_training_curves(step, losses: dict, rollout: dict | None = None, path=None, title=None,
                         logy: bool | None = None) -> Figure:
    """Loss curves against training step (``losses``: name -> values aligned with
    ``step``; NaN entries, e.g. validation every k steps, are skipped) and, with
    ``rollout`` (name -> values), a second panel of the rollout-validation metrics
    beside them.

    logy=None: log scale iff all losses are positive (Gaussian NLL can be negative).
    """
    step = np.asarray(step, dtype=np.float64)
    if not losses:
        raise ValueError("no loss columns")
    rollout = {k: v for k, v in (rollout or {}).items() if np.isfinite(np.asarray(v, dtype=float)).any()}
    fig, axes = _figure(2 if rollout else 1, width=6.5)

    def draw(ax, series):
        values = []
        for i, (name, y) in enumerate(series.items()):
            y = np.asarray(y, dtype=np.float64)
            if y.shape != step.shape:
                raise ValueError(f"{name}: {y.shape[0]} values for {step.shape[0]} steps")
            ok = np.isfinite(y) & np.isfinite(step)
            values.append(y[ok])
            ax.plot(step[ok], y[ok], label=name, marker="o" if ok.sum() < 30 else None, ms=3,
                    color=_PALETTE[i % len(_PALETTE)], lw=1.4)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return np.concatenate(values) if values else np.zeros(0)

    values = draw(axes[0], losses)
    if logy is None:
        logy = values.size > 0 and bool(np.all(values > 0))
    if logy:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("loss")
    if rollout:
        draw(axes[1], rollout)
        axes[1].axhline(0.0, color="0.5", lw=0.8)
        axes[1].set_ylabel("rollout validation (relative / per bead)")
    return _finish(fig, path, title)
