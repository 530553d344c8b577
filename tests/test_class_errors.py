"""Per-class test errors, the no-3s transfer set as its own dataset label, and the class-bias correction."""
import json

import torch

from kdbench.bias import best_shift, correct_run, errors_with_shift
from kdbench.report import leaderboard, load_paper, load_records
from kdbench.data import dataset_label
from kdbench.train import evaluate
from tests.conftest import compose_config, resolve_job


class _Fixed(torch.nn.Module):
    """A 'model' that returns preset logits batch by batch."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


class _Loader:
    def __init__(self, n, targets, batch):
        self.n, self.targets, self.batch = n, targets, batch

    def epoch(self, seed=0):
        from kdbench.data import Batch

        for s in range(0, self.n, self.batch):
            idx = torch.arange(s, min(s + self.batch, self.n))
            yield Batch(idx.float().view(-1, 1, 1, 1), self.targets[idx], idx, torch.zeros(len(idx), 2), torch.zeros(len(idx), dtype=torch.bool))


def test_evaluate_counts_errors_per_true_class_across_batches():
    targets = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    predicted = torch.tensor([0, 2, 2, 0, 1, 1, 1])  # wrong: idx 1 (class 1), 3 (class 2), 5 (class 0), 6 (class 2)
    logits = torch.nn.functional.one_hot(predicted, 3).float()
    ev = evaluate(_Fixed(logits), _Loader(7, targets, batch=3))
    assert ev.class_errors == [1, 1, 2] and ev.errors == 4 and ev.n == 7


def test_dataset_label_names_the_excluded_classes():
    assert dataset_label(compose_config(["dataset=mnist"]).dataset) == "mnist"
    assert dataset_label(compose_config(["dataset=mnist", "dataset.exclude_train_classes=[3]"]).dataset) == "mnist-no3"
    assert dataset_label(compose_config(["dataset=mnist", "dataset.exclude_train_classes=[8,7]"]).dataset) == "mnist-no78"
    only78 = compose_config(["dataset=mnist", "dataset.exclude_train_classes=[0,1,2,3,4,5,6,9]"]).dataset
    assert dataset_label(only78) == "mnist-only78"


def test_no3_experiment_reuses_the_full_data_teacher():
    full = resolve_job(["experiment=hinton_mnist", "method=kd", "seed=2"]).teacher
    no3 = resolve_job(["experiment=hinton_mnist_no3", "method=kd", "seed=2"]).teacher
    assert list(no3.job.dataset.exclude_train_classes) == [] and no3.job.dataset.crop_padding == 2
    assert no3.job.seed == 2 and full.entry == no3.entry


def test_errors_with_shift_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0],   # label 1: right once the shift on class 1 exceeds 1.0
                           [0.0, 0.2, 2.0],   # label 2: wrong once the shift exceeds 1.8
                           [0.0, 0.2, 3.0]])  # label 2: right for shifts below 2.8
    labels = torch.tensor([1, 2, 2])
    assert errors_with_shift(logits, labels, 1, 0.0) == (1, [0, 1, 0])
    assert errors_with_shift(logits, labels, 1, 1.2) == (0, [0, 0, 0])
    assert errors_with_shift(logits, labels, 1, 2.0) == (1, [0, 0, 1])
    assert errors_with_shift(logits, labels, 1, 3.0) == (2, [0, 0, 2])
    assert best_shift(logits, labels, 1, grid=[0.0, 0.5, 1.0, 1.2, 1.5, 2.0]) == 1.2  # fewest errors, smallest
    # several classes move together; a negative shift lowers their logits (the 7s-and-8s student's fix)
    assert errors_with_shift(logits, labels, [0, 2], -1.5) == (0, [0, 0, 0])  # row 0: 0.5 < 1.0, now class 1
    assert errors_with_shift(logits, labels, [0, 2], -2.0) == (1, [0, 0, 1])  # row 1: 0.0 < 0.2, now class 1
    assert best_shift(logits, labels, [0, 2], grid=[-2.0, -1.5, -1.2, 0.0]) == -1.2  # 0 errors at -1.5 and -1.2


def test_class_metric_is_compared_with_the_paper(tmp_path):
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "P.csv").write_text("paper,table,dataset,teacher,student,method,metric,value,protocol,runs,source\n"
                                 "P,t,mnist-no3,T,S,kd,test_errors_class3,133,last,1,src\n")
    for seed, errs in ((1, [1, 2, 3, 120, 0, 0, 0, 0, 0, 0]), (2, [1, 2, 3, 140, 0, 0, 0, 0, 0, 0])):
        d = tmp_path / "runs" / str(seed)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({
            "status": "completed", "dataset": "mnist-no3", "teacher": "T", "student": "S", "method": "kd",
            "seed": seed, "overrides": [], "n_test": 10000, "last_top1": 98.0, "best_top1": 98.0,
            "last_class_errors": errs}))
    row = leaderboard(load_records([tmp_path / "runs"]), load_paper(paper)).iloc[0]
    assert row["ours"] == 130.0 and row["delta"] == -3.0
    # std over seeds of 120, 140 = 14.14; tol = max(2 * 14.14, mnist floor 0.1% of 10000 = 10)
    assert abs(row["tol"] - 2 * 200 ** 0.5) < 1e-9 and bool(row["within"])


def test_bias_correction_reloads_the_final_student(run_job, tmp_path):
    rec = run_job("dataset=digits", "dataset.exclude_train_classes=[3]", "method=kd", "teacher=mlp_32",
                  "student=mlp_32", "trainer.epochs=2", "trainer.progress=false", "+teacher.recipe.trainer.epochs=2")
    assert rec["dataset"] == "digits-no3"
    # With the shift pinned to 0 the reloaded student must reproduce the run's own last evaluation exactly.
    same = correct_run(tmp_path / "job", 3, grid=[0.0])
    assert (same["last_errors"], same["last_class_errors"]) == (rec["last_errors"], rec["last_class_errors"])
    derived = correct_run(tmp_path / "job", 3)
    assert derived["method"] == "kd+bias3" and derived["dataset"] == "digits-no3" and derived["status"] == "completed"
    assert derived["last_errors"] <= rec["last_errors"] + 5  # chosen on train, so not guaranteed to help on test
    on_disk = json.loads((tmp_path / "job" / "bias3" / "metrics.json").read_text())
    assert on_disk["bias_correction"]["shift"] == derived["bias_correction"]["shift"]
    board = leaderboard(load_records([tmp_path / "job"]))
    assert sorted(board["method"]) == ["kd", "kd+bias3"]
