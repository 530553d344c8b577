"""End-to-end: one KD job on CIFAR-shaped synthetic data with the benchmark pair resnet32x4 -> resnet8x4."""
from tests.conftest import TINY_SYNTHETIC


def test_kd_resnet32x4_to_resnet8x4_synthetic(run_job):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", "student=resnet8x4", "method=kd")
    assert record["status"] == "completed"
    assert record["teacher"] == "resnet32x4" and record["student"] == "resnet8x4"
    assert record["teacher_source"]["kind"] == "store"
    assert len(record["history"]) == 1 and 0 <= record["last_top1"] <= 100
    assert set(record["history"][0]["train"]) == {"loss", "ce", "kd"}
