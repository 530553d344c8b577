"""Class-bias correction for a student whose transfer set lacked a class (Hinton et al. 2015, section 3).

A student distilled without any 3s still learns most of what a 3 looks like from the soft targets, but its
bias for class 3 is too low. Raising that one logit bias fixes most of the errors on 3s. The paper picked the
shift (+3.5) on the test set; here it is picked on the training set (all 60,000 digits, including the 3s the
student never saw) so the test set stays untouched, and the paper's +3.5 is reported beside it.

    python -m kdbench.bias <sweep or run dir> --cls 3

For each completed run below the dir (not itself a derived record), it loads the final student from the run's
checkpoint and writes a derived record `<run>/bias<cls>/metrics.json` (method label `<method>+bias<cls>`), which
the report averages over seeds like any other run and joins with the paper's bias-corrected numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdbench.data import DeviceLoader
from kdbench.errors import KDBenchError
from kdbench.io import load_torch
from kdbench.record import RECORD_FILE, RunRecord
from kdbench.report import find_records
from kdbench.train import CHECKPOINT_FILE, build_model, prepare_data, resolve_device

DEFAULT_GRID = [round(0.1 * i, 1) for i in range(0, 151)]  # 0.0 .. 15.0
PAPER_SHIFT = 3.5


@torch.no_grad()
def logits_and_labels(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for batch in loader.epoch():
        logits.append(model(batch.inputs).float())
        labels.append(batch.targets)
    return torch.cat(logits), torch.cat(labels)


def errors_with_shift(logits: torch.Tensor, labels: torch.Tensor, cls: int, shift: float) -> tuple[int, list[int]]:
    """(total errors, errors per true class) after adding `shift` to class `cls`'s logit."""
    shifted = logits.clone()
    shifted[:, cls] += shift
    wrong = shifted.argmax(1) != labels
    return int(wrong.sum()), torch.bincount(labels[wrong], minlength=logits.shape[1]).tolist()


def best_shift(logits: torch.Tensor, labels: torch.Tensor, cls: int, grid=DEFAULT_GRID) -> float:
    """The smallest shift in `grid` with the fewest errors."""
    return min(grid, key=lambda b: (errors_with_shift(logits, labels, cls, b)[0], b))


def correct_run(run_dir: Path, cls: int, grid=DEFAULT_GRID) -> dict:
    """Write and return the derived record of one completed run."""
    rec = json.loads((run_dir / RECORD_FILE).read_text())
    cfg = OmegaConf.create(rec["config"])
    ckpt = run_dir / CHECKPOINT_FILE
    if not ckpt.exists():
        raise KDBenchError(f"{ckpt} is missing: bias correction needs the run's final checkpoint")
    full = copy.deepcopy(cfg)
    full.dataset.exclude_train_classes = []  # choose the shift on every training digit, the held-out class too
    device = resolve_device(str(cfg.trainer.device))
    data = prepare_data(full, device)
    student = build_model(cfg.student.model, data)
    student.load_state_dict(load_torch(ckpt, "run checkpoint")["student"])
    student.to(device)
    ds = full.dataset
    train_eval = DeviceLoader(data.train, int(cfg.trainer.eval_batch_size), list(ds.mean), list(ds.std), device)
    train_logits, train_labels = logits_and_labels(student, train_eval)
    test_logits, test_labels = logits_and_labels(student, data.test_loader)
    shift = best_shift(train_logits, train_labels, cls, grid)
    errors, class_errors = errors_with_shift(test_logits, test_labels, cls, shift)
    paper_errors, paper_class_errors = errors_with_shift(test_logits, test_labels, cls, PAPER_SHIFT)
    n = len(test_labels)
    top1 = 100.0 * (n - errors) / n
    labels = {k: rec[k] for k in ("dataset", "teacher", "student")}
    derived = RunRecord.start(run_dir / f"bias{cls}", config=rec["config"], config_hash=rec["config_hash"],
                              labels={**labels, "method": f"{rec['method']}+bias{cls}"}, seed=rec["seed"],
                              overrides=rec.get("overrides", []))
    derived.update(derived_from=str(run_dir), device=str(device), n_test=n, epochs_done=rec.get("epochs_done"), last_top1=top1,
                   best_top1=top1, last_errors=errors, last_class_errors=class_errors,
                   bias_correction={"class": cls, "shift": shift, "chosen_on": "training set, all classes",
                                    "grid": [grid[0], grid[-1], len(grid)],
                                    "before": {"errors": rec.get("last_errors"), "class_errors": rec.get("last_class_errors")},
                                    "at_paper_shift": {"shift": PAPER_SHIFT, "errors": paper_errors,
                                                       "class_errors": paper_class_errors}})
    derived.complete()
    return derived.data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdbench.bias", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--cls", type=int, required=True, help="the class left out of the transfer set")
    args = parser.parse_args(argv)
    for path in find_records(args.dirs):
        rec = json.loads(path.read_text())
        if rec.get("status") != "completed" or rec.get("derived_from") or not (path.parent / CHECKPOINT_FILE).exists():
            continue
        out = correct_run(path.parent, args.cls)
        bc = out["bias_correction"]
        print(f"{path.parent}: seed {out['seed']}: {bc['before']['errors']} -> {out['last_errors']} test errors "
              f"(class {args.cls}: {bc['before']['class_errors'][args.cls]} -> {out['last_class_errors'][args.cls]}) "
              f"with shift +{bc['shift']} chosen on train; at +{PAPER_SHIFT}: {bc['at_paper_shift']['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
