"""Zhou, Fan, Cui, Bian, Zhu & Gai, AAAI 2018, "Rocket Launching: A Universal and Efficient Framework for Training
Well-performing Light Net"; reference code zhougr1993/Rocket-Launching (rocket_interval.py, README commands).

No pre-trained teacher. A light net (the student, the network kept for inference) and a booster net train together;
the light net learns the booster's logits through a hint loss, and a gradient block keeps that loss from moving the
booster:
  ce          CE(z_light, y)                                    (the base class's term)
  booster_ce  CE(z_booster, y)
  hint        (1/B) sum_b sum_c (z_booster - z_light)^2          (z_booster detached: the gradient block)
total = ce + booster_ce + gamma * hint with gamma = 0.03 (README: --gamma 0.03; rocket_interval.py divides the summed
square by the batch size). `gradient_block: false` lets the hint gradient reach the booster (the paper's ablation).

The booster's architecture is the run's teacher model config (`booster: ${teacher.model}`: pair=wrn_40_1-wrn_16_1
trains booster wrn_40_1 with light net wrn_16_1); nothing is pre-trained or loaded for it, and the record names no
teacher. Parameter sharing, `share: interval` (rocket_interval.py --param_share True, the README's "interval" runs):
every conv of the light net is also the booster's conv of the same name (the stem and, in each stage, the first blocks:
the light net's block i is the booster's block i), so the booster's first blocks compute with the light net's conv
weights; batch norms and classifiers stay separate (the code's bns*/fcs). kdbench keeps the shared convs in the
student only (the booster borrows them, unregistered), so they are counted, checkpointed and optimised once.
`share: none` (--param_share False): two separate networks. Not reproduced: rocket_bottom.py (a light net made of the
booster's bottom stages), the code's reflection padding, its momentum restart at each LR decay and its initialisation
(kaiming fan-in convs, BN scales drawn uniformly from [0, 1)); the networks keep kdbench's model-zoo initialisation.
Evaluation: the run is the light net; head `booster` gets a record of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.errors import KDBenchError
from kdbench.methods.branches import build_model
from kdbench.models import count_parameters

SHARE_MODES = ("interval", "none")


def rocket_loss(light_logits: torch.Tensor, booster_logits: torch.Tensor, targets: torch.Tensor,
                gradient_block: bool = True) -> dict[str, torch.Tensor]:
    """Rocket Launching's unweighted terms (Rocket-Launching rocket_interval.py h()):
      ce = CE(z_light, y), booster_ce = CE(z_booster, y),
      hint = (1/B) sum_b sum_c (z_booster[b, c] - z_light[b, c])^2   (z_booster detached with the gradient block;
    the code divides by the configured batch size, kdbench by the batch's)."""
    course = booster_logits.detach() if gradient_block else booster_logits
    return {
        "ce": F.cross_entropy(light_logits, targets),
        "booster_ce": F.cross_entropy(booster_logits, targets),
        "hint": (course.float() - light_logits.float()).pow(2).sum(1).mean(),
    }


class Borrowed(nn.Module):
    """A module of another network used in this one's forward without being registered here (its parameters stay
    the other network's: not in this module's parameters(), state_dict() or parameter count)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["borrowed"] = module

    def forward(self, x):
        return self.__dict__["borrowed"](x)


def share_convs(light: nn.Module, booster: nn.Module) -> list[str]:
    """Replace every conv of `booster` that has the name and weight shape of a conv of `light` by that conv
    (borrowed); returns the shared names. Raises KDBenchError if some conv of the light net has no counterpart."""
    booster_modules = dict(booster.named_modules())
    shared, missing = [], []
    for name, conv in light.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        other = booster_modules.get(name)
        if isinstance(other, nn.Conv2d) and other.weight.shape == conv.weight.shape \
                and (other.stride, other.padding, other.groups, other.bias is None) == \
                (conv.stride, conv.padding, conv.groups, conv.bias is None):
            parent_name, _, attr = name.rpartition(".")
            parent = booster_modules[parent_name] if parent_name else booster
            parent._modules[attr] = Borrowed(conv)
            shared.append(name)
        else:
            missing.append(name)
    if missing:
        raise KDBenchError(f"the booster has no conv of the same name and shape for {missing[:4]}"
                           f"{' ...' if len(missing) > 4 else ''}")
    return shared


@register_method("rocket")
class Rocket(Method):
    paper = "Zhou et al., Rocket Launching: A Universal and Efficient Framework for Training Well-performing Light Net, AAAI 2018"
    code = "zhougr1993/Rocket-Launching"
    needs_teacher = False

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        self.share = str(cfg.get("share", "interval"))
        if self.share not in SHARE_MODES:
            raise KDBenchError(f"rocket: method.share must be one of {list(SHARE_MODES)}, got '{self.share}'")
        self.gradient_block = bool(cfg.get("gradient_block", True))
        self.booster_name, self.booster = build_model(cfg.get("booster"), pair, self.method_name)
        self.shared = []
        if self.share == "interval":
            if type(self.booster) is not type(pair.student):
                raise pair.incompatible(self.method_name,
                                        f"interval sharing needs a booster of the light net's family, got "
                                        f"{self.booster_name} ({type(self.booster).__name__} vs "
                                        f"{type(pair.student).__name__}); use method.share=none")
            try:
                self.shared = share_convs(pair.student, self.booster)
            except KDBenchError as err:
                raise pair.incompatible(self.method_name, f"interval sharing with booster {self.booster_name}: {err} "
                                                          f"(the booster must be a deeper net of the light net's "
                                                          f"widths); use method.share=none") from None
        self.shared_params = sum(p.numel() for name, m in pair.student.named_modules() if name in self.shared
                                 for p in m.parameters())

    def terms(self, batch, student, teacher):
        terms = rocket_loss(student["logits"], self.booster(batch.inputs), batch.targets, self.gradient_block)
        del terms["ce"]  # the base class's term
        return terms

    def extra_heads(self):
        return {"booster": lambda student, x: self.booster(x)}

    def record_fields(self) -> dict:
        return {"evaluated_head": "student (the light net)",
                "online": {"booster": self.booster_name, "share": self.share, "gradient_block": self.gradient_block,
                           "shared_convs": len(self.shared), "shared_params": self.shared_params,
                           "extra_params": {"booster": count_parameters(self.booster)}}}
