"""NumPy references and job helpers shared by the online methods' tests (one, okddip, ffl, ktg, rocket): written from
the reference codes' formulas, independent of kdbench's implementations."""
from __future__ import annotations

import json
import math

import numpy as np

from tests.helpers import np_ce, np_softmax


def np_soft_kl(z, target, T, eps=1e-7):
    """T^2 * mean_b sum_c q (log q - log p), q = softmax(target / T) + eps (not renormalised), p = softmax(z / T)."""
    total = 0.0
    for b in range(z.shape[0]):
        q = np_softmax(target[b] / T) + eps
        p = np_softmax(z[b] / T)
        total += sum(q[c] * (math.log(q[c]) - math.log(p[c])) for c in range(z.shape[1]))
    return T * T * total / z.shape[0]


def np_mean_ce(z, y):
    return sum(np_ce(z[b], int(y[b])) for b in range(z.shape[0])) / z.shape[0]


def np_sigmoid_ramp(epoch0, length):
    if length == 0:
        return 1.0
    t = min(max(epoch0, 0), length) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def np_batchnorm_train(x, gamma, beta, eps=1e-5):
    """BatchNorm over axis 0 in training mode (biased batch variance)."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def head_record(tmp_path, name):
    return json.loads((tmp_path / "job" / "heads" / name / "metrics.json").read_text())


SMALL_SYNTHETIC = ["dataset=synthetic", "dataset.num_classes=10", "dataset.image_shape=[3,16,16]",
                   "dataset.train_size=32", "dataset.test_size=16", "trainer.batch_size=16", "trainer.epochs=1",
                   "trainer.progress=false"]


def assert_online_job(record, tmp_path, method, heads, terms):
    """A completed one-epoch job of a teacher-free online method, with a record per extra head."""
    assert record["status"] == "completed" and record["method"] == method and record["teacher"] is None
    assert len(record["history"]) == 1 and set(record["history"][0]["train"]) == {"loss", *terms}
    assert set(record["history"][0]["heads"]) == set(heads)
    assert record["evaluated_head"].startswith("student")
    for head in heads:
        rec = head_record(tmp_path, head)
        assert rec["status"] == "completed" and rec["method"] == f"{method}@{head}"
        assert 0 <= rec["last_top1"] <= 100
