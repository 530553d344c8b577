"""Jin, Peng, Wu, Liu, Liu, Liang, Yan & Hu (ICCV 2019), "Knowledge Distillation via Route Constrained Optimization"
(RCO). No official code; the equal-epoch-interval (EEI) strategy of the paper, as KD_Lib's RCO re-implements it.

Instead of the converged teacher only, the student follows anchor points on the teacher's training route: the
teacher's weights kept every K epochs of its own training (the store keeps them when the teacher job runs with
`trainer.keep_every=K`, e.g. `teacher.recipe.trainer.keep_every=60`; they land in the store entry's anchors/ and
meta.json) and, last, the converged teacher. The student's epochs are split equally over the anchors in order
(EEI): with A anchors and E epochs, epochs (a-1)*E/A + 1 .. a*E/A learn from anchor a. Each epoch's loss is
Hinton's KD against the current anchor's logits:
  total = ce * CE(z_s, y) + kd * T^2 KL(softmax(z_anchor / T) || softmax(z_s / T))   (T 4; ce 0.1, kd 0.9)
The loss weights and T are kdbench's choice (the paper's classification runs use KD; their weights are not released).
The anchors' logits come from a live forward of the anchor's weights loaded into a copy of the teacher (eval mode,
no gradient; one anchor on the device at a time); the final anchor is the run's own teacher (cached when exact).
Anchors can also be named explicitly (`anchors: [file, ...]`, weights files, earliest first). A teacher with no
anchors (a checkpoint file, or a store entry trained without keep_every) is refused (IncompatibleModels) unless
`require_anchors: false`, which then distils from the converged teacher alone (plain KD).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from kdbench.distill import Method, register_method
from kdbench.io import load_torch, sha256_file
from kdbench.losses import kd_loss


def anchor_for_epoch(epoch: int, epochs: int, anchors: int) -> int:
    """0-based index of the anchor that teaches 1-indexed `epoch` when `epochs` are split equally over `anchors`."""
    return min((epoch - 1) * anchors // max(epochs, 1), anchors - 1)


def rco_kd_loss(z_s: torch.Tensor, z_anchor: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD against an anchor's logits: T^2 batchmean KL(softmax(z_a / T) || softmax(z_s / T))."""
    return kd_loss(z_s, z_anchor.detach(), temperature)


class _Holder:
    """Keeps an anchor network out of the Method's modules (not a parameter, not in the checkpoint)."""

    def __init__(self):
        self.index, self.model = None, None


@register_method("rco")
class RCO(Method):
    paper = "Jin et al., Knowledge Distillation via Route Constrained Optimization, ICCV 2019"
    code = "no official code (the paper's equal-epoch-interval strategy)"
    teacher_taps = ("logits",)

    def __init__(self, cfg, pair):
        super().__init__(cfg, pair)
        if pair.teacher is None:
            raise pair.incompatible(self.method_name, "it needs a teacher")
        self.epochs = int(pair.epochs)
        listed = [str(p) for p in (cfg.get("anchors") or [])]
        stored = getattr(pair.teacher, "kdbench_anchors", None)  # set by the store when it loads a teacher
        self.anchor_files: list[tuple[str, str | None]] = [(p, None) for p in listed] if listed else \
            [(path, digest) for _, path, digest in (stored or [])]
        self.anchor_epochs = [] if listed else [int(e) for e, _, _ in (stored or [])]
        self.require_anchors = bool(cfg.get("require_anchors", True))
        known = listed or stored is not None  # a teacher built by check_pair (no store yet) has no attribute
        if known and not self.anchor_files and self.require_anchors:
            raise pair.incompatible(self.method_name, "the teacher has no anchors (weights kept during its "
                                                      "training): train the stored teacher with "
                                                      "teacher.recipe.trainer.keep_every=<K>, name them in "
                                                      "method.anchors, or set method.require_anchors=false")
        self.num_anchors = len(self.anchor_files) + 1  # the converged teacher is the last anchor
        if self.num_anchors > self.epochs:
            raise pair.incompatible(self.method_name, f"{self.num_anchors} anchors need at least as many epochs, "
                                                      f"the run has {self.epochs}")
        self._template = _Holder()
        self._template.model = pair.teacher
        self._current = _Holder()

    def anchor_index(self, epoch: int) -> int:
        return anchor_for_epoch(epoch, self.epochs, self.num_anchors)

    def _anchor_model(self, index: int, device):
        if self._current.index != index:
            path, digest = self.anchor_files[index]
            if digest is not None and sha256_file(Path(path)) != digest:
                raise RuntimeError(f"rco: anchor {path} does not match its recorded sha256")
            state = load_torch(Path(path), "rco anchor")
            model = copy.deepcopy(self._template.model)
            model.load_state_dict(state["model"] if "model" in state else state)
            self._current.model = model.to(device).eval().requires_grad_(False)
            self._current.index = index
        return self._current.model

    def anchor_logits(self, inputs: torch.Tensor, epoch: int):
        """The current anchor's logits for `epoch`, or None when the converged teacher teaches."""
        index = self.anchor_index(epoch)
        if index >= len(self.anchor_files):
            return None
        with torch.no_grad():
            return self._anchor_model(index, inputs.device)(inputs)

    def forward_loss(self, batch, step):
        student = step.forward(batch.inputs, self.student_taps)
        z_anchor = self.anchor_logits(batch.inputs, step.epoch)
        teacher = {"logits": z_anchor} if z_anchor is not None else step.teacher(batch)
        return self.loss(batch, student, teacher, step.epoch)

    def terms(self, batch, student, teacher):
        return {"kd": rco_kd_loss(student["logits"], teacher["logits"], self.kd_temperature)}

    def record_fields(self):
        return {"evaluated_head": "student", "rco_anchors": [*self.anchor_epochs, "final"] if self.anchor_epochs
                else [*(p for p, _ in self.anchor_files), "final"],
                "rco_epochs_per_anchor": self.epochs / self.num_anchors}
