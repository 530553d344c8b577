"""Convert rows of the shared reference table (paper_numbers.csv) into results/paper/<paper>.csv in kdbench's
vocabulary (dataset/model/method names as kdbench registers them, metric top1 or test_errors, protocol last/best).

    python scripts/import_paper_numbers.py ../shared/reference/paper_numbers.csv

Only rows kdbench can run and compare are imported; each keeps its source, confidence and note.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "results" / "paper"
COLUMNS = ["paper", "table", "dataset", "teacher", "student", "method", "metric", "value", "protocol", "runs",
           "source", "confidence", "note"]
CRD_METHODS = {"KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
               "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd"}
HINTON = {  # (student column prefix, method column) -> (teacher, student, method)
    ("MLP 784-1200-1200-10", "teacher alone"): ("", "mlp_1200x2", "vanilla"),
    ("MLP 784-800-800-10", "baseline hard labels"): ("", "mlp_800x2", "vanilla"),
    ("MLP 2x800", "distillation T=20 (soft targets only regularizer)"): ("mlp_1200x2", "mlp_800x2", "kd"),
}


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
    table = "same-architecture" if student[:3].lower() == teacher[:3].lower() or not teacher else "cross-architecture"
    return {"paper": "Tian2020_CRD", "table": f"RepDistiller README CIFAR-100 ({table})", "dataset": "cifar100",
            "teacher": teacher, "student": student, "method": method, "metric": "top1", "value": row["value"],
            "protocol": "last", "runs": "not stated"}


def hinton_row(row: dict) -> dict | None:
    if row["dataset"] != "MNIST":
        return None
    for (student_prefix, method), (teacher, student, ours) in HINTON.items():
        if row["student"].startswith(student_prefix) and row["method"] == method:
            return {"paper": "Hinton2015", "table": "MNIST (section 3)", "dataset": "mnist", "teacher": teacher,
                    "student": student, "method": ours, "metric": "test_errors", "value": row["value"],
                    "protocol": "last", "runs": "1"}
    return None


def main(src: str) -> None:
    converters = {"Tian2020_CRD": crd_row, "Hinton2015": hinton_row}
    out: dict[str, dict[tuple, dict]] = {}
    with open(src, newline="") as f:
        for row in csv.DictReader(f):
            convert = converters.get(row["paper"])
            new = convert(row) if convert else None
            if new is None:
                continue
            try:
                float(new["value"])
            except ValueError:
                continue  # "-" cells (method not applicable to the pair)
            new.update(source=row["source"], confidence=row["confidence"], note=row["note"])
            key = (new["dataset"], new["teacher"], new["student"], new["method"])
            out.setdefault(new["paper"], {}).setdefault(key, new)  # a teacher baseline repeats across pairs
    OUT.mkdir(parents=True, exist_ok=True)
    for paper, rows in out.items():
        with open(OUT / f"{paper}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows.values())
        print(f"{paper}: {len(rows)} rows -> {OUT / f'{paper}.csv'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper_numbers.csv"))
