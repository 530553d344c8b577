"""The hooks a method uses when the default step is not enough: several teachers, extra heads evaluated as rows of
their own, and batches the method samples itself (class-paired batches; data-free methods that never read the
training split). Toy methods registered here exercise the core; the real methods have their own tests."""
from __future__ import annotations

import json

import pytest
import torch

from kdbench.distill import Method, register_method
from kdbench.losses import kd_loss
from kdbench.plan import plan_job, teachers_to_train
from tests.conftest import resolve_job

FAST = ["trainer.epochs=2", "trainer.progress=false"]


@register_method("test_avg_teachers")
class AverageTeachers(Method):
    """KD from the mean of several teachers' logits (a test stand-in for the multi-teacher baselines)."""

    multi_teacher = True
    teacher_taps = ("logits",)
    seen: list[int] = []

    def forward_loss(self, batch, step):
        outs = [teacher(batch) for teacher in step.teachers]
        AverageTeachers.seen.append(len(outs))
        student = step.forward(batch.inputs, self.student_taps)
        mean = {"logits": torch.stack([o["logits"] for o in outs]).mean(0)}
        return self.loss(batch, student, mean, step.epoch)

    def terms(self, batch, student, teacher):
        return {"avg": kd_loss(student["logits"], teacher["logits"], 4.0)}


@register_method("test_heads")
class TwoHeads(Method):
    """Plain CE, with the student's logits also evaluated negated (a head that is always wrong) and as they are."""

    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.steps = 0

    def terms(self, batch, student, teacher):
        self.steps += 1
        return {}

    def extra_heads(self):
        return {"same": lambda s, x: s(x), "negated": lambda s, x: -s(x)}

    def record_fields(self):  # asked before training and after every epoch: what it counted reaches the record
        return {"evaluated_head": "student", "steps_taken": self.steps}


@register_method("test_paired_batches")
class PairedBatches(Method):
    """Batches of two samples per class, drawn with loader.take (CS-KD's sampler shape)."""

    needs_teacher = False
    drawn: list[torch.Tensor] = []

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.labels = torch.as_tensor(pair.train_labels)

    def batches(self, loader, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            idx = torch.cat([torch.nonzero(self.labels == c).squeeze(1)[torch.randperm(int((self.labels == c).sum()),
                                                                                        generator=g)[:2]]
                             for c in range(int(self.labels.max()) + 1)])
            PairedBatches.drawn.append(idx)
            yield loader.take(idx, g)


def _method(name: str) -> list[str]:
    return [f"method.name={name}", "+method.weights.avg=1.0"]


def test_a_multi_teacher_method_gets_every_teacher_of_the_teachers_config(run_job, tmp_path):
    AverageTeachers.seen.clear()
    overrides = ["method=vanilla", *_method("test_avg_teachers"), "+teacher@teachers.a=mlp_32",
                 "+teacher@teachers.b=mlp_800x2", *FAST]
    job = resolve_job(overrides, tmp_path)
    assert [t.model.label for t in job.teachers] == ["mlp_32", "mlp_800x2"] and job.labels["teacher"] == "mlp_32+mlp_800x2"
    assert job.labels["method"] == "test_avg_teachers"
    plan = plan_job(job)
    assert [t["label"] for t in teachers_to_train(plan)] == ["mlp_32", "mlp_800x2"]  # both trained first, each once
    rec = run_job(*overrides)
    assert rec["status"] == "completed" and set(AverageTeachers.seen) == {2}
    assert [s["kind"] for s in rec["teacher_sources"]] == ["store", "store"] and len(rec["teachers_top1"]) == 2
    assert len(list((tmp_path / "teachers").iterdir())) == 2


def test_a_multi_teacher_method_without_teachers_names_the_setting(tmp_path):
    from kdbench.errors import InvalidSetting

    with pytest.raises(InvalidSetting, match="teacher@teachers"):
        resolve_job(["method=vanilla", *_method("test_avg_teachers")], tmp_path)


def test_each_extra_head_is_evaluated_every_epoch_and_recorded_as_its_own_row(run_job, tmp_path):
    from kdbench.report import load_records

    rec = run_job("method=vanilla", "method.name=test_heads", *FAST)
    assert rec["evaluated_head"] == "student" and rec["steps_taken"] == 2 * -(-rec["n_train"] // rec["config"]["trainer"]["batch_size"])
    assert all(set(h["heads"]) == {"same", "negated"} for h in rec["history"])
    same = json.loads((tmp_path / "job" / "heads" / "same" / "metrics.json").read_text())
    negated = json.loads((tmp_path / "job" / "heads" / "negated" / "metrics.json").read_text())
    assert same["status"] == negated["status"] == "completed" and same["method"] == "test_heads@same"
    assert same["last_top1"] == rec["last_top1"] and negated["last_top1"] < same["last_top1"]
    methods = set(load_records([tmp_path / "job"])["method"])
    assert methods == {"test_heads", "test_heads@same", "test_heads@negated"}


def test_a_method_that_samples_its_own_batches_trains_on_exactly_those(run_job):
    PairedBatches.drawn.clear()
    rec = run_job("method=vanilla", "method.name=test_paired_batches", *FAST)
    assert rec["status"] == "completed" and len(PairedBatches.drawn) == 6  # 3 batches x 2 epochs
    from tests.conftest import compose_config
    from kdbench.data import load_splits

    train, _ = load_splits(compose_config(["dataset=digits"]).dataset)
    for idx in PairedBatches.drawn:
        counts = torch.bincount(train.labels[idx], minlength=10)
        assert counts.tolist() == [2] * 10  # two samples of every class
