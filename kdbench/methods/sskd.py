"""Xu, Liu, Li & Loy 2020, "Knowledge Distillation Meets Self-Supervision" (SSKD). Reference code: xuguodong03/SSKD
(`student.py`, `wrapper.py`, `cifar.py`); torchdistill's SSKDLoss / AuxSSKDLoss refactor the same computation.

Views. Every image of a batch is seen at 0, 90, 180 and 270 degrees: torch.rot90 over (H, W), k quarter turns
counter-clockwise, as the reference's np.rot90 on HWC arrays (exact on normalised tensors: the normalisation is per
channel). The 4N views are interleaved as in the reference: row 4i + k is image i turned k quarter turns, so rows
4i are the originals. The student sees all 4N rows in ONE forward (train mode: its BatchNorm statistics are over
the 4N views, as in the reference); the teacher (eval mode, no gradient) sees them too. `terms()` therefore reads a
*view batch* (`rotation_views(batch)`) and outputs of its 4N rows; `forward_loss` builds it.

Self-supervision heads: Linear(d, d) - ReLU - Linear(d, d) on the `embedding` vector (the reference wrapper's
proj_head on feats[-1]), one for the student (trained with it, in the main optimizer) and one for the teacher
(trained in the stage below, then frozen). Extra parameters for resnet32x4 -> resnet8x4: 2 x 131,584.

Similarities of head outputs h (4N, d): S[j, i] = cos(h_aug_j, h_orig_i), a (3N, N) matrix whose rows are the
rotated views in (image, rotation) order; the positive column of row j is its own image, j // 3. Norms are clamped
at 1e-8 (F.cosine_similarity's eps).

Stage 'ss_head' (`stage_epochs` 60, `stage_lr` 0.05, SGD momentum 0.9, weight decay 5e-4; student.py --t-epoch,
--t-lr): the frozen teacher embeds the 4N views and only its head is trained, on CE(S_t, own image) -- plain
cross-entropy over the cosines, no temperature -- averaged over the 3N rows; the LR decays x0.1 after epochs 30 and 45
(`stage_milestones`, --t-milestones). The stage runs no student forward (the student is not trained in it).

Error-tolerant selection: for scores (R, C) and a positive column per row, rank_r = #{c : score_rc > score_r,pos}
(the position of the positive in the descending order; ties count in its favour). Rows with rank 0 ("correct")
are all kept, plus the floor(ratio * #wrong) wrong rows of smallest rank, ties in row order. The reference uses
torch.argsort (ties in unspecified order), the same set whenever no two scores of a row, or no two ranks at the cut,
are equal. A selection that keeps no row gives 0 (the reference's batchmean over no rows is NaN).

Terms (T_kd = `temperature` 4, T_tf = `tf_temperature` 4, T_ss = `ss_temperature` 0.5):
  ce = CE(z_s[orig], y), mean over the N originals
  kd = T_kd^2 * batchmean KL(softmax(z_t[orig] / T_kd) || softmax(z_s[orig] / T_kd))        (kdbench.losses.kd_loss)
  tf = T_tf^2 * (1 / |K_tf|) sum_{r in K_tf} KL(softmax(z_t[aug_r] / T_tf) || softmax(z_s[aug_r] / T_tf)), K_tf the
       3N rotated views kept by ranking the teacher's logits at the label (`tf_ratio` 1.0: every row)
  ss = T_ss^2 * (1 / |K_ss|) sum_{r in K_ss} KL(softmax(S_t[r] / T_ss) || softmax(S_s[r] / T_ss)), K_ss kept by ranking
       S_t at the own image (`ss_ratio` 0.75)
Benchmark (student.py defaults, used for every CIFAR-100 pair in command.sh): 0.1 ce + 0.9 kd + 2.7 tf + 10 ss.

Where kdbench differs from the reference (not options: the data interface decides them):
  - the reference crops each rotated view independently (RandomCrop after np.rot90, one shared flip); kdbench rotates
    the batch's one augmented crop, so the four views share the crop offset (each view alone has the same
    distribution; their correlation differs);
  - the stage's constant LR (above), and the stage's loop also runs a (discarded) student forward in train mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.data.loader import Batch
from kdbench.distill import Method, Stage, register_method
from kdbench.errors import KDBenchError
from kdbench.losses import kd_loss
from kdbench.methods.common import flat_dim

VIEWS = 4  # 0, 90, 180, 270 degrees
COS_EPS = 1e-8


# ----------------------------------------------------------------------------- views


def rotate_views(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (4N, C, H, W): row 4i + k is x[i] turned k quarter turns counter-clockwise."""
    return torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(VIEWS)], dim=1).flatten(0, 1)


def quarter_turns(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (3N, C, H, W): x turned 1, 2 and 3 quarter turns, stacked by rotation ([k=1; k=2; k=3])."""
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(1, VIEWS)])


def rotation_views(batch: Batch) -> Batch:
    """The view batch: rotate_views(inputs), every other field repeated per view (targets, indices, augmentation)."""
    rep = lambda t: t.repeat_interleave(VIEWS, dim=0)  # noqa: E731
    return Batch(rotate_views(batch.inputs), rep(batch.targets), rep(batch.indices), rep(batch.crop_offsets),
                 rep(batch.flips))


def interleave(original: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """(N, ...) originals and (3N, ...) rotated rows stacked by rotation ([k=1 rows; k=2 rows; k=3 rows]) -> (4N, ...)
    in the view layout (row 4i + k)."""
    n = original.shape[0]
    rotated = rotated.reshape(VIEWS - 1, n, *rotated.shape[1:]).transpose(0, 1)
    return torch.cat([original.unsqueeze(1), rotated], dim=1).flatten(0, 1)


def split_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4N, ...) in the view layout -> (originals (N, ...), rotated (3N, ...) in (image, rotation) order)."""
    v = t.reshape(-1, VIEWS, *t.shape[1:])
    return v[:, 0], v[:, 1:].flatten(0, 1)


# ----------------------------------------------------------------------------- plain losses


def view_similarities(h: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """(3N, N) cosines between the rotated rows and the original rows of head outputs h (4N, d), in float32 or
    wider; each norm clamped at eps."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    orig, aug = split_views(h.flatten(1))
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(eps)  # noqa: E731
    return unit(aug) @ unit(orig).t()


def view_positives(n: int, device=None) -> torch.Tensor:
    """The own-image column of each of the 3N rotated rows: [0, 0, 0, 1, 1, 1, ...]."""
    return torch.arange(n, device=device).repeat_interleave(VIEWS - 1)


def ss_head_loss(h_t: torch.Tensor) -> torch.Tensor:
    """The stage's loss: mean over the 3N rotated rows of CE(S[j], own image), S = view_similarities(h_t) (no
    temperature, as the reference)."""
    s = view_similarities(h_t)
    return F.cross_entropy(s, view_positives(s.shape[1], s.device))


def kept_rows(scores: torch.Tensor, positive: torch.Tensor, ratio: float) -> torch.Tensor:
    """(R,) bool: every row whose positive column scores highest (rank 0) and the floor(ratio * #wrong) wrong rows of
    smallest rank (#columns scoring strictly above the positive), ties in row order. No host sync."""
    scores = scores.detach()
    rank = (scores > scores.gather(1, positive.view(-1, 1))).sum(1)
    wrong = (rank > 0).sum()
    n_keep = (rank.numel() - wrong) + torch.floor(wrong.double() * float(ratio)).long()
    order = torch.sort(rank, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position < n_keep


def selected_kl(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * the mean over kept rows of KL(softmax(teacher / T) || softmax(student / T)) (0 when no row is kept);
    teacher detached; float32 or wider."""
    s = student.float() if student.dtype in (torch.float16, torch.bfloat16) else student
    t = teacher.detach().to(s.dtype)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    keep = keep.to(kl.dtype)
    return temperature**2 * (kl * keep).sum() / keep.sum().clamp_min(1.0)


def sskd_tf_loss(z_s_aug: torch.Tensor, z_t_aug: torch.Tensor, targets: torch.Tensor, temperature: float = 4.0,
                 ratio: float = 1.0) -> torch.Tensor:
    """KD on the rotated views (3N, C) with labels `targets` (3N,), over the rows the teacher's ranking keeps."""
    return selected_kl(z_s_aug, z_t_aug, kept_rows(z_t_aug, targets, ratio), temperature)


def sskd_ss_loss(h_s: torch.Tensor, h_t: torch.Tensor, temperature: float = 0.5, ratio: float = 0.75) -> torch.Tensor:
    """Similarity transfer between the student's and the teacher's head outputs (4N, d each, view layout)."""
    s_sim, t_sim = view_similarities(h_s), view_similarities(h_t.detach())
    keep = kept_rows(t_sim, view_positives(t_sim.shape[1], t_sim.device), ratio)
    return selected_kl(s_sim, t_sim, keep, temperature)


# ----------------------------------------------------------------------------- the method


class SSHead(nn.Module):
    """The self-supervision module: Linear(d, d), ReLU, Linear(d, d) (reference wrapper.proj_head)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


def _ratio(cfg, key: str, default: float) -> float:
    value = float(cfg.get(key, default))
    if not 0.0 <= value <= 1.0:
        raise KDBenchError(f"sskd: method.{key} is the share of wrong predictions kept, in [0, 1]; got {value}")
    return value


@register_method("sskd")
class SSKD(Method):
    paper = "Xu, Liu, Li & Loy, Knowledge Distillation Meets Self-Supervision (SSKD), ECCV 2020"
    code = "xuguodong03/SSKD student.py"
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)
    teacher_cache = False  # the teacher sees the four rotations of each batch, live
    student_passes, teacher_passes = 4 * 3.0, 4 * 1.0  # both networks see the 4 rotations of every image

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        name = self.method_name
        if pair.teacher is None or pair.teacher_shapes is None:
            raise pair.incompatible(name, "it needs a teacher")
        shape = tuple(pair.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise pair.incompatible(name, f"rotating by 90 degrees needs square (C, H, W) image inputs, got {shape}")
        self.tf_temperature = float(cfg.get("tf_temperature", 4.0))
        self.ss_temperature = float(cfg.get("ss_temperature", 0.5))
        self.tf_ratio = _ratio(cfg, "tf_ratio", 1.0)
        self.ss_ratio = _ratio(cfg, "ss_ratio", 0.75)
        self.stage_epochs = int(cfg.get("stage_epochs", 60))
        self.stage_lr = float(cfg.get("stage_lr", 0.05))
        self.stage_milestones = tuple(int(m) for m in cfg.get("stage_milestones", (30, 45)))
        self.student_head = SSHead(flat_dim(pair.student_shapes["embedding"]))
        self.teacher_head = SSHead(flat_dim(pair.teacher_shapes["embedding"]))

    def trainable_parameters(self):
        """Only the student's head joins the main optimizer; the teacher's is trained in the stage, then frozen."""
        return self.student_head.parameters()

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []

        def loss(batch, s, t):
            # the originals' embeddings come from the loop's teacher forward, the 3 rotations' from this one (eval
            # mode: a row's output does not depend on the rest of the batch)
            with torch.no_grad():
                rotated = teacher.forward_taps(quarter_turns(batch.inputs), ("embedding",))["embedding"]
            return ss_head_loss(self.teacher_head(interleave(t["embedding"], rotated)))

        return [Stage(name="ss_head", epochs=self.stage_epochs, lr=self.stage_lr, milestones=self.stage_milestones,
                      parameters=list(self.teacher_head.parameters()), loss=loss, teacher_taps=("embedding",),
                      uses_student=False)]

    def all_terms(self, batch, student, teacher):
        """Every term is computed here, on the right views (the base class would put CE over all 4N rows)."""
        return self.terms(batch, student, teacher)

    def terms(self, batch, student, teacher):
        """The SSKD terms of a view batch (rotation_views) and its student/teacher outputs (4N rows each)."""
        z_s, z_t = student["logits"], teacher["logits"]
        if len(batch) % VIEWS or z_s.shape[0] != len(batch) or z_t.shape[0] != len(batch):
            raise KDBenchError(f"sskd: terms() reads a view batch of 4 rotations per image and the outputs of its "
                               f"rows (use rotation_views / forward_loss); got a batch of {len(batch)} rows and "
                               f"outputs of {z_s.shape[0]} (student) and {z_t.shape[0]} (teacher)")
        y, _ = split_views(batch.targets)
        s_orig, s_aug = split_views(z_s)
        t_orig, t_aug = split_views(z_t)
        out = {}
        if "ce" in self.weights:
            out["ce"] = F.cross_entropy(s_orig, y)
        if "kd" in self.weights:
            out["kd"] = kd_loss(s_orig, t_orig, self.kd_temperature)
        out["tf"] = sskd_tf_loss(s_aug, t_aug, y.repeat_interleave(VIEWS - 1), self.tf_temperature, self.tf_ratio)
        with torch.no_grad():
            h_t = self.teacher_head(teacher["embedding"])
        out["ss"] = sskd_ss_loss(self.student_head(student["embedding"]), h_t, self.ss_temperature, self.ss_ratio)
        return out

    def forward_loss(self, batch, step):
        """Both nets see the 4N rotated views: one student forward (train mode) and one live teacher forward."""
        views = rotation_views(batch)
        teacher = step.teacher.with_taps(self.teacher_taps)(views)  # live: a cache holds the originals only
        student = step.forward(views.inputs, self.student_taps)
        return self.loss(views, student, teacher, step.epoch)

