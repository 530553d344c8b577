"""Hinton et al. 2015's class-bias correction: errors after shifting some classes' logits, the shift chosen (fewest
errors, then the smallest in size, whatever the grid's order), and chosen on the training set with every class."""
import torch

import kdbench.bias as bias
from kdbench.bias import best_shift, errors_with_shift

# Four samples, four classes. With a shift s on class 2's logit:
#   row 0 (label 2): right once s > 0.5      row 1 (label 1): wrong once s > 1.0
#   row 2 (label 3): wrong once s > 3.0      row 3 (label 0): wrong once s > 2.0
LOGITS = torch.tensor([[1.0, 0.0, 0.5, 0.0],
                       [0.0, 2.0, 1.0, 0.0],
                       [0.0, 0.0, 0.0, 3.0],
                       [2.0, 0.0, 0.0, 0.0]])
LABELS = torch.tensor([2, 1, 3, 0])


def test_errors_with_shift_counts_total_and_per_true_class_errors_by_hand():
    expected = {-1.0: (1, [0, 0, 1, 0]), 0.0: (1, [0, 0, 1, 0]), 0.8: (0, [0, 0, 0, 0]), 1.5: (1, [0, 1, 0, 0]),
                2.5: (2, [1, 1, 0, 0]), 3.5: (3, [1, 1, 0, 1])}
    for shift, want in expected.items():
        assert errors_with_shift(LOGITS, LABELS, 2, shift) == want, shift
        assert errors_with_shift(LOGITS, LABELS, [2], shift) == want, shift


def test_several_classes_move_together_whatever_order_they_are_named_in():
    # classes 0 and 3 lowered by 1.5: row 0 -> [-0.5, 0, 0.5, -1.5] right; row 2 -> 1.5 still wins;
    # row 3 -> [0.5, 0, 0, -1.5] still right; row 1 unaffected
    assert errors_with_shift(LOGITS, LABELS, [0, 3], -1.5) == (0, [0, 0, 0, 0])
    assert errors_with_shift(LOGITS, LABELS, [3, 0], -1.5) == (0, [0, 0, 0, 0])
    # lowered by 3.5: row 2 -> [0, 0, 0, -0.5], argmax class 0 (first of the ties at 0): wrong
    assert errors_with_shift(LOGITS, LABELS, (0, 3), -3.5) == (2, [1, 0, 0, 1])


def test_the_logits_are_left_untouched():
    before = LOGITS.clone()
    best_shift(LOGITS, LABELS, 2, grid=[0.0, 0.8, 3.5, -1.0])
    errors_with_shift(LOGITS, LABELS, [0, 3], 5.0)
    assert torch.equal(LOGITS, before)


def test_best_shift_has_the_fewest_errors_then_the_smallest_size_in_any_grid_order():
    grid = [-1.0, 0.0, 0.6, 0.8, 0.9, 1.5, 2.5]
    assert best_shift(LOGITS, LABELS, 2, grid=grid) == 0.6  # 0 errors at 0.6, 0.8 and 0.9
    assert best_shift(LOGITS, LABELS, 2, grid=grid[::-1]) == 0.6
    assert best_shift(LOGITS, LABELS, 2, grid=[-0.7, 0.7]) == 0.7  # same size: the one with fewer errors
    assert best_shift(LOGITS, LABELS, 2, grid=[1.5, -1.5, 0.0]) == 0.0  # 1 error each: no shift is smallest
    # an exact tie in errors and size is broken the same way whatever the order
    assert best_shift(LOGITS, LABELS, 2, grid=[1.5, -1.5]) == best_shift(LOGITS, LABELS, 2, grid=[-1.5, 1.5])


def test_default_grid_spans_minus_to_plus_15_in_tenths_and_includes_the_papers_shifts():
    assert bias.DEFAULT_GRID[0] == -15.0 and bias.DEFAULT_GRID[-1] == 15.0 and len(bias.DEFAULT_GRID) == 301
    assert 0.0 in bias.DEFAULT_GRID and 3.5 in bias.DEFAULT_GRID and -7.6 in bias.DEFAULT_GRID


def test_the_shift_is_chosen_on_every_training_sample_and_applied_to_the_test_set(run_job, tmp_path, monkeypatch):
    rec = run_job("dataset=digits", "dataset.exclude_train_classes=[3]", "method=vanilla", "student=mlp_32",
                  "trainer.epochs=1", "trainer.progress=false")
    assert rec["n_train"] == 1437 - 146  # digits' training split holds 146 threes
    chosen_on, applied = [], []
    real_best, real_errors = bias.best_shift, bias.errors_with_shift

    def best_spy(logits, labels, classes, grid=bias.DEFAULT_GRID):
        chosen_on.append(labels.clone())
        return real_best(logits, labels, classes, grid)

    def errors_spy(logits, labels, classes, shift):
        applied.append((len(labels), shift))
        return real_errors(logits, labels, classes, shift)

    monkeypatch.setattr(bias, "best_shift", best_spy)
    monkeypatch.setattr(bias, "errors_with_shift", errors_spy)
    out = bias.correct_run(tmp_path / "job", 3, grid=[-1.0, 0.0, 1.0, 2.0])
    (labels,) = chosen_on
    assert len(labels) == 1437 and (labels == 3).sum() == 146  # the held-out class is in the choice
    shift = out["bias_correction"]["shift"]
    assert (360, shift) in applied and out["n_test"] == 360  # the test set is only scored, at the chosen shift
