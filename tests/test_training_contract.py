"""What the training loop promises, checked with a model whose mode matters (BatchNorm + dropout, tests' ProbeNet):
which network runs in which mode for every forward, which epochs a resumed launch really trains, what the record's
summary takes from its history, and which runs share a stored teacher.

ProbeNet logs every forward as (tag, training, grad enabled, batch size). On digits (1,437 training and 360 test
images) with batches of 500 and evaluation batches of 360, a training pass is three forwards of 500, 500 and 437
samples, and an evaluation one forward of 360, so the log tells them apart without knowing the loop's code.
"""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import ProbeNet, compose_config, resolve_job

TRAIN_BATCHES = [500, 500, 437]
TEST_BATCH = 360
DIGITS = ["dataset=digits", "trainer.batch_size=500", f"trainer.eval_batch_size={TEST_BATCH}", "trainer.epochs=2",
          "trainer.progress=false", "schedule=constant"]


@pytest.fixture
def teacher_checkpoint(tmp_path):
    """An (untrained) ProbeNet teacher in the reference checkpoint format, so no job trains a teacher first."""
    torch.manual_seed(0)
    path = tmp_path / "probe_teacher.pth"
    torch.save({"model": ProbeNet(10, (1, 8, 8)).state_dict()}, path)
    return path


def probe_run(tmp_path, *overrides, name="job", teacher_checkpoint=None):
    """A real job with ProbeNet as student (tag 'student') and, from a checkpoint, as teacher (tag 'teacher')."""
    from kdbench.job import resolve, run

    cfg = compose_config([*DIGITS, *overrides], tmp_path)
    with open_dict(cfg):
        cfg.student.model = {"name": "probe_net", "tag": "student"}
        cfg.student.label = "probe_net"
        cfg.teacher.model = {"name": "probe_net", "tag": "teacher"}
        cfg.teacher.label = "probe_teacher"
        cfg.teacher.checkpoint = str(teacher_checkpoint) if teacher_checkpoint else None
    return run(resolve(cfg, tuple(overrides)), tmp_path / name)


def calls_of(log, tag, grad=None, sizes=None):
    return [c for c in log if c[0] == tag and (grad is None or c[2] == grad) and (sizes is None or c[3] in sizes)]


# ----------------------------------------------------------------------------- modes


def test_the_student_trains_in_train_mode_and_is_evaluated_in_eval_mode(tmp_path, probe_calls):
    probe_run(tmp_path, "method=vanilla")
    trained = calls_of(probe_calls, "student", grad=True)
    assert [c[3] for c in trained] == TRAIN_BATCHES * 2  # two epochs, nothing else with gradients
    assert all(c[1] for c in trained)
    evaluated = calls_of(probe_calls, "student", grad=False, sizes={TEST_BATCH})
    assert len(evaluated) == 2 and not any(c[1] for c in evaluated)  # one evaluation per epoch, in eval mode
    assert not any(c[1] for c in calls_of(probe_calls, "student", grad=False))  # shape probes too


@pytest.mark.parametrize("method, train_mode", [("kd", False), ("ofd", True)])
@pytest.mark.parametrize("augmented", [True, False], ids=["live teacher", "cached teacher"])
def test_the_teacher_runs_in_the_mode_its_method_declares(tmp_path, probe_calls, teacher_checkpoint, method,
                                                         train_mode, augmented):
    aug = ["dataset.crop_padding=1"] if augmented else []
    rec = probe_run(tmp_path, f"method={method}", *aug, teacher_checkpoint=teacher_checkpoint)
    teacher = calls_of(probe_calls, "teacher", sizes=set(TRAIN_BATCHES))
    assert teacher and not any(c[2] for c in teacher)  # never with gradients
    assert {c[1] for c in teacher} == {train_mode}
    # its outputs are cached only when exact: no augmentation and an eval-mode teacher
    cached = not augmented and not train_mode
    assert rec["teacher_cache"] is cached
    assert len(teacher) == len(TRAIN_BATCHES) * (1 if cached else 2)
    # the teacher's own evaluation (teacher_top1) is in eval mode whatever the method does with it in training
    teacher_eval = calls_of(probe_calls, "teacher", sizes={TEST_BATCH})
    assert len(teacher_eval) == 1 and not teacher_eval[0][1]
    assert all(c[1] for c in calls_of(probe_calls, "student", grad=True))


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_a_pre_training_stage_trains_the_student_then_main_training_runs_as_usual(tmp_path, probe_calls,
                                                                                  teacher_checkpoint, method):
    rec = probe_run(tmp_path, f"method={method}", "method.stage_epochs=1", "dataset.crop_padding=1",
                    teacher_checkpoint=teacher_checkpoint)
    assert rec["status"] == "completed"
    trained = calls_of(probe_calls, "student", grad=True)
    assert [c[3] for c in trained] == TRAIN_BATCHES * 3  # 1 stage epoch + 2 main epochs
    assert all(c[1] for c in trained)
    assert not any(c[1] for c in calls_of(probe_calls, "student", grad=False, sizes={TEST_BATCH}))
    assert not any(c[1] for c in calls_of(probe_calls, "teacher"))


def test_a_stage_that_trains_no_student_part_runs_no_student_forward(tmp_path, probe_calls, teacher_checkpoint):
    """FT's paraphraser stage: only the teacher is read, so the student's BatchNorm statistics stay untouched (as in
    RepDistiller, whose init stage keeps the student in eval mode)."""
    rec = probe_run(tmp_path, "method=ft", "method.stage_epochs=1", "dataset.crop_padding=1",
                    teacher_checkpoint=teacher_checkpoint)
    assert rec["status"] == "completed"
    assert [c[3] for c in calls_of(probe_calls, "student", grad=True)] == TRAIN_BATCHES * 2  # main epochs only
    assert len(calls_of(probe_calls, "teacher", sizes=set(TRAIN_BATCHES))) == len(TRAIN_BATCHES) * 3


# ----------------------------------------------------------------------------- the record's summary


def test_the_summary_takes_best_and_last_from_their_own_epochs():
    from kdbench.train import summary

    history = [{"epoch": 1, "test_top1": 50.0, "test_errors": 50}, {"epoch": 2, "test_top1": 70.0, "test_errors": 30},
               {"epoch": 3, "test_top1": 60.0, "test_errors": 40}]
    assert summary(history) == {"last_top1": 60.0, "last_errors": 40, "best_top1": 70.0, "best_errors": 30,
                                  "best_epoch": 2, "epochs_done": 3}


def test_the_summary_of_a_tie_is_its_first_best_epoch():
    from kdbench.train import summary

    history = [{"epoch": e, "test_top1": t, "test_errors": 100 - t} for e, t in ((1, 60.0), (2, 70.0), (3, 70.0))]
    assert summary(history)["best_epoch"] == 2


def test_the_record_summarises_its_own_history(tmp_path, probe_calls):
    rec = probe_run(tmp_path, "method=vanilla", "trainer.epochs=3", "optim.lr=0.3")
    history = rec["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert rec["last_top1"] == history[-1]["test_top1"] and rec["last_errors"] == history[-1]["test_errors"]
    best = max(history, key=lambda h: h["test_top1"])
    assert (rec["best_top1"], rec["best_epoch"]) == (best["test_top1"], best["epoch"])
    assert rec["epochs_done"] == 3


# ----------------------------------------------------------------------------- resume


def _interrupt_at_epoch(log, epoch: int) -> int:
    """The forward (1-based position in the log) that starts training epoch `epoch` (1-based)."""
    first_batches = [i for i, c in enumerate(log) if c[0] == "student" and c[2] and c[3] == TRAIN_BATCHES[0]]
    return first_batches[2 * (epoch - 1)] + 1  # two batches of 500 per epoch


@pytest.mark.parametrize("stage", [False, True], ids=["plain", "after a stage"])
def test_a_resumed_launch_trains_only_the_epochs_not_finished(tmp_path, probe_calls, teacher_checkpoint, stage):
    job = ["method=ab", "method.stage_epochs=1"] if stage else ["method=kd"]
    job += ["trainer.epochs=3", "dataset.crop_padding=1"]
    straight = probe_run(tmp_path, *job, name="straight", teacher_checkpoint=teacher_checkpoint)
    stage_batches = len(TRAIN_BATCHES) if stage else 0
    ProbeNet.interrupt_at = _interrupt_at_epoch(probe_calls, 2 + (1 if stage else 0))
    probe_calls.clear()
    with pytest.raises(KeyboardInterrupt):
        probe_run(tmp_path, *job, name="resumed", teacher_checkpoint=teacher_checkpoint)
    partial = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert partial["status"] == "interrupted" and [h["epoch"] for h in partial["history"]] == [1]
    assert len(calls_of(probe_calls, "student", grad=True)) == stage_batches + len(TRAIN_BATCHES) + 1

    probe_calls.clear()
    resumed = probe_run(tmp_path, *job, name="resumed", teacher_checkpoint=teacher_checkpoint)
    assert [c[3] for c in calls_of(probe_calls, "student", grad=True)] == TRAIN_BATCHES * 2  # epochs 2 and 3 only
    assert len(calls_of(probe_calls, "student", sizes={TEST_BATCH})) == 2
    assert resumed["history"][0] == partial["history"][0]  # epoch 1 kept as it was, not trained again
    for a, b in zip(resumed["history"], straight["history"]):
        assert (a["train"], a["test_top1"], a["lr"]) == (b["train"], b["test_top1"], b["lr"])

    probe_calls.clear()
    again = probe_run(tmp_path, *job, name="resumed", teacher_checkpoint=teacher_checkpoint)
    assert calls_of(probe_calls, "student", grad=True) == []  # a finished job launched again trains nothing
    assert again["history"] == resumed["history"] and again["status"] == "completed"


# ----------------------------------------------------------------------------- the teacher store


def test_teachers_share_a_store_entry_exactly_when_seed_recipe_and_architecture_agree(run_job, tmp_path):
    from kdbench.plan import plan_job

    base = ["method=kd", "teacher=mlp_32", "trainer.epochs=1", "+teacher.recipe.trainer.epochs=1",
            "trainer.progress=false"]
    variants = {"base": [], "student seed": ["seed=2"], "teacher seed": ["teacher.seed=1"], "teacher recipe": ["+teacher.recipe.optim.lr=0.01"],
                "architecture": ["teacher=mlp_800x2"]}
    keys, shas = {}, {}
    for name, extra in variants.items():
        planned = plan_job(resolve_job([*base, *extra], tmp_path))["teacher"]
        source = run_job(*base, *extra, name=name.replace(" ", "_"))["teacher_source"]
        assert planned["key"] == f"{source['path'].split('/')[-2]}"  # the dry run names the entry the job uses
        keys[name], shas[name] = source["key"], source["sha256"]
    assert keys["student seed"] == keys["base"]
    assert len({keys[k] for k in ("base", "teacher seed", "teacher recipe", "architecture")}) == 4
    assert len(list((tmp_path / "teachers").iterdir())) == len(set(keys.values()))
    assert shas["teacher seed"] != shas["base"]  # and a teacher seed is trained with that seed
