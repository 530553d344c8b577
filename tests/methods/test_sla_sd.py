"""sla_sd (SLA+SD, hankook/SLA): joint labels over 4 rotations on a 4K-way head, the single head taught by the
aggregated joint prediction; the aggregated (SLA+AG) and plain-view joint (SLA+SI) predictions as extra rows."""
from __future__ import annotations

import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_kl, np_softmax, rand64

SMALL_IMAGES = ["dataset.image_shape=[3,16,16]"]


def test_joint_labels_are_four_y_plus_the_rotation_image_major():
    from kdbench.methods.sla_sd import joint_labels

    assert joint_labels(torch.tensor([2, 0, 5])).tolist() == [8, 9, 10, 11, 0, 1, 2, 3, 20, 21, 22, 23]


def test_aggregated_logits_average_each_views_own_rotation_column_per_class():
    from kdbench.methods.sla_sd import aggregated_logits

    N, K = 3, 5
    joint = rand64(4 * N, 4 * K, seed=1)
    want = torch.zeros(N, K, dtype=torch.float64)
    for i in range(N):
        for c in range(K):
            want[i, c] = sum(joint[4 * i + k, 4 * c + k] for k in range(4)) / 4
    torch.testing.assert_close(aggregated_logits(joint), want, rtol=0, atol=1e-12)


def test_joint_loss_is_the_mean_cross_entropy_of_every_view_at_its_joint_label():
    from kdbench.methods.sla_sd import sla_joint_loss

    y = torch.tensor([1, 0])
    joint = rand64(8, 8, seed=2, scale=2.0)
    want = sum(np_ce(joint[4 * i + k].numpy(), 4 * int(y[i]) + k) for i in range(2) for k in range(4)) / 8
    close(sla_joint_loss(joint, y), want)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_self_distillation_is_t_squared_kl_from_the_aggregated_to_the_single_head(T):
    from kdbench.methods.sla_sd import sla_sd_loss

    N, K = 3, 4
    joint, single = rand64(4 * N, 4 * K, seed=3, scale=2.0), rand64(N, K, seed=4, scale=2.0)
    j, z = joint.numpy(), single.numpy()
    want = 0.0
    for i in range(N):
        a = [sum(j[4 * i + k, 4 * c + k] for k in range(4)) / 4 for c in range(K)]
        want += T**2 * np_kl(np_softmax(torch.tensor(a).numpy() / T), np_softmax(z[i] / T)) / N
    close(sla_sd_loss(single, joint, T), want)


def test_the_aggregated_target_gets_no_gradient():
    from kdbench.methods.sla_sd import sla_sd_loss

    joint, single = rand64(8, 8, seed=5).requires_grad_(), rand64(2, 2, seed=6).requires_grad_()
    sla_sd_loss(single, joint).backward()
    assert joint.grad is None and single.grad.abs().sum() > 0


class _Step:
    def __init__(self, model, log):
        self.model, self.log, self.epoch = model, log, 1

    def forward(self, inputs, taps):
        self.log.append(inputs.shape[0])
        return self.model.forward_taps(inputs, taps)


def test_a_step_forwards_the_four_rotations_of_every_image_at_once_and_scores_the_plain_view():
    from kdbench.methods.sla_sd import sla_joint_loss, sla_sd_loss
    from kdbench.methods.sskd import rotate_views

    pair = make_pair(None, "resnet8")
    method = create_method(method_options("sla_sd"), pair)
    pair.student.train()
    batch = make_batch(3, 10)
    log = []
    total, terms = method.forward_loss(batch, _Step(pair.student, log))
    assert log == [12] and set(terms) == {"ce", "joint", "sd"}
    with torch.no_grad():  # train mode: the same 12-row batch
        out = pair.student.forward_taps(rotate_views(batch.inputs), ("embedding",))
        joint = method.joint_head(out["embedding"])
    y = batch.targets
    close(terms["ce"], sum(np_ce(out["logits"][4 * i].double().numpy(), int(y[i])) for i in range(3)) / 3, 1e-5)
    close(terms["joint"], float(sla_joint_loss(joint, y)), 1e-5)
    close(terms["sd"], float(sla_sd_loss(out["logits"][::4], joint)), 1e-5)
    close(total.detach(), float((terms["ce"] + terms["joint"] + terms["sd"]).detach()), 1e-6)


def test_the_aggregated_and_single_view_heads_read_the_joint_head():
    from kdbench.methods.sla_sd import aggregated_logits
    from kdbench.methods.sskd import rotate_views

    pair = make_pair(None, "resnet8")
    method = create_method(method_options("sla_sd"), pair).eval()
    pair.student.eval()
    x = make_batch(2, 10).inputs
    heads = method.extra_heads()
    assert set(heads) == {"aggregated", "single_view"}
    with torch.no_grad():
        rotated = [pair.student.forward_taps(torch.rot90(x, k, dims=(2, 3)), ("embedding",))["embedding"]
                   for k in range(4)]
        want_agg = sum(method.joint_head(e)[:, k::4] for k, e in enumerate(rotated)) / 4
        torch.testing.assert_close(heads["aggregated"](pair.student, x), want_agg)
        torch.testing.assert_close(heads["single_view"](pair.student, x), method.joint_head(rotated[0])[:, 0::4])
        emb = pair.student.forward_taps(rotate_views(x), ("embedding",))["embedding"]
        torch.testing.assert_close(aggregated_logits(method.joint_head(emb)), want_agg)


def test_the_joint_head_is_the_only_extra_parameter(benchmark_pair):
    """Linear(d, 4K): 256 * 400 + 400 on resnet8x4; 64 * 400 + 400 on resnet32 (the reference's cresnet32)."""
    method = create_method(method_options("sla_sd"), benchmark_pair)
    assert count_parameters(method) == 256 * 400 + 400 == 102_800
    pair = make_pair(None, "resnet32", num_classes=100, input_shape=(3, 32, 32))
    assert count_parameters(create_method(method_options("sla_sd"), pair)) == 26_000
    assert method.record_fields()["joint_head_params"] == 102_800
    assert method_class("sla_sd").needs_teacher is False


def test_sla_sd_refuses_images_that_are_not_square():
    with pytest.raises(IncompatibleModels, match="square"):
        create_method(method_options("sla_sd"), make_pair(None, "resnet8", input_shape=(3, 16, 8)))


def test_an_sla_sd_job_records_the_aggregated_and_single_view_rows(run_job, tmp_path):
    import json

    rec = run_job(*TINY_SYNTHETIC, *SMALL_IMAGES, "student=resnet8", "method=sla_sd")
    assert rec["status"] == "completed" and rec["teacher"] is None and rec["extra_params"] == 64 * 40 + 40
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "joint", "sd"}
    for name in ("aggregated", "single_view"):
        head = json.loads((tmp_path / "job" / "heads" / name / "metrics.json").read_text())
        assert head["method"] == f"sla_sd@{name}" and head["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "MobileNetV2"])
def test_an_sla_sd_job_trains_resnet8x4_and_another_architecture(run_job, student):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=sla_sd")
    assert rec["status"] == "completed" and rec["student"] == student
    assert rec["extra_params"] == {"resnet8x4": 256 * 40 + 40, "MobileNetV2": 1280 * 40 + 40}[student]
