"""Romero et al. 2015, "FitNets: Hints for Thin Deep Nets", as in RepDistiller/mdistiller (single stage).

A regressor (blocks.ConvReg: conv chosen by the spatial sizes, BatchNorm, ReLU) maps the student's hint-layer
map onto the teacher's; hint = mean over N*C*H*W of (ConvReg(f_s) - f_t)^2. The regressor is trained jointly with
the student from epoch 1 (the paper's separate hint pre-training stage is not used by RD/MD).
total = ce * CE + hint * HINT with ce = 1, hint = beta = 100, hint layer stage2 (= RD/MD feat[2]).
Extra parameters for resnet32x4 -> resnet8x4: 16,768 (1x1 conv 128->128 with bias, BN).
"""
import torch
import torch.nn.functional as F

from kdbench.methods.common import ConvReg, feature_map_shapes
from kdbench.distill import Method, register_method


def hint_loss(regressed_student: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student map and the (detached) teacher map."""
    return F.mse_loss(regressed_student, teacher_map.detach())


@register_method("fitnet")
class FitNet(Method):
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"
    code = "HobbitLong/RepDistiller distiller_zoo/FitNet.py; megvii-research/mdistiller FitNet"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.hint_layer = str(cfg.get("hint_layer", "stage2"))
        self.student_taps = self.teacher_taps = (self.hint_layer,)
        (s_shape,), (t_shape,) = feature_map_shapes(pair, self.method_name, self.student_taps, self.teacher_taps)
        try:
            self.regressor = ConvReg(s_shape, t_shape, use_relu=True)
        except ValueError as err:
            raise pair.incompatible(self.method_name, f"hint layer '{self.hint_layer}': {err}") from None

    def terms(self, batch, student, teacher):
        return {"hint": hint_loss(self.regressor(student[self.hint_layer]), teacher[self.hint_layer])}
