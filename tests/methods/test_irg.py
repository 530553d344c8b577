"""irg (Liu et al. CVPR 2019, Knowledge-Distillation-Zoo's one-to-one IRG): vertex, edge and transformation losses."""
from __future__ import annotations

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import make_batch, make_pair
from tests.helpers import assert_no_teacher_grad, close, forward, method_options, rand64
from tests.methods.feature_helpers import one_epoch, teacher_checkpoints  # noqa: F401  (fixture)


def _np_edges(x):
    rows = [r.flatten().tolist() for r in x]
    n = len(rows)
    d = [[0.0 if i == j else max(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])), 1e-12) for j in range(n)]
         for i in range(n)]
    top = max(max(r) for r in d)
    return [[v / top for v in r] for r in d]


def _mse(a, b):
    flat_a = [v for r in a for v in (r if isinstance(r, list) else [r])]
    flat_b = [v for r in b for v in (r if isinstance(r, list) else [r])]
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)


def test_edge_matrix_is_the_max_normalised_squared_distance_with_a_zero_diagonal():
    from kdbench.methods.irg import irg_edge_matrix

    x = rand64(4, 2, 3, 3, seed=1)
    got = irg_edge_matrix(x)
    want = _np_edges(x)
    for i in range(4):
        for j in range(4):
            close(got[i, j], want[i][j])


def test_edge_loss_is_the_mean_over_levels_of_the_graph_mse():
    from kdbench.methods.irg import irg_edge_loss

    s = [rand64(3, 5, seed=2), rand64(3, 2, 2, 2, seed=3)]
    t = [rand64(3, 7, seed=4), rand64(3, 4, 2, 2, seed=5)]
    want = sum(_mse(_np_edges(a), _np_edges(b)) for a, b in zip(s, t)) / 2
    close(irg_edge_loss(s, t), want)


def test_transformation_halves_the_wider_later_map_by_averaging_adjacent_channel_pairs_after_pooling():
    from kdbench.methods.irg import irg_transformation_vector

    f1, f2 = rand64(3, 2, 4, 4, seed=6), rand64(3, 4, 2, 2, seed=7)
    dists = []
    for n in range(3):
        total = 0.0
        for c in range(2):
            for i in range(2):
                for j in range(2):
                    pooled = sum(f1[n, c, 2 * i + a, 2 * j + b].item() for a in range(2) for b in range(2)) / 4
                    halved = (f2[n, 2 * c, i, j].item() + f2[n, 2 * c + 1, i, j].item()) / 2  # the zoo's pairs
                    total += (pooled - halved) ** 2
        dists.append(max(total, 1e-12))
    top = max(dists)
    got = irg_transformation_vector(f1, f2)
    for n in range(3):
        close(got[n], dists[n] / top)


def test_vertex_is_the_mse_of_the_logits_and_the_three_terms_use_the_last_two_stages(benchmark_pair):
    from kdbench.methods.irg import irg_transformation_loss, irg_vertex_loss

    m = create_method(method_options("irg"), benchmark_pair)
    assert m.student_taps == ("stage2", "stage3", "embedding") and count_parameters(m) == 0
    s, t = forward(benchmark_pair, m, n=3)
    terms = m.all_terms(make_batch(3, 100, (3, 32, 32)), s, t)
    zs, zt = s["logits"].detach(), t["logits"].detach()
    close(terms["irg_vertex"], float(((zs - zt) ** 2).mean()))
    close(irg_vertex_loss(zs, zt), _mse(zs.tolist(), zt.tolist()), tol=1e-5)
    close(terms["irg_transformation"], float(irg_transformation_loss(s["stage2"], s["stage3"], t["stage2"],
                                                                     t["stage3"]).detach()))


def test_no_gradient_reaches_the_teacher():
    pair = make_pair("resnet14", "resnet8", 10, (3, 16, 16))
    m = create_method(method_options("irg"), pair)
    s, t = forward(pair, m, n=4, shape=(3, 16, 16))
    terms = m.all_terms(make_batch(4, 10), s, t)
    assert_no_teacher_grad(terms["irg_vertex"] + terms["irg_edge"] + terms["irg_transformation"], *t.values())


def test_irg_refuses_a_pair_without_feature_maps():
    with pytest.raises(IncompatibleModels, match="'irg'"):
        create_method(method_options("irg"), make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 8)))


@pytest.mark.slow
def test_irg_job_runs_resnet32x4_to_resnet8x4(run_job, teacher_checkpoints):
    record = one_epoch(run_job, teacher_checkpoints, "irg", "resnet32x4", "resnet8x4")
    assert record["status"] == "completed" and record["extra_params"] == 0
    assert set(record["history"][0]["train"]) == {"loss", "ce", "irg_vertex", "irg_edge", "irg_transformation"}


@pytest.mark.slow
def test_irg_job_runs_the_cross_architecture_pair_vgg13_to_mobilenetv2(run_job, teacher_checkpoints):
    assert one_epoch(run_job, teacher_checkpoints, "irg", "vgg13", "MobileNetV2")["status"] == "completed"
