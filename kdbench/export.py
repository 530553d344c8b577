"""`kdbench export RUN_DIR --out DIR`: a finished run's student in formats other tools load.

    model.safetensors     the weights (safetensors; the state dict of the kdbench model)
    model.torchscript.pt  torch.jit.trace of the model's forward (logits), where tracing reproduces it
    model.onnx            ONNX (input `input` [batch, C, H, W], output `logits`), with `onnx` installed
    model.json            what rebuilds it: model name and keyword arguments, classes, input shape, the inputs'
                          normalisation, the kdbench and torch versions, the run it came from

Rebuild from the JSON and the safetensors: kdbench.export.load_exported(DIR), i.e.
create_model(name, num_classes=..., input_shape=..., **kwargs) + safetensors.torch.load_model.
A format the model does not allow is skipped, with the reason in model.json ("skipped").
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

import kdbench
from kdbench.errors import KDBenchError
from kdbench.io import write_json

EXPORT_FORMAT = "kdbench-export/1"
JSON_FILE = "model.json"
FORMATS = ("safetensors", "torchscript", "onnx")


def export_run(run_dir: Path, out: Path, formats=FORMATS) -> dict:
    """Export the student of a finished run (kdbench.job.load_finished) into `out`; returns model.json's content."""
    from safetensors.torch import save_model

    from kdbench.job import load_finished
    from kdbench.record import RECORD_FILE, read_record

    run_dir, out = Path(run_dir), Path(out)
    rec = read_record(run_dir / RECORD_FILE)
    if rec is None:
        raise KDBenchError(f"{run_dir} holds no readable {RECORD_FILE}: give the folder of a finished run")
    if rec.get("status") != "completed":
        raise KDBenchError(f"the run in {run_dir} is {rec.get('status')}, not completed: export a finished run")
    student, job = load_finished(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    input_shape = [int(v) for v in job.dataset.image_shape]
    files, skipped = {}, {}
    if "safetensors" in formats:
        save_model(student, str(out / "model.safetensors"), metadata={"kdbench_model": job.student.name})
        files["safetensors"] = "model.safetensors"
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(example)
    if "torchscript" in formats:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(student, example, check_trace=False)
            with torch.no_grad():
                if not torch.allclose(traced(example), expected, atol=1e-5, rtol=1e-4):
                    raise RuntimeError("the traced model's logits differ from the model's")
            traced.save(str(out / "model.torchscript.pt"))
            files["torchscript"] = "model.torchscript.pt"
        except Exception as err:  # noqa: BLE001  (a model tracing cannot follow: skipped, with the reason)
            skipped["torchscript"] = f"{type(err).__name__}: {err}"[:300]
    if "onnx" in formats:
        try:
            _export_onnx(student, example, out / "model.onnx")
            files["onnx"] = "model.onnx"
        except Exception as err:  # noqa: BLE001
            skipped["onnx"] = f"{type(err).__name__}: {err}"[:300]
    meta = {
        "format": EXPORT_FORMAT,
        "model": {"name": job.student.name, "kwargs": job.student.kwargs, "num_classes": int(job.dataset.num_classes),
                  "input_shape": input_shape},
        "inputs": {"mean": list(job.dataset.mean), "std": list(job.dataset.std),
                   "note": "inputs are (image in [0, 1] - mean) / std per channel"},
        "versions": {"kdbench": kdbench.__version__, "torch": torch.__version__},
        "run": {"dir": str(run_dir.resolve()), **{k: rec.get(k) for k in ("dataset", "teacher", "student", "method",
                                                                        "seed", "last_top1", "best_top1",
                                                                        "epochs_done", "config_hash")}},
        "files": files,
        "skipped": skipped,
        "rebuild": "kdbench.export.load_exported(<this folder>)",
    }
    write_json(out / JSON_FILE, meta)
    return meta


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise KDBenchError("the onnx package is not installed (pip install 'kdbench[onnx]')") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))


def load_exported(folder: Path, device: str | torch.device = "cpu"):
    """The exported student rebuilt from model.json and model.safetensors (eval mode, on `device`)."""
    from safetensors.torch import load_model

    from kdbench.models import create_model

    meta = json.loads((Path(folder) / JSON_FILE).read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise KDBenchError(f"{folder} is not a kdbench export ({JSON_FILE} format {meta.get('format')!r})")
    spec = meta["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], input_shape=spec["input_shape"],
                         **spec["kwargs"])
    load_model(model, str(Path(folder) / meta["files"]["safetensors"]))
    return model.to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (its metrics.json and checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write into")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated, from {', '.join(FORMATS)} (default: all)")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or "safetensors" not in formats:
        parser.error(f"--formats takes {', '.join(FORMATS)} and always includes safetensors (got {args.formats})")
    try:
        meta = export_run(args.run_dir, args.out, formats)
    except KDBenchError as err:
        print(f"kdbench export: {err}", file=sys.stderr)
        return 2
    for name, file in meta["files"].items():
        print(f"wrote {args.out / file} ({name})")
    print(f"wrote {args.out / JSON_FILE} (model {meta['model']['name']}, kdbench {meta['versions']['kdbench']})")
    for name, why in meta["skipped"].items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
