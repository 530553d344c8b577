"""Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (FT), RD's two stages.

Both nets' last feature map (the last stage tap). Rate k = 0.5, C_f = int(C_t * k) factor channels.
  Paraphraser (teacher side, no BN, 3x3 stride-1 convs with bias, each followed by LeakyReLU(0.1)):
    encoder C_t->C_t, C_t->C_f, C_f->C_f; decoder (transposed) C_f->C_f, C_f->C_t, C_t->C_t.
  Translator (student side): conv C_s->C_s, C_s->C_f, C_f->C_f, each followed by BN and LeakyReLU(0.1).
Stage 'paraphraser': `stage_epochs` epochs training only the paraphraser to reconstruct the teacher's map
(MSE, mean). Main training: the paraphraser is frozen (not in the optimizer, run under no_grad); the translator
is trained jointly with the student on ce * CE + ft * FT, ft = beta = 200.
  variant: reference  RD: after spatial matching, phi(F) = L2-normalise over H*W of the channel mean of F^2;
                      FT = mean over N*H*W of |phi(F_s) - phi(F_t)|.
  variant: paper      the paper / torchdistill: phi(F) = F flattened over C*H*W and L2-normalised;
                      FT = mean over N*C*H*W of |phi(F_s) - phi(F_t)|.
Extra parameters for resnet32x4 -> resnet8x4: paraphraser 2,065,536 and translator 1,033,728.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods.common import attention_map, feature_map_shapes, match_spatial
from kdbench.distill import Method, Stage, register_method
from kdbench.errors import KDBenchError

VARIANTS = ("reference", "paper")
_RD_SMALL_LR_STUDENTS = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                         "resnet8x4", "resnet32x4"}


def _leaky(*layers):
    out = []
    for layer in layers:
        out += [layer, nn.LeakyReLU(0.1)]
    return out


class Paraphraser(nn.Module):
    """Teacher-side autoencoder: encoder(f_t) is the teacher factor; decoder reconstructs f_t from it."""

    def __init__(self, c_t: int, rate: float = 0.5):
        super().__init__()
        c_f = int(c_t * rate)
        self.encoder = nn.Sequential(*_leaky(nn.Conv2d(c_t, c_t, 3, 1, 1), nn.Conv2d(c_t, c_f, 3, 1, 1),
                                             nn.Conv2d(c_f, c_f, 3, 1, 1)))
        self.decoder = nn.Sequential(*_leaky(nn.ConvTranspose2d(c_f, c_f, 3, 1, 1), nn.ConvTranspose2d(c_f, c_t, 3, 1, 1),
                                             nn.ConvTranspose2d(c_t, c_t, 3, 1, 1)))

    def forward(self, f_t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(f_t))


class Translator(nn.Module):
    """Student-side encoder: conv-BN-LeakyReLU x3, C_s -> C_s -> C_f -> C_f."""

    def __init__(self, c_s: int, c_t: int, rate: float = 0.5):
        super().__init__()
        c_f = int(c_t * rate)
        layers = []
        for a, b in ((c_s, c_s), (c_s, c_f), (c_f, c_f)):
            layers += [nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.body(f_s)


def paraphraser_loss(reconstruction: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Stage-1 reconstruction loss: mean squared error to the (detached) teacher map."""
    return F.mse_loss(reconstruction, teacher_map.detach())


def ft_factor(factor: torch.Tensor, variant: str = "reference") -> torch.Tensor:
    """phi(F): 'reference' -> (N, H*W) attention-style map (p = 2); 'paper' -> (N, C*H*W) L2-normalised factor."""
    if variant == "reference":
        return attention_map(factor, p=2.0)
    if variant == "paper":
        return F.normalize(factor.flatten(1), dim=1, eps=1e-12)
    raise KDBenchError(f"ft: variant must be one of {VARIANTS}, got '{variant}'")


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, variant: str = "reference") -> torch.Tensor:
    """Mean absolute difference of phi(student factor) and phi(teacher factor) after spatial matching; teacher detached."""
    f_s, f_t = match_spatial(student_factor, teacher_factor.detach())
    return (ft_factor(f_s, variant) - ft_factor(f_t, variant)).abs().mean()


def rd_stage_lr(student_name: str, base_lr: float) -> float:
    """RD's paraphraser LR: 0.01 for CIFAR ResNet / WRN students (resnet8..resnet110, resnet8x4, resnet32x4, wrn_*),
    else the run's base LR."""
    name = student_name or ""
    return 0.01 if name in _RD_SMALL_LR_STUDENTS or name.startswith("wrn_") else base_lr


@register_method("ft")
class FT(Method):
    paper = "Kim, Park & Kwak, Paraphrasing Complex Network: Network Compression via Factor Transfer, NeurIPS 2018"
    code = "HobbitLong/RepDistiller distiller_zoo/FT.py"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.variant = str(cfg.get("variant", "reference"))
        if self.variant not in VARIANTS:
            raise KDBenchError(f"ft: method.variant must be one of {VARIANTS}, got '{self.variant}'")
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.stage_epochs = int(cfg.get("stage_epochs", 30))
        stage_lr = cfg.get("stage_lr", None)
        self.stage_lr = rd_stage_lr(pair.student_name, pair.lr) if stage_lr is None else float(stage_lr)
        rate = float(cfg.get("rate", 0.5))
        if not pair.student.stage_names or not pair.teacher.stage_names:
            raise pair.incompatible(self.method_name, "it needs stage feature maps on both models")
        self.s_tap, self.t_tap = pair.student.stage_names[-1], pair.teacher.stage_names[-1]
        self.student_taps, self.teacher_taps = (self.s_tap,), (self.t_tap,)
        (s_shape,), (t_shape,) = feature_map_shapes(pair, self.method_name, self.student_taps, self.teacher_taps)
        if int(t_shape[0] * rate) < 1:
            raise pair.incompatible(self.method_name, f"rate {rate} leaves no factor channels for teacher map {t_shape}")
        self.paraphraser = Paraphraser(t_shape[0], rate)
        self.translator = Translator(s_shape[0], t_shape[0], rate)

    def stages(self, student, teacher):
        if self.stage_epochs <= 0:
            return []

        def loss(batch, s, t):
            return paraphraser_loss(self.paraphraser(t[self.t_tap]), t[self.t_tap])

        return [Stage(name="paraphraser", epochs=self.stage_epochs, lr=self.stage_lr, uses_student=False,
                      parameters=list(self.paraphraser.parameters()), loss=loss, teacher_taps=self.teacher_taps)]

    def trainable_parameters(self):
        """Only the translator joins the main optimizer; the paraphraser is trained in its stage, then frozen."""
        return self.translator.parameters()

    def terms(self, batch, student, teacher):
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher[self.t_tap])
        student_factor = self.translator(student[self.s_tap])
        return {"ft": ft_loss(student_factor, teacher_factor, self.variant)}
