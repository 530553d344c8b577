"""Li, Li, Liu & Zhang (CVPR 2020), "Few Sample Knowledge Distillation for Efficient Network Compression" (FSKD;
LTH14/FSKD `vggprune_pruning.py` recover_one_layer, `models/vgg.py` add_pwconv / absorb_pwconv).

A 1x1 convolution Q_l (C x C, no bias, identity at start) is added to the student at the end of each block, before
its final ReLU, and estimated in closed form, block by block in depth order, so that the student's pre-activation
block output matches the teacher's on a few unlabeled samples; then Q_l is absorbed into the block's weights:

  alignment  for level l (earlier levels already aligned): with r = the output of the student's BN before the final
             ReLU (where Q_l acts) and o = the rest of the pre-activation sum (the residual shortcut, 0 for a plain
             net), so that stage_pre = Q_l r + o:
                 Q_l = argmin_Q sum_{n, h, w} ||Q r_nhw + o_nhw - t_nhw||^2 = (lstsq(R, T - O))^T
             over every position of every transfer sample (R, O, T: (rows, C), t = the teacher's pre-activation
             stage map, average-pooled to the student's size when larger). The code solves numpy lstsq on the rows;
             kdbench accumulates the normal equations R^T R, R^T (T - O) in float64 and solves them by lstsq (the same
             minimiser when R has full column rank).
  absorb     Q_l (BN(conv(x))) with BN in eval mode a * (conv(x) + c - mu) + b: the conv's weight becomes
             Q diag(a) W (its bias 0), the BN an identity with bias Q (a (c - mu) + b) (gamma 1, mean 0, var 1 - eps):
             exact in eval mode (the code's absorb_pwconv multiplies pw into the conv and is exact for its BN-free VGG).
The levels are the stages of equal width on both nets (paired in order); a student whose pre-activation stage output
is not `BN output + a shortcut` (MobileNetV2, ShuffleNets, MLPs: no such taps or BN) is refused. Where no conv feeds
that BN directly (WRN's pre-activation BNs) Q cannot be absorbed and stays applied by a forward hook on the BN (the
run's own checkpoint keeps it in the method's state; the student's weights alone then lack it).

Protocol. The paper compresses a teacher by pruning/decoupling and then runs FSKD on a few samples only. kdbench's
student is a separate architecture: the run first trains it on the (few-sample) transfer set with the configured
terms (default Hinton KD as RepDistiller runs it: ce 0.1, kd 0.9, T 4 -- kdbench's choice), then, after the last
training batch of the last epoch, aligns and absorbs (so the last epoch's evaluation and the checkpoint are the
aligned student). The transfer set: dataset.samples_per_class (N per class) or dataset.train_size (the code's
--num_sample first images; kdbench's seeded random subset). The alignment reads the training loader's batches
(augmented as the recipe says; the code uses un-augmented images). `align: false` skips the alignment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.distill import Method, register_method
from kdbench.methods.common import stage_pairs
from kdbench.train import epoch_seed

ALIGN_STREAM = 12


def solve_pointwise(rtr: torch.Tensor, rty: torch.Tensor) -> torch.Tensor:
    """The (C_out, C_in) 1x1 conv weight Q minimising ||R Q^T - Y||^2 from the normal equations R^T R, R^T Y."""
    return torch.linalg.lstsq(rtr, rty).solution.t()


def fskd_least_squares(r: torch.Tensor, o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Q for maps r, o, t of shape (N, C, H, W): argmin ||Q r + o - t||^2 summed over every sample and position."""
    rows = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
    target = (t - o).permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
    return solve_pointwise(rows.t() @ rows, rows.t() @ target)


def block_alignment_loss(r: torch.Tensor, o: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mean over samples, positions and channels of (Q r + o - t)^2 (the quantity the alignment minimises)."""
    return (F.conv2d(r, q[:, :, None, None]) + o - t).pow(2).mean()


def conv_feeding(model: nn.Module, bn: nn.BatchNorm2d) -> nn.Conv2d | None:
    """The Conv2d registered just before `bn` (its input in the CIFAR ResNet / VGG / ResNetV2 blocks), if it fits."""
    last = None
    for m in model.modules():
        if m is bn:
            return last if last is not None and last.out_channels == bn.num_features else None
        if isinstance(m, nn.Conv2d):
            last = m
    return None


@torch.no_grad()
def absorb_pointwise(conv: nn.Conv2d, bn: nn.BatchNorm2d, q: torch.Tensor) -> None:
    """Fold Q applied after BN(conv(x)) (BN in eval mode) into conv and bn, in place (see the module docstring)."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    c = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = a * (c - bn.running_mean) + bn.bias
    q = q.to(conv.weight)
    conv.weight.copy_(torch.einsum("oc,cikl->oikl", q * a.unsqueeze(0), conv.weight))
    if conv.bias is not None:
        conv.bias.zero_()
    bn.weight.fill_(1.0)
    bn.bias.copy_(q @ shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)


class _Scratch(dict):
    """The BN outputs the hooks capture during a forward (graph tensors: never copied with the method)."""

    def __deepcopy__(self, memo):
        return _Scratch()


@register_method("fskd")
class FSKD(Method):
    paper = "Li et al., Few Sample Knowledge Distillation for Efficient Network Compression, CVPR 2020"
    code = "no official code (the paper's block-level alignment)"
    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.align = bool(cfg.get("align", True))
        pairs = stage_pairs(pair, self.method_name, align="first", suffix="_pre")
        try:
            bns = list(pair.student.bn_before_relu())
        except NotImplementedError as err:
            raise pair.incompatible(self.method_name, f"it adds its 1x1 convs after the student's BN-before-ReLU "
                                                      f"layers: {err}") from None
        stages = list(pair.student.stage_names)
        levels = []
        for s, t in pairs:
            c_s, c_t = pair.student_shapes[s][0], pair.teacher_shapes[t][0]
            if c_s == c_t:
                levels.append((s, t, bns[stages.index(s[: -len("_pre")])]))
        if not levels:
            raise pair.incompatible(self.method_name, "no stage of the student has the width of the teacher's stage "
                                                      "it pairs with (its 1x1 convs are C x C)")
        self.levels = [(s, t) for s, t, _ in levels]
        self._bns = [bn for _, _, bn in levels]
        self._student = [pair.student]  # a list: not a submodule
        for i, (_, _, bn) in enumerate(levels):
            self.register_buffer(f"q{i}", torch.eye(bn.num_features))
        self.register_buffer("aligned", torch.tensor(False))
        self._captured = _Scratch()
        self._hooks = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self._bns)]
        self._check_additive(pair)
        self.student_taps = tuple(s for s, _ in self.levels)
        self.teacher_taps = ("logits", *(t for _, t in self.levels))
        self._loader, self._step = None, None
        self._epochs, self._seed = int(pair.epochs), int(pair.seed)  # the run's length and seed, for the alignment

    def q(self, i: int) -> torch.Tensor:
        return getattr(self, f"q{i}")

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self._captured[i] = output
            q = self.q(i)
            return F.conv2d(output, q.to(output.dtype)[:, :, None, None])
        return hook

    @torch.no_grad()
    def _check_additive(self, pair) -> None:
        """Refuse a student whose pre-activation stage output is not BN output + a term independent of Q."""
        model = pair.student
        was = model.training
        model.eval()
        self._absorbable = []
        seen: dict[str, torch.Tensor] = {}
        probes = []
        for i, bn in enumerate(self._bns):
            conv = conv_feeding(model, bn)
            if conv is not None:
                probes.append(conv.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(f"conv{i}", out)))
            probes.append(bn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"bn{i}", a[0])))
        try:
            x = torch.randn(2, *pair.input_shape, generator=torch.Generator().manual_seed(0))
            base = model.forward_taps(x, [s for s, _ in self.levels])
            for i in range(len(self._bns)):  # absorbable when the conv's output is exactly the BN's input
                self._absorbable.append(f"conv{i}" in seen and seen[f"conv{i}"].shape == seen[f"bn{i}"].shape
                                        and torch.equal(seen[f"conv{i}"], seen[f"bn{i}"]))
            for h in probes:
                h.remove()
            r = {i: self._captured[i] for i in range(len(self.levels))}
            for i, (s, _) in enumerate(self.levels):
                self.q(i).mul_(2.0)
                doubled = model.forward_taps(x, [s])[s]
                self.q(i).div_(2.0)
                if not torch.allclose(doubled - base[s], r[i], rtol=1e-4, atol=1e-4):
                    raise pair.incompatible(self.method_name, f"the student's {s} is not its BN-before-ReLU output "
                                                              f"plus a shortcut, so a 1x1 conv there cannot be "
                                                              f"fitted in closed form")
        finally:
            for h in probes:
                h.remove()
            model.train(was)
            self._captured.clear()

    def terms(self, batch, student, teacher):
        return {}  # the base class's ce and kd: the transfer-set training before the alignment

    # -- the alignment after the last epoch's last batch

    def batches(self, loader, seed):
        self._loader = loader
        yield from loader.epoch(seed)
        step = self._step
        if step is not None and self.align and step.epoch == self.epochs_total and not bool(self.aligned):
            self.align_and_absorb(loader, step)

    def train_step(self, batch, step):
        self._step = step
        return super().train_step(batch, step)

    @property
    def epochs_total(self) -> int:
        return self._epochs

    @torch.no_grad()
    def align_and_absorb(self, loader, step) -> list[float]:
        """Solve Q_l level by level over the transfer set, then absorb every Q_l; returns the alignment losses
        (mean squared residual) per level after solving."""
        student = self._student[0]
        was = student.training
        student.eval()
        residuals = []
        try:
            for i, (s, t) in enumerate(self.levels):
                self.q(i).copy_(torch.eye(self.q(i).shape[0], device=self.q(i).device))
                rtr = rty = None
                sq_sum, count = 0.0, 0
                batches = list(loader.epoch(epoch_seed(self._seed, self._epochs, ALIGN_STREAM)))
                for batch in batches:
                    out = step.forward(batch.inputs, (s,))
                    r = self._captured[i].float()
                    o = out[s].float() - r
                    t_map = step.teacher(batch)[t].float()
                    if t_map.shape[-2] > r.shape[-2]:
                        t_map = F.adaptive_avg_pool2d(t_map, r.shape[-2:])
                    rows = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
                    target = (t_map - o).permute(0, 2, 3, 1).reshape(-1, r.shape[1]).double()
                    rtr = rows.t() @ rows if rtr is None else rtr + rows.t() @ rows
                    rty = rows.t() @ target if rty is None else rty + rows.t() @ target
                q = solve_pointwise(rtr, rty)
                self.q(i).copy_(q.to(self.q(i)))
                for batch in batches:
                    out = step.forward(batch.inputs, (s,))
                    r = self._captured[i].float()
                    o = out[s].float() - F.conv2d(r, self.q(i)[:, :, None, None])
                    t_map = step.teacher(batch)[t].float()
                    if t_map.shape[-2] > r.shape[-2]:
                        t_map = F.adaptive_avg_pool2d(t_map, r.shape[-2:])
                    sq_sum += float(block_alignment_loss(r, o, t_map, self.q(i))) * len(batch)
                    count += len(batch)
                residuals.append(sq_sum / max(count, 1))
            for i, bn in enumerate(self._bns):
                conv = conv_feeding(student, bn)
                if conv is None or not self._absorbable[i]:
                    continue  # no conv feeds the BN directly (WRN's pre-activation BN): Q stays applied by its hook
                absorb_pointwise(conv, bn, self.q(i))
                self.q(i).copy_(torch.eye(self.q(i).shape[0], device=self.q(i).device))
            self.aligned.fill_(True)
        finally:
            student.train(was)
        self.residuals = residuals
        return residuals

    def record_fields(self):
        return {"evaluated_head": "student (1x1 convs absorbed after the alignment)",
                "fskd_levels": [s for s, _ in self.levels], "fskd_align": self.align}

