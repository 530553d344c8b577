"""vid (variational information distillation): Gaussian NLL of the teacher's map under a regressor's mean and a
learned per-channel variance."""
from __future__ import annotations

import math

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC
from tests.helpers import assert_refuses, close, method_options, rand64


def test_vid_nll_matches_loops_and_the_regressor_pools_the_student_map_first():
    from kdbench.methods.vid import VIDRegressor, softplus_variance, vid_nll

    mean, target = rand64(2, 3, 2, 2, seed=10), rand64(2, 3, 2, 2, seed=11)
    var = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)
    m, t, v = mean.numpy(), target.numpy(), var.numpy()
    terms = [0.5 * ((m[n, c, i, j] - t[n, c, i, j]) ** 2 / v[c] + math.log(v[c]))
             for n in range(2) for c in range(3) for i in range(2) for j in range(2)]
    close(vid_nll(mean, target, var), sum(terms) / len(terms))

    reg = VIDRegressor(4, 6, 6)
    close(softplus_variance(reg.alpha, reg.eps)[0], 5.0, 1e-6)  # sigma^2 = 5 at init
    convs = [m for m in reg.regressor if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(4, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert isinstance(reg.alpha, torch.nn.Parameter)
    assert not isinstance(VIDRegressor(4, 6, 6, learn_var=False).alpha, torch.nn.Parameter)
    # the student map (8x8) is pooled to the teacher's 4x4 before the regressor
    f_s, f_t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        mu = reg.regressor(torch.nn.functional.avg_pool2d(f_s, 2))
        expected = vid_nll(mu, f_t, softplus_variance(reg.alpha, reg.eps))
        close(reg(f_s, f_t), float(expected), 1e-5)


def test_vid_with_fixed_variance_drops_the_variance_parameters(benchmark_pair):
    assert count_parameters(create_method(method_options("vid", fixed_variance=True), benchmark_pair)) == 258_048


def test_vid_refuses_a_student_without_feature_maps():
    assert_refuses("vid", "resnet14", "mlp_800x2", "(C, H, W)")


@pytest.mark.slow
def test_vid_job_on_an_incompatible_pair_fails_before_training(run_job, random_teacher_checkpoint):
    with pytest.raises(IncompatibleModels):
        run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=mlp_32", "method=vid",
                f"teacher.checkpoint={random_teacher_checkpoint}")
