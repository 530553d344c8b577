"""Convert rows of the shared reference table (paper_numbers.csv) into kdbench/paper/<paper>.csv in kdbench's
vocabulary (dataset/model/method names as kdbench registers them, metric top1 or test_errors, protocol last/best).

    python scripts/import_paper_numbers.py [../shared/reference/paper_numbers.csv] [--out kdbench/paper]

Only rows kdbench can run and compare are imported; each keeps its source, confidence and note. One row per
(dataset, teacher, student, method, metric) and paper: the first wins. A baseline repeated in the same table with
the same value (one column per pair) is dropped silently; a repeat from another table, or with another value, is
dropped and mentioned in the kept row's note.

ImageNet rows (dataset `imagenet`) map the papers' model names to kdbench's torchvision/mdistiller models (ResNet34 /
ResNet-34 -> tv_resnet34, ResNet18 -> tv_resnet18, ResNet50 -> tv_resnet50, MobileNetV1 / MobileNet -> mobilenet_v1);
errors become accuracies (100 - error, noted). Imported: the DKD and DOT README ImageNet tables (mdistiller: best
epoch; DKD averages 3 trials on ImageNet, mdistiller#30) and AT's ResNet-34 -> ResNet-18 README row (top-1 and top-5).

Rows left out, and why:
  - Tiny-ImageNet (DOT), CUB-200 (YimFSP2017), speech, TIMIT and CHiME rows: no such data set / recipe here
    (BaCaruana2014, MengCondTS2019 and most of Hinton2015 are only such rows; DOT's Tiny-ImageNet rows use
    mdistiller's Tiny-ImageNet ResNet18 / MobileNetV2 variants, which kdbench does not have);
  - TAKD2020's ImageNet rows (ResNet-50 -> ResNet-14, TA ResNet-20): no ImageNet ResNet-14 / ResNet-20 in kdbench;
  - "-" / "N/A" cells: the method does not apply to the pair (e.g. FSP across widths);
  - Hinton2015 "% of test 3s correct" (98.6): the same run as its 14 errors on the 1010 test 3s;
  - YimFSP2017 Tables 1-2 ("avg acc of 3 nets", self-distillation): Table 1's rows repeat Table 3's resnet26
    teacher key, Table 2's teacher rows (64k iterations, 1/3 of the iterations) repeat Table 4's resnet32 baseline
    key under other budgets, and the starred rows use the "fast optimisation" budget (1/3 of the iterations after
    the FSP stage), a recipe that no experiment here runs;
  - TAKD2020 Fig. 6 rows ("CIFAR-10 (80 epochs)"): Heo et al.'s 80-epoch setting, which no experiment runs; its
    cells (e.g. ResNet-8 NOKD) share their dataset/teacher/student/method keys with Table 1's 160-epoch cells, and
    paper rows join on those keys only, so importing them would compare one run with two recipes' numbers.
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from kdbench.models import list_models

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "kdbench" / "paper"
SRC = REPO.parent / "shared" / "reference" / "paper_numbers.csv"
MODELS = set(list_models())
COLUMNS = ["paper", "table", "dataset", "teacher", "student", "method", "metric", "value", "protocol", "runs",
           "experiments", "source", "confidence", "note"]
# The experiments whose recipe each paper's rows follow (conf/experiment); the report compares a row only with runs of
# these (or runs made without an experiment). The CIFAR-100 benchmark papers share one recipe and one set of teachers.
CIFAR100_BENCHMARK = ("crd_cifar100_same crd_cifar100_cross dkd_cifar100_same dkd_cifar100_cross dot_cifar100 "
                      "ban_cifar100")
EXPERIMENTS = {"Tian2020_CRD": CIFAR100_BENCHMARK, "Zhao2022_DKD": CIFAR100_BENCHMARK, "Zhao2023_DOT": CIFAR100_BENCHMARK,
               "AT2017": "at_cifar10_wrn", "YimFSP2017": "fsp_cifar10 fsp_cifar100", "TAKD2020": "takd_cifar10 takd_cifar100",
               "Hinton2015": "hinton_mnist hinton_mnist_no3 hinton_mnist_only78"}
CIFAR = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "CIFAR-100 (no augmentation)": "cifar100"}
IMAGENET = ("ImageNet", "ImageNet (val; single crop)")
# The ImageNet experiment of each teacher -> student pair (the mdistiller tables' recipes)
IMAGENET_PAIR_EXPERIMENT = {("tv_resnet34", "tv_resnet18"): "imagenet_r34_r18",
                            ("tv_resnet50", "mobilenet_v1"): "imagenet_r50_mv1"}
CRD_METHODS = {"KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
               "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd"}
MD_BEST = {"protocol": "best", "runs": "5"}  # mdistiller: best epoch, mean of 5 runs (methods.md section 1.2)
HINTON = {  # (dataset, student column prefix, method column, metric column) -> (teacher, student, method, metric)
    ("MNIST", "MLP 784-1200-1200-10", "teacher alone", "test errors (of 10000)"):
        ("", "mlp_1200x2", "vanilla", "test_errors"),
    ("MNIST", "MLP 784-800-800-10", "baseline hard labels", "test errors (of 10000)"):
        ("", "mlp_800x2", "vanilla", "test_errors"),
    ("MNIST", "MLP 2x800", "distillation T=20 (soft targets only regularizer)", "test errors (of 10000)"):
        ("mlp_1200x2", "mlp_800x2", "kd", "test_errors"),
    ("MNIST (transfer set without any 3s)", "MLP 2x800", "distillation (no 3s in transfer set)", "test errors total"):
        ("mlp_1200x2", "mlp_800x2", "kd", "test_errors"),
    ("MNIST (transfer set without any 3s)", "MLP 2x800", "distillation (no 3s)", "test errors on 3s"):
        ("mlp_1200x2", "mlp_800x2", "kd", "test_errors_class3"),
    ("MNIST (transfer set without any 3s)", "MLP 2x800", "distillation + class-3 bias +3.5", "test errors total"):
        ("mlp_1200x2", "mlp_800x2", "kd+bias3", "test_errors"),
    ("MNIST (transfer set without any 3s)", "MLP 2x800", "distillation + class-3 bias +3.5", "test errors on 3s"):
        ("mlp_1200x2", "mlp_800x2", "kd+bias3", "test_errors_class3"),
    ("MNIST (transfer set = only 7s and 8s)", "MLP 2x800", "distillation", "test error %"):
        ("mlp_1200x2", "mlp_800x2", "kd", "top1"),
    ("MNIST (transfer set = only 7s and 8s)", "MLP 2x800", "distillation + biases for 7 and 8 reduced by 7.6",
     "test error %"): ("mlp_1200x2", "mlp_800x2", "kd+bias78", "top1"),
}
HINTON_TABLES = {  # paper dataset -> (table, kdbench dataset label)
    "MNIST": ("MNIST (section 3)", "mnist"),
    "MNIST (transfer set without any 3s)": ("MNIST, no 3s in the transfer set (section 3)", "mnist-no3"),
    "MNIST (transfer set = only 7s and 8s)": ("MNIST, only 7s and 8s in the transfer set (section 3)", "mnist-only78"),
}
BIAS_NOTE = {"kd+bias3": "derived record: the kd student with its class-3 logit bias raised afterwards "
                         "(python -m kdbench.bias <sweep> --cls 3, see conf/experiment/hinton_mnist_no3.yaml)",
             "kd+bias78": "derived record: the kd student with its 7 and 8 logit biases lowered afterwards "
                          "(python -m kdbench.bias <sweep> --cls 7 8, see conf/experiment/hinton_mnist_only78.yaml)"}


def _note(row: dict, extra: str) -> str:
    return "; ".join(n for n in (row["note"], extra) if n)


def _arch_table(teacher: str, student: str) -> str:
    return "same-architecture" if student[:3].lower() == teacher[:3].lower() or not teacher else "cross-architecture"


def _model(text: str, dataset: str) -> str | None:
    """'ResNet-110' -> resnet110, 'plain CNN-10' / 'CNN-4' -> plain_cnn_10 (plain_cnn_10_c100 on CIFAR-100),
    'WRN-16-2 (0.7M)' -> wrn_16_2; None when kdbench has no such model."""
    if m := re.match(r"WRN-(\d+)-(\d+)", text):
        name = f"wrn_{m[1]}_{m[2]}"
    elif m := re.match(r"ResNet-(\d+)", text):
        name = f"resnet{m[1]}"
    elif m := re.match(r"(?:plain )?CNN-(\d+)", text):
        name = f"plain_cnn_{m[1]}" + ("_c100" if dataset == "cifar100" else "")
    else:
        return None
    return name if name in MODELS else None


def _imagenet_model(text: str) -> str | None:
    """'ResNet34' / 'ResNet-34' -> tv_resnet34, 'MobileNetV1' / 'MobileNet' -> mobilenet_v1; None when kdbench has no
    such ImageNet model (e.g. ResNet-14)."""
    if m := re.fullmatch(r"ResNet-?(\d+)", text.strip()):
        name = f"tv_resnet{m[1]}"
    elif re.fullmatch(r"MobileNet(-?V1)?", text.strip()):
        name = "mobilenet_v1"
    else:
        return None
    return name if name in MODELS else None


def _imagenet_mdistiller(row: dict, paper: str, table: str, method: str) -> dict | None:
    """A row of mdistiller's README ImageNet tables (top-1 accuracy, best epoch)."""
    teacher, student = _imagenet_model(row["teacher"]), _imagenet_model(row["student"])
    experiment = IMAGENET_PAIR_EXPERIMENT.get((teacher, student), "")
    if method == "kd+dot":
        experiment = "dot_imagenet"
    runs = "3" if paper == "Zhao2022_DKD" else "not stated"
    note = ("the DKD paper averages 3 trials on ImageNet and reports the best epoch (mdistiller#30)" if runs == "3" else
            "mdistiller's trainer keeps the best epoch; the README does not say how many runs were averaged")
    if method == "kd":
        note += "; KD as mdistiller reruns it (the DKD paper's KD*: T 1, CE 0.5, KD 0.5, batch 512, lr 0.2)"
    return {"paper": paper, "table": table, "dataset": "imagenet", "teacher": teacher, "student": student,
            "method": method, "metric": "top1", "value": row["value"], "protocol": "best", "runs": runs,
            "experiments": experiment, "note": _note(row, note)}


def crd_row(row: dict) -> dict | None:
    method = row["method"]
    if method == "Teacher (baseline)":
        teacher, student, method = "", row["teacher"], "vanilla"
    elif method == "Student (vanilla baseline)":
        teacher, student, method = "", row["student"], "vanilla"
    elif method in CRD_METHODS:
        teacher, student, method = row["teacher"], row["student"], CRD_METHODS[method]
    else:
        return None
    return {"paper": "Tian2020_CRD", "table": f"RepDistiller README CIFAR-100 ({_arch_table(teacher, student)})",
            "dataset": "cifar100", "teacher": teacher, "student": student, "method": method, "metric": "top1",
            "value": row["value"], "protocol": "last", "runs": "not stated"}


def dkd_row(row: dict) -> dict | None:
    if row["dataset"] == "ImageNet" and row["method"] in ("KD", "DKD"):
        return _imagenet_mdistiller(row, "Zhao2022_DKD", "mdistiller README ImageNet DKD table", row["method"].lower())
    if row["dataset"] != "CIFAR-100" or row["method"] not in ("KD", "DKD"):
        return None
    teacher, student, note = row["teacher"], row["student"], row["note"]
    if (teacher, student) == ("resnet32x4", "MobileNetV2"):
        student, note = "ShuffleV2", _note(row, "imported as resnet32x4 -> ShuffleV2")
    return {"paper": "Zhao2022_DKD", "table": f"mdistiller README CIFAR-100 DKD table ({_arch_table(teacher, student)})",
            "dataset": "cifar100", "teacher": teacher, "student": student, "method": row["method"].lower(),
            "metric": "top1", "value": row["value"], **MD_BEST, "note": note}


def dot_row(row: dict) -> dict | None:
    if row["dataset"] == "ImageNet":
        return _imagenet_mdistiller(row, "Zhao2023_DOT", "mdistiller README ImageNet DOT table",
                                    {"KD": "kd", "KD+DOT": "kd+dot"}[row["method"]])
    if row["dataset"] != "CIFAR-100":
        return None
    return {"paper": "Zhao2023_DOT", "table": "mdistiller README CIFAR-100 DOT table", "dataset": "cifar100",
            "teacher": row["teacher"], "student": row["student"], "method": {"KD": "kd", "KD+DOT": "kd+dot"}[row["method"]],
            "metric": "top1", "value": row["value"], **MD_BEST}


def at_row(row: dict) -> dict | None:
    if row["dataset"] in IMAGENET:
        metric = {"top-1 error %": "top1", "top-5 error %": "top5"}[row["metric"]]
        teacher, student = _imagenet_model(row["teacher"]), _imagenet_model(row["student"])
        method = {"student (no transfer)": "vanilla", "AT": "at"}[row["method"]]
        return {"paper": "AT2017", "table": "ImageNet ResNet-34 -> ResNet-18 (README)", "dataset": "imagenet",
                "teacher": "" if method == "vanilla" else teacher, "student": student, "method": method,
                "metric": metric, "value": f"{100 - float(row['value']):.2f}", "protocol": "last",
                "runs": "not stated", "experiments": "at_imagenet",
                "note": _note(row, f"the README reports {'top-1' if metric == 'top1' else 'top-5'} error {row['value']}%; "
                                   f"value = 100 - error; the README's released model (last epoch assumed)")}
    if row["dataset"] != "CIFAR-10":
        return None
    teacher, student = _model(row["teacher"], "cifar10"), _model(row["student"], "cifar10")
    method = row["method"]
    if method == "student (no transfer)":
        teacher, method = "", "vanilla"
    elif method == "teacher":
        teacher, student, method = "", teacher, "vanilla"
    else:
        method = {"AT": "at", "KD": "kd"}[method]
    return {"paper": "AT2017", "table": "Table 1 (CIFAR-10, WRN)", "dataset": "cifar10", "teacher": teacher,
            "student": student, "method": method, "metric": "top1", "value": f"{100 - float(row['value']):.2f}",
            "protocol": "last", "runs": "not stated",
            "note": _note(row, f"paper reports test error {row['value']}%; value = 100 - error")}


def yim_row(row: dict) -> dict | None:
    dataset = CIFAR.get(row["dataset"])
    if dataset is None or row["metric"] != "accuracy %":  # CUB; Tables 1-2 ("avg acc of 3 nets")
        return None
    teacher, student = _model(row["teacher"], dataset), _model(row["student"], dataset)
    method = {"Student-original": "vanilla", "Teacher-original": "vanilla", "FitNet": "fitnet",
              "FSP (Proposed Method)": "fsp"}[row["method"]]
    table = "Table 3 (CIFAR-10)" if dataset == "cifar10" else "Table 4 (CIFAR-100, no augmentation)"
    return {"paper": "YimFSP2017", "table": table, "dataset": dataset, "teacher": "" if method == "vanilla" else teacher,
            "student": student, "method": method, "metric": "top1", "value": row["value"], "protocol": "last",
            "runs": "not stated"}


def takd_row(row: dict) -> dict | None:
    dataset = CIFAR.get(row["dataset"])
    if dataset is None:  # ImageNet; Fig. 6 "CIFAR-10 (80 epochs...)"
        return None
    student = _model(row["student"], dataset)
    if row["method"] == "NOKD":
        teacher, method = "", "vanilla"
    elif row["method"] == "BLKD":
        teacher, method = _model(row["teacher"], dataset), "kd"
    else:  # "ResNet-110 -> TA ResNet-20": the TA teaches; teacher assistants are labelled <model>_ta
        ta = _model(row["teacher"].split(" TA ")[1], dataset)
        teacher, method = ta and f"{ta}_ta", "kd"
    table = row["note"].split(";")[0].split(" (")[0]
    return {"paper": "TAKD2020", "table": f"{table} ({row['dataset']})", "dataset": dataset, "teacher": teacher,
            "student": student, "method": method, "metric": "top1", "value": row["value"], "protocol": "best",
            "runs": "not stated"}


def hinton_row(row: dict) -> dict | None:
    for (dataset, student_prefix, method, metric), (teacher, student, ours, our_metric) in HINTON.items():
        if (row["dataset"], row["method"], row["metric"]) == (dataset, method, metric) and row["student"].startswith(student_prefix):
            table, label = HINTON_TABLES[dataset]
            value, notes = row["value"], [BIAS_NOTE.get(ours, "")]
            if metric == "test error %":
                value = f"{100 - float(row['value']):.1f}"
                notes.insert(0, f"paper reports test error {row['value']}%; value = 100 - error")
            return {"paper": "Hinton2015", "table": table, "dataset": label, "teacher": teacher, "student": student,
                    "method": ours, "metric": our_metric, "value": value, "protocol": "last", "runs": "1",
                    "note": _note(row, "; ".join(n for n in notes if n))}
    return None


CONVERTERS = {"Tian2020_CRD": crd_row, "Hinton2015": hinton_row, "Zhao2022_DKD": dkd_row, "Zhao2023_DOT": dot_row,
              "AT2017": at_row, "YimFSP2017": yim_row, "TAKD2020": takd_row}


def convert(src: Path) -> dict[str, list[dict]]:
    out: dict[str, dict[tuple, dict]] = {}
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            convert_row = CONVERTERS.get(row["paper"])
            new = convert_row(row) if convert_row else None
            if new is None or None in (new["teacher"], new["student"]):
                continue  # not a row kdbench runs, or a model the zoo lacks
            try:
                float(new["value"])
            except ValueError:
                continue  # "-" / "N/A" cells (method not applicable to the pair)
            new = {"source": row["source"], "confidence": row["confidence"], "note": row["note"],
                   "experiments": EXPERIMENTS[new["paper"]], **new}
            if new["dataset"] == "imagenet" and not new["experiments"]:
                continue  # an ImageNet pair no experiment runs
            key = (new["dataset"], new["teacher"], new["student"], new["method"], new["metric"])
            kept = out.setdefault(new["paper"], {}).setdefault(key, new)
            if kept is not new and (kept["table"], kept["value"]) != (new["table"], new["value"]):
                repeat = "also in" if new["value"] == kept["value"] else f"{new['value']} (not imported) in"
                kept["note"] = _note(kept, f"{repeat} {new['table']}")
    return {paper: list(rows.values()) for paper, rows in out.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, default=SRC, help="paper_numbers.csv")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write <paper>.csv")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for paper, rows in convert(args.src).items():
        with open(args.out / f"{paper}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"{paper}: {len(rows)} rows -> {args.out / f'{paper}.csv'}")


if __name__ == "__main__":
    main()
