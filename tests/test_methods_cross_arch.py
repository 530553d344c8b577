"""Every method on a cross-architecture pair (vgg13 -> MobileNetV2, synthetic CIFAR-shaped data, 1 epoch, stages
included): it trains, or it refuses with IncompatibleModels before training, as the references cannot serve it."""
import pytest
import torch

from kdbench.distill import list_methods
from kdbench.errors import IncompatibleModels
from kdbench.models import create_model
from tests.conftest import TINY_SYNTHETIC

# Methods the references cannot run on this pair: KDSVD compares singular vectors of equal widths, FSP needs equal
# widths, OFD and ReviewKD need pre-activation features MobileNetV2 does not define (mdistiller cannot either).
REFUSES = {"kdsvd", "fsp", "ofd", "reviewkd"}
NO_TEACHER = {"vanilla", "dml", "tf_kd"}
STAGE_OPTIONS = {"ab": ["method.stage_epochs=1"], "fsp": ["method.stage_epochs=1"],
                 # an untrained teacher's last map is ~1e2 in scale: a tiny paraphraser LR keeps the stage finite
                 "ft": ["method.stage_epochs=1", "method.stage_lr=1e-6"]}
PAIR = {"tf_kd_self": ("MobileNetV2", "MobileNetV2"), "ban": ("MobileNetV2", "MobileNetV2")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for arch in ("vgg13", "MobileNetV2"):
        paths[arch] = root / f"{arch}.pt"
        torch.save({"model": create_model(arch, num_classes=10, input_shape=(3, 32, 32)).state_dict()}, paths[arch])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(list_methods()) | {"crd_kd", "ban"}))
def test_cross_architecture_pair(run_job, checkpoints, method):
    teacher, student = PAIR.get(method, ("vgg13", "MobileNetV2"))
    overrides = [*TINY_SYNTHETIC, f"teacher={teacher}", f"student={student}", f"method={method}",
                 f"teacher.checkpoint={checkpoints[teacher]}", *STAGE_OPTIONS.get(method, [])]
    if method in REFUSES:
        with pytest.raises(IncompatibleModels, match=method):
            run_job(*overrides)
        return
    record = run_job(*overrides)
    assert record["status"] == "completed" and len(record["history"]) == 1
    assert (record["teacher"] is None) == (method in NO_TEACHER)
