"""Known-answer tests for openmm_cgml.analysis (fast: small systems, fixed seeds)."""
import numpy as np
import pytest

from openmm_cgml import analysis as A


def _rng(seed=0):
    return np.random.default_rng(seed)


def _ar1(phi, n, m, seed=0):
    rng = _rng(seed)
    e = rng.normal(size=(n, m))
    x = np.empty((n, m))
    x[0] = e[0] / np.sqrt(1 - phi ** 2)  # stationary start
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


# ------------------------------------------------------------------ Rg^2


def test_rg2_discrete_rod_and_ring():
    n, b = 11, 0.3
    rod = np.zeros((1, n, 3))
    rod[0, :, 0] = b * np.arange(n)
    # exact discrete formula for n equal masses spaced b: b^2 (n^2 - 1) / 12
    assert A.radius_of_gyration_squared(rod)[0] == pytest.approx(b ** 2 * (n ** 2 - 1) / 12, rel=1e-12)
    # continuous limit L^2 / 12
    many = np.zeros((1, 2001, 3))
    many[0, :, 1] = np.linspace(0, 2.0, 2001)
    assert A.radius_of_gyration_squared(many)[0] == pytest.approx(2.0 ** 2 / 12, rel=2e-3)

    r = 1.7
    phi = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    ring = np.stack([r * np.cos(phi), r * np.sin(phi), np.zeros_like(phi)], -1)[None] + 5.0
    assert A.radius_of_gyration_squared(ring)[0] == pytest.approx(r ** 2, rel=1e-12)


def test_rg2_groups_masses_and_translation_invariance():
    rng = _rng(1)
    x = rng.normal(size=(3, 10, 3))
    m = rng.uniform(1, 5, size=10)
    groups = [np.array([0, 1, 2, 3]), np.array([9, 5, 7]), np.array([4, 6, 8])]
    got = A.radius_of_gyration_squared(x + 10.0, m, groups)
    assert got.shape == (3, 3)
    for g, idx in enumerate(groups):
        w = m[idx] / m[idx].sum()
        com = np.einsum("fnk,n->fk", x[:, idx], w)
        ref = np.einsum("fn,n->f", ((x[:, idx] - com[:, None]) ** 2).sum(-1), w)
        np.testing.assert_allclose(got[:, g], ref, rtol=1e-10)
    # mass weighting matters: a heavy bead pulls the centre
    two = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
    assert A.radius_of_gyration_squared(two, [3.0, 1.0])[0] == pytest.approx(0.1875)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        A.radius_of_gyration_squared(np.zeros((5, 3)))
    with pytest.raises(ValueError):
        A.radius_of_gyration_squared(np.zeros((2, 5, 3)), masses=np.ones(4))
    with pytest.raises(ValueError):
        A.rdf(np.zeros((2, 5, 3)), None, np.arange(5))
    with pytest.raises(ValueError):
        A.rdf(np.zeros((2, 5, 3)), np.eye(3), np.arange(5), r_max=0.9)  # > L/2


def test_shared_histogram_uses_common_bins():
    edges, (h1, h2) = A.shared_histogram([np.arange(10.0), np.arange(5.0, 20.0)], bins=19)
    assert edges[0] == 0 and edges[-1] == 19
    assert np.sum(h1 * np.diff(edges)) == pytest.approx(1) and np.sum(h2 * np.diff(edges)) == pytest.approx(1)


# ------------------------------------------------------------------ ACF / errors


def test_acf_ar1_and_relaxation_time():
    phi = 0.9
    x = _ar1(phi, 20000, 4)
    acf = A.autocorrelation(x, max_lag=200)
    assert acf[0] == 1.0
    np.testing.assert_allclose(acf[:11], phi ** np.arange(11), atol=0.03)
    dt = 2.0  # ps per frame
    rt = A.relaxation_time(acf, dt=dt)
    tau_true = -dt / np.log(phi)  # 18.98 ps
    assert rt.crossed
    assert rt.tau_exp == pytest.approx(tau_true, rel=0.1)
    assert rt.amplitude == pytest.approx(1.0, abs=0.05)
    assert rt.tau_integral == pytest.approx(tau_true, rel=0.15)
    # explicit cutoff: integral of exp(-t/tau) to 5 tau
    rt2 = A.relaxation_time(np.exp(-np.arange(400) * 0.5 / 10.0), dt=0.5, cutoff=50.0)
    assert rt2.tau_integral == pytest.approx(10 * (1 - np.exp(-5)), rel=1e-3)
    assert rt2.tau_exp == pytest.approx(10.0, rel=1e-6)


def test_acf_white_noise_is_delta():
    acf = A.autocorrelation(_rng(3).normal(size=5000), max_lag=20)
    assert np.all(np.abs(acf[1:]) < 0.06)


def test_sem_of_correlated_mean_matches_ar1_theory():
    phi = 0.8
    n = 16384
    x = _ar1(phi, n, 6, seed=5)
    # Var(mean) = sigma_x^2 / n * (1 + phi) / (1 - phi), sigma_x^2 = 1 / (1 - phi^2)
    true = np.sqrt(1 / (1 - phi ** 2) / n * (1 + phi) / (1 - phi))
    naive = np.sqrt(1 / (1 - phi ** 2) / n)
    for method in ("blocking", "acf"):
        errs = np.array([A.mean_with_error(x[:, k], method)[1] for k in range(6)])
        assert np.mean(errs) == pytest.approx(true, rel=0.2), method
        assert np.all(errs > 2 * naive)
    assert A.integrated_autocorrelation_time(x[:, 0]) == pytest.approx((1 + phi) / (1 - phi), rel=0.2)


# ------------------------------------------------------------------ RDF


def test_rdf_ideal_gas_is_one_for_self_and_cross_groups():
    rng = _rng(2)
    box = np.diag([3.0, 3.5, 4.0])
    x = rng.uniform(size=(6, 600, 3)) * np.diag(box) - 1.0  # not wrapped: shifted by -1
    for ga, gb in [(np.arange(600), None), (np.arange(300), np.arange(300, 600)),
                   (np.arange(400), np.arange(200, 600))]:  # overlapping groups
        r, g = A.rdf(x, box, ga, gb, r_max=1.4, n_bins=14)
        assert r.shape == g.shape == (14,)
        assert np.all(np.abs(g[2:] - 1) < 0.1)
        assert np.mean(g[2:]) == pytest.approx(1.0, abs=0.02)


def test_rdf_tree_matches_brute_and_mdtraj():
    md = pytest.importorskip("mdtraj")
    rng = _rng(4)
    L = 2.5
    x = rng.uniform(0, L, size=(3, 200, 3))
    a, b = np.arange(80), np.arange(80, 200)
    r, g_tree = A.rdf(x, np.eye(3) * L, a, b, r_max=1.2, n_bins=24, method="tree")
    _, g_brute = A.rdf(x, np.eye(3) * L, a, b, r_max=1.2, n_bins=24, method="brute")
    np.testing.assert_allclose(g_tree, g_brute, atol=1e-12)
    top = md.Topology()
    chain = top.add_chain()
    for _ in range(200):
        top.add_atom("C", md.element.carbon, top.add_residue("X", chain))
    traj = md.Trajectory(x, top, unitcell_lengths=np.full((3, 3), L), unitcell_angles=np.full((3, 3), 90.0))
    r_md, g_md = md.compute_rdf(traj, top.select_pairs(a, b), r_range=(0, 1.2), n_bins=24)
    np.testing.assert_allclose(r, r_md, atol=1e-6)
    np.testing.assert_allclose(g_tree, g_md, atol=2e-3)


def test_rdf_detects_structure_and_triclinic_ideal_gas():
    # pairs of beads at fixed distance 0.5 nm: a spike at r = 0.5
    rng = _rng(6)
    L = 3.0
    c = rng.uniform(0, L, size=(2, 100, 3))
    u = rng.normal(size=(2, 100, 3))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    x = np.concatenate([c, c + 0.52 * u], axis=1)
    r, g = A.rdf(x, np.eye(3) * L, np.arange(100), np.arange(100, 200), r_max=1.0, n_bins=20)
    assert r[10] == pytest.approx(0.525) and 10 + np.argmax(g[10:]) == 10
    shell = 4 / 3 * np.pi * (0.55 ** 3 - 0.5 ** 3)
    ideal = 100 * 100 * shell / L ** 3  # ideal pair count per frame in that bin
    assert g[10] == pytest.approx(1 + 100 / ideal, abs=0.35)  # + the 100 bonded pairs
    # triclinic (reduced form) ideal gas
    box = np.array([[3.0, 0, 0], [1.2, 3.0, 0], [-1.0, 1.3, 3.0]])
    xt = rng.uniform(size=(3, 500, 3)) @ box
    r, g = A.rdf(xt, box, np.arange(500), r_max=1.2, n_bins=12)
    assert np.mean(g[2:]) == pytest.approx(1.0, abs=0.03)


def test_minimum_image_triclinic_matches_image_search():
    rng = _rng(7)
    box = np.array([[3.0, 0, 0], [1.2, 3.0, 0], [-1.0, 1.3, 3.0]])
    d = rng.uniform(-6, 6, size=(2000, 3))
    got = np.linalg.norm(A.minimum_image(d, box), axis=-1)
    shifts = np.array(np.meshgrid(*[np.arange(-3, 4)] * 3)).reshape(3, -1).T @ box
    best = np.min(np.linalg.norm(d[:, None, :] + shifts[None], axis=-1), axis=1)
    short = best < 0.5 * 3.0 * 0.9  # exactness is guaranteed below half the width
    np.testing.assert_allclose(got[short], best[short], atol=1e-12)


# ------------------------------------------------------------------ MSD / diffusion


def test_msd_random_walk_gives_6Dt_and_D_within_error():
    # (calibration over 30 seeds: z = (D - D_true) / D_err has mean 0.0, sd 1.2)
    rng = _rng(0)
    sigma, dt, F, N = 0.05, 2.0, 800, 300  # step std per axis (nm), ps per frame
    D_true = sigma ** 2 / (2 * dt)  # nm^2/ps
    x = np.cumsum(rng.normal(scale=sigma, size=(F, N, 3)), axis=0)
    res = A.mean_squared_displacement(x, dt, remove_com_drift=False)
    lag = slice(1, 200)
    np.testing.assert_allclose(res.msd[lag], 6 * D_true * res.lag_times[lag], rtol=0.05)
    fit = A.fit_diffusion(res)
    assert fit.fit_window == pytest.approx((0.1 * (F - 1) * dt, 0.5 * (F - 1) * dt))
    assert 0 < fit.D_err < 0.1 * D_true
    assert abs(fit.D - D_true) < 3 * fit.D_err
    # with COM-drift removal (all beads equal mass) the bias is only (1 - 1/N)
    fit2 = A.fit_diffusion(A.mean_squared_displacement(x, dt))
    assert abs(fit2.D - D_true * (1 - 1 / N)) < 3 * fit2.D_err
    # units helper: 1 nm^2/ps = 1000 x 1e-5 cm^2/s
    assert A.nm2_per_ps_to_1e5_cm2_per_s(1.0) == pytest.approx(1000.0)


def test_msd_species_drift_and_clusters():
    rng = _rng(9)
    F, N, dt = 200, 60, 1.0
    x = np.cumsum(rng.normal(scale=0.02, size=(F, N, 3)), axis=0)
    x[:, 30:] *= 3.0  # second species diffuses 9x faster
    drift = np.arange(F)[:, None, None] * np.array([0.05, 0.0, 0.0])
    d_slow = A.fit_diffusion(A.mean_squared_displacement(x, dt, np.arange(30), remove_com_drift=False)).D
    d_fast = A.fit_diffusion(A.mean_squared_displacement(x, dt, np.arange(30, 60), remove_com_drift=False)).D
    assert d_fast / d_slow == pytest.approx(9.0, rel=0.35)
    # a uniform drift is removed exactly by COM-drift removal
    r0 = A.mean_squared_displacement(x, dt, np.arange(30))
    r1 = A.mean_squared_displacement(x + drift, dt, np.arange(30))
    np.testing.assert_allclose(r0.msd, r1.msd, rtol=1e-8, atol=1e-10)
    # clusters: error computed over 6 clusters of 5 beads
    fit = A.fit_diffusion(A.mean_squared_displacement(
        x, dt, np.arange(30), cluster_labels=np.repeat(np.arange(6), 5)))
    assert fit.n_independent == 6 and np.isfinite(fit.D_err)


def test_group_centers():
    x = np.arange(2 * 4 * 3, dtype=float).reshape(2, 4, 3)
    c = A.group_centers(x, [1, 1, 2, 2], [np.array([0, 1]), np.array([2, 3])])
    np.testing.assert_allclose(c[:, 0], 0.5 * (x[:, 0] + x[:, 1]))
    np.testing.assert_allclose(c[:, 1], (x[:, 2] + x[:, 3]) / 2)


# ------------------------------------------------------------------ collisions


def test_collision_counting_hand_made_with_pbc():
    L = 4.0
    pos = np.array([[
        [0.05, 2.0, 2.0],  # 0 and 1: 0.1 nm apart across the x boundary
        [3.95, 2.0, 2.0],
        [1.0, 1.0, 1.0],  # 2 and 3: 0.1 nm apart but bonded -> not a collision
        [1.1, 1.0, 1.0],
        [2.0, 3.0, 1.0],  # 4 and 5: 0.15 nm apart -> collision
        [2.0, 3.15, 1.0],
        [2.0, 1.0, 3.0],  # 6 alone
        [3.0, 3.0, 3.0],  # 7 at 0.5 nm from 8 -> not a collision
        [3.5, 3.0, 3.0],
    ]])
    bonds = np.array([[3, 2]])
    rate = A.collision_rate(pos, 0.2, boxes=np.eye(3) * L, bonds=bonds)
    assert rate.shape == (1,)
    assert rate[0] == pytest.approx(2 / 9)
    # without PBC the pair across the boundary is 3.9 nm apart
    assert A.collision_rate(pos, 0.2, boxes=None, bonds=bonds)[0] == pytest.approx(1 / 9)
    # without the bond exclusion, 3 collisions
    assert A.collision_rate(pos, 0.2, boxes=np.eye(3) * L)[0] == pytest.approx(3 / 9)
    nn = A.nearest_nonbonded_distances(pos, np.eye(3) * L, bonds)
    np.testing.assert_allclose(nn[0, :2], 0.1, atol=1e-12)
    assert nn[0, 2] > 0.5 and nn[0, 7] == pytest.approx(0.5)


def test_collision_threshold_from_reference_and_scaling():
    rng = _rng(10)
    L, N = 6.0, 10_000
    x = rng.uniform(0, L, size=(2, N, 3))
    thr = A.collision_threshold(x, np.eye(3) * L, quantile=0.01)
    # ideal gas: P(nn < r) = 1 - exp(-rho 4/3 pi r^3)  -> 1 % quantile
    rho = N / L ** 3
    r01 = (-np.log(0.99) / (rho * 4 / 3 * np.pi)) ** (1 / 3)
    assert thr == pytest.approx(r01, rel=0.05)
    rate = A.collision_rate(x, thr, np.eye(3) * L)
    # pairs within thr per bead = rho * 4/3 pi thr^3 / 2
    assert rate.mean() == pytest.approx(rho * 4 / 3 * np.pi * thr ** 3 / 2, rel=0.15)


# ------------------------------------------------------------------ PCA / FES


def test_pca_fes_of_embedded_gaussian_is_quadratic_with_minimum_at_mean():
    rng = _rng(11)
    N, F = 8, 40000
    s1, s2 = 0.3, 0.15
    z = rng.normal(size=(F, 2)) * [s1, s2]
    basis, _ = np.linalg.qr(rng.normal(size=(3 * N, 2)))
    mean = rng.normal(size=3 * N)
    x = (mean + z @ basis.T).reshape(F, N, 3)
    model = A.fit_pca(x, 2, align="none")
    np.testing.assert_allclose(model.explained_variance, [s1 ** 2, s2 ** 2], rtol=0.05)
    proj = model.transform(x)
    fes = A.free_energy_surface([proj], bins=31, range=((-1.0, 1.0), (-0.5, 0.5)))
    fe = fes.free_energy[0]
    xc = 0.5 * (fes.x_edges[1:] + fes.x_edges[:-1])
    yc = 0.5 * (fes.y_edges[1:] + fes.y_edges[:-1])
    i, j = np.unravel_index(np.nanargmin(fe), fe.shape)
    assert abs(xc[i]) <= 2 * np.diff(xc)[0] and abs(yc[j]) <= 2 * np.diff(yc)[0]
    # fit F = a x^2 + b y^2 + c on well-sampled bins (F < 3 kT)
    X, Y = np.meshgrid(xc, yc, indexing="ij")
    ok = np.isfinite(fe) & (fe < 3)
    M = np.stack([X[ok] ** 2, Y[ok] ** 2, np.ones(ok.sum())], 1)
    (a, b, _), *_ = np.linalg.lstsq(M, fe[ok], rcond=None)
    assert a == pytest.approx(1 / (2 * s1 ** 2), rel=0.15)
    assert b == pytest.approx(1 / (2 * s2 ** 2), rel=0.15)


def test_kabsch_and_pca_remove_rigid_motion():
    rng = _rng(12)
    N, F = 10, 300
    ref = rng.normal(size=(N, 3))
    q = np.linalg.qr(rng.normal(size=(F, 3, 3)))[0]
    q[np.linalg.det(q) < 0, :, 0] *= -1  # proper rotations
    x = np.einsum("nj,fjk->fnk", ref, q) + rng.normal(size=(F, 1, 3)) * 5
    al = A.kabsch_align(x, ref)
    np.testing.assert_allclose(al, np.broadcast_to(ref - ref.mean(0), al.shape), atol=1e-9)
    # rigidly moved copies of one structure + a 1-D deformation: PC1 is the deformation
    mode = rng.normal(size=(N, 3)) * 0.1
    amp = rng.normal(size=F)
    y = np.einsum("fnj,fjk->fnk", ref + amp[:, None, None] * mode, q)
    model, fes = A.pca_free_energy_surfaces(y, [y[:100]], labels=["ref", "learned"], bins=20)
    p = model.transform(y)[:, 0]
    assert abs(np.corrcoef(p, amp)[0, 1]) > 0.99
    assert model.explained_variance[1] < 0.05 * model.explained_variance[0]
    assert len(fes.free_energy) == 2 and fes.free_energy[1].shape == (20, 20)


# ------------------------------------------------------------------ distances


def test_distribution_distances():
    rng = _rng(13)
    a = rng.normal(size=20000)
    assert A.jensen_shannon_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    same = A.jensen_shannon_divergence(a, rng.normal(size=20000), bins=30)
    shifted = A.jensen_shannon_divergence(a, rng.normal(2.0, size=20000), bins=30)
    assert same < 0.01 < 0.3 < shifted <= 1.0
    assert A.wasserstein_1(a, a + 0.7) == pytest.approx(0.7, rel=1e-9)
    assert A.mean_absolute_error([1, 2, 3], [1, 1, 5]) == pytest.approx(1.0)
    np.testing.assert_allclose(A.relative_error([1.1, 1.8], [1.0, 2.0]), [0.1, -0.1])


def test_msd_fft_matches_direct_average_and_chunking():
    rng = _rng(14)
    x = np.cumsum(rng.normal(size=(30, 7, 3)), axis=0)
    res = A.mean_squared_displacement(x, 1.0, remove_com_drift=False)
    direct = [np.mean(np.sum((x[k:] - x[:30 - k]) ** 2, -1)) for k in range(30)]
    np.testing.assert_allclose(res.msd, direct, rtol=1e-9, atol=1e-9)
    small = A.mean_squared_displacement(x, 1.0, remove_com_drift=False, chunk_elems=90)
    np.testing.assert_allclose(small.msd, res.msd, rtol=1e-12)
    np.testing.assert_allclose(small.per_unit_slope, res.per_unit_slope, rtol=1e-12)


def test_rdf_triclinic_counts_match_minimum_image_pairs():
    rng = _rng(15)
    box = np.array([[2.5, 0, 0], [0.9, 2.5, 0], [-0.8, 1.0, 2.5]])
    x = rng.uniform(-1, 2, size=(1, 60, 3)) @ box  # unwrapped-looking coordinates
    a, b = np.arange(25), np.arange(15, 60)
    r, g = A.rdf(x, box, a, b, r_max=1.0, n_bins=10)
    d = np.linalg.norm(A.minimum_image(x[0, b][None] - x[0, a][:, None], box), axis=-1)
    d = d[a[:, None] != b[None, :]]
    counts = np.histogram(d, bins=np.linspace(0, 1.0, 11))[0]
    n_pairs = a.size * b.size - 10
    ideal = n_pairs * 4 / 3 * np.pi * np.diff(np.linspace(0, 1.0, 11) ** 3) / abs(np.linalg.det(box))
    np.testing.assert_allclose(g, counts / ideal, rtol=1e-12)


def test_rdf_first_peak_finds_the_first_shell_not_a_later_one():
    r = np.linspace(0.01, 2.0, 200)
    g = 1 + 1.5 * np.exp(-((r - 0.45) / 0.05) ** 2) + 0.4 * np.exp(-((r - 0.9) / 0.08) ** 2)
    g[r < 0.3] = 0.0  # excluded core
    g += np.random.default_rng(0).normal(0, 0.02, size=r.size)
    position, height = A.rdf_first_peak(r, g)
    assert abs(position - 0.45) < 0.02 and abs(height - 2.5) < 0.1
    assert A.rdf_first_peak(r, np.full_like(r, 0.9)) is None  # never above 1: no shell
    with pytest.raises(ValueError, match="same length"):
        A.rdf_first_peak(r, g[:-1])


def test_rdf_peak_errors_skip_reference_peaks_that_barely_rise():
    reference = {"A-B": (0.27, 8.0), "A-A": (0.57, 1.06), "B-B": (0.40, 6.0)}
    other = {"A-B": (0.25, 6.0), "A-A": (0.24, 3.0)}  # B-B has no peak in the other run
    errors = A.rdf_peak_errors(reference, other)
    assert set(errors) == {"A-B"}  # A-A: reference peak 1.06 < 1.5; B-B: missing in other
    shift, height = errors["A-B"]
    assert shift == pytest.approx(0.02) and height == pytest.approx(0.25)
    assert set(A.rdf_peak_errors(reference, other, min_height=1.0)) == {"A-B", "A-A"}
