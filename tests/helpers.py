"""Plain helpers shared by the method tests: float64 tensors, NumPy reference formulas, tolerance checks and a
forward pass through a (student, teacher) pair. Fixtures and model/batch builders live in tests/conftest.py."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import make_pair, method_config

# ----------------------------------------------------------------------------- configs


@lru_cache(maxsize=None)
def _composed_method(name: str) -> dict:
    return OmegaConf.to_container(method_config(name), resolve=True)


def method_options(name: str, **options):
    """conf/method/<name>.yaml as a job composes it (see conftest.method_config), with `options` set by dotted key,
    e.g. method_options("dkd", **{"weights.nckd": 2.0}). Composed once per name (composing costs ~0.2 s), a fresh
    struct-mode copy per call, so options may be lists or dicts (`peers=[{"name": "resnet8"}, "resnet14"]`)."""
    cfg = OmegaConf.create(_composed_method(name))
    OmegaConf.set_struct(cfg, True)
    for key, value in options.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# ----------------------------------------------------------------------------- tensors and tolerances


def t64(a):
    """A float64 tensor of the NumPy array (or nested list) `a`."""
    return torch.tensor(a, dtype=torch.float64)


def rng(seed: int = 0):
    return np.random.default_rng(seed)


def rand64(*shape, seed: int = 0, scale: float = 1.0, relu: bool = False):
    """scale * N(0, 1) float64 tensor from its own generator; relu clamps negatives to 0 (after scaling)."""
    x = scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def close(value, expected, tol: float = 1e-6):
    """|value - expected| <= tol * max(1, |expected|) (relative above 1, absolute below)."""
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


def assert_no_teacher_grad(loss, *teacher_tensors):
    """Backpropagate `loss` and check none of the teacher-side tensors received a gradient."""
    loss.backward()
    for t in teacher_tensors:
        assert t.grad is None, "gradient reached the teacher side"


# ----------------------------------------------------------------------------- NumPy reference formulas


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) summed term by term."""
    return sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(len(p)))


def np_ce(z, y):
    """Cross entropy of logits z against class y."""
    return -math.log(np_softmax(z)[y])


def np_block_pool(f, out_h):
    """Average non-overlapping blocks of a (..., H, W) array down to (..., out_h, out_h) (H divisible by out_h; what
    adaptive average pooling does then)."""
    k = f.shape[-1] // out_h
    out = np.zeros(f.shape[:-2] + (out_h, out_h))
    for i in range(out_h):
        for j in range(out_h):
            out[..., i, j] = f[..., i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(-1, -2))
    return out


def np_attention(f):
    """Zagoruyko & Komodakis' attention map (p=2), per sample: channel mean of squares, flattened, L2-normalised."""
    n, c, h, w = f.shape
    out = np.zeros((n, h * w))
    for i in range(n):
        v = np.array([sum(f[i, k, a, b] ** 2 for k in range(c)) / c for a in range(h) for b in range(w)])
        out[i] = v / math.sqrt((v ** 2).sum())
    return out


# ----------------------------------------------------------------------------- method pairs


def forward(pair, method, n: int = 2, shape=(3, 32, 32)):
    """Student and teacher taps for `method` on n Gaussian inputs (global seed 1). The teacher runs in the mode the
    trainer runs it in (eval unless method.teacher_train_mode); its outputs are detached leaves that require grad,
    so a loss that leaks into them leaves a .grad."""
    torch.manual_seed(1)
    x = torch.randn(n, *shape)
    pair.teacher.train(method.teacher_train_mode)
    s_out = pair.student.forward_taps(x, method.student_taps)
    t_out = {k: v.detach().requires_grad_() for k, v in pair.teacher.forward_taps(x, method.teacher_taps).items()}
    return s_out, t_out


def assert_refuses(name: str, teacher: str, student: str, needle: str, input_shape=(3, 32, 32)):
    """Building `name` for teacher -> student raises IncompatibleModels naming the method, both models and `needle`."""
    from kdbench.distill import create_method
    from kdbench.errors import IncompatibleModels

    pair = make_pair(teacher, student, input_shape=input_shape)
    with pytest.raises(IncompatibleModels) as err:
        create_method(method_options(name), pair)
    message = str(err.value)
    assert f"'{name}'" in message and teacher in message and student in message and needle in message
