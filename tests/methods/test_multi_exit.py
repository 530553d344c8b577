"""multi_exit (Phuong & Lampert, mary-phuong/multiexit-distillation): early exits on the student's stages learn the
labels and the last exit's softened prediction, the temperature annealed until the last exit's mean max probability
falls to 0.5; multi_exit_ce is the CE-only baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method, method_class
from kdbench.errors import IncompatibleModels
from kdbench.models import count_parameters
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, np_ce, np_softmax, rand64

SMALL_IMAGES = ["dataset.image_shape=[3,16,16]"]


def test_exit_kd_is_t_squared_times_the_soft_cross_entropy_to_the_last_exit_summed_over_exits():
    from kdbench.methods.multi_exit import multi_exit_kd_loss

    T = 2.5
    final = rand64(4, 5, seed=1, scale=3.0)
    exits = [rand64(4, 5, seed=s, scale=3.0) for s in (2, 3)]
    f = final.numpy()
    want = 0.0
    for z in exits:
        for n in range(4):
            p, q = np_softmax(f[n] / T), np_softmax(z.numpy()[n] / T)
            want += T**2 * -sum(p[c] * math.log(q[c]) for c in range(5)) / 4
    close(multi_exit_kd_loss(exits, final, T), want)
    close(multi_exit_kd_loss(exits, final, torch.tensor(T, dtype=torch.float64)), want)


def test_exit_ce_is_the_sum_of_the_exits_mean_cross_entropies():
    from kdbench.methods.multi_exit import multi_exit_ce_loss

    y = torch.tensor([4, 0, 2])
    exits = [rand64(3, 5, seed=s) for s in (4, 5, 6)]
    close(multi_exit_ce_loss(exits, y), sum(sum(np_ce(z.numpy()[n], int(y[n])) for n in range(3)) / 3 for z in exits))


def test_the_last_exit_gets_no_gradient_from_the_distillation_term():
    from kdbench.methods.multi_exit import multi_exit_kd_loss

    final, z = rand64(3, 4, seed=7).requires_grad_(), rand64(3, 4, seed=8).requires_grad_()
    multi_exit_kd_loss([z], final, 1.0).backward()
    assert final.grad is None and z.grad.abs().sum() > 0


def test_the_temperature_grows_by_the_factor_only_while_the_mean_max_probability_exceeds_the_threshold():
    from kdbench.methods.multi_exit import annealed_temperature

    sharp = torch.tensor([[6.0, 0.0, 0.0], [0.0, 5.0, 0.0]])  # mean max softmax at T 1: ~0.99
    flat = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0]])
    T = torch.tensor(1.0)
    mean_max = lambda z, t: float(np.mean([np_softmax(r / t).max() for r in z.numpy()]))  # noqa: E731
    assert mean_max(sharp, 1.0) > 0.5 and mean_max(flat, 1.0) < 0.5
    close(annealed_temperature(sharp, T), 1.05)
    close(annealed_temperature(flat, T), 1.0)
    close(annealed_temperature(sharp, torch.tensor(2.0), max_prob=0.99, factor=1.1), 2.0)
    t, steps = torch.tensor(1.0), 0
    while mean_max(sharp, float(t)) > 0.5:
        t, steps = annealed_temperature(sharp, t), steps + 1
    close(t, 1.05**steps, 1e-5)
    assert mean_max(sharp, float(t) / 1.05) > 0.5 >= mean_max(sharp, float(t))


class _Step:
    def __init__(self, model):
        self.model, self.epoch = model, 1

    def forward(self, inputs, taps):
        return self.model.forward_taps(inputs, taps)


def test_a_step_uses_the_current_temperature_then_anneals_the_buffer():
    pair = make_pair(None, "resnet8")
    method = create_method(method_options("multi_exit"), pair)
    with torch.no_grad():
        pair.student.fc.weight.mul_(50.0)  # a confident last exit: the mean max probability is above 0.5
    batch = make_batch(8, 10)
    pair.student.train()
    _, terms = method.forward_loss(batch, _Step(pair.student))
    close(terms["temperature"], 1.0)
    close(method.temperature, 1.05)
    assert "temperature" in method.state_dict()  # checkpointed with the method
    _, terms = method.forward_loss(batch, _Step(pair.student))
    close(terms["temperature"], 1.05)
    fixed = create_method(method_options("multi_exit", anneal=False, temperature=4.0), pair)
    fixed.forward_loss(batch, _Step(pair.student))
    close(fixed.temperature, 4.0)


def test_every_weight_is_scaled_by_ten_over_the_number_of_classifiers():
    pair = make_pair(None, "ResNet18", input_shape=(3, 16, 16))  # 3 early exits + the last: 2 * 5 / 4
    method = create_method(method_options("multi_exit"), pair)
    assert method.global_scale == pytest.approx(2.5)
    assert method.term_weights(1) == pytest.approx({"ce": 1.25, "exit_ce": 1.25, "exit_kd": 1.25, "temperature": 0.0})
    ce_only = create_method(method_options("multi_exit_ce"), pair)
    assert ce_only.term_weights(7) == {"ce": 1.0, "exit_ce": 1.0, "exit_kd": 0.0, "temperature": 0.0}


def test_the_ce_only_baseline_sums_every_exits_cross_entropy():
    pair = make_pair(None, "resnet8")
    method = create_method(method_options("multi_exit_ce"), pair)
    batch = make_batch(4, 10)
    s = pair.student.forward_taps(batch.inputs, method.student_taps)
    total, terms = method.loss(batch, s, None, 1)
    exits = [head(s[tap]) for head, tap in zip(method.exits, method.exit_taps)]
    y = batch.targets.tolist()
    want = sum(sum(np_ce(z[n].detach().double().numpy(), y[n]) for n in range(4)) / 4 for z in [s["logits"], *exits])
    close(total.detach(), want, 1e-5)


def exit_params(c: int, w: int, k: int) -> int:
    """ConvBnReLU(c, w) + ConvBnReLU(w, w) (3x3 convs with bias, BN) + Linear(w, k)."""
    return (9 * c * w + w + 2 * w) + (9 * w * w + w + 2 * w) + (w * k + k)


def test_exits_on_resnet8x4_are_msdnet_exit_heads_of_width_128(benchmark_pair):
    method = create_method(method_options("multi_exit"), benchmark_pair)
    assert method.exit_taps == ("stage1", "stage2")
    assert [count_parameters(e) for e in method.exits] == [exit_params(64, 128, 100), exit_params(128, 128, 100)]
    assert count_parameters(method) == 234_852 + 308_580  # by hand from the formula
    conv = method.exits[0].body[0][0]
    assert conv.bias is not None and bool((conv.bias == 0).all()) and bool((method.exits[0].fc.bias == 0).all())
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / (9 * 128))) < 0.01  # MsdNet.init_weights


def test_each_exit_is_an_extra_head_and_the_record_names_them():
    pair = make_pair(None, "resnet8")
    method = create_method(method_options("multi_exit"), pair).eval()
    pair.student.eval()
    x = make_batch(2, 10).inputs
    heads = method.extra_heads()
    taps = pair.student.forward_taps(x, ("stage1", "stage2"))
    for i, name in enumerate(["exit1", "exit2"]):
        assert torch.equal(heads[name](pair.student, x), method.exits[i](taps[f"stage{i + 1}"]))
    assert method.record_fields()["exits"] == {"exit1": "stage1", "exit2": "stage2"}
    assert method_class("multi_exit").needs_teacher is False


def test_multi_exit_refuses_a_student_without_stage_maps():
    with pytest.raises(IncompatibleModels, match="'multi_exit'.*mlp_800x2"):
        create_method(method_options("multi_exit"), make_pair(None, "mlp_800x2", input_shape=(1, 28, 28)))


@pytest.mark.parametrize("name", ["multi_exit", "multi_exit_ce"])
def test_a_multi_exit_job_trains_and_records_each_exit_as_a_row(run_job, tmp_path, name):
    import json

    rec = run_job(*TINY_SYNTHETIC, *SMALL_IMAGES, "student=resnet8", f"method={name}")
    assert rec["status"] == "completed" and rec["teacher"] is None and rec["method"] == name
    assert set(rec["history"][0]["train"]) == {"loss", "ce", "exit_ce", "exit_kd", "temperature"}
    assert rec["extra_params"] == exit_params(16, 128, 10) + exit_params(32, 128, 10)
    head = json.loads((tmp_path / "job" / "heads" / "exit1" / "metrics.json").read_text())
    assert head["method"] == f"{name}@exit1" and head["status"] == "completed"
    ckpt = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert "temperature" in ckpt["method"]


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "MobileNetV2"])
def test_a_multi_exit_job_trains_resnet8x4_and_another_architecture(run_job, student):
    rec = run_job(*TINY_SYNTHETIC, f"student={student}", "method=multi_exit")
    assert rec["status"] == "completed" and rec["student"] == student
    assert len(rec["history"][0]["heads"]) == {"resnet8x4": 2, "MobileNetV2": 3}[student]
