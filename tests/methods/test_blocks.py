"""kdbench.blocks, the building blocks several methods share: spatial matching, attention maps, FitNet's hint
regressor rule (conv_reg_layer / ConvReg) and feature_map_shapes. Checked against explicit NumPy loops (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.methods.common import ConvReg, attention_map, conv_reg_layer, feature_map_shapes, match_spatial
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import make_pair
from tests.helpers import np_block_pool, rng, t64


def test_match_spatial_pools_the_larger_map_either_way():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    pa, pb = match_spatial(a, b)
    assert pa.shape == (2, 3, 4, 4) and pb is b
    np.testing.assert_allclose(pa.numpy(), np_block_pool(a.numpy(), 4), rtol=1e-5, atol=1e-6)
    pb2, pa2 = match_spatial(b, a)
    assert pb2 is b and pa2.shape == (2, 3, 4, 4)
    same = torch.randn(2, 3, 4, 4)
    assert all(x is y for x, y in zip(match_spatial(same, b), (same, b)))


def test_attention_map_is_the_normalised_channel_mean_of_squares():
    f = rng(1).normal(size=(2, 3, 2, 3))
    got = attention_map(t64(f), p=2).numpy()
    for n in range(2):
        am = [sum(f[n, c, h, w] ** 2 for c in range(3)) / 3 for h in range(2) for w in range(3)]
        am = np.array(am) / math.sqrt(sum(v * v for v in am))
        np.testing.assert_allclose(got[n], am, rtol=1e-12)


@pytest.mark.parametrize("s_shape, t_shape, kind, kernel", [
    ((8, 16, 16), (4, 8, 8), torch.nn.Conv2d, (3, 3)),           # H_s = 2 H_t: conv 3x3 stride 2
    ((8, 8, 8), (4, 16, 16), torch.nn.ConvTranspose2d, (4, 4)),  # 2 H_s = H_t: transposed conv 4x4 stride 2
    ((8, 8, 8), (4, 8, 8), torch.nn.Conv2d, (1, 1)),             # equal: 1x1
    ((8, 10, 10), (4, 8, 8), torch.nn.Conv2d, (3, 3)),           # H_s > H_t: kernel 1 + H_s - H_t
])
def test_conv_reg_picks_its_layer_from_the_spatial_ratio_and_ends_in_bn_relu(s_shape, t_shape, kind, kernel):
    layer = conv_reg_layer(s_shape, t_shape)
    assert type(layer) is kind and tuple(layer.kernel_size) == kernel and layer.bias is not None
    reg = ConvReg(s_shape, t_shape)
    out = reg(torch.randn(2, *s_shape))
    assert out.shape == (2, *t_shape) and (out >= 0).all()  # BN then ReLU
    assert not ((ConvReg(s_shape, t_shape, use_relu=False)(torch.randn(2, *s_shape))) >= 0).all()


def test_conv_reg_refuses_a_student_map_more_than_twice_smaller():
    with pytest.raises(ValueError, match="no hint regressor"):
        conv_reg_layer((8, 4, 4), (8, 16, 16))


def test_conv_reg_for_resnet8x4_stage2_has_16768_parameters():
    assert count_parameters(ConvReg((128, 16, 16), (128, 16, 16))) == 16_768  # resnet8x4 <- resnet32x4 stage2


def test_feature_map_shapes_rejects_vectors():
    pair = make_pair("mlp_1200x2", "mlp_32", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(IncompatibleModels, match=r"method 'x' cannot distill mlp_1200x2 -> mlp_32.*\(C, H, W\)"):
        feature_map_shapes(pair, "x", ("hidden1",), ("hidden1",))
