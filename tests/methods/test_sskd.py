"""sskd (Xu et al. 2020, xuguodong03/SSKD): every image at 0/90/180/270 degrees, KD on the originals and on the
rotated views kept by the teacher's ranking, similarity transfer between self-supervision heads, and a stage that
trains the teacher's head on the frozen teacher."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels, KDBenchError
from kdbench.methods.sskd import (interleave, kept_rows, quarter_turns, rotate_views, rotation_views, selected_kl,
                                  split_views, ss_head_loss, sskd_ss_loss, sskd_tf_loss, view_similarities)
from kdbench.models import count_parameters, create_model
from kdbench.teachers import TeacherOutputs
from kdbench.train import Run, StepContext
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import method_options, np_kl, np_softmax, rng, t64

SMALL = (3, 16, 16)


# ----------------------------------------------------------------------------- NumPy references (loops)


def np_cos(a, b):
    return float(a @ b / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8)))


def np_view_similarities(h):
    """Rows: image i's rotation k (k = 1..3), image-major; columns: image j's original. h rows are 4i + k."""
    n = h.shape[0] // 4
    return np.array([[np_cos(h[4 * i + k], h[4 * j]) for j in range(n)] for i in range(n) for k in (1, 2, 3)])


def np_kept(scores, positive, ratio):
    """The reference's procedure: rank = position of the positive in the descending order, keep the rows of the
    first correct + int(ratio * wrong) positions of the stable ascending order of ranks."""
    rank = np.array([list(np.argsort(-row, kind="stable")).index(p) for row, p in zip(scores, positive)])
    wrong = int((rank > 0).sum())
    n_keep = len(rank) - wrong + int(wrong * ratio)
    return sorted(np.argsort(rank, kind="stable")[:n_keep].tolist())


def np_selected_kl(s, t, rows, temperature):
    if not rows:
        return 0.0
    return temperature ** 2 * sum(np_kl(np_softmax(t[r] / temperature), np_softmax(s[r] / temperature))
                                  for r in rows) / len(rows)


# ----------------------------------------------------------------------------- views


def test_views_are_numpys_quarter_turns_of_each_image_interleaved_as_the_reference():
    x = rng(0).normal(size=(3, 2, 5, 5))
    views = rotate_views(t64(x))
    assert views.shape == (12, 2, 5, 5)
    for i in range(3):
        hwc = x[i].transpose(1, 2, 0)
        for k in range(4):  # cifar.py: np.rot90(img, k) on the HWC image
            expected = np.rot90(hwc, k).transpose(2, 0, 1)
            assert np.array_equal(views[4 * i + k].numpy(), expected), (i, k)
    # quarter_turns + interleave (the stage's split forward) give the same layout
    assert torch.equal(interleave(t64(x), quarter_turns(t64(x))), views)
    orig, aug = split_views(views)
    assert torch.equal(orig, t64(x)) and torch.equal(aug[4], views[4 * 1 + 2])


def test_rotating_normalised_inputs_equals_normalising_rotated_images():
    image = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.5071, 0.4866, 0.4409]).view(1, 3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)
    assert torch.equal(rotate_views((image - mean) / std), (rotate_views(image) - mean) / std)


def test_view_batch_repeats_every_field_per_view():
    b = make_batch(3, 10, indices=[5, 9, 2])
    v = rotation_views(b)
    assert len(v) == 12 and v.targets.tolist() == [5] * 4 + [9] * 4 + [2] * 4
    assert v.indices.tolist() == [5] * 4 + [9] * 4 + [2] * 4
    assert v.crop_offsets.shape == (12, 2) and v.flips.shape == (12,)
    assert torch.equal(v.inputs, rotate_views(b.inputs))


# ----------------------------------------------------------------------------- plain losses vs loops


def test_view_similarities_match_cosines_of_each_rotation_against_every_original():
    h = rng(1).normal(size=(12, 5))
    h[6] = 0.0  # a zero vector: the eps clamp gives cosine 0
    got = view_similarities(t64(h))
    assert got.shape == (9, 3)
    np.testing.assert_allclose(got.numpy(), np_view_similarities(h), rtol=0, atol=1e-12)


def test_stage_loss_is_cross_entropy_of_the_cosines_at_the_own_image_without_temperature():
    h = rng(2).normal(size=(16, 6))
    sim = np_view_similarities(h)
    expected = np.mean([-math.log(np_softmax(row)[r // 3]) for r, row in enumerate(sim)])
    assert ss_head_loss(t64(h)).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_kept_rows_are_the_correct_rows_and_the_best_ranked_share_of_the_wrong_ones(ratio):
    r = rng(3)
    scores = r.normal(size=(40, 7))  # distinct scores: no ties
    positive = r.integers(0, 7, size=40)
    got = kept_rows(t64(scores), torch.as_tensor(positive), ratio)
    assert sorted(torch.nonzero(got).flatten().tolist()) == np_kept(scores, positive, ratio)


def test_kept_rows_by_hand_ties_favour_the_positive_and_then_earlier_rows():
    scores = t64([[3.0, 1.0, 2.0],   # positive 0: rank 0 (correct)
                  [1.0, 1.0, 0.0],   # positive 1 tied with column 0: rank 0 (ties count for the positive)
                  [0.0, 2.0, 1.0],   # positive 0: rank 2
                  [1.0, 0.0, 5.0],   # positive 0: rank 1
                  [2.0, 0.0, 1.0]])  # positive 2: rank 1
    positive = torch.tensor([0, 1, 0, 0, 2])
    # wrong rows 2 (rank 2), 3 (rank 1), 4 (rank 1): floor(0.5 * 3) = 1 kept -> row 3 (rank 1, earlier than row 4)
    assert kept_rows(scores, positive, 0.5).tolist() == [True, True, False, True, False]
    assert kept_rows(scores, positive, 0.7).tolist() == [True, True, False, True, True]  # floor(2.1) = 2
    assert kept_rows(scores, positive, 0.0).tolist() == [True, True, False, False, False]
    assert kept_rows(scores, positive, 1.0).all()


def test_selected_kl_by_hand_and_zero_when_no_row_is_kept():
    s, t = t64([[0.0, 0.0], [1.0, 0.0]]), t64([[math.log(3.0), 0.0], [0.0, 0.0]])
    # row 0 at T 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2)
    kl0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert selected_kl(s, t, torch.tensor([True, False]), 1.0).item() == pytest.approx(kl0, abs=1e-12)
    assert selected_kl(s, t, torch.tensor([False, False]), 4.0).item() == 0.0
    # T 2, both rows: 4 * mean of the two row KLs
    both = np_selected_kl(s.numpy(), t.numpy(), [0, 1], 2.0)
    assert selected_kl(s, t, torch.tensor([True, True]), 2.0).item() == pytest.approx(both, abs=1e-12)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
def test_tf_loss_matches_loops_over_the_rotated_views_the_teacher_ranking_keeps(ratio):
    r = rng(4)
    z_s, z_t = 3 * r.normal(size=(12, 6)), 3 * r.normal(size=(12, 6))
    y = r.integers(0, 6, size=12)
    expected = np_selected_kl(z_s, z_t, np_kept(z_t, y, ratio), 4.0)
    s = t64(z_s).requires_grad_()
    got = sskd_tf_loss(s, t64(z_t), torch.as_tensor(y), 4.0, ratio)
    assert got.item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("ratio", [0.75, 1.0, 0.0])
def test_ss_loss_matches_loops_over_the_similarity_rows_the_teacher_ranking_keeps(ratio):
    r = rng(5)
    h_s, h_t = r.normal(size=(20, 4)), r.normal(size=(20, 4))
    s_sim, t_sim = np_view_similarities(h_s), np_view_similarities(h_t)
    positive = np.arange(15) // 3
    expected = np_selected_kl(s_sim, t_sim, np_kept(t_sim, positive, ratio), 0.5)
    assert sskd_ss_loss(t64(h_s), t64(h_t), 0.5, ratio).item() == pytest.approx(expected, abs=1e-10)


def test_losses_send_no_gradient_to_the_teacher_side():
    r = rng(6)
    h_s, h_t = t64(r.normal(size=(8, 3))).requires_grad_(), t64(r.normal(size=(8, 3))).requires_grad_()
    z_s, z_t = t64(r.normal(size=(6, 5))).requires_grad_(), t64(r.normal(size=(6, 5))).requires_grad_()
    (sskd_ss_loss(h_s, h_t) + sskd_tf_loss(z_s, z_t, torch.tensor([0, 1, 2, 3, 4, 0]))).backward()
    assert h_t.grad is None and z_t.grad is None
    assert h_s.grad.abs().sum() > 0 and z_s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the method


def _step(pair, method, epoch=1):
    """The real StepContext over the pair (no optimizer: forward_loss only)."""
    outputs = TeacherOutputs(pair.teacher, method.teacher_taps, method.teacher_train_mode)
    outputs.start_epoch()
    pair.student.train()
    return StepContext(Run(pair.student, method, outputs, None, None, 0), epoch, torch.device("cpu"))


def test_forward_loss_runs_one_student_and_one_teacher_forward_over_the_4n_views(probe_calls):
    pair = make_pair("probe_net", "probe_net", 10, (3, 8, 8))
    pair.teacher.tag, pair.student.tag = "teacher", "student"
    method = create_method(method_options("sskd"), pair)
    probe_calls.clear()
    method.forward_loss(make_batch(5, 10, (3, 8, 8)), _step(pair, method))
    assert sorted(probe_calls) == [("student", True, True, 20), ("teacher", False, False, 20)]


def test_forward_loss_terms_are_the_plain_losses_of_the_rotated_views():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    method = create_method(method_options("sskd"), pair)
    batch = make_batch(6, 10)
    torch.manual_seed(0)
    total, terms = method.forward_loss(batch, _step(pair, method))
    x4 = rotate_views(batch.inputs)
    s = pair.student.forward_taps(x4, ("embedding",))  # train mode, the same 24 rows: the same BN statistics
    with torch.no_grad():
        t = pair.teacher.eval().forward_taps(x4, ("embedding",))
        h_t = method.teacher_head(t["embedding"])
    orig = torch.arange(24) % 4 == 0
    y = batch.targets
    expected = {"ce": torch.nn.functional.cross_entropy(s["logits"][orig], y),
                "kd": 16 * torch.nn.functional.kl_div(torch.log_softmax(s["logits"][orig] / 4, 1),
                                                      torch.softmax(t["logits"][orig] / 4, 1), reduction="batchmean"),
                "tf": sskd_tf_loss(s["logits"][~orig], t["logits"][~orig], y.repeat_interleave(3), 4.0, 1.0),
                "ss": sskd_ss_loss(method.student_head(s["embedding"]), h_t, 0.5, 0.75)}
    for k, v in expected.items():
        torch.testing.assert_close(terms[k], v, rtol=1e-5, atol=1e-6, msg=k)
    weights = {"ce": 0.1, "kd": 0.9, "tf": 2.7, "ss": 10.0}
    torch.testing.assert_close(total, sum(weights[k] * expected[k] for k in weights), rtol=1e-5, atol=1e-6)


def test_forward_loss_sends_no_gradient_to_the_teacher_or_its_head_and_ignores_a_teacher_cache():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    method = create_method(method_options("sskd"), pair)
    batch = make_batch(4, 10)
    step = _step(pair, method)
    _, clean = method.forward_loss(batch, step)
    # a cache holds one output per sample (the originals): the rotated views must come from a live forward
    step.run.teacher.cache = {k: torch.full((40, *v.shape[1:]), 7.0) for k, v in
                              pair.teacher.forward_taps(batch.inputs[:1], ("embedding",)).items()}
    pair.teacher.requires_grad_(True)
    total, terms = method.forward_loss(batch, step)
    for k in clean:
        torch.testing.assert_close(terms[k], clean[k], msg=k)
    total.backward()
    assert all(p.grad is None for p in pair.teacher.parameters())
    assert all(p.grad is None for p in method.teacher_head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters())


def test_terms_refuse_outputs_that_are_not_of_a_view_batch():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    method = create_method(method_options("sskd"), pair)
    batch = make_batch(6, 10)
    s = pair.student.forward_taps(batch.inputs, ("embedding",))
    with torch.no_grad():
        t = pair.teacher.forward_taps(batch.inputs, ("embedding",))
    with pytest.raises(KDBenchError, match="view batch"):
        method.loss(batch, s, t, 1)


def test_stage_trains_only_the_teacher_head_on_the_frozen_teachers_rotated_views():
    pair = make_pair("resnet14", "resnet8", 10, SMALL)
    method = create_method(method_options("sskd"), pair)
    (stage,) = method.stages(pair.student, pair.teacher)
    assert (stage.name, stage.epochs, stage.lr, stage.momentum, stage.weight_decay) == ("ss_head", 60, 0.05, 0.9, 5e-4)
    assert stage.student_taps == () and stage.teacher_taps == ("embedding",)
    assert {id(p) for p in stage.parameters} == {id(p) for p in method.teacher_head.parameters()}
    assert not {id(p) for p in stage.parameters} & {id(p) for p in method.trainable_parameters()}
    batch = make_batch(5, 10)
    pair.teacher.eval().requires_grad_(True)
    with torch.no_grad():
        t = pair.teacher.forward_taps(batch.inputs, ("embedding",))
        joint = pair.teacher.forward_taps(rotate_views(batch.inputs), ("embedding",))["embedding"]
    loss = stage.loss(batch, {}, t)
    torch.testing.assert_close(loss, ss_head_loss(method.teacher_head(joint)), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in pair.teacher.parameters())
    assert all(p.grad is None for p in method.student_head.parameters())
    assert all(p.grad.abs().sum() > 0 for p in method.teacher_head.parameters())
    assert method.stages(pair.student, pair.teacher) and \
        create_method(method_options("sskd", stage_epochs=0), pair).stages(pair.student, pair.teacher) == []


def test_extra_parameters_are_two_heads_of_2_d_squared_plus_2_d():
    pair = make_pair("resnet32x4", "resnet8x4", num_classes=100, input_shape=(3, 32, 32))
    method = create_method(method_options("sskd"), pair)
    head = 2 * (256 * 256 + 256)  # wrapper.proj_head on the 256-d pooled features of either net
    assert head == 131_584
    assert count_parameters(method) == 2 * head
    assert sum(p.numel() for p in method.trainable_parameters()) == head
    cross = create_method(method_options("sskd"), make_pair("vgg13", "MobileNetV2", 100, (3, 32, 32)))
    assert count_parameters(cross.student_head) == 2 * (1280 * 1280 + 1280) == 3_279_360
    assert count_parameters(cross.teacher_head) == 2 * (512 * 512 + 512) == 525_312


def test_pairs_it_cannot_serve_fail_at_construction():
    with pytest.raises(IncompatibleModels, match="needs a teacher"):
        create_method(method_options("sskd"), make_pair(None, "resnet8", 10, SMALL))
    with pytest.raises(IncompatibleModels, match="square"):
        create_method(method_options("sskd"), make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 4)))
    with pytest.raises(IncompatibleModels, match="square"):
        create_method(method_options("sskd"), make_pair("mlp_1200x2", "mlp_32", 10, (64,)))
    with pytest.raises(KDBenchError, match="ss_ratio"):
        create_method(method_options("sskd", ss_ratio=1.5), make_pair("resnet14", "resnet8", 10, SMALL))
    # square greyscale MLP inputs can be rotated
    create_method(method_options("sskd"), make_pair("mlp_1200x2", "mlp_32", 10, (1, 8, 8)))


# ----------------------------------------------------------------------------- end to end (synthetic CIFAR shape)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sskd_teachers")
    paths = {}
    for arch in ("resnet32x4", "wrn_40_2"):
        paths[arch] = root / f"{arch}.pt"
        torch.save({"model": create_model(arch, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, paths[arch])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("teacher, student, extra", [
    ("resnet32x4", "resnet8x4", 2 * 131_584),
    ("wrn_40_2", "ShuffleV1", 2 * (960 * 960 + 960) + 2 * (128 * 128 + 128)),  # student head 960-d, teacher 128-d
])
def test_sskd_job_runs_its_head_stage_then_trains(run_job, checkpoints, tmp_path, teacher, student, extra):
    record = run_job(*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", "method=sskd",
                     f"teacher.checkpoint={checkpoints[teacher]}", "method.stage_epochs=1")
    assert record["status"] == "completed" and record["method"] == "sskd" and len(record["history"]) == 1
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd", "tf", "ss"}
    assert record["extra_params"] == extra
    ckpt = torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=False)
    assert ckpt["stages_done"] == ["ss_head"]
    assert any(k.startswith("teacher_head.") for k in ckpt["method"])
