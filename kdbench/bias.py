"""Class-bias correction for a student whose transfer set lacked classes (Hinton et al. 2015, section 3).

A student distilled without any 3s still learns most of what a 3 looks like from the soft targets, but its
bias for class 3 is too low; one distilled on 7s and 8s alone has the opposite problem, biases for 7 and 8 far
too high. Shifting those logit biases by one amount fixes most of the errors. The paper picked the shift (+3.5
for the 3s, -7.6 for the 7s and 8s) on the test set; here it is picked on the training set (all 60,000 digits,
including those the student never saw) so the test set stays untouched, and the paper's shift is reported beside.

    python -m kdbench.bias <sweep or run dir> --cls 3
    python -m kdbench.bias <sweep or run dir> --cls 7 8

For each completed run below the dir (not itself a derived record), it loads the final student from the run's
checkpoint and writes a derived record `<run>/bias<classes>/metrics.json` (method label `<method>+bias<classes>`,
e.g. kd+bias3, kd+bias78), which the report averages over seeds like any other run and joins with the paper's
bias-corrected numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from kdbench.data import DeviceLoader, prepare_data
from kdbench.job import CHECKPOINT_FILE, load_finished
from kdbench.record import RECORD_FILE, RunRecord
from kdbench.report import find_records
from kdbench.train import resolve_device

DEFAULT_GRID = [round(0.1 * i, 1) for i in range(-150, 151)]  # -15.0 .. 15.0
PAPER_SHIFT = {(3,): 3.5, (7, 8): -7.6}  # Hinton et al. 2015, section 3, chosen there on the test set


@torch.no_grad()
def logits_and_labels(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for batch in loader.epoch():
        logits.append(model(batch.inputs).float())
        labels.append(batch.targets)
    return torch.cat(logits), torch.cat(labels)


def errors_with_shift(logits: torch.Tensor, labels: torch.Tensor, classes, shift: float) -> tuple[int, list[int]]:
    """(total errors, errors per true class) after adding `shift` to the logits of `classes` (one or several)."""
    shifted = logits.clone()
    shifted[:, _classes(classes)] += shift
    wrong = shifted.argmax(1) != labels
    return int(wrong.sum()), torch.bincount(labels[wrong], minlength=logits.shape[1]).tolist()


def _classes(classes) -> list[int]:
    return [int(classes)] if isinstance(classes, int) else sorted(int(c) for c in classes)


def best_shift(logits: torch.Tensor, labels: torch.Tensor, classes, grid=DEFAULT_GRID) -> float:
    """The shift in `grid` with the fewest errors; of equals, the smallest in size."""
    return min(grid, key=lambda b: (errors_with_shift(logits, labels, classes, b)[0], abs(b), b))


def correct_run(run_dir: Path, classes, grid=DEFAULT_GRID) -> dict:
    """Write and return the derived record of one completed run, its `classes` (one or several) shifted."""
    classes = _classes(classes)
    tag = "".join(map(str, classes))
    rec = json.loads((run_dir / RECORD_FILE).read_text())
    device = resolve_device(str(rec["config"]["trainer"]["device"]))
    student, job = load_finished(run_dir, device)
    # choose the shift on every training digit, the held-out class too
    ds = dataclasses.replace(job.dataset, exclude_train_classes=[])
    data = prepare_data(ds, job.trainer, device)
    train_eval = DeviceLoader(data.train, int(job.trainer.eval_batch_size), list(ds.mean), list(ds.std), device)
    train_logits, train_labels = logits_and_labels(student, train_eval)
    test_logits, test_labels = logits_and_labels(student, data.test_loader)
    shift = best_shift(train_logits, train_labels, classes, grid)
    errors, class_errors = errors_with_shift(test_logits, test_labels, classes, shift)
    n = len(test_labels)
    top1 = 100.0 * (n - errors) / n
    correction = {"classes": classes, "shift": shift, "chosen_on": "training set, all classes",
                  "grid": [grid[0], grid[-1], len(grid)],
                  "before": {"errors": rec.get("last_errors"), "class_errors": rec.get("last_class_errors")}}
    if tuple(classes) in PAPER_SHIFT:
        paper_shift = PAPER_SHIFT[tuple(classes)]
        paper_errors, paper_class_errors = errors_with_shift(test_logits, test_labels, classes, paper_shift)
        correction["at_paper_shift"] = {"shift": paper_shift, "errors": paper_errors, "class_errors": paper_class_errors}
    labels = {k: rec[k] for k in ("dataset", "teacher", "student")}
    derived = RunRecord.start(run_dir / f"bias{tag}", config=rec["config"], config_hash=rec["config_hash"],
                              labels={**labels, "method": f"{rec['method']}+bias{tag}"}, seed=rec["seed"],
                              overrides=rec.get("overrides", []))
    derived.update(derived_from=str(run_dir), device=str(device), n_test=n, epochs_done=rec.get("epochs_done"), last_top1=top1,
                   best_top1=top1, last_errors=errors, last_class_errors=class_errors, bias_correction=correction)
    derived.complete()
    return derived.data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdbench.bias", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--cls", type=int, nargs="+", required=True,
                        help="the class(es) whose bias is shifted (one shift for all), e.g. 3, or 7 8")
    args = parser.parse_args(argv)
    for path in find_records(args.dirs):
        rec = json.loads(path.read_text())
        if rec.get("status") != "completed" or rec.get("derived_from") or not (path.parent / CHECKPOINT_FILE).exists():
            continue
        out = correct_run(path.parent, args.cls)
        bc = out["bias_correction"]
        before, after = (sum(errors[c] for c in bc["classes"]) for errors in (bc["before"]["class_errors"],
                                                                              out["last_class_errors"]))
        paper = bc.get("at_paper_shift")
        print(f"{path.parent}: seed {out['seed']}: {bc['before']['errors']} -> {out['last_errors']} test errors "
              f"(classes {bc['classes']}: {before} -> {after}) "
              f"with shift {bc['shift']:+} chosen on train"
              + (f"; at the paper's {paper['shift']:+}: {paper['errors']}" if paper else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
