"""Cohorts: the jobs of a sweep that see the same batches train together in one process.

Jobs that differ only in method (and its options), student, optimizer or schedule, and agree on everything that
decides the batches and the teacher's outputs (data set and its augmentation, teachers, seed, batch size, epochs,
precision, device), form a cohort. Each batch is drawn and augmented once; each teacher's forward runs once per batch
with the union of the taps the members read; then each member takes its own step (kdbench.train.train_together).
A member's record, checkpoint, logger and resume are its own, and its history equals the one it trains alone: its
student and heads are built from its seed as alone, its dropout and method randomness come from its own RNG stream
(swapped in around its steps), and the teacher's outputs do not depend on which other taps were recorded. A member
that fails is recorded as failed and left out; the others go on.

Jobs that cannot share run alone, and `alone_reason` says why: a method that draws its own batches (CS-KD's pairs,
data-free generators), a teacher in train mode (its BatchNorm statistics depend on the batch order of one run:
OFD's mdistiller default, Label Refinery, MEAL), or a distributed job.

    kdbench -m experiment=crd_cifar100_same pair=resnet32x4-resnet8x4 seed=1 hydra/launcher=cohort
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from kdbench.distill import Method, method_class
from kdbench.io import config_hash
from kdbench.job import (Job, ObtainedTeachers, Trainee, check_pair, finished_record, job_logger, obtain_teachers,
                         prepare, start_record, teacher_view_cache)
from kdbench.teachers import TeacherOutputs, cache_bytes, cache_is_exact, outputs_are_pure
from kdbench.train import autocast, fit_cohort

# Trainer settings a cohort's members may differ in (they change nothing the members share; not `compile`, which
# compiles the shared teacher too).
MEMBER_TRAINER_KEYS = ("progress", "resume")


def alone_reason(job: Job) -> Optional[str]:
    """Why this job cannot join a cohort (None: it can)."""
    from kdbench.distributed import world

    cls = method_class(job.method.name)
    if cls.batches is not Method.batches:
        return f"method {job.method.name} draws its own batches"
    if job.teacher_train_mode:
        return f"method {job.method.name} runs its teacher in train mode (batch statistics of its own batches)"
    if world().distributed:
        return "a distributed job runs alone"
    return None


def _teacher_identity(spec) -> dict:
    return {"model": spec.model.name, "kwargs": spec.model.kwargs, "checkpoint": str(spec.checkpoint or ""),
            "entry": spec.entry or "", "pretrained": spec.pretrained or ""}


def cohort_key(job: Job) -> Optional[str]:
    """Jobs with equal keys can train as one cohort; None for a job that runs alone."""
    if alone_reason(job) is not None:
        return None
    dataset = {k: v for k, v in dataclasses.asdict(job.dataset).items() if k not in ("root", "download")}
    trainer = {k: v for k, v in dataclasses.asdict(job.trainer).items() if k not in MEMBER_TRAINER_KEYS}
    shared = {"dataset": dataset, "teachers": [_teacher_identity(t) for t in job.teachers], "seed": job.seed,
              "trainer": trainer}
    return config_hash(json.loads(json.dumps(shared, default=str)))


def group(jobs: Sequence[Job]) -> list[list[int]]:
    """Positions of `jobs` in cohorts, in sweep order (a job that runs alone is a cohort of one)."""
    cohorts: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for i, job in enumerate(jobs):
        key = cohort_key(job)
        if key is None:
            out.append([i])
        elif key in cohorts:
            cohorts[key].append(i)
        else:
            cohorts[key] = [i]
            out.append(cohorts[key])
    return out


# ----------------------------------------------------------------------------- shared teacher outputs


class SharedTeacherOutputs:
    """One teacher's outputs for a cohort: the union of the members' taps, computed once for the batch the cohort is
    on (kdbench.train.train_together announces it with begin_batch), under the autocast state it is asked in."""

    def __init__(self, base: TeacherOutputs):
        self.base = base
        self.batch = None
        self._memo: dict[bool, dict[str, torch.Tensor]] = {}

    def begin_batch(self, batch) -> None:
        if batch is not self.batch:
            self.batch, self._memo = batch, {}

    def outputs(self, batch) -> Optional[dict[str, torch.Tensor]]:
        if batch is not self.batch:
            return None
        state = torch.is_autocast_enabled(batch.inputs.device.type)
        if state not in self._memo:
            self._memo[state] = self.base(batch)
        return self._memo[state]

    def view(self, taps) -> "TeacherView":
        return TeacherView(self, taps)


class TeacherView:
    """What one member sees of a SharedTeacherOutputs: the TeacherOutputs interface, with its own taps."""

    def __init__(self, shared: SharedTeacherOutputs, taps):
        self.shared = shared
        self.taps = tuple(taps)
        self.model = shared.base.model
        self.train_mode = shared.base.train_mode

    @property
    def cached(self) -> bool:
        return self.shared.base.cached

    def begin_batch(self, batch) -> None:
        self.shared.begin_batch(batch)

    def with_taps(self, taps) -> TeacherOutputs:
        return TeacherOutputs(self.model, taps, self.train_mode)

    def start_epoch(self) -> None:
        self.shared.base.start_epoch()

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        out = self.shared.outputs(batch)
        if out is None:  # another batch than the cohort's (a method's own views): the base's caches or a forward
            out = self.shared.base(batch)
        keep = {*self.taps, "logits"}
        return {name: value for name, value in out.items() if name in keep}


def _shared_outputs(trainees: Sequence[Trainee], teachers: ObtainedTeachers, data, device, job: Job) -> list:
    """One SharedTeacherOutputs per teacher with the members' union of taps: cached per sample when that is exact
    for every member and fits, or from the view cache when every member reads only logits."""
    trainer, shared = job.trainer, []
    taps = sorted({tap for t in trainees for tap in t.method.teacher_taps})
    needs = SimpleNamespace(teacher_taps=tuple(taps), teacher_train_mode=False, method_name="the cohort",
                            teacher_cache=all(t.method.teacher_cache for t in trainees))
    for k, teacher in enumerate(teachers.models):
        base = TeacherOutputs(teacher, taps, False)
        shapes = trainees[0].pair.teachers_shapes[k]
        exact = cache_is_exact(data.train_loader.augmented, False)
        fits = cache_bytes(shapes, taps, len(data.train)) <= trainer.teacher_cache_gb * 2**30
        if trainer.teacher_cache and needs.teacher_cache and exact and fits:
            base.build_cache(data.train_loader, lambda: autocast(device, trainer.precision))
        base.view_cache, info = teacher_view_cache(job, needs, data, device, teacher, teachers.sources[k])
        if trainer.compile and outputs_are_pure(needs):
            base.compile_forward()  # as Trainee.own_teacher_outputs (trainer.compile is part of the cohort key)
        if k == 0:
            for t in trainees:
                t.record.update(teacher_view_cache=info)
        shared.append(SharedTeacherOutputs(base))
    return shared


# ----------------------------------------------------------------------------- running a cohort


def run_cohort(items: Sequence[tuple[Job, Path]]) -> list:
    """Train the jobs of one cohort (equal cohort_key) together; each item's result is its record (dict) or the
    exception that stopped it. Members already completed in their folder keep their record."""
    results: list = [None] * len(items)
    live = []
    for i, (job, out_dir) in enumerate(items):
        try:
            kept = finished_record(job, out_dir)
            if kept is not None:
                results[i] = kept
                continue
            check_pair(job)
            live.append(i)
        except Exception as err:  # noqa: BLE001
            results[i] = err
    if not live:
        return results
    if len(live) > 1:
        names = ", ".join(items[i][0].labels["method"] for i in live)
        print(f"kdbench: cohort of {len(live)} jobs ({names}) on {items[live[0]][0].labels['student']}'s data, seed "
              f"{items[live[0]][0].seed}: one teacher forward per batch", flush=True)
    records, loggers, trainees = {}, {}, {}
    first = items[live[0]][0]
    try:
        for i in live:
            records[i] = start_record(*items[i])
            loggers[i] = job_logger(*items[i])
        device, data = prepare(first)
        teachers = obtain_teachers(first, data, device)
        for i in live:
            try:
                trainees[i] = Trainee(items[i][0], items[i][1], records[i], loggers[i], _single(), data, device,
                                      teachers)
            except Exception as err:  # noqa: BLE001
                _fail(records[i], err, results, i)
        shared = _shared_outputs(list(trainees.values()), teachers, data, device, first)
        members = []
        for i, trainee in list(trainees.items()):
            try:
                trainee.attach([s.view(trainee.method.teacher_taps) for s in shared])
                trainee.run_stages()
                members.append((i, trainee.member(on_failure=lambda err, i=i: _fail(records[i], err, results, i))))
            except Exception as err:  # noqa: BLE001
                _fail(records[i], err, results, i)
        if members:
            fit_cohort([m for _, m in members], first.trainer.epochs, progress=first.trainer.progress)
        for i, member in members:
            if member.failed is None:
                records[i].complete()
                results[i] = records[i].data
    except BaseException as err:  # setup shared by every member failed, or Ctrl-C / SIGTERM: each record says so
        for i in live:
            if results[i] is None and i in records:
                _fail(records[i], err, results, i)
        if not isinstance(err, Exception):
            raise
    finally:
        for i, logger in loggers.items():
            logger.finish(records[i].data["status"])
    return results


def _single():
    from kdbench.distributed import SINGLE

    return SINGLE


def _fail(record, err: BaseException, results: list, i: int) -> None:
    record.fail(err)
    results[i] = err
