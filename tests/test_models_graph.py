"""Graph construction: cell list vs all pairs vs a brute-force image search."""
import itertools

import pytest
import torch

from openmm_cgml.models.graph import (EDGE_BOND, EDGE_RADIUS, EDGE_SELF, build_graph, build_graph_batched,
                                      radius_edges)

torch.set_num_threads(1)

TRICLINIC = torch.tensor([[2.0, 0.0, 0.0], [0.6, 2.2, 0.0], [-0.5, 0.7, 2.4]], dtype=torch.float64)


def random_rotation(seed):
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def brute_force_pairs(pos, box, cutoff, images=3):
    """(sender, receiver) pairs with some periodic image closer than cutoff."""
    d = pos.unsqueeze(0) - pos.unsqueeze(1)  # [receiver, sender] = x_sender - x_receiver
    if bool((box != 0).any()):
        dist = torch.full(d.shape[:2], float("inf"), dtype=pos.dtype)
        for k in itertools.product(range(-images, images + 1), repeat=3):
            shift = torch.tensor(k, dtype=pos.dtype) @ box
            dist = torch.minimum(dist, torch.linalg.vector_norm(d + shift, dim=-1))
    else:
        dist = torch.linalg.vector_norm(d, dim=-1)
    receivers, senders = torch.nonzero(dist < cutoff, as_tuple=True)
    return set(zip(senders.tolist(), receivers.tolist()))


BOXES = {
    "none": torch.zeros(3, 3, dtype=torch.float64),
    "orthorhombic": torch.diag(torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64)),
    "triclinic": TRICLINIC,
    "rotated_triclinic": TRICLINIC @ random_rotation(1).T,
    "unreduced_triclinic": torch.tensor([[2.0, 0.0, 0.0], [1.9, 2.2, 0.0], [-2.5, 1.7, 2.4]], dtype=torch.float64),
}


@pytest.mark.parametrize("box_name", list(BOXES))
def test_cell_list_equals_all_pairs_and_brute_force(box_name):
    box = BOXES[box_name]
    gen = torch.Generator().manual_seed(7)
    # positions also outside the primary cell: the search must wrap them
    n = 150 if "unreduced" in box_name else 300  # its reference needs 13^3 images
    pos = torch.rand(n, 3, dtype=torch.float64, generator=gen) * 3.5 - 0.5
    expected = brute_force_pairs(pos, box, 0.7, images=6 if "unreduced" in box_name else 2)
    for method in ("all_pairs", "cell_list"):
        senders, receivers = radius_edges(pos, box, 0.7, method)
        found = list(zip(senders.tolist(), receivers.tolist()))
        assert len(found) == len(set(found)), f"{method} produced duplicate edges"
        assert set(found) == expected, method


def test_cell_list_sparse_non_periodic_and_scripted():
    # a long, sparse chain: the non-periodic cell grid must stay bounded and correct
    gen = torch.Generator().manual_seed(3)
    pos = torch.cumsum(torch.randn(400, 3, generator=gen) * 0.3, dim=0)
    box = torch.zeros(3, 3)
    expected = brute_force_pairs(pos, box, 0.5)
    scripted = torch.jit.script(radius_edges)
    s, r = scripted(pos, box, 0.5, "cell_list", 256)
    assert set(zip(s.tolist(), r.tolist())) == expected


def test_minimum_image_at_box_edge():
    box = torch.diag(torch.tensor([3.0, 3.0, 3.0]))
    pos = torch.tensor([[0.01, 1.5, 1.5], [2.99, 1.5, 1.5], [1.5, 1.5, 1.5]])
    for method in ("all_pairs", "cell_list"):
        senders, receivers, vec, etype = build_graph(pos, box, torch.zeros(0, 2, dtype=torch.long), 0.5, method)
        edges = {(s, r): v for s, r, v in zip(senders.tolist(), receivers.tolist(), vec)}
        assert (1, 0) in edges and (0, 1) in edges
        # x_sender - x_receiver through the face: 2.99 -> -0.01 relative to 0.01
        torch.testing.assert_close(edges[(1, 0)], torch.tensor([-0.02, 0.0, 0.0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(edges[(0, 1)], torch.tensor([0.02, 0.0, 0.0]), atol=1e-5, rtol=0)
        assert (2, 0) not in edges and (0, 2) not in edges


def test_self_loops_and_bond_edges():
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    bonds = torch.tensor([[0, 1], [1, 2]])  # (1, 2) is 1.7 nm apart, beyond the cutoff
    senders, receivers, vec, etype = build_graph(pos, torch.zeros(3, 3), bonds, 0.5)
    edges = {(s, r): (v, t) for s, r, v, t in zip(senders.tolist(), receivers.tolist(), vec, etype.tolist())}
    assert len(edges) == senders.numel(), "duplicate edges"
    for i in range(4):
        v, t = edges[(i, i)]
        assert t == EDGE_SELF and torch.all(v == 0)
    for s, r in [(0, 1), (1, 0), (1, 2), (2, 1)]:
        assert edges[(s, r)][1] == EDGE_BOND
    torch.testing.assert_close(edges[(2, 1)][0], torch.tensor([1.7, 0.0, 0.0]))
    assert (0, 2) not in edges and (3, 2) not in edges
    assert set(etype.tolist()) == {EDGE_SELF, EDGE_BOND}

    # an unbonded pair within the cutoff is a radius edge
    pos2 = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    _, _, _, t2 = build_graph(pos2, torch.zeros(3, 3), torch.zeros(0, 2, dtype=torch.long), 0.5)
    assert sorted(t2.tolist()) == [EDGE_RADIUS, EDGE_RADIUS, EDGE_SELF, EDGE_SELF]


@pytest.mark.parametrize("max_block_beads", [64, 0])  # vectorised blocks; one search per graph
def test_batched_graph_equals_per_graph(max_block_beads):
    gen = torch.Generator().manual_seed(5)
    pos_a = torch.rand(30, 3, generator=gen) * 2
    pos_b = torch.rand(20, 3, generator=gen) * 2
    box_a, box_b = torch.diag(torch.tensor([2.0, 2.0, 2.0])), torch.zeros(3, 3)
    bonds_a, bonds_b = torch.tensor([[0, 29]]), torch.tensor([[3, 4], [0, 19]])
    pos = torch.cat([pos_a, pos_b])
    batch = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    s, r, v, t = build_graph_batched(pos, torch.stack([box_a, box_b]), torch.cat([bonds_a, bonds_b + 30]), batch, 0.6,
                                     max_block_beads=max_block_beads)
    assert len(s) == len(set(zip(s.tolist(), r.tolist())))  # no duplicate edges
    sa, ra, va, ta = build_graph(pos_a, box_a, bonds_a, 0.6)
    sb, rb, vb, tb = build_graph(pos_b, box_b, bonds_b, 0.6)
    got = {(a, b): (tuple(round(x, 5) for x in c.tolist()), d) for a, b, c, d in zip(s.tolist(), r.tolist(), v, t.tolist())}
    want = {(a, b): (tuple(round(x, 5) for x in c.tolist()), d) for a, b, c, d in zip(sa.tolist(), ra.tolist(), va, ta.tolist())}
    want.update({(a + 30, b + 30): (tuple(round(x, 5) for x in c.tolist()), d)
                 for a, b, c, d in zip(sb.tolist(), rb.tolist(), vb, tb.tolist())})
    assert got == want


def test_bad_inputs_raise_clear_errors():
    pos = torch.rand(5, 3)
    with pytest.raises(ValueError, match="half the smallest box width"):
        radius_edges(pos, torch.eye(3), 0.6)
    with pytest.raises(ValueError, match="out of range"):
        build_graph(pos, torch.zeros(3, 3), torch.tensor([[0, 5]]), 0.5)
    with pytest.raises(ValueError, match="itself"):
        build_graph(pos, torch.zeros(3, 3), torch.tensor([[2, 2]]), 0.5)
    with pytest.raises(ValueError, match="different graphs"):
        build_graph_batched(pos, torch.zeros(2, 3, 3), torch.tensor([[0, 4]]), torch.tensor([0, 0, 0, 1, 1]), 0.5)


def test_cell_list_sparse_periodic_box():
    # a box much larger than the cutoff with few particles: the cell grid is capped
    gen = torch.Generator().manual_seed(0)
    box = torch.diag(torch.tensor([20.0, 15.0, 12.0], dtype=torch.float64))
    pos = torch.rand(100, 3, dtype=torch.float64, generator=gen) * 20
    pos = torch.cat([pos, pos + 0.3 * torch.randn(100, 3, dtype=torch.float64, generator=gen)])
    senders, receivers = radius_edges(pos, box, 0.7, "cell_list")
    assert set(zip(senders.tolist(), receivers.tolist())) == brute_force_pairs(pos, box, 0.7, images=1)


def test_box_rotations_of_augmentation_map_the_periodic_graph_onto_itself():
    """The rotations by pi that training augmentation uses under PBC give the same edges
    with rotated edge vectors, with positions outside the box and for both builders."""
    torch.manual_seed(0)
    box = torch.diag(torch.tensor([3.0, 3.5, 4.0]))
    pos = torch.rand(300, 3) * torch.diagonal(box) + torch.randn(300, 3)
    bonds = torch.zeros(0, 2, dtype=torch.long)
    for method in ("all_pairs", "cell_list"):
        s1, r1, v1, _ = build_graph(pos, box, bonds, 0.9, method)
        for diagonal in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
            R = torch.diag(torch.tensor(diagonal, dtype=torch.float32))
            s2, r2, v2, _ = build_graph(pos @ R.T, box, bonds, 0.9, method)
            first = {(int(a), int(b)): v for a, b, v in zip(s1, r1, v1 @ R.T)}
            second = {(int(a), int(b)): v for a, b, v in zip(s2, r2, v2)}
            assert first.keys() == second.keys() and len(first) > 300
            assert max(float((second[k] - first[k]).abs().max()) for k in first) < 1e-5


@pytest.mark.parametrize("box_name", list(BOXES))
def test_dense_all_pairs_graph_equals_cell_list_graph(box_name):
    """build_graph's all-pairs path (dense masks, one pass) and its cell-list path (pair
    search, then bonds merged by key) give the same edges, vectors and types, scripted too:
    every box shape, positions outside the cell, bonds within and beyond the cutoff."""
    box = BOXES[box_name].to(torch.float32)
    gen = torch.Generator().manual_seed(11)
    n = 120
    pos = torch.rand(n, 3, generator=gen) * 3.5 - 0.5
    bonds = torch.stack([torch.arange(0, n - 1, 2), torch.arange(1, n, 2)], dim=1)  # some far apart
    scripted = torch.jit.script(build_graph)
    graphs = {name: fn(pos, box, bonds, 0.7, method) for name, fn, method in
              [("dense", build_graph, "all_pairs"), ("scripted", scripted, "all_pairs"),
               ("cell list", build_graph, "cell_list")]}
    as_dict = {name: {(int(s), int(r)): (v, int(t)) for s, r, v, t in zip(*g)} for name, g in graphs.items()}
    want = as_dict["cell list"]
    assert sum(t == EDGE_BOND for _, t in want.values()) == 2 * len(bonds)
    assert any(float(v.norm()) > 0.7 for v, t in want.values() if t == EDGE_BOND), "no bond beyond the cutoff"
    for name in ("dense", "scripted"):
        got = as_dict[name]
        assert len(got) == graphs[name][0].numel(), f"{name}: duplicate edges"
        assert got.keys() == want.keys(), name
        assert all(got[k][1] == want[k][1] for k in want), f"{name}: edge types differ"
        assert max(float((got[k][0] - want[k][0]).abs().max()) for k in want) < 1e-5, f"{name}: edge vectors differ"
    receivers = graphs["dense"][1]
    assert bool((receivers[1:] >= receivers[:-1]).all()), "the all-pairs graph is ordered by receiver"
    # and both against the brute-force image search, bonds added in both directions
    bonded = {(int(a), int(b)) for a, b in bonds} | {(int(b), int(a)) for a, b in bonds}
    assert set(as_dict["dense"]) == brute_force_pairs(pos.double(), box.double(), 0.7, images=6) | bonded


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("box_name", ["none", "orthorhombic", "rotated_triclinic"])
def test_all_pairs_graph_of_zero_or_one_bead(n, box_name):
    box = BOXES[box_name].to(torch.float32)
    for fn in (build_graph, torch.jit.script(build_graph)):
        s, r, v, t = fn(torch.rand(n, 3), box, torch.zeros(0, 2, dtype=torch.long), 0.7, "all_pairs")
        assert s.tolist() == r.tolist() == list(range(n)) and v.shape == (n, 3) and t.tolist() == [EDGE_SELF] * n
