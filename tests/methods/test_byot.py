"""byot (Be Your Own Teacher, as MMRazor ports it): exits on the student's stages (attention + separable-conv
bottleneck + Linear) taught by the deepest classifier (KL at tau 3, feature L2), each exit a leaderboard row."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_kl, np_softmax, rand64

SMALL_IMAGES = ["dataset.image_shape=[3,16,16]"]


# ----------------------------------------------------------------------------- losses against NumPy / loops


def test_exit_ce_is_the_sum_over_exits_of_each_exits_mean_cross_entropy():
    from kdbench.methods.byot import exit_ce_loss

    y = torch.tensor([0, 3, 1])
    exits = [rand64(3, 4, seed=s, scale=2.0) for s in (1, 2)]
    want = sum(sum(np_ce(z.numpy()[n], int(y[n])) for n in range(3)) / 3 for z in exits)
    close(exit_ce_loss(exits, y), want)


def test_exit_kd_is_t_squared_times_the_batch_mean_kl_from_the_deepest_summed_over_exits():
    from kdbench.methods.byot import exit_kd_loss

    T = 3.0
    final = rand64(4, 5, seed=3, scale=3.0)
    exits = [rand64(4, 5, seed=s, scale=3.0) for s in (4, 5, 6)]
    f = final.numpy()
    want = sum(T**2 * sum(np_kl(np_softmax(f[n] / T), np_softmax(z.numpy()[n] / T)) for n in range(4)) / 4
               for z in exits)
    close(exit_kd_loss(exits, final, T), want)


def _loops(s, t, mode, chunk):
    s, t = s.numpy(), t.numpy()
    n, d = s.shape
    if mode == "paper":
        return sum(sum((s[i, c] - t[i, c]) ** 2 for c in range(d)) for i in range(n)) / n
    parts = []
    for start in range(0, n, chunk):
        rows = range(start, min(start + chunk, n))
        if mode == "dist":
            parts.append(math.sqrt(sum((s[j, c] - t[j, c]) ** 2 for j in rows for c in range(d))))
        else:
            parts.append(math.sqrt(sum((s[j, e] - t[i, c]) ** 2 for i in rows for c in range(d)
                                       for j in rows for e in range(d))))
    return sum(parts) / len(parts)


@pytest.mark.parametrize("mode", ["mmrazor", "dist", "paper"])
def test_feature_loss_matches_explicit_loops_over_chunks(mode):
    from kdbench.methods.byot import feature_l2_loss

    s, t = rand64(6, 3, seed=7), rand64(6, 3, seed=8, scale=2.0)
    close(feature_l2_loss(s, t, mode, chunk=4), _loops(s, t, mode, 4))  # chunks of 4 and 2 samples
    close(feature_l2_loss(s, t, mode, chunk=None), _loops(s, t, mode, 6))


def test_the_mmrazor_feature_loss_is_l2loss_dist_on_the_broadcast_of_features_and_the_pooled_map():
    """What MMRazor's L2Loss(normalize=False, dist=True) computes when handed the connector's (n, D) features and
    neck.gap's (n, D, 1, 1) output: torch.sub broadcasts them to (n, D, n, D)."""
    from kdbench.methods.byot import feature_l2_loss

    s, t = rand64(5, 4, seed=9), rand64(5, 4, seed=10)
    literal = torch.sqrt(torch.sum(torch.pow(torch.sub(s, t.view(5, 4, 1, 1)), 2)))
    close(feature_l2_loss(s, t, "mmrazor", chunk=16), float(literal))


def test_the_mmrazor_feature_loss_stays_exact_for_features_far_from_zero_in_float32():
    from kdbench.methods.byot import feature_l2_loss

    s = (rand64(8, 16, seed=15, scale=0.01) + 100.0).float()
    t = (rand64(8, 16, seed=16, scale=0.01) + 100.0).float()
    literal = torch.sqrt(torch.sum(torch.pow(torch.sub(s.double(), t.double().view(8, 16, 1, 1)), 2)))
    close(feature_l2_loss(s, t, "mmrazor", chunk=None), float(literal), 1e-4)


def test_the_deepest_classifier_and_features_get_no_gradient_from_the_exit_terms():
    from kdbench.methods.byot import byot_feature_loss, exit_kd_loss

    final, feat = rand64(3, 4, seed=11).requires_grad_(), rand64(3, 6, seed=12).requires_grad_()
    z, f = rand64(3, 4, seed=13).requires_grad_(), rand64(3, 6, seed=14).requires_grad_()
    (exit_kd_loss([z], final, 3.0) + sum(byot_feature_loss([f], feat, m) for m in ("mmrazor", "dist", "paper"))).backward()
    assert final.grad is None and feat.grad is None and z.grad.abs().sum() > 0 and f.grad.abs().sum() > 0


def test_an_unknown_feature_loss_is_an_error():
    from kdbench.methods.byot import feature_l2_loss

    with pytest.raises(KDBenchError, match="feature_loss"):
        feature_l2_loss(rand64(2, 3), rand64(2, 3), "l1")
    with pytest.raises(KDBenchError, match="feature_loss"):
        create_method(method_options("byot", feature_loss="l1"), make_pair(None, "resnet8"))


# ----------------------------------------------------------------------------- exits


def sep_conv_params(a: int, b: int) -> int:
    """DARTS SepConv(a -> b): depthwise 3x3 a, 1x1 a->a, BN a; grouped 3x3 a->b (groups a), 1x1 b->b, BN b."""
    return 9 * a + a * a + 2 * a + 9 * b + b * b + 2 * b


def exit_params(c: int, d: int, k: int) -> int:
    """BYOTConnector(c -> d) + Linear(d, k): attention SepConv(c, c) + BN(c); log2(d / c) doubling SepConvs."""
    n = sep_conv_params(c, c) + 2 * c
    while c < d:
        n += sep_conv_params(c, 2 * c)
        c *= 2
    return n + d * k + k


def test_exits_on_resnet8x4_have_mmrazors_connector_parameters(benchmark_pair):
    method = create_method(method_options("byot"), benchmark_pair)
    assert method.exit_taps == ("stage1", "stage2")  # resnet8x4: 64x32x32 and 128x16x16, deepest width 256
    assert [count_parameters(e) for e in method.exits] == [exit_params(64, 256, 100), exit_params(128, 256, 100)]
    assert count_parameters(method) == 144_164 + 147_684  # worked out by hand from the formula above


def test_exits_on_resnet18_are_mmrazors_three_connectors():
    """MMRazor's config: BYOTConnector 64/128/256 -> 512 on layer1..3 of ResNet18, 100 classes."""
    pair = make_pair(None, "ResNet18", num_classes=100, input_shape=(3, 32, 32))
    method = create_method(method_options("byot"), pair)
    assert method.exit_taps == ("stage1", "stage2", "stage3") and method.feature_taps == ("stage1", "stage2")
    assert [count_parameters(e) for e in method.exits] == [505_892, 509_412, 524_644]
    assert [exit_params(c, 512, 100) for c in (64, 128, 256)] == [505_892, 509_412, 524_644]


def test_an_exit_maps_its_stage_to_deepest_width_features_and_class_logits():
    from kdbench.methods.byot import ByotExit

    torch.manual_seed(0)
    head = ByotExit(16, 64, 10).eval()
    f = torch.randn(2, 16, 8, 8).relu()
    feat, logits = head(f)
    assert feat.shape == (2, 64) and logits.shape == (2, 10)
    gate = head.attention(f)
    assert gate.shape == f.shape and bool(((gate > 0) & (gate < 1)).all())
    with torch.no_grad():
        close(logits.sum(), float(head.fc(head.scala(gate * f).flatten(1)).sum()))


def test_terms_read_the_exits_on_the_stage_taps_and_the_feature_term_only_on_feature_exits():
    from kdbench.methods.byot import byot_feature_loss

    pair = make_pair(None, "ResNet18", num_classes=10, input_shape=(3, 16, 16))
    method = create_method(method_options("byot"), pair)
    batch = make_batch(4, 10)
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    terms = method.terms(batch, s, None)
    feats = [head(s[tap])[0] for head, tap in zip(method.exits, method.exit_taps)]
    close(terms["exit_feat"].detach(), float(byot_feature_loss(feats[:2], s["embedding"], "mmrazor", 16).detach()))
    every = create_method(method_options("byot", feature_exits=None, feature_loss="paper"), pair)
    every.load_state_dict(method.state_dict())
    close(every.terms(batch, s, None)["exit_feat"].detach(), float(byot_feature_loss(feats, s["embedding"], "paper").detach()))


def test_each_exit_is_an_extra_head_evaluated_on_its_stage():
    pair = make_pair(None, "resnet8")
    method = create_method(method_options("byot"), pair).eval()
    pair.student.eval()
    x = make_batch(3, 10).inputs
    heads = method.extra_heads()
    assert list(heads) == ["exit1", "exit2"]
    taps = pair.student.forward_taps(x, ("stage1", "stage2"))
    for i, (name, logits_of) in enumerate(heads.items()):
        assert torch.equal(logits_of(pair.student, x), method.exits[i](taps[f"stage{i + 1}"])[1])
    fields = method.record_fields()
    assert fields["exits"] == {"exit1": "stage1", "exit2": "stage2"}
    assert fields["exit_params"] == {"exit1": exit_params(16, 64, 10), "exit2": exit_params(32, 64, 10)}


# ----------------------------------------------------------------------------- pairs it cannot serve


def test_byot_needs_no_teacher():
    assert method_class("byot").needs_teacher is False


@pytest.mark.parametrize("student, needle", [("MobileNetV2", "power of two"), ("mlp_800x2", "(C, H, W)"),
                                             ("mlp_32", "no stage before the last")])
def test_byot_refuses_students_its_exits_cannot_serve(student, needle):
    shape = (1, 28, 28) if student.startswith("mlp") else (3, 32, 32)
    with pytest.raises(IncompatibleModels) as err:
        create_method(method_options("byot"), make_pair(None, student, input_shape=shape))
    assert "'byot'" in str(err.value) and needle in str(err.value)


# ----------------------------------------------------------------------------- end to end


def test_a_byot_job_trains_its_exits_and_records_each_as_a_row(run_job, tmp_path):
    import json

    rec = run_job(*TINY_SYNTHETIC, *SMALL_IMAGES, "teacher=resnet32x4", "student=resnet8", "method=byot")
    assert rec["status"] == "completed" and rec["teacher"] is None
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "exit_ce", "exit_kd", "exit_feat"}
    assert rec["extra_params"] == exit_params(16, 64, 10) + exit_params(32, 64, 10)
    assert set(rec["history"][0]["heads"]) == {"exit1", "exit2"}
    for name in ("exit1", "exit2"):
        head = json.loads((tmp_path / "job" / "heads" / name / "metrics.json").read_text())
        assert head["method"] == f"byot@{name}" and head["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "vgg8"])
def test_a_byot_job_trains_resnet8x4_and_another_architecture(run_job, student):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=byot")
    assert rec["status"] == "completed" and np.isfinite(rec["history"][0]["train"]["loss"])
    assert rec["extra_params"] == {"resnet8x4": 121_034 + 124_554,  # exit_params(64, 256, 10), (128, 256, 10)
                                   "vgg8": exit_params(128, 512, 10) + exit_params(256, 512, 10)
                                   + exit_params(512, 512, 10)}[student]
