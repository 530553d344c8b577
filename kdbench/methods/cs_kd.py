"""Yun, Park, Lee & Shin, CVPR 2020, "Regularizing Class-wise Predictions via Self-knowledge Distillation" (CS-KD).
Reference code: alinlab/cs-kd (`train.py` KDLoss and the `--cls` branch of `train()`, `datasets.py`
PairBatchSampler). No pre-trained teacher: needs_teacher = False.

Class-paired batches (PairBatchSampler). Each epoch visits the training set in a random order in batches of
`trainer.batch_size` anchors (the last one smaller); for every anchor i of class y_i one partner j(i) is drawn
uniformly from ALL training samples of class y_i (random.choice over the class list: the anchor itself may be drawn).
The step's batch is [anchors; partners] (2B rows), each row augmented independently (`loader.take`). The draws come
from a torch.Generator seeded from the epoch's data seed through epoch_seed(seed, 0, 10) (stream 10), so an epoch
replays exactly on resume.

One step, as the reference's (two forwards of the student, both in train mode):
  z_a = f(anchors)                         with gradient  (BatchNorm statistics of the B anchors)
  z_p = f(partners)                        under no_grad  (a second forward: BatchNorm statistics of the B partners,
                                                           running statistics updated by both forwards)
  ce  = (1/B) sum_i CE(z_a[i], y_i)
  cls = T^2 * (1/B) sum_i KL(softmax(z_p[i] / T) || softmax(z_a[i] / T))         (KLDivLoss(sum) * T^2 / B)
  total = ce * CE + cls * cls,   T = 4 (--temp), cls weight = lambda (--lamda 1 for CIFAR-100, 3 for CUB-200)
The partner's prediction is the (detached) target: a network's prediction for another image of the same class.

Where kdbench differs from the reference: the partner indices come from torch's generator, not Python's `random`;
the anchors' order is a torch permutation. The partner pool is the training split kdbench loads (its `train_size`
subset or class exclusions included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdbench.data.loader import Batch
from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.train import epoch_seed

PAIR = "pair_logits"  # the outputs key of the partners' (detached) logits
STREAM = 10  # epoch_seed stream of the pair sampler's draws


def cs_kd_loss(anchor_logits: torch.Tensor, pair_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * (1/N) sum_i KL(softmax(z_p[i] / T) || softmax(z_a[i] / T)); the partner side is detached (alinlab/cs-kd
    KDLoss: nn.KLDivLoss(reduction="sum") * T^2 / N). Computed in float32 or wider."""
    z_a = anchor_logits.float() if anchor_logits.dtype in (torch.float16, torch.bfloat16) else anchor_logits
    z_p = pair_logits.detach().to(z_a.dtype)
    log_p_a = F.log_softmax(z_a / temperature, dim=1)
    log_p_p = F.log_softmax(z_p / temperature, dim=1)
    return F.kl_div(log_p_a, log_p_p, reduction="sum", log_target=True) * temperature**2 / z_a.shape[0]


class ClassPairSampler:
    """PairBatchSampler's draws on dataset indices: a permutation of the training set cut into batches, and for each
    anchor a uniformly drawn index of its own class (itself included). Works on CPU tensors."""

    def __init__(self, labels: torch.Tensor):
        labels = torch.as_tensor(labels).long().cpu()
        self.labels = labels
        classes = int(labels.max()) + 1 if len(labels) else 0
        self.order = torch.argsort(labels, stable=True)  # dataset indices sorted by class
        self.count = torch.bincount(labels, minlength=classes)
        self.start = torch.cumsum(self.count, 0) - self.count

    def partners(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One index of the same class per anchor, uniform over that class's samples."""
        y = self.labels[anchors]
        offset = (torch.rand(len(anchors), generator=generator) * self.count[y]).long().clamp_max(self.count[y] - 1)
        return self.order[self.start[y] + offset]

    def epoch(self, batch_size: int, generator: torch.Generator):
        """[(anchors, partners)] for one epoch."""
        perm = torch.randperm(len(self.labels), generator=generator)
        for start in range(0, len(perm), batch_size):
            anchors = perm[start:start + batch_size]
            yield anchors, self.partners(anchors, generator)


def split_pairs(batch: Batch) -> tuple[Batch, Batch]:
    """A [anchors; partners] batch of 2B rows -> (anchor batch, partner batch)."""
    if len(batch) % 2:
        raise KDBenchError(f"cs_kd: a class-paired batch has an even number of rows (B anchors then B partners), "
                           f"got {len(batch)}")
    b = len(batch) // 2
    half = lambda s: Batch(batch.inputs[s], batch.targets[s], batch.indices[s], batch.crop_offsets[s],  # noqa: E731
                           batch.flips[s])
    return half(slice(0, b)), half(slice(b, None))


@register_method("cs_kd")
class CSKD(Method):
    """Terms: the base class's `ce` on the anchors and `cls`, the class-wise KL to the partners' predictions."""
    paper = "Yun et al., Regularizing Class-wise Predictions via Self-knowledge Distillation, CVPR 2020"
    code = "alinlab/cs-kd"

    needs_teacher = False
    student_passes = 3.0 + 1.0  # the anchors' forward + backward, the partners' forward (no backward)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.temperature = float(cfg.get("temperature", 4.0))
        if self.temperature <= 0:
            raise KDBenchError(f"cs_kd: method.temperature must be > 0, got {self.temperature}")
        labels = torch.as_tensor(pair.train_labels).long()
        if len(labels) == 0:
            raise pair.incompatible(self.method_name, "the training set is empty")
        self.sampler = ClassPairSampler(labels)

    def batches(self, loader, seed):
        generator = torch.Generator().manual_seed(epoch_seed(seed, 0, STREAM))
        for anchors, partners in self.sampler.epoch(loader.batch_size, generator):
            yield loader.take(torch.cat([anchors, partners]), generator)

    def forward_loss(self, batch, step):
        anchors, partners = split_pairs(batch)
        student = step.forward(anchors.inputs, self.student_taps)
        with torch.no_grad():
            pair_logits = step.forward(partners.inputs, ())["logits"]
        return self.loss(anchors, {**student, PAIR: pair_logits}, None, step.epoch)

    def terms(self, batch, student, teacher):
        if PAIR not in student:
            raise KDBenchError(f"cs_kd needs the partners' logits under '{PAIR}' in the student outputs "
                               f"(CSKD.forward_loss adds them)")
        return {"cls": cs_kd_loss(student["logits"], student[PAIR], self.temperature)}

    def record_fields(self):
        return {"evaluated_head": "student", "sampler": "class-paired batches (CS-KD PairBatchSampler)"}
