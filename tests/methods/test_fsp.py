"""fsp (flow of solution procedure): Gram matrices between consecutive stages, matched in a pre-training stage."""
from __future__ import annotations

import numpy as np
import pytest

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.methods.fsp import fsp_loss, fsp_matrix
from tests.conftest import TINY_SYNTHETIC, make_pair
from tests.helpers import assert_no_teacher_grad, forward, method_options, np_block_pool, rng, t64


def np_fsp_matrix(a, b):
    if a.shape[-1] > b.shape[-1]:
        a = np_block_pool(a, b.shape[-1])
    elif b.shape[-1] > a.shape[-1]:
        b = np_block_pool(b, a.shape[-1])
    n, ca, h, w = a.shape
    cb = b.shape[1]
    g = np.zeros((n, ca, cb))
    for i in range(n):
        for x in range(ca):
            for y in range(cb):
                g[i, x, y] = sum(a[i, x, p, q] * b[i, y, p, q] for p in range(h) for q in range(w)) / (h * w)
    return g


def test_fsp_matrix_and_loss_match_loops_in_both_protocols():
    r = rng(7)
    shapes = [(2, 2, 4, 4), (2, 3, 4, 4), (2, 2, 2, 2)]  # stem-like, stage1 (same size), stage2 (pooled pair)
    fs = [r.normal(size=s) for s in shapes]
    ft = [r.normal(size=s) for s in shapes]
    g01 = fsp_matrix(t64(fs[0]), t64(fs[1])).numpy()
    np.testing.assert_allclose(g01, np_fsp_matrix(fs[0], fs[1]), rtol=1e-12)
    mean_ref = frob_ref = 0.0
    for i in range(2):
        d = np_fsp_matrix(fs[i], fs[i + 1]) - np_fsp_matrix(ft[i], ft[i + 1])
        mean_ref += (d ** 2).mean()
        frob_ref += sum((d[n] ** 2).sum() for n in range(2)) / 2
    s = [t64(x).requires_grad_() for x in fs]
    t = [t64(x).requires_grad_() for x in ft]
    assert fsp_loss(s, t, "mean").item() == pytest.approx(mean_ref, rel=1e-10)
    got = fsp_loss(s, t, "frobenius")
    assert got.item() == pytest.approx(frob_ref, rel=1e-10)
    assert_no_teacher_grad(got, *t)


def test_fsp_trains_the_whole_student_in_its_stage_and_paper_protocol_sums_entries():
    pair = make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32), lr=0.05)
    for protocol in ("reference", "paper"):
        m = create_method(method_options("fsp", protocol=protocol), pair)
        assert m.weights == {"ce": 1.0, "fsp": 0.0}
        assert m.student_taps == ("stem", "stage1", "stage2", "stage3")
        (stage,) = m.stages(pair.student, pair.teacher)
        assert stage.name == "fsp" and stage.epochs == 30 and stage.lr == 0.05
        assert {id(p) for p in stage.parameters} == {id(p) for p in pair.student.parameters()}
    s_out, t_out = forward(pair, m)
    ref = create_method(method_options("fsp"), pair)._fsp(s_out, t_out)
    paper = m._fsp(s_out, t_out)
    assert paper.item() > ref.item() > 0  # Frobenius sums entries, reference averages them


def test_fsp_width_mismatch_is_a_clear_error():
    pair = make_pair("resnet32x4", "resnet20", num_classes=100, input_shape=(3, 32, 32))
    with pytest.raises(IncompatibleModels) as err:
        create_method(method_options("fsp"), pair)
    msg = str(err.value)
    assert "method 'fsp' cannot distill resnet32x4 -> resnet20" in msg
    assert "stem student (16, 32, 32) vs teacher (32, 32, 32)" in msg


@pytest.mark.slow
def test_fsp_job_on_an_incompatible_pair_fails_before_training(run_job_shared_teachers, tmp_path):
    with pytest.raises(IncompatibleModels, match="resnet32x4 -> resnet20"):
        run_job_shared_teachers(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet20", "method=fsp")
    assert not (tmp_path / "job" / "checkpoint.pt").exists()
