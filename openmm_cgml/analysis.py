"""Observables for comparing learned CG trajectories with reference MD mapped to CG.

Everything here works on plain numpy arrays so that reference MD (after mapping to
beads) and learned rollouts go through exactly the same code:

* ``positions``: ``[F, N, 3]`` float, nm, **unwrapped** (no periodic jumps).
* ``masses``: ``[N]``, any mass unit (only ratios matter); ``None`` = equal masses.
* ``dt``: time between consecutive frames, ps.
* ``boxes``: ``[F, 3, 3]`` or ``[3, 3]`` (box vectors as rows, nm, OpenMM reduced
  form: ``a = (ax, 0, 0)``, ``b = (bx, by, 0)``, ``c = (cx, cy, cz)``) or ``None``.
* index groups: 1-D integer arrays of bead indices; a molecule/chain is a group.

Estimator choices (documented once here, repeated where used):

* Standard error of a correlated mean: automated blocking (Jonsson, Phys. Rev. E 98,
  043304 (2018)) by default; alternatively ``1 + 2 sum rho_k`` integrated
  autocorrelation time with Sokal's self-consistent window (c = 5).
* Relaxation time: (a) integral of the normalised ACF, trapezoidal, up to its first
  zero crossing (linearly interpolated) or an explicit cutoff; (b) least-squares fit
  of ``A exp(-t / tau)`` over the lags before the ACF first falls below 0.1.
* Diffusivity: linear least-squares fit of MSD(t) = 6 D t + b over the lag window
  [10 %, 50 %] of the trajectory duration (default).  Uncertainty: standard error
  over independent units (beads, or molecule centres, or clusters of beads given by
  labels) of the per-unit slopes - this is the closed form of a bootstrap over
  molecules for the mean slope (the fit is linear in the MSD curve).
* Collision threshold: 1 % quantile of the reference nearest-non-bonded-neighbour
  distance (pooled over beads and frames), or an explicit value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import optimize, stats
from scipy.spatial import cKDTree

__all__ = [
    "radius_of_gyration_squared",
    "group_centers",
    "shared_histogram",
    "autocorrelation",
    "integrated_autocorrelation_time",
    "blocking_sem",
    "mean_with_error",
    "RelaxationTime",
    "relaxation_time",
    "minimum_image",
    "rdf",
    "MSDResult",
    "DiffusionFit",
    "mean_squared_displacement",
    "fit_diffusion",
    "nm2_per_ps_to_1e5_cm2_per_s",
    "nearest_nonbonded_distances",
    "collision_threshold",
    "collision_rate",
    "kabsch_align",
    "PCAModel",
    "fit_pca",
    "FreeEnergySurface",
    "free_energy_surface",
    "pca_free_energy_surfaces",
    "jensen_shannon_divergence",
    "wasserstein_1",
    "mean_absolute_error",
    "relative_error",
]

# --------------------------------------------------------------------------- inputs


def _positions(positions, name="positions") -> np.ndarray:
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{name} must have shape [F, N, 3] (nm), got {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must contain at least one frame and one bead, got {x.shape}")
    return x


def _masses(masses, n: int) -> np.ndarray:
    if masses is None:
        return np.ones(n)
    m = np.asarray(masses, dtype=np.float64)
    if m.shape != (n,):
        raise ValueError(f"masses must have shape [{n}], got {m.shape}")
    if np.any(m <= 0):
        raise ValueError("masses must be positive")
    return m


def _indices(idx, n: int, name="indices") -> np.ndarray:
    if idx is None:
        return np.arange(n)
    i = np.asarray(idx)
    if i.dtype == bool:
        if i.shape != (n,):
            raise ValueError(f"boolean {name} must have shape [{n}], got {i.shape}")
        i = np.flatnonzero(i)
    if i.ndim != 1 or not np.issubdtype(i.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer index array, got {i.dtype} {i.shape}")
    if i.size == 0:
        raise ValueError(f"{name} is empty")
    if i.min() < 0 or i.max() >= n:
        raise ValueError(f"{name} out of range [0, {n})")
    return i.astype(np.int64)


def _boxes(boxes, n_frames: int, required: bool = False) -> np.ndarray | None:
    if boxes is None:
        if required:
            raise ValueError("a periodic box is required (boxes=None given)")
        return None
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape == (3, 3):
        b = np.broadcast_to(b, (n_frames, 3, 3))
    if b.shape != (n_frames, 3, 3):
        raise ValueError(f"boxes must have shape [3, 3] or [{n_frames}, 3, 3], got {b.shape}")
    if np.any(np.abs(b[:, 0, 1:]) > 0) or np.any(np.abs(b[:, 1, 2]) > 0):
        raise ValueError("boxes must be in reduced (lower-triangular) form: a=(ax,0,0), b=(bx,by,0)")
    if np.any(np.diagonal(b, axis1=1, axis2=2) <= 0):
        raise ValueError("box diagonal must be positive")
    return b


def _is_orthorhombic(box: np.ndarray) -> bool:
    return bool(np.all(box[np.tril_indices(3, -1)] == 0))


def _half_min_width(box: np.ndarray) -> float:
    """Half of the smallest perpendicular width V / |b_j x b_k| of a box (nm)."""
    vol = abs(float(np.linalg.det(box)))
    widths = [vol / np.linalg.norm(np.cross(box[j], box[k])) for j, k in ((1, 2), (2, 0), (0, 1))]
    return 0.5 * min(widths)


def _time_series(x, name="x") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [T] or [T, M] (M independent series), got {a.shape}")
    if a.shape[0] < 4:
        raise ValueError(f"{name} needs at least 4 time points, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return a


# --------------------------------------------------------------------------- Rg^2


def _group_layout(groups, n: int):
    idx = [_indices(g, n, "group") for g in groups]
    if not idx:
        raise ValueError("groups is empty")
    flat = np.concatenate(idx)
    starts = np.cumsum([0] + [len(g) for g in idx[:-1]])
    return flat, starts


def group_centers(positions, masses=None, groups=None) -> np.ndarray:
    """Mass-weighted centres of index groups.

    positions [F, N, 3] nm (unwrapped); masses [N]; groups: sequence of index arrays
    (None = whole system as one group).  Returns [F, G, 3] nm.
    """
    x = _positions(positions)
    m = _masses(masses, x.shape[1])
    flat, starts = _group_layout([np.arange(x.shape[1])] if groups is None else groups, x.shape[1])
    w = m[flat]
    mx = np.add.reduceat(x[:, flat] * w[None, :, None], starts, axis=1)
    return mx / np.add.reduceat(w, starts)[None, :, None]


def radius_of_gyration_squared(positions, masses=None, groups=None) -> np.ndarray:
    """Mass-weighted squared radius of gyration, nm^2.

    Rg^2 = sum_i m_i |x_i - x_com|^2 / sum_i m_i, per frame, on *unwrapped* positions.
    groups=None: whole system, returns [F].  groups = sequence of index arrays (one per
    molecule/chain): returns [F, G].
    """
    x = _positions(positions)
    m = _masses(masses, x.shape[1])
    single = groups is None
    flat, starts = _group_layout([np.arange(x.shape[1])] if single else groups, x.shape[1])
    w = m[flat]
    xs = x[:, flat]
    wsum = np.add.reduceat(w, starts)
    com = np.add.reduceat(xs * w[None, :, None], starts, axis=1) / wsum[None, :, None]
    sizes = np.diff(np.append(starts, flat.size))
    d = xs - np.repeat(com, sizes, axis=1)
    rg2 = np.add.reduceat(np.einsum("fnk,fnk->fn", d, d) * w[None, :], starts, axis=1) / wsum
    return rg2[:, 0] if single else rg2


def shared_histogram(samples: Sequence, bins: int | np.ndarray = 50, range=None,
                     density: bool = True):
    """Histograms of several 1-D samples on one shared set of bins.

    samples: sequence of arrays (flattened).  bins: count or explicit edges.  range:
    (lo, hi); default = pooled min/max of all samples.  Returns (edges [B+1],
    [hist [B], ...]); density=True gives probability densities (units 1/x).
    """
    arrs = [np.ravel(np.asarray(s, dtype=np.float64)) for s in samples]
    if not arrs or any(a.size == 0 for a in arrs):
        raise ValueError("need at least one non-empty sample")
    if np.ndim(bins) == 0:
        if range is None:
            lo = min(a.min() for a in arrs)
            hi = max(a.max() for a in arrs)
            if hi <= lo:
                hi = lo + 1.0
            range = (lo, hi)
        edges = np.linspace(range[0], range[1], int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    hists = [np.histogram(a, bins=edges, density=density)[0] for a in arrs]
    return edges, hists


# --------------------------------------------------------------------------- ACF / errors


def autocorrelation(x, max_lag: int | None = None, unbiased: bool = True) -> np.ndarray:
    """Normalised autocorrelation function rho(k) of a time series (FFT, mean removed).

    x: [T] or [T, M] (M independent series, e.g. one per chain; ACFs are averaged, each
    series' own mean removed).  rho(0) = 1.  unbiased=True divides the lag-k sum by
    (T - k) (estimator of the ACF itself); False divides by T (positive-definite,
    decays to 0; used for integrated autocorrelation times).  max_lag default T - 1.
    Returns rho [max_lag + 1] indexed by lag in frames (multiply by dt for ps).
    """
    a = _time_series(x)
    t = a.shape[0]
    max_lag = t - 1 if max_lag is None else int(max_lag)
    if not 0 <= max_lag < t:
        raise ValueError(f"max_lag must be in [0, {t - 1}], got {max_lag}")
    a = a - a.mean(axis=0)
    nfft = 1 << int(np.ceil(np.log2(2 * t)))
    f = np.fft.rfft(a, n=nfft, axis=0)
    acov = np.fft.irfft(f * np.conj(f), n=nfft, axis=0)[: max_lag + 1]
    norm = (t - np.arange(max_lag + 1)) if unbiased else np.full(max_lag + 1, t)
    acov = acov / norm[:, None]
    var = acov[0]
    if np.any(var <= 0):
        raise ValueError("a series has zero variance; its ACF is undefined")
    return (acov / var).mean(axis=1)


def integrated_autocorrelation_time(x, c: float = 5.0) -> float:
    """Integrated autocorrelation time tau_int = 1 + 2 sum_{k>=1} rho_k, in frames.

    Sum truncated with Sokal's self-consistent window: the smallest M with
    M >= c * tau_int(M).  The effective number of independent samples is T / tau_int.
    """
    rho = autocorrelation(x, unbiased=False)
    taus = 2.0 * np.cumsum(rho) - 1.0
    window = np.arange(len(taus)) >= c * taus
    m = int(np.argmax(window)) if window.any() else len(taus) - 1
    return float(taus[m])


def blocking_sem(x) -> float:
    """Standard error of the mean of a correlated 1-D series by automated blocking.

    Flyvbjerg-Petersen blocking with Jonsson's (2018) automatic choice of the block
    level (chi^2 test at 99 %).  The series is truncated to its first 2^d points.
    Units: those of x.
    """
    a = np.ravel(np.asarray(x, dtype=np.float64))
    d = int(np.floor(np.log2(a.size)))
    if d < 3:
        raise ValueError("blocking needs at least 8 samples")
    a = a[: 2 ** d]
    s = np.empty(d)
    gamma = np.empty(d)
    for i in range(d):
        n = a.size
        mu = a.mean()
        gamma[i] = np.sum((a[:-1] - mu) * (a[1:] - mu)) / n
        s[i] = a.var()
        a = 0.5 * (a[0::2] + a[1::2])
    if np.any(s <= 0):
        return 0.0
    m_stat = np.cumsum(((gamma / s) ** 2 * 2.0 ** np.arange(1, d + 1)[::-1])[::-1])[::-1]
    q = stats.chi2.ppf(0.99, df=np.arange(d, 0, -1))
    ok = np.flatnonzero(m_stat < q)
    k = int(ok[0]) if ok.size else d - 1
    return float(np.sqrt(s[k] / 2 ** (d - k)))


def mean_with_error(x, method: str = "blocking") -> tuple[float, float]:
    """Mean of a correlated 1-D series and its standard error (units of x).

    method="blocking": automated blocking (see blocking_sem).  method="acf":
    sqrt(var / T * tau_int) with tau_int from integrated_autocorrelation_time.
    """
    a = np.ravel(np.asarray(x, dtype=np.float64))
    if method == "blocking":
        return float(a.mean()), blocking_sem(a)
    if method == "acf":
        tau = integrated_autocorrelation_time(a)
        return float(a.mean()), float(np.sqrt(a.var(ddof=1) * max(tau, 1.0) / a.size))
    raise ValueError(f"method must be 'blocking' or 'acf', got {method!r}")


@dataclass
class RelaxationTime:
    """Relaxation times of a normalised ACF, ps.

    tau_integral: trapezoidal integral of rho(t) from 0 to ``integral_cutoff`` (first
    zero crossing, linearly interpolated, or the explicit cutoff).  ``crossed`` is False
    if the ACF never reached zero within the computed lags (integral then truncated at
    the last lag: a lower bound).  tau_exp, amplitude: least-squares fit of
    A exp(-t/tau) over t < ``fit_window`` (lags before rho first drops below the fit
    threshold).  tau_exp is NaN if fewer than 3 points were available.
    """

    tau_integral: float
    tau_exp: float
    amplitude: float
    integral_cutoff: float
    fit_window: float
    crossed: bool


def relaxation_time(acf, dt: float = 1.0, cutoff: float | None = None,
                    fit_threshold: float = 0.1) -> RelaxationTime:
    """Integral and exponential-fit relaxation times of a normalised ACF.

    acf: rho at lags 0, dt, 2 dt, ... (rho[0] = 1).  dt: lag spacing, ps.  cutoff: if
    given, integrate up to this time (ps) instead of the first zero crossing.
    fit_threshold: the exponential is fitted to lags before rho first drops below it.
    """
    rho = np.ravel(np.asarray(acf, dtype=np.float64))
    if rho.size < 2:
        raise ValueError("acf needs at least 2 lags")
    if dt <= 0:
        raise ValueError("dt must be positive")
    t = np.arange(rho.size) * dt
    crossed = True
    if cutoff is None:
        neg = np.flatnonzero(rho <= 0)
        if neg.size:
            k = int(neg[0])
            t0 = t[k - 1] + dt * rho[k - 1] / (rho[k - 1] - rho[k])
            tt = np.append(t[:k], t0)
            rr = np.append(rho[:k], 0.0)
        else:
            crossed = False
            tt, rr = t, rho
    else:
        if cutoff <= 0:
            raise ValueError("cutoff must be positive (ps)")
        sel = t <= cutoff
        tt, rr = t[sel], rho[sel]
        if cutoff > t[-1]:
            crossed = False
        elif tt[-1] < cutoff:
            tt = np.append(tt, cutoff)
            rr = np.append(rr, np.interp(cutoff, t, rho))
    tau_int = float(np.trapezoid(rr, tt))

    below = np.flatnonzero(rho < fit_threshold)
    n_fit = int(below[0]) if below.size else rho.size
    tau_exp, amp = np.nan, np.nan
    if n_fit >= 3:
        tf, rf = t[:n_fit], rho[:n_fit]
        guess = max(tau_int, dt)
        try:
            (amp, tau_exp), _ = optimize.curve_fit(
                lambda s, a, tau: a * np.exp(-s / tau), tf, rf, p0=(1.0, guess),
                bounds=([0.0, 1e-12 * dt], [np.inf, np.inf]), maxfev=10000)
        except RuntimeError:
            tau_exp, amp = np.nan, np.nan
    return RelaxationTime(float(tau_int), float(tau_exp), float(amp), float(tt[-1]),
                          float(t[n_fit - 1]) if n_fit >= 1 else 0.0, crossed)


# --------------------------------------------------------------------------- PBC / RDF


def minimum_image(d, box) -> np.ndarray:
    """Minimum-image displacement vectors under a reduced (lower-triangular) box.

    d: [..., 3] nm; box [3, 3] (rows = box vectors, nm).  Uses OpenMM's sequential
    reduction (c, then b, then a), exact for |d| below half the smallest box width.
    """
    d = np.array(d, dtype=np.float64, copy=True)
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (3, 3):
        raise ValueError(f"box must be [3, 3], got {box.shape}")
    for k in (2, 1, 0):
        d -= np.round(d[..., k] / box[k, k])[..., None] * box[k]
    return d


def _wrap_ortho(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    y = np.mod(x, lengths)
    y[y >= lengths] = 0.0  # np.mod can return exactly L for tiny negatives
    return y


def _pair_histogram_brute(xa, xb, box, edges, chunk_elems=2_000_000):
    """Histogram of minimum-image |xb - xa| over all (a, b) pairs, chunked over a.

    Per-coordinate arrays, OpenMM's sequential reduction (c, b, a) for reduced boxes;
    memory O(chunk_elems)."""
    nb = len(edges) - 1
    r0, width = edges[0], (edges[-1] - edges[0]) / nb
    rmax2 = edges[-1] ** 2
    counts = np.zeros(nb, dtype=np.float64)
    step = max(1, chunk_elems // max(1, len(xb)))
    for s in range(0, len(xa), step):
        dx, dy, dz = (np.subtract.outer(xb[:, k], xa[s:s + step, k]) for k in range(3))
        if box is not None:
            n = np.rint(dz / box[2, 2])
            dz -= n * box[2, 2]
            if box[2, 1] != 0 or box[2, 0] != 0:
                dy -= n * box[2, 1]
                dx -= n * box[2, 0]
            n = np.rint(dy / box[1, 1])
            dy -= n * box[1, 1]
            if box[1, 0] != 0:
                dx -= n * box[1, 0]
            dx -= np.rint(dx / box[0, 0]) * box[0, 0]
        r2 = dx * dx
        r2 += dy * dy
        r2 += dz * dz
        r = np.sqrt(r2[r2 <= rmax2])
        idx = np.floor((r - r0) / width).astype(np.int64)
        idx[r == edges[-1]] = nb - 1  # right edge inclusive, like np.histogram
        counts += np.bincount(idx[(idx >= 0) & (idx < nb)], minlength=nb)
    return counts


def rdf_first_peak(r, g, smooth: int = 3) -> tuple[float, float] | None:
    """Position (nm) and height of the first peak of g(r): the first local maximum, after
    g first exceeds 1, of g smoothed by a ``smooth``-bin moving average (bin noise of
    short runs makes single-bin maxima). None if g never exceeds 1."""
    r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
    if r.shape != g.shape or r.ndim != 1:
        raise ValueError("r and g must be 1-D arrays of the same length")
    if smooth > 1 and len(g) >= smooth:
        g = np.convolve(g, np.ones(smooth) / smooth, mode="same")
    above = np.flatnonzero(g > 1.0)
    if above.size == 0:
        return None
    i = int(above[0])
    while i + 1 < len(g) and g[i + 1] >= g[i]:
        i += 1
    return float(r[i]), float(g[i])


RDF_PEAK_MIN_HEIGHT = 1.5


def rdf_peak_errors(reference: dict, other: dict, min_height: float = RDF_PEAK_MIN_HEIGHT) -> dict:
    """Compare first RDF peaks, {pair: (position nm, height)} as from
    :func:`rdf_first_peak`, with the reference's: per pair whose reference peak rises
    above ``min_height`` (a peak barely above g = 1, e.g. of a handful of ions, is bin
    noise and its position jumps) and that ``other`` has too, the position shift |dr|
    (nm) and the relative height error |h / h_ref - 1|. Returns {pair: (shift, height)}."""
    return {pair: (abs(other[pair][0] - ref[0]), abs(other[pair][1] / ref[1] - 1))
            for pair, ref in reference.items() if ref[1] > min_height and pair in other}


def rdf(positions, boxes, group_a, group_b=None, r_max: float | None = None,
        n_bins: int = 200, r_min: float = 0.0, method: str = "auto", stride: int = 1):
    """Radial distribution function g_AB(r) under periodic boundaries.

    positions [F, N, 3] nm (wrapped or unwrapped); boxes [F, 3, 3] or [3, 3] nm
    (required); group_a, group_b: index arrays (group_b=None: same as group_a).
    Pairs are ordered (i in A, j in B, i != j); self pairs are excluded, so the ideal
    number of pairs is N_A N_B - |A & B| and g -> 1 for an ideal gas whether or not the
    groups overlap.  g(r) = sum_frames counts(r) / sum_frames [n_pairs V_shell(r) / V].
    r grid: n_bins equal bins on [r_min, r_max] nm; r_max default (and maximum) = half
    the smallest box width of any frame.  method: "tree" (periodic cKDTree cumulative
    counts, orthorhombic boxes only, O(N log N)), "brute" (chunked minimum image,
    triclinic OK, O(N_A N_B) time, bounded memory), "auto".  Cost per frame grows with
    the number of pairs within r_max (~1e7 pairs/s here): for 10^4 beads to r = L/2
    use stride (every stride-th frame) to subsample frames.
    Returns (r_centres [n_bins] nm, g [n_bins]).
    """
    if int(stride) < 1:
        raise ValueError("stride must be >= 1")
    x = _positions(positions)[:: int(stride)]
    if boxes is not None and np.ndim(boxes) == 3:
        boxes = np.asarray(boxes)[:: int(stride)]
    f, n, _ = x.shape
    bx = _boxes(boxes, f, required=True)
    a = _indices(group_a, n, "group_a")
    b = a if group_b is None else _indices(group_b, n, "group_b")
    hw = min(_half_min_width(bx[i]) for i in range(f))
    r_max = hw if r_max is None else float(r_max)
    if not 0 <= r_min < r_max:
        raise ValueError(f"need 0 <= r_min < r_max, got {r_min}, {r_max}")
    if r_max > hw * (1 + 1e-12):
        raise ValueError(f"r_max={r_max} nm exceeds half the smallest box width ({hw} nm)")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    ortho = all(_is_orthorhombic(bx[i]) for i in range(f))
    if method == "auto":
        method = "tree" if ortho else "brute"
    if method == "tree" and not ortho:
        raise ValueError("method='tree' needs orthorhombic boxes; use 'brute'")
    if method not in ("tree", "brute"):
        raise ValueError(f"method must be 'auto', 'tree' or 'brute', got {method!r}")
    edges = np.linspace(r_min, r_max, n_bins + 1)
    n_self = np.intersect1d(a, b).size
    n_pairs = a.size * b.size - n_self
    if n_pairs <= 0:
        raise ValueError("no distinct pairs between the groups")
    counts = np.zeros(n_bins)
    ideal = np.zeros(n_bins)
    shell = 4.0 / 3.0 * np.pi * np.diff(edges ** 3)
    for i in range(f):
        box = bx[i]
        vol = float(np.prod(np.diagonal(box)))
        if method == "tree":
            lengths = np.diagonal(box).copy()
            xa = _wrap_ortho(x[i, a], lengths)
            xb = _wrap_ortho(x[i, b], lengths)
            ta = cKDTree(xa, boxsize=lengths)
            tb = ta if b is a else cKDTree(xb, boxsize=lengths)
            # cumulative counts of pairs with d <= edge; self pairs (d = 0) only enter
            # the cumulative count at every edge and cancel in the difference.
            cum = ta.count_neighbors(tb, edges).astype(np.float64)
            counts += np.diff(cum)
        else:
            c = _pair_histogram_brute(x[i, a], x[i, b], box, edges)
            if r_min == 0.0:
                c[0] -= n_self  # self pairs land at r = 0, the first bin
            counts += c
        ideal += n_pairs * shell / vol
    return 0.5 * (edges[1:] + edges[:-1]), counts / ideal


# --------------------------------------------------------------------------- MSD


@dataclass
class MSDResult:
    """Mean-squared displacement averaged over time origins and units.

    lag_times [L] ps; msd [L] nm^2 (mean over units); per_unit_slope [U] nm^2/ps
    (least-squares slope of each unit's MSD over the fit window, for the error);
    fit_window (t_lo, t_hi) ps; cluster_labels [U] or None (units sharing a label
    form one independent unit for the error).
    """

    lag_times: np.ndarray
    msd: np.ndarray
    per_unit_slope: np.ndarray
    fit_window: tuple
    cluster_labels: np.ndarray | None = None


@dataclass
class DiffusionFit:
    """D = slope / 6 of MSD(t) = 6 D t + b over fit_window.

    D, D_err in nm^2/ps (D_err = standard error over independent units/clusters);
    intercept nm^2; fit_window (t_lo, t_hi) ps; n_independent = number of units or
    clusters the error is based on.
    """

    D: float
    D_err: float
    intercept: float
    fit_window: tuple
    n_independent: int


def _msd_fft(x: np.ndarray) -> np.ndarray:
    """Multiple-origin MSD for x [F, n, 3] -> [F, n] (lags 0..F-1), FFT algorithm."""
    f = x.shape[0]
    d2 = np.einsum("fnk,fnk->fn", x, x)
    c = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(d2, axis=0)])
    m = np.arange(f)
    s1 = (c[f - m] + (c[f] - c[m])) / (f - m)[:, None]
    nfft = 1 << int(np.ceil(np.log2(2 * f)))
    g = np.fft.rfft(x, n=nfft, axis=0)
    s2 = np.fft.irfft(np.einsum("fnk,fnk->fn", g, np.conj(g)), n=nfft, axis=0)[:f]
    s2 = s2 / (f - m)[:, None]
    out = s1 - 2.0 * s2
    out[0] = 0.0
    return np.maximum(out, 0.0)


def _default_window(duration: float) -> tuple:
    return (0.1 * duration, 0.5 * duration)


def _fit_weights(t: np.ndarray, sel: np.ndarray):
    """Weights w such that the least-squares slope over t[sel] is sum_k w_k y_k."""
    ts = t[sel]
    dtm = ts - ts.mean()
    w = np.zeros_like(t)
    w[sel] = dtm / np.sum(dtm ** 2)
    return w


def mean_squared_displacement(positions, dt: float, indices=None, masses=None,
                              remove_com_drift: bool = True, fit_window=None,
                              cluster_labels=None, chunk_elems: int = 4_000_000
                              ) -> MSDResult:
    """MSD(t) = <|x_i(t0 + t) - x_i(t0)|^2> over all time origins t0 and units i.

    positions [F, N, 3] nm, *unwrapped*; dt ps per frame; indices: the species' beads
    (default all).  To get molecule-centre diffusion pass group_centers(...) as
    positions.  remove_com_drift: subtract the mass-weighted centre of *all* N beads
    (masses) per frame first.  fit_window (t_lo, t_hi) ps for the per-unit slopes;
    default [0.1, 0.5] x trajectory duration.  cluster_labels [n_indices]: units with
    the same label are treated as one independent unit for the error (e.g. the chain id
    of each bead).  Computation is FFT-based and chunked over beads.
    """
    x = _positions(positions)
    f, n, _ = x.shape
    if f < 4:
        raise ValueError("need at least 4 frames for an MSD")
    if dt <= 0:
        raise ValueError("dt must be positive (ps)")
    idx = _indices(indices, n)
    if remove_com_drift:
        m = _masses(masses, n)
        com = np.einsum("fnk,n->fk", x, m) / m.sum()
    t = np.arange(f) * dt
    window = _default_window(t[-1]) if fit_window is None else tuple(map(float, fit_window))
    sel = (t >= window[0]) & (t <= window[1]) & (t > 0)
    if sel.sum() < 2:
        raise ValueError(f"fit window {window} ps contains fewer than 2 lags")
    w = _fit_weights(t, sel)
    total = np.zeros(f)
    slopes = np.empty(idx.size)
    step = max(1, chunk_elems // (3 * f))
    for s in range(0, idx.size, step):
        xs = x[:, idx[s:s + step]]
        if remove_com_drift:
            xs = xs - com[:, None, :]
        msd_i = _msd_fft(xs)
        total += msd_i.sum(axis=1)
        slopes[s:s + step] = w @ msd_i
    labels = None
    if cluster_labels is not None:
        labels = np.asarray(cluster_labels)
        if labels.shape != (idx.size,):
            raise ValueError(f"cluster_labels must have shape [{idx.size}], got {labels.shape}")
    return MSDResult(t, total / idx.size, slopes, window, labels)


def fit_diffusion(result: MSDResult) -> DiffusionFit:
    """Diffusivity from an MSDResult: D = slope / 6 (nm^2/ps) with standard error.

    Slope: least-squares line through the mean MSD over result.fit_window.  Error: the
    standard error of the mean of per-unit slopes (or per-cluster mean slopes), / 6,
    i.e. the closed-form bootstrap-over-molecules error of the mean slope.
    """
    t, y = result.lag_times, result.msd
    lo, hi = result.fit_window
    sel = (t >= lo) & (t <= hi) & (t > 0)
    slope, intercept = np.polyfit(t[sel], y[sel], 1)
    s = result.per_unit_slope
    if result.cluster_labels is not None:
        _, inv = np.unique(result.cluster_labels, return_inverse=True)
        s = np.bincount(inv, weights=s) / np.bincount(inv)
    err = float(np.std(s, ddof=1) / np.sqrt(s.size)) if s.size > 1 else np.nan
    return DiffusionFit(float(slope / 6.0), err / 6.0, float(intercept), (lo, hi), int(s.size))


def nm2_per_ps_to_1e5_cm2_per_s(d):
    """Convert a diffusivity from nm^2/ps (OpenMM units) to units of 1e-5 cm^2/s.

    1 nm^2/ps = 1e-14 cm^2 / 1e-12 s = 1e-2 cm^2/s = 1000 x 1e-5 cm^2/s.
    """
    return np.asarray(d, dtype=np.float64) * 1000.0


# --------------------------------------------------------------------------- collisions


def _bond_keys(bonds, n: int) -> np.ndarray:
    if bonds is None:
        return np.empty(0, dtype=np.int64)
    bd = np.asarray(bonds)
    if bd.size == 0:
        return np.empty(0, dtype=np.int64)
    if bd.ndim != 2 or bd.shape[1] != 2 or not np.issubdtype(bd.dtype, np.integer):
        raise ValueError(f"bonds must be an integer array [B, 2], got {bd.dtype} {bd.shape}")
    if bd.min() < 0 or bd.max() >= n:
        raise ValueError("bond index out of range")
    lo, hi = np.minimum(bd[:, 0], bd[:, 1]).astype(np.int64), np.maximum(bd[:, 0], bd[:, 1]).astype(np.int64)
    return np.unique(lo * n + hi)


def _frame_tree(xf: np.ndarray, box: np.ndarray | None):
    if box is None:
        return cKDTree(xf), xf
    if not _is_orthorhombic(box):
        raise NotImplementedError("collision/neighbour search supports orthorhombic boxes or no box")
    lengths = np.diagonal(box).copy()
    xw = _wrap_ortho(xf, lengths)
    return cKDTree(xw, boxsize=lengths), xw


def _close_pairs(xf, box, r: float) -> np.ndarray:
    tree, _ = _frame_tree(xf, box)
    return tree.query_pairs(r, output_type="ndarray").astype(np.int64)


def nearest_nonbonded_distances(positions, boxes=None, bonds=None, frames=None) -> np.ndarray:
    """Distance of each bead to its nearest non-bonded bead, per frame, nm.

    Non-bonded = not the bead itself and not joined by an entry of bonds [B, 2] (CG
    bonds).  PBC via a periodic cKDTree (orthorhombic boxes) or open boundaries if
    boxes is None.  frames: optional frame indices to use.  Returns [F', N].
    """
    x = _positions(positions)
    f, n, _ = x.shape
    bx = _boxes(boxes, f)
    keys = _bond_keys(bonds, n)
    deg = np.bincount(np.concatenate([keys // n, keys % n]), minlength=n) if keys.size else np.zeros(n, int)
    k = min(n, int(deg.max()) + 2)
    if n < 2:
        raise ValueError("need at least 2 beads")
    frames = np.arange(f) if frames is None else np.asarray(frames)
    out = np.empty((frames.size, n))
    me = np.arange(n)[:, None]
    for row, i in enumerate(frames):
        tree, xw = _frame_tree(x[i], None if bx is None else bx[i])
        dist, nb = tree.query(xw, k=k)
        lo, hi = np.minimum(me, nb), np.maximum(me, nb)
        bad = (nb == me) | np.isin(lo * n + hi, keys)
        dist = np.where(bad, np.inf, dist)
        out[row] = dist.min(axis=1)
    return out


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """At most ``limit`` evenly spaced indices of ``range(n)`` (all of them for None),
    first and last included: the one rule for subsampling frames and windows."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, int(limit)).astype(int))


def collision_threshold(reference_positions, boxes=None, bonds=None, quantile: float = 0.01,
                        max_frames: int = 200) -> float:
    """Collision distance from the reference: a low quantile (default 1 %) of the pooled
    nearest-non-bonded-neighbour distances (nm), over at most max_frames evenly spaced
    reference frames."""
    if not 0 < quantile < 1:
        raise ValueError("quantile must be in (0, 1)")
    x = _positions(reference_positions, "reference_positions")
    frames = evenly_spaced(x.shape[0], max_frames)
    d = nearest_nonbonded_distances(x, boxes, bonds, frames)
    d = d[np.isfinite(d)]
    return float(np.quantile(d, quantile))


def collision_rate(positions, threshold: float, boxes=None, bonds=None) -> np.ndarray:
    """Collisions per bead per frame.

    A collision is an unordered pair of non-bonded beads (not in bonds [B, 2]) closer
    than threshold (nm) under minimum image (orthorhombic boxes via periodic cKDTree)
    or open boundaries (boxes=None).  Returns [F] = n_colliding_pairs / N.  Memory
    O(N + pairs found), never O(N^2).
    """
    if threshold <= 0:
        raise ValueError("threshold must be positive (nm)")
    x = _positions(positions)
    f, n, _ = x.shape
    bx = _boxes(boxes, f)
    keys = _bond_keys(bonds, n)
    out = np.empty(f)
    for i in range(f):
        p = _close_pairs(x[i], None if bx is None else bx[i], threshold)
        if p.size:
            pk = np.minimum(p[:, 0], p[:, 1]) * n + np.maximum(p[:, 0], p[:, 1])
            out[i] = np.count_nonzero(~np.isin(pk, keys)) / n
        else:
            out[i] = 0.0
    return out


# --------------------------------------------------------------------------- PCA / FES


def kabsch_align(positions, reference, masses=None, rotate: bool = True) -> np.ndarray:
    """Superimpose every frame on a reference structure.

    positions [F, N, 3] nm; reference [N, 3] nm.  Translation: mass-weighted centres
    moved to the origin (the reference is centred too).  rotate=True: optimal proper
    rotation (Kabsch, weighted by masses).  Returns aligned [F, N, 3] nm.
    """
    x = _positions(positions)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.shape != x.shape[1:]:
        raise ValueError(f"reference must have shape {x.shape[1:]}, got {ref.shape}")
    m = _masses(masses, x.shape[1])
    w = m / m.sum()
    xc = x - np.einsum("fnk,n->fk", x, w)[:, None, :]
    rc = ref - w @ ref
    if not rotate:
        return xc
    h = np.einsum("fni,n,nj->fij", xc, w, rc)  # covariance, [F, 3, 3]
    u, _, vt = np.linalg.svd(h)
    det = np.sign(np.linalg.det(np.einsum("fij,fjk->fik", u, vt)))
    dmat = np.broadcast_to(np.eye(3), h.shape).copy()
    dmat[:, 2, 2] = det
    rot = np.einsum("fij,fjk,fkl->fil", u, dmat, vt)  # x @ rot ~ ref
    return np.einsum("fni,fij->fnj", xc, rot)


@dataclass
class PCAModel:
    """PCA of CG coordinates fitted on the reference.

    mean [3N] nm, components [k, 3N] (orthonormal rows), explained_variance [k] nm^2,
    align: "rotation" (centre + Kabsch), "translation" (centre only) or "none";
    reference_structure [N, 3] nm used for alignment; masses [N].
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    align: str
    reference_structure: np.ndarray
    masses: np.ndarray

    def prepare(self, positions) -> np.ndarray:
        x = _positions(positions)
        if x.shape[1:] != self.reference_structure.shape:
            raise ValueError(f"positions must have N={self.reference_structure.shape[0]} beads")
        if self.align == "none":
            return x
        return kabsch_align(x, self.reference_structure, self.masses, rotate=self.align == "rotation")

    def transform(self, positions) -> np.ndarray:
        """Project [F, N, 3] nm positions on the principal components -> [F, k] nm."""
        x = self.prepare(positions)
        x = x.reshape(x.shape[0], -1)
        return (x - self.mean) @ self.components.T


def fit_pca(reference_positions, n_components: int = 2, align: str = "rotation",
            reference_frame: int = 0, masses=None) -> PCAModel:
    """Fit PCA on reference CG coordinates [F, N, 3] nm.

    align: "rotation" (remove translation and rotation by Kabsch alignment to frame
    reference_frame; use for single chains), "translation" (remove the centre only;
    for periodic systems), "none".  Returns a PCAModel (use .transform for any traj).
    """
    x = _positions(reference_positions, "reference_positions")
    if align not in ("rotation", "translation", "none"):
        raise ValueError(f"align must be 'rotation', 'translation' or 'none', got {align!r}")
    d = 3 * x.shape[1]
    if not 1 <= n_components <= min(d, x.shape[0]):
        raise ValueError(f"n_components must be in [1, {min(d, x.shape[0])}]")
    m = _masses(masses, x.shape[1])
    ref = x[reference_frame].copy()
    model = PCAModel(np.zeros(d), np.zeros((n_components, d)), np.zeros(n_components), align, ref, m)
    xf = model.prepare(x).reshape(x.shape[0], -1)
    if align == "rotation":  # iterate once: align to the mean structure, not to one frame
        model.reference_structure = xf.mean(axis=0).reshape(-1, 3)
        xf = model.prepare(x).reshape(x.shape[0], -1)
    mean = xf.mean(axis=0)
    _, s, vt = np.linalg.svd(xf - mean, full_matrices=False)
    model.mean = mean
    model.components = vt[:n_components]
    model.explained_variance = s[:n_components] ** 2 / max(1, x.shape[0] - 1)
    return model


@dataclass
class FreeEnergySurface:
    """F = -ln p on a shared 2-D grid, in kT, each shifted so its minimum is 0.

    x_edges [Bx+1], y_edges [By+1] (projection units, nm); free_energy: list of
    [Bx, By] arrays (NaN where the histogram is empty); labels: list of str.
    """

    x_edges: np.ndarray
    y_edges: np.ndarray
    free_energy: list
    labels: list = field(default_factory=list)


def free_energy_surface(projections: Sequence, bins: int = 50, range=None, labels=None,
                        pad: float = 0.05) -> FreeEnergySurface:
    """F(x, y) = -ln p(x, y) (kT) of several 2-D samples on one shared grid.

    projections: sequence of [F_i, >=2] arrays (first two columns used).  range:
    ((xlo, xhi), (ylo, yhi)); default = pooled extent of all samples + pad fraction.
    """
    ps = [np.asarray(p, dtype=np.float64) for p in projections]
    if not ps or any(p.ndim != 2 or p.shape[1] < 2 or p.shape[0] < 1 for p in ps):
        raise ValueError("projections must be a sequence of [F, >=2] arrays")
    ps = [p[:, :2] for p in ps]
    if range is None:
        allp = np.concatenate(ps)
        lo, hi = allp.min(axis=0), allp.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        range = tuple((lo[k] - pad * span[k], hi[k] + pad * span[k]) for k in (0, 1))
    xe = np.linspace(range[0][0], range[0][1], bins + 1)
    ye = np.linspace(range[1][0], range[1][1], bins + 1)
    fes = []
    for p in ps:
        h, _, _ = np.histogram2d(p[:, 0], p[:, 1], bins=(xe, ye), density=True)
        with np.errstate(divide="ignore"):
            fe = -np.log(h)
        fe[~np.isfinite(fe)] = np.nan
        fes.append(fe - np.nanmin(fe))
    labels = list(labels) if labels is not None else [f"traj {i}" for i in np.arange(len(ps))]
    return FreeEnergySurface(xe, ye, fes, labels)


def pca_free_energy_surfaces(reference_positions, others: Iterable, labels=None,
                             align: str = "rotation", masses=None, bins: int = 50):
    """PCA fitted on the reference, all trajectories projected, shared-grid FES (kT).

    reference_positions [F, N, 3] nm; others: iterable of [F_i, N, 3] nm.
    Returns (PCAModel, FreeEnergySurface) with the reference surface first.
    """
    model = fit_pca(reference_positions, 2, align=align, masses=masses)
    proj = [model.transform(reference_positions)] + [model.transform(o) for o in others]
    if labels is None:
        labels = ["reference"] + [f"traj {i}" for i in np.arange(1, len(proj))]
    return model, free_energy_surface(proj, bins=bins, labels=labels)


# --------------------------------------------------------------------------- distances


def jensen_shannon_divergence(a, b, bins: int = 50, range=None, base: float = 2.0) -> float:
    """Jensen-Shannon divergence between two 1-D samples on shared histogram bins.

    JS = 0.5 KL(P || M) + 0.5 KL(Q || M), M = (P + Q) / 2; base 2 => in [0, 1] bits.
    Dimensionless.  Note that finite-sample noise gives a small positive value even
    for samples from the same distribution.
    """
    edges, (h1, h2) = shared_histogram([a, b], bins=bins, range=range, density=False)
    p = h1 / h1.sum()
    q = h2 / h2.sum()
    mix = 0.5 * (p + q)

    def kl(u):
        nz = u > 0
        return np.sum(u[nz] * np.log(u[nz] / mix[nz]))

    return float((0.5 * kl(p) + 0.5 * kl(q)) / np.log(base))


def wasserstein_1(a, b) -> float:
    """Earth mover's distance W1 between two 1-D samples (units of the samples)."""
    a = np.ravel(np.asarray(a, dtype=np.float64))
    b = np.ravel(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("samples must be non-empty")
    return float(stats.wasserstein_distance(a, b))


def mean_absolute_error(estimate, reference) -> float:
    """Mean |estimate - reference| over matching arrays (e.g. two g(r) on one grid)."""
    e = np.asarray(estimate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if e.shape != r.shape:
        raise ValueError(f"shape mismatch {e.shape} vs {r.shape}")
    return float(np.mean(np.abs(e - r)))


def relative_error(estimate, reference):
    """(estimate - reference) / |reference| (signed, dimensionless; elementwise)."""
    e = np.asarray(estimate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (e - r) / np.abs(r)
    return out.item() if out.ndim == 0 else out
