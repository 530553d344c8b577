"""Lee, Hwang & Shin, ICML 2020, "Self-supervised Label Augmentation via Input Transformations" (SLA), its SLA+SD
objective: joint labels over the 4 rotations plus self-distillation of the aggregated prediction into the plain
classifier. Reference code: hankook/SLA (`trainers.py` create_sla_sd_trainer, `augmentations.py` rotation,
`models/modules.py` PredictionModel, `train.py`). No pre-trained teacher: needs_teacher = False.

Views. Every image is seen at 0, 90, 180 and 270 degrees (torch.rot90 over (H, W), k quarter turns), interleaved
image-major: row 4i + k is image i turned k times (kdbench.methods.sskd.rotation_views, the reference's
torch.stack(..., 1).view(-1, ...)); the student sees the 4N rows in ONE forward (train mode: BatchNorm statistics
over the 4N views, as in the reference). Labels of row 4i + k: joint label 4 y_i + k (class-major, rotation-minor).

Heads on the pooled features h (the student's `embedding`): the joint head, a method module Linear(d, 4K) (the
reference's first PredictionModel classifier, nn.Linear's default init; extra parameters d * 4K + 4K: 102,800 on
resnet8x4, 26,000 on resnet32, at 100 classes), and the single head, the student's own classifier (its `logits`;
the reference's second classifier Linear(d, K)).

Terms (T = `temperature`, 1 in train.py):
  joint  CE(joint(h), 4 y + k), mean over the 4N rows                                        (joint_loss)
  ce     CE(z[4i], y_i), the single head on the unrotated rows, mean over N                  (single_loss)
  sd     T^2 * (1/N) sum_i KL(softmax(a_i / T) || softmax(z[4i] / T)), a detached            (distillation_loss)
         with the aggregated logits a_i = (1/4) sum_k joint(h)[4i + k, 4 c + k] over c      (agg_preds: a mean of
         LOGITS, one column per class at the view's own rotation)
  total = joint * joint + ce * ce + sd * sd, all 1 (the reference's joint + single + T^2 KL; the paper's Eq. for
  SLA+SD writes beta * CE for the single head, and beta = 1 in the code). `--with-large-loss` (ImageNet, iNaturalist)
  multiplies the joint term by 4: method.weights.joint=4.

Evaluation. The run's own number is the single head on the plain image (SLA+SD, the code's `single_acc`). Extra
heads, each a leaderboard row: `aggregated` (SLA+AG, the code's `agg_acc`: a over the 4 rotations of the test image)
and `single_view` (SLA+SI: the joint head on the plain image at its rotation-0 columns, joint(h)[:, 4c]).

Where kdbench differs from the reference: the reference selects its reported test accuracy by the best validation
`single_acc` on 5,000 held-out training images (splits/cifar100_val_idx.npy) and trains on the other 45,000, drawing
each batch as a fresh random subset (80,000 iterations); kdbench trains on the whole training split in epochs (see
conf/experiment/sla_sd_cifar100.yaml). The rotations are of the loader's one crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.common import flat_dim
from kdbench.methods.sskd import VIEWS, rotate_views, rotation_views

# ----------------------------------------------------------------------------- plain functions


def joint_labels(targets: torch.Tensor, views: int = VIEWS) -> torch.Tensor:
    """(N,) labels of N images -> (views N,) joint labels views * y + k in the view layout (row views i + k)."""
    return (targets.view(-1, 1) * views + torch.arange(views, device=targets.device)).flatten()


def aggregated_logits(joint: torch.Tensor, views: int = VIEWS) -> torch.Tensor:
    """(views N, views K) joint logits in the view layout -> (N, K): a[i, c] = mean_k joint[views i + k, views c + k]."""
    n, k = joint.shape[0] // views, joint.shape[1] // views
    j = joint.reshape(n, views, k, views)  # [image, view, class, rotation label]
    return torch.diagonal(j, dim1=1, dim2=3).mean(-1)


def sla_joint_loss(joint: torch.Tensor, targets: torch.Tensor, views: int = VIEWS) -> torch.Tensor:
    """Mean over the views N rows of CE(joint row, views * y + k); `targets` are the N images' labels."""
    return F.cross_entropy(joint, joint_labels(targets, views))


def sla_sd_loss(single_logits: torch.Tensor, joint: torch.Tensor, temperature: float = 1.0, views: int = VIEWS
                ) -> torch.Tensor:
    """T^2 * (1/N) sum_i KL(softmax(a_i / T) || softmax(z_i / T)), a = aggregated_logits(joint) detached, z the
    single head's logits of the N unrotated images."""
    a = aggregated_logits(joint.detach(), views)
    log_p_a = F.log_softmax(a.float() / temperature, dim=1)
    log_p_s = F.log_softmax(single_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_a, reduction="batchmean", log_target=True) * temperature**2


# ----------------------------------------------------------------------------- the method


@register_method("sla_sd")
class SLASD(Method):
    paper = "Lee, Hwang & Shin, Self-supervised Label Augmentation via Input Transformations, ICML 2020"
    code = "hankook/SLA"
    student_taps = ("embedding",)
    needs_teacher = False
    student_passes = 4 * 3.0  # forward + backward on the 4 rotations of every image

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        self.temperature = float(cfg.get("temperature", 1.0))
        if self.temperature <= 0:
            raise KDBenchError(f"sla_sd: method.temperature must be > 0, got {self.temperature}")
        shape = tuple(pair.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise pair.incompatible(name, f"rotating by 90 degrees needs square (C, H, W) image inputs, got {shape}")
        self.num_classes = int(pair.num_classes)
        self.joint_head = nn.Linear(flat_dim(pair.student_shapes["embedding"]), VIEWS * self.num_classes)

    def joint(self, student) -> torch.Tensor:
        return self.joint_head(student["embedding"].flatten(1))

    def all_terms(self, batch, student, teacher):
        """Every term is computed here, on the right rows (the base class would put CE over all 4N rows)."""
        return self.terms(batch, student, teacher)

    def terms(self, batch, student, teacher):
        """The SLA+SD terms of a view batch (rotation_views: row 4i + k = image i turned k times) and the student's
        outputs of its 4N rows."""
        z = student["logits"]
        if len(batch) % VIEWS or z.shape[0] != len(batch):
            raise KDBenchError(f"sla_sd: terms() reads a view batch of 4 rotations per image and the student outputs "
                               f"of its rows (use rotation_views / forward_loss); got a batch of {len(batch)} rows "
                               f"and outputs of {z.shape[0]}")
        y = batch.targets[::VIEWS]
        joint = self.joint(student)
        single = z[::VIEWS]
        out = {}
        if "ce" in self.weights:
            out["ce"] = F.cross_entropy(single, y)
        out["joint"] = sla_joint_loss(joint, y)
        out["sd"] = sla_sd_loss(single, joint, self.temperature)
        return out

    def forward_loss(self, batch, step):
        """The student sees the 4N rotated views in one forward."""
        views = rotation_views(batch)
        student = step.forward(views.inputs, self.student_taps)
        return self.loss(views, student, None, step.epoch)

    # -- evaluation

    def aggregated_logits_of(self, student, inputs: torch.Tensor) -> torch.Tensor:
        """SLA+AG: the joint head over the 4 rotations of each image, aggregated (N, K)."""
        out = student.forward_taps(rotate_views(inputs), self.student_taps)
        return aggregated_logits(self.joint(out))

    def single_view_logits_of(self, student, inputs: torch.Tensor) -> torch.Tensor:
        """SLA+SI: the joint head on the plain image, at the rotation-0 label of every class (N, K)."""
        return self.joint(student.forward_taps(inputs, self.student_taps))[:, ::VIEWS]

    def extra_heads(self):
        return {"aggregated": self.aggregated_logits_of, "single_view": self.single_view_logits_of}

    def record_fields(self):
        return {"evaluated_head": "single head (the student's own fc, SLA+SD) on the plain image",
                "joint_head_params": sum(p.numel() for p in self.joint_head.parameters())}
