"""rco (Jin et al. ICCV 2019): the student learns from anchor points of the teacher's training route, kept by the
store (trainer.keep_every), each for an equal share of the epochs, then from the converged teacher."""
from __future__ import annotations

import json

import pytest
import torch

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.models import create_model
from tests.conftest import TINY_SYNTHETIC, make_pair, resolve_job
from tests.helpers import close, method_options, np_kl, np_softmax, rand64


def test_epochs_are_split_equally_over_the_anchors_in_order():
    from kdbench.methods.rco import anchor_for_epoch

    assert [anchor_for_epoch(e, 240, 4) for e in (1, 60, 61, 120, 121, 180, 181, 240)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [anchor_for_epoch(e, 5, 2) for e in range(1, 6)] == [0, 0, 0, 1, 1]


def test_the_anchor_term_is_hintons_kd_against_the_anchor_logits():
    from kdbench.methods.rco import rco_kd_loss

    zs, za = rand64(2, 3, seed=1), rand64(2, 3, seed=2)
    want = sum(np_kl(np_softmax(za[n].numpy() / 4), np_softmax(zs[n].numpy() / 4)) for n in range(2)) / 2 * 16
    close(rco_kd_loss(zs, za, 4.0), want)


def test_named_anchors_teach_their_share_of_the_epochs_then_the_converged_teacher(tmp_path):
    pair = make_pair("resnet8", "resnet8", 10, (3, 16, 16), epochs=4)
    torch.manual_seed(5)
    anchor = create_model("resnet8", num_classes=10, input_shape=(3, 16, 16))
    torch.save({"model": anchor.state_dict()}, tmp_path / "a.pt")
    m = create_method(method_options("rco", anchors=[str(tmp_path / "a.pt")]), pair)
    assert m.num_anchors == 2
    x = torch.randn(3, 3, 16, 16)
    anchor.eval()
    with torch.no_grad():
        close(float((m.anchor_logits(x, 2) - anchor(x)).abs().max()), 0.0)
    assert m.anchor_logits(x, 3) is None  # epochs 3-4: the run's own teacher


def test_a_teacher_without_anchors_is_refused_unless_plain_kd_is_asked_for():
    pair = make_pair("resnet8", "resnet8")
    pair.teacher.kdbench_anchors = []  # what the store / a checkpoint file gives a teacher that kept no route
    with pytest.raises(IncompatibleModels, match="keep_every"):
        create_method(method_options("rco"), pair)
    assert create_method(method_options("rco", require_anchors=False), pair).num_anchors == 1


def test_keeping_anchors_does_not_change_the_stored_teachers_key(tmp_path):
    plain = resolve_job([*TINY_SYNTHETIC, "teacher=resnet8", "student=resnet8", "method=rco"], tmp_path)
    kept = resolve_job([*TINY_SYNTHETIC, "teacher=resnet8", "student=resnet8", "method=rco",
                        "++teacher.recipe.trainer.keep_every=1"], tmp_path)
    assert plain.teacher.entry == kept.teacher.entry  # same teacher; keeping its anchors is not a new recipe
    assert kept.teacher.job.trainer.keep_every == 1


def test_a_stored_teacher_keeps_its_anchors_and_the_student_follows_them(run_job, tmp_path):
    record = run_job(*TINY_SYNTHETIC, "dataset.image_shape=[3,16,16]", "teacher=resnet8", "student=resnet8",
                     "method=rco", "++teacher.recipe.trainer.epochs=3", "++teacher.recipe.trainer.keep_every=1",
                     "trainer.epochs=3")
    assert record["status"] == "completed"
    assert record["rco_anchors"] == [1, 2, "final"] and record["rco_epochs_per_anchor"] == 1.0
    (meta,) = (tmp_path / "teachers").glob("*/meta.json")
    anchors = json.loads(meta.read_text())["anchors"]
    assert sorted(anchors) == ["1", "2"]
    for entry in anchors.values():
        assert (meta.parent / entry["file"]).is_file()
    assert not list((meta.parent / "train").glob("anchors/*.pt"))  # moved into the entry, not copied


def test_no_gradient_reaches_the_teacher_or_an_anchor(tmp_path):
    from tests.conftest import make_batch
    from tests.helpers import assert_no_teacher_grad, forward

    pair = make_pair("resnet8", "resnet8", 10, (3, 16, 16), epochs=2)
    torch.save({"model": create_model("resnet8", num_classes=10, input_shape=(3, 16, 16)).state_dict()}, tmp_path / "a.pt")
    m = create_method(method_options("rco", anchors=[str(tmp_path / "a.pt")]), pair)
    s, t = forward(pair, m, n=3, shape=(3, 16, 16))
    assert_no_teacher_grad(m.all_terms(make_batch(3, 10), s, t)["kd"], *t.values())
    z_anchor = m.anchor_logits(torch.randn(3, 3, 16, 16), 1)
    assert not z_anchor.requires_grad
    assert all(not p.requires_grad for p in m._current.model.parameters())
