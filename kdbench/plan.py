"""Dry runs (`dry_run=true`): what each job of a sweep would train and roughly what it costs, before any GPU time.

A job's plan walks the same resolved Job (kdbench.job) the run walks, but needs no data and trains nothing:
train-set sizes come from the datasets' known sizes (kdbench.data.datasets), forward FLOPs from one batch-1 forward
of the freshly built model under torch's FlopCounterMode, and whether a teacher must be trained first from the
teacher store. Each job writes its plan to `plan.json` in its output dir, so the
sweep's totals can be summed at the end whichever launcher ran the jobs (in-process or in workers).

Cost model (training FLOPs, the usual 3x forward for forward + backward):
  student   3 x forward x samples x epochs
  teacher   forward x samples x (1 when its outputs are cached, else epochs)
  training  a teacher not yet in the store costs its own job's plan (Job.teacher.job),
            recursively for teaching-assistant chains, counted once per store entry across the sweep
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdbench.data import planned_train_size
from kdbench.distill import method_class
from kdbench.io import write_json
from kdbench.job import Job, ModelSpec
from kdbench.models import create_model
from kdbench.teachers import TeacherStore, cache_is_exact

PLAN_FILE = "plan.json"
FOOTNOTE = ("Estimate: training = 3 x forward FLOPs (torch FlopCounterMode: convolutions and matmuls) per sample "
            "and epoch (more where a method passes several views of a sample: SSKD and SLA 4 rotations, CS-KD a "
            "partner); the teacher's forward once per sample when its outputs are cached (no augmentation), else "
            "every epoch. Not counted: method heads/embeddings and the networks an online method trains beside the "
            "student (peers, branches, generators), pre-training stages, test-set evaluation, "
            "whether cached teacher outputs fit in trainer.teacher_cache_gb. exclude_train_classes is approximated "
            "as 1/num_classes of the training set per excluded class.")


@lru_cache(maxsize=None)
def _forward_flops(model_json: str, num_classes: int, input_shape: tuple[int, ...]) -> int:
    kwargs = json.loads(model_json)
    if "weights" in kwargs:
        kwargs["weights"] = None  # the FLOPs do not depend on pretrained weights; never download them
    model = create_model(kwargs.pop("name"), num_classes=num_classes, input_shape=input_shape, **kwargs).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def forward_flops(model: ModelSpec, dataset) -> int:
    """FLOPs of one sample's forward pass (eval mode), cached per (model, classes, input shape)."""
    model_json = json.dumps({"name": model.name, **model.kwargs}, sort_keys=True)
    return _forward_flops(model_json, int(dataset.num_classes), tuple(dataset.image_shape))


def teacher_outputs_cached(job: Job) -> bool:
    """Whether the run would cache its teacher's outputs (the conditions the run checks before the size budget)."""
    augmented = bool(job.dataset.crop_padding) or bool(job.dataset.hflip)
    cacheable = method_class(job.method.name).teacher_cache
    return job.trainer.teacher_cache and cacheable and cache_is_exact(augmented, job.teacher_train_mode)


def plan_job(job: Job) -> dict:
    """The job's labels, epochs and FLOPs, and how each of its teachers is obtained (with the plan of its training
    when it is not in the store yet). The job's own `flops` leave out teacher training, which sweeps count once."""
    ds = job.dataset
    samples, epochs = planned_train_size(ds), int(job.trainer.epochs)
    method = method_class(job.method.name)
    plan = {"labels": job.labels, "seed": job.seed, "epochs": epochs, "samples": samples,
            "flops": method.student_passes * forward_flops(job.student, ds) * samples * epochs, "teacher": None,
            "teachers": []}
    if job.student_init is not None:
        plan["student_init"] = str(job.student_init)
    cached = teacher_outputs_cached(job)
    view = planned_view_cache(job, samples) if job.teachers else None
    if view is not None:
        plan["teacher_view_cache"] = view
    for spec in job.teachers:
        # teacher forwards per sample: 1 with the per-sample cache; with the view cache, none (found) or one per view
        # (built now); else one per epoch
        state = (view or {}).get("state")
        per_sample = 1 if cached else 0 if state == "found" else view["views"] if state == "build" else epochs
        plan["flops"] += forward_flops(spec.model, ds) * samples * per_sample * method.teacher_passes
        teacher = {"label": spec.model.label, "cached": cached}
        if spec.pretrained is not None:
            teacher.update(source="pretrained", weights=spec.pretrained)
        elif spec.checkpoint is not None:
            teacher.update(source="checkpoint", path=str(spec.checkpoint))
        else:
            stored = TeacherStore(job.teacher_store).entry(spec.entry).exists()
            teacher.update(source="store" if stored else "train", key=spec.entry)
            if not stored:
                teacher["training"] = plan_job(spec.job)
        plan["teachers"].append(teacher)
    plan["teacher"] = plan["teachers"][0] if plan["teachers"] else None
    return plan


@lru_cache(maxsize=None)
def _teacher_taps(method_json: str, teacher_json: str, student_json: str, classes: int, shape: tuple) -> tuple:
    """(the method's teacher taps, its teacher train mode, its teacher_cache flag), from the method built on untrained
    models (no data; the global RNG untouched)."""
    from kdbench.distill import Options, PairInfo, create_method
    from kdbench.models import probe_taps

    def build(spec_json):
        kwargs = json.loads(spec_json)
        kwargs.pop("weights", None)  # never download pretrained weights to plan
        return create_model(kwargs.pop("name"), num_classes=classes, input_shape=shape, **kwargs)

    with torch.random.fork_rng(devices=[]):
        teacher, student = build(teacher_json), build(student_json)
        pair = PairInfo(student, teacher, probe_taps(student, shape), probe_taps(teacher, shape), "s", "t", classes,
                        torch.arange(2 * classes) % classes, 1, 0.1, shape)
        method = create_method(Options(json.loads(method_json)), pair)
    return tuple(method.teacher_taps), bool(method.teacher_train_mode), bool(method.teacher_cache)


def planned_view_cache(job: Job, samples: int) -> Optional[dict]:
    """What the run would do with the teacher view cache (kdbench.viewcache): its size, and found / build / skipped /
    not used, with why."""
    from types import SimpleNamespace

    from kdbench import viewcache
    from kdbench.io import sha256_file

    ds, spec = job.dataset, job.teacher
    augment = SimpleNamespace(active=bool(ds.crop_padding) or bool(ds.hflip))
    if ds.name in ("imagenet", "imagefolder"):
        loader = SimpleNamespace(random_resized=True)
    else:
        loader = SimpleNamespace(augment=augment, random_resized=False)
    dump = lambda m: json.dumps({"name": m.name, **m.kwargs}, sort_keys=True)  # noqa: E731
    try:
        taps, train_mode, cacheable = _teacher_taps(json.dumps(dict(job.method), sort_keys=True, default=str),
                                                    dump(spec.model), dump(job.student), int(ds.num_classes),
                                                    tuple(ds.image_shape))
    except Exception as err:  # noqa: BLE001  (the run says it more precisely)
        return {"state": "not used", "why": f"the method could not be built here ({type(err).__name__})"}
    needs = SimpleNamespace(teacher_taps=taps, teacher_train_mode=train_mode, teacher_cache=cacheable,
                            method_name=job.method.name)
    reason = viewcache.applies(needs, loader)
    if reason is not None:
        return {"state": "not used", "why": reason}
    sha, entry_dir = None, None
    if spec.checkpoint is not None and Path(spec.checkpoint).exists():
        sha = sha256_file(spec.checkpoint)
        entry_dir = job.teacher_store / viewcache.HIDDEN_DIR / f"{Path(spec.checkpoint).stem}-{sha[:16]}"
    elif spec.entry is not None:
        entry = TeacherStore(job.teacher_store).entry(spec.entry)
        if entry.exists():
            sha, entry_dir = json.loads(entry.meta.read_text())["sha256"], entry.directory
    cache_spec = viewcache.spec_for(sha or "", ds, job.trainer.precision, samples)
    found = sha is not None and viewcache.paths(entry_dir, cache_spec)[1].exists()
    mode = str(getattr(job.trainer.teacher_view_cache, "value", job.trainer.teacher_view_cache))
    action, why = viewcache.decide(mode, cache_spec, job.trainer.epochs, job.trainer.teacher_view_cache_gb, found)
    state = {"use": "found", "build": "build", "skip": "skipped"}[action]
    if state == "build":
        why = why.replace("built now", "built first")
    return {"state": state, "why": why, "bytes": cache_spec.nbytes, "views": cache_spec.views}


def teachers_to_train(plan: dict) -> list[dict]:
    """The store entries a job would train before it starts, deepest link of a chain first."""
    out = []
    for teacher in plan.get("teachers") or ([plan["teacher"]] if plan.get("teacher") else []):
        if "training" not in teacher:
            continue
        training = teacher["training"]
        out += [*teachers_to_train(training), {"key": teacher["key"], "label": teacher["label"],
                                               "method": training["labels"]["method"], "epochs": training["epochs"],
                                               "flops": training["flops"]}]
    return out


def _cost(flops: float, tflops: float) -> str:
    """'232 PFLOP ≈ 6.46 h' (in smaller units for demo-sized sweeps), at `tflops` TFLOP/s."""
    scale, unit = next(((s, u) for s, u in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")) if flops >= s),
                       (1e6, "MFLOP"))
    seconds = flops / (tflops * 1e12)
    if seconds >= 3600:
        duration = f"{seconds / 3600:.3g} h"
    elif seconds >= 60:
        duration = f"{seconds / 60:.3g} min"
    else:
        duration = f"{seconds:.2g} s" if seconds >= 1 else "< 1 s"
    return f"{flops / scale:.3g} {unit} ≈ {duration}"


def _chain_start(teacher: dict) -> str:
    """How the deepest teacher to train gets its own teacher: '' for vanilla, 'X (in store) -> ' for a TA."""
    training = teacher["training"]
    while training["teacher"] is not None and "training" in training["teacher"]:
        training = training["teacher"]["training"]
    first = training["teacher"]
    if first is None:
        return ""
    return f"{first['label']} ({'in store' if first['source'] == 'store' else 'checkpoint'}) -> "


def _teacher_note(teacher: dict, tflops: float) -> str:
    if teacher["source"] == "pretrained":
        return f"teacher {teacher['label']}: torchvision weights {teacher['weights']}"
    if teacher["source"] == "checkpoint":
        return f"teacher {teacher['label']}: checkpoint {teacher['path']}"
    if teacher["source"] == "store":
        return f"teacher {teacher['label']}: in store"
    chain = teachers_to_train({"teachers": [teacher]})
    steps = " -> ".join(f"{t['label']} ({t['method']}, {t['epochs']} ep)" for t in chain)
    return (f"teacher {teacher['label']}: not in store, trained first: {_chain_start(teacher)}{steps}, "
            f"{_cost(sum(t['flops'] for t in chain), tflops)} (once per sweep)")


def format_job(plan: dict, tflops: float) -> str:
    """One line: job number, labels, seed, epochs, the job's own cost, and where its teacher comes from."""
    labels = plan["labels"]
    names = " | ".join(labels[k] or "-" for k in ("dataset", "teacher", "student", "method"))
    number = f"#{plan['job']} " if plan.get("job") is not None else ""
    line = f"{number}{names}  seed {plan['seed']}  {plan['epochs']} ep  {_cost(plan['flops'], tflops)}"
    notes = [_teacher_note(t, tflops) for t in plan.get("teachers") or ([plan["teacher"]] if plan["teacher"] else [])]
    if plan.get("teacher_view_cache"):
        view = plan["teacher_view_cache"]
        notes.append(f"teacher view cache: {view['why']}" if view["state"] != "not used"
                     else f"teacher view cache: not used ({view['why']})")
    return "  ".join([line, *notes])


def dry_run_job(job: Job, out_dir: Path, number: Optional[int], tflops: float) -> dict:
    """Plan one job, print its line and keep the plan in out_dir/plan.json."""
    plan = {"job": number, **plan_job(job)}
    write_json(Path(out_dir) / PLAN_FILE, plan)
    print(format_job(plan, tflops), flush=True)
    return plan


def dry_run_failed(out_dir: Path, number: Optional[int], err: BaseException) -> None:
    """Keep why a job could not be planned (resolving it or planning it failed) in out_dir/plan.json."""
    write_json(Path(out_dir) / PLAN_FILE, {"job": number, "error": f"{type(err).__name__}: {err}"})


def load_plans(sweep_dir: Path) -> list[dict]:
    """Every plan.json under a sweep dir, by job number (failed plans carry an 'error')."""
    plans = [json.loads(p.read_text()) for p in Path(sweep_dir).glob(f"**/{PLAN_FILE}")]
    return sorted(plans, key=lambda p: p["job"])


def sweep_totals(plans: list[dict]) -> dict:
    """Jobs planned, the distinct store entries to train first, and total FLOPs with each entry counted once."""
    planned = [p for p in plans if "error" not in p]
    teachers = {t["key"]: t for p in planned for t in teachers_to_train(p)}
    flops = sum(p["flops"] for p in planned) + sum(t["flops"] for t in teachers.values())
    return {"jobs": len(planned), "teachers": list(teachers.values()), "flops": flops,
            "failed": [p for p in plans if "error" in p]}


def format_totals(plans: list[dict], tflops: float) -> str:
    totals = sweep_totals(plans)
    lines = [f"dry run: {totals['jobs']} jobs, {len(totals['teachers'])} teacher(s) to train first, "
             f"total {_cost(totals['flops'], tflops)} at {tflops:g} TFLOP/s (dry_run_tflops)"]
    lines += [f"  teacher to train: {t['key']} ({t['method']}, {t['epochs']} ep) {_cost(t['flops'], tflops)}"
              for t in totals["teachers"]]
    lines += [f"  job #{p['job']} could not be planned: {p['error']}" for p in totals["failed"]]
    return "\n".join([*lines, FOOTNOTE])
