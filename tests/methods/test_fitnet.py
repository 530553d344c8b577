"""fitnet (FitNets hints): a ConvReg regressor maps the student's hint layer onto the teacher's, MSE between them."""
from __future__ import annotations

import pytest
import torch

from kdbench.methods.common import ConvReg
from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.methods.fitnet import hint_loss
from kdbench.models import count_parameters
from tests.conftest import make_pair
from tests.helpers import assert_no_teacher_grad, method_options


def test_hint_loss_is_the_mse_and_trains_the_regressor_but_not_the_teacher():
    reg = ConvReg((4, 8, 8), (6, 4, 4))
    fs = torch.randn(2, 4, 8, 8, requires_grad=True)
    ft = torch.randn(2, 6, 4, 4, requires_grad=True)
    out = reg(fs)
    loss = hint_loss(out, ft)
    ref = ((out.detach().numpy() - ft.detach().numpy()) ** 2).mean()
    assert loss.item() == pytest.approx(float(ref), rel=1e-6)
    assert_no_teacher_grad(loss, ft)
    assert fs.grad is not None and reg.conv.weight.grad is not None


def test_fitnet_hints_stage2_with_a_16768_parameter_regressor_on_resnet32x4_to_resnet8x4():
    pair = make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    fit = create_method(method_options("fitnet"), pair)
    assert count_parameters(fit) == 16_768 and fit.student_taps == fit.teacher_taps == ("stage2",)


def test_fitnet_regressor_for_resnet56_to_resnet20_has_1120_parameters():
    pair = make_pair("resnet56", "resnet20", num_classes=100, input_shape=(3, 16, 16))
    assert count_parameters(create_method(method_options("fitnet"), pair)) == 1_120  # methods.md §3.4


def test_fitnet_refuses_hint_shapes_no_regressor_can_map():
    pair = make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    pair.student_shapes = {**pair.student_shapes, "stage2": (128, 4, 4)}
    with pytest.raises(IncompatibleModels, match=r"fitnet.*resnet32x4 -> resnet8x4.*\(128, 4, 4\).*\(128, 16, 16\)"):
        create_method(method_options("fitnet"), pair)
