"""trainer.compile compiles a frozen eval-mode teacher's forward with inductor's freezing: its outputs equal the eager
teacher's to float rounding, a teacher in train mode is never frozen, and a job with it trains to completion."""
from __future__ import annotations

import pytest
import torch

from kdbench.models import create_model
from kdbench.teachers import TeacherOutputs
from tests.conftest import resolve_job


@pytest.mark.slow  # ~20 s: inductor compiles the teacher
def test_a_compiled_frozen_teacher_gives_the_eager_outputs_to_float_rounding():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, input_shape=(3, 32, 32)).eval().requires_grad_(False)
    eager = TeacherOutputs(model, ("stage2",), train_mode=False)
    compiled = TeacherOutputs(model, ("stage2",), train_mode=False)
    compiled.compile_forward()
    batch = type("B", (), {"inputs": torch.randn(8, 3, 32, 32)})()
    a, b = eager(batch), compiled(batch)
    assert set(a) == set(b) and {"stage2", "logits"} <= set(a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


def test_a_teacher_in_train_mode_is_never_compiled_with_frozen_weights():
    model = create_model("resnet8", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="train mode"):
        TeacherOutputs(model, (), train_mode=True).compile_forward()


@pytest.mark.slow  # ~60 s: inductor compiles the student's training graph and the teacher's forward
def test_a_job_with_trainer_compile_trains_with_the_compiled_teacher(tmp_path, monkeypatch):
    from kdbench.job import run

    compiled = []
    original = TeacherOutputs.compile_forward
    monkeypatch.setattr(TeacherOutputs, "compile_forward", lambda self: (compiled.append(self), original(self)))

    job = resolve_job(["dataset=synthetic", "dataset.num_classes=10", "dataset.train_size=64", "dataset.test_size=16",
                       "trainer.batch_size=32", "trainer.epochs=1", "trainer.progress=false", "trainer.compile=true",
                       "teacher=resnet8", "student=resnet8", "method=kd", "++teacher.recipe.trainer.epochs=1",
                       "seed=1"], tmp_path)
    record = run(job, tmp_path / "run")
    assert record["status"] == "completed" and len(record["history"]) == 1
    assert len(compiled) == 1 and compiled[0].compiled is not None
