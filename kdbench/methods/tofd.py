"""Zhang, Song, Ma & Ma (NeurIPS 2020), "Task-Oriented Feature Distillation" (TOFD;
ArchipLab-LinfengZhang/Task-Oriented-Feature-Distillation `distill.py`, `models/resnet.py`, `utils.py`).

Both nets carry task-oriented auxiliary classifiers: on every stage but the last, a chain of SepConv blocks (depthwise
3x3 stride s, 1x1, BN, ReLU, depthwise 3x3, 1x1 to the next width, BN, ReLU; one block per later stage, stride = that
stage's downsampling, widths = the later stages' widths, as the code's auxiliary1..3 on a ResNet-18), global average
pooling and a Linear classifier; the last level is the network's own pooled embedding and classifier. Levels pair
the deepest min(L_s, L_t) stages of the two nets. Per level i (features f = pooled aux features, z = aux logits):

  tofd_feat  sum_i ||link_i(f_s,i) - f_t,i||_2        (torch.dist: the Frobenius norm over the whole batch, not squared)
  aux_ce     sum_{i < last} CE(z_s,i, y)               (the main level's CE is the base `ce` term)
  tofd_kd    sum_i -mean_n sum_c softmax(z_t,i / T) log softmax(z_s,i / T), T = 1 + t_growth * epoch / t_epochs
             (the code's CrossEntropy at 1 + (3 / 250) (1 + epoch_0); kdbench's epochs are 1-indexed) -- a soft
             cross-entropy, not a KL, without T^2
  orth       sum_i ||W_i W_i^T - I||_F + ||W_i^T W_i - I||_F  on the bias-free link_i = Linear(d_s -> d_t)
total = ce + aux_ce + tofd_kd + alpha * tofd_feat + beta * orth, alpha 0.05, beta 0.03 (the code's defaults).

The code's teacher is a ResNet trained with its own auxiliary classifiers. kdbench's teachers have none: a
pre-training stage (`teacher_aux`) trains the teacher-side auxiliary classifiers on the frozen teacher's stage maps
with CE (no student forward), `stage_epochs` at `stage_lr`; they are then frozen (kept out of the main optimizer, eval
mode). Code oddities not reproduced: in the released distill.py the optimiser step sits outside the batch loop (one
update per epoch, surely an indentation slip); the first optimizer's weight decay 7e-3 (--l2) is replaced by 5e-4 when
the link layers are added, so 5e-4 is what trains. The code's recipe (250 epochs, batch 128, lr 0.1 decayed x0.1 at
80/160/240, Cutout 16) is the experiment's to set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, Stage, register_method
from kdbench.methods.common import stage_pairs


class SepConv(nn.Module):
    """TOFD's SepConv: dw3x3(stride) -> 1x1 -> BN -> ReLU -> dw3x3 -> 1x1(c_in -> c_out) -> BN -> ReLU, no biases."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))

    def forward(self, x):
        return self.op(x)


class AuxClassifier(nn.Module):
    """SepConv chain from one stage's map to the last stage's width and size, global average pool, Linear."""

    def __init__(self, shapes: list[tuple[int, int, int]], num_classes: int):
        super().__init__()
        blocks = []
        for (c_in, h_in, _), (c_out, h_out, _) in zip(shapes[:-1], shapes[1:]):
            blocks.append(SepConv(c_in, c_out, stride=max(h_in // max(h_out, 1), 1)))
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(shapes[-1][0], num_classes)

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        f = self.features(x)
        return f, self.fc(f)


def soft_cross_entropy(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean_n sum_c softmax(z_t / T) log softmax(z_s / T) (TOFD utils.CrossEntropy); teacher detached."""
    return -(F.log_softmax(z_s / temperature, dim=1) * F.softmax(z_t.detach() / temperature, dim=1)).sum(1).mean()


def tofd_feature_loss(f_s, f_t) -> torch.Tensor:
    """sum_i ||f_s,i - f_t,i||_2 over the flattened batches (torch.dist, p = 2), linked student features given."""
    return sum(torch.dist(s, t.detach(), p=2) for s, t in zip(f_s, f_t, strict=True))


def orthogonal_loss(weights) -> torch.Tensor:
    """sum over the link weights W of ||W W^T - I||_F + ||W^T W - I||_F."""
    total = 0.0
    for w in weights:
        eye_out = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        eye_in = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        total = total + torch.dist(w @ w.t(), eye_out, p=2) + torch.dist(w.t() @ w, eye_in, p=2)
    return total


def tofd_temperature(epoch: int, t_start: float = 1.0, t_growth: float = 3.0, t_epochs: float = 250.0) -> float:
    return t_start + t_growth * epoch / t_epochs


def _aux_heads(stage_taps, last_tap, shapes, num_classes):
    chain = [tuple(shapes[t]) for t in (*stage_taps, last_tap)]
    return nn.ModuleList(AuxClassifier(chain[i:], num_classes) for i in range(len(stage_taps)))


@register_method("tofd")
class TOFD(Method):
    paper = "Zhang et al., Task-Oriented Feature Distillation, NeurIPS 2020"
    code = "ArchipLab-LinfengZhang/Task-Oriented-Feature-Distillation"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        pairs = stage_pairs(pair, self.method_name, align="last")
        s_last, t_last = pair.student.stage_names[-1], pair.teacher.stage_names[-1]
        if len(pairs) < 2:
            raise pair.incompatible(self.method_name, "it needs at least two stages on each side")
        for side, shapes, name in (("student", pair.student_shapes, pair.student_name),
                                   ("teacher", pair.teacher_shapes, pair.teacher_name)):
            if len(shapes.get("embedding", ())) != 1:
                raise pair.incompatible(self.method_name, f"it needs the {side}'s pooled embedding; {name} has none")
        self.s_aux_taps = tuple(s for s, _ in pairs[:-1])
        self.t_aux_taps = tuple(t for _, t in pairs[:-1])
        self.student_taps = (*self.s_aux_taps, "embedding")
        self.teacher_taps = (*self.t_aux_taps, "embedding")
        self.student_heads = _aux_heads(self.s_aux_taps, s_last, pair.student_shapes, pair.num_classes)
        self.teacher_head = _aux_heads(self.t_aux_taps, t_last, pair.teacher_shapes, pair.num_classes)
        d_s = [self.student_heads[i].fc.in_features for i in range(len(self.s_aux_taps))] + \
            [pair.student_shapes["embedding"][0]]
        d_t = [self.teacher_head[i].fc.in_features for i in range(len(self.t_aux_taps))] + \
            [pair.teacher_shapes["embedding"][0]]
        self.links = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(d_s, d_t))
        self.t_start = float(cfg.get("t_start", 1.0))
        self.t_growth = float(cfg.get("t_growth", 3.0))
        self.t_epochs = float(cfg.get("t_epochs", 250))
        self.stage_epochs = int(cfg.get("stage_epochs", 30))
        stage_lr = cfg.get("stage_lr")
        self.stage_lr = float(pair.lr if stage_lr is None else stage_lr)
        self._epoch = 1

    def trainable_parameters(self):
        frozen = {id(p) for p in self.teacher_head.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]

    def loss(self, batch, student, teacher, epoch):
        self._epoch = int(epoch)
        return super().loss(batch, student, teacher, epoch)

    def temperature_at(self, epoch: int) -> float:
        return tofd_temperature(epoch, self.t_start, self.t_growth, self.t_epochs)

    def terms(self, batch, student, teacher):
        self.teacher_head.eval()
        f_s, z_s, f_t, z_t = [], [], [], []
        for head, tap in zip(self.student_heads, self.s_aux_taps):
            f, z = head(student[tap])
            f_s.append(f)
            z_s.append(z)
        with torch.no_grad():
            for head, tap in zip(self.teacher_head, self.t_aux_taps):
                f, z = head(teacher[tap])
                f_t.append(f)
                z_t.append(z)
        aux_ce = sum(F.cross_entropy(z, batch.targets) for z in z_s)
        f_s.append(student["embedding"])
        f_t.append(teacher["embedding"])
        z_s.append(student["logits"])
        z_t.append(teacher["logits"])
        temperature = self.temperature_at(self._epoch)
        return {
            "aux_ce": aux_ce,
            "tofd_kd": sum(soft_cross_entropy(a, b, temperature) for a, b in zip(z_s, z_t)),
            "tofd_feat": tofd_feature_loss([link(f) for link, f in zip(self.links, f_s)], f_t),
            "orth": orthogonal_loss([link.weight for link in self.links]),
        }

    def teacher_head_loss(self, batch, student, teacher) -> torch.Tensor:
        """The stage's loss: CE of every teacher auxiliary classifier on the frozen teacher's maps."""
        self.teacher_head.train()
        return sum(F.cross_entropy(head(teacher[tap].detach())[1], batch.targets)
                   for head, tap in zip(self.teacher_head, self.t_aux_taps))

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []
        return [Stage("teacher_aux", self.stage_epochs, self.stage_lr, list(self.teacher_head.parameters()),
                      self.teacher_head_loss, teacher_taps=self.t_aux_taps, uses_student=False)]

    def record_fields(self):
        return {"evaluated_head": "student", "trained_heads": ["student_aux_classifiers", "links"],
                "stage_trained": ["teacher_aux_classifiers"]}
