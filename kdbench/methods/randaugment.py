"""FixMatch-style RandAugment + Cutout on batches of image tensors, on their own device (no PIL, no per-sample loop).
Not a method (nothing registers here): MLKD builds its strong view with it.

What it reproduces: `RandAugment(2, 10)` of Jin-Ying/Multi-Level-Logit-Distillation (mdistiller/dataset/cifar100.py,
the same at 6327e733 and 77b91ec7; the FixMatch implementation it copies), applied to PIL uint8 images:
  - per image, n_ops = 2 operations drawn uniformly WITH replacement (random.choices) from the 14 below, each at a
    magnitude drawn uniformly from its range (the "10" of RandAugment(2, 10) is unused: "deprecated" in the code);
  - then Cutout: a square of side v * 32 px, v ~ U[0, 0.5), centred at (U[0, W), U[0, H)), top-left corner
    (int(max(0, cx - side/2)), int(max(0, cy - side/2))), drawn by PIL's inclusive rectangle up to int(corner + side)
    (clipped to the image), in the colour (125, 123, 114); nothing when v = 0.

  op            range            what (PIL semantics, on 0..255 integer images)
  AutoContrast  -                per channel: floor((x - lo) * 255 / (hi - lo)), identity when hi == lo
  Brightness    [0.05, 0.95]     trunc(v * x)                           (ImageEnhance: blend with black)
  Color         [0.05, 0.95]     trunc(L + v (x - L)), L = PIL grey (R 19595 + G 38470 + B 7471 + 2^15) >> 16
  Contrast      [0.05, 0.95]     trunc(m + v (x - m)), m = int(mean L + 0.5) over the image
  Equalize      -                PIL's per-channel histogram equalisation (lut = (step//2 + cumhist) // step)
  Identity      -
  Posterize     [4, 8]           keep the top max(1, int(v)) bits
  Rotate        [-30, 30] deg    counter-clockwise about (W/2, H/2), nearest, black fill
  Sharpness     [0.05, 0.95]     trunc(S + v (x - S)), S = PIL SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13, rounded;
                                 border pixels kept)
  ShearX/Y      [-0.3, 0.3]      input = (x + v y, y) / (x, y + v x) about the top-left corner, nearest, black fill
  Solarize      [0, 256]         x >= v -> 255 - x
  TranslateX/Y  [-0.3, 0.3]      input = output + v * W (or H) px, nearest, black fill
Every op works on integer-valued images and returns integer values, as PIL's uint8 pipeline does; the geometric ops
sample at pixel centres with PIL's affine convention (floor of the transformed centre). Checked against PIL in
tests/methods/test_mlkd.py (exact but for the odd float-rounding pixel of Rotate).

Differences from the reference: the draws come from a torch.Generator (not Python's `random`/NumPy), and the caller
decides which image the view starts from (MLKD: the weak view's crop and flip, see kdbench.methods.mlkd).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPS = ("auto_contrast", "brightness", "color", "contrast", "equalize", "identity", "posterize", "rotate", "sharpness",
       "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
RANGES = {"auto_contrast": (0.0, 1.0), "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
          "equalize": (0.0, 1.0), "identity": (0.0, 1.0), "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0),
          "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0.0, 256.0),
          "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}
CUTOUT_COLOR = (125.0, 123.0, 114.0)


@dataclass
class Plan:
    """The random draws of one batch: ops (n_ops, N) indices into OPS, magnitudes (n_ops, N) in each op's range,
    cutout (N,) fractions in [0, 0.5), centres (N, 2) as (x, y) in [0, W) x [0, H)."""

    ops: torch.Tensor
    magnitudes: torch.Tensor
    cutout: torch.Tensor
    centres: torch.Tensor


def draw_plan(n: int, height: int, width: int, generator: torch.Generator, n_ops: int = 2, cutout_max: float = 0.5,
              device=None) -> Plan:
    device = generator.device if device is None else device
    ops = torch.randint(len(OPS), (n_ops, n), generator=generator, device=device)
    u = torch.rand(n_ops, n, generator=generator, device=device, dtype=torch.float64)
    lo = torch.tensor([RANGES[o][0] for o in OPS], device=device, dtype=torch.float64)[ops]
    hi = torch.tensor([RANGES[o][1] for o in OPS], device=device, dtype=torch.float64)[ops]
    cutout = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * cutout_max
    size = torch.tensor([width, height], device=device, dtype=torch.float64)
    centres = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64) * size
    return Plan(ops, lo + (hi - lo) * u, cutout, centres)


# ----------------------------------------------------------------------------- the ops, on (N, 3, H, W) 0..255 floats


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, v) on uint8: truncate, clip to 0..255."""
    return torch.trunc(degenerate + _per_sample(v, x) * (x - degenerate)).clamp(0, 255)


def grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L'): (R 19595 + G 38470 + B 7471 + 32768) >> 16, as (N, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def auto_contrast(x, v=None):
    x64 = x.double()
    lo, hi = x64.amin(dim=(2, 3), keepdim=True), x64.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    out = torch.floor(x64 * scale + (-lo * scale)).clamp(0, 255)
    return torch.where(hi > lo, out, x64).to(x.dtype)


def brightness(x, v):
    return _blend(torch.zeros_like(x), x, v)


def color(x, v):
    return _blend(grey(x).expand_as(x), x, v)


def contrast(x, v):
    mean = torch.floor(grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, v)


def equalize(x, v=None):
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    # histograms by sorting (deterministic on every device, unlike an atomic scatter-add): below[:, k] = #pixels < k
    edges = torch.arange(257, device=x.device).expand(n * c, 257).contiguous()
    below = torch.searchsorted(torch.sort(flat, dim=1).values, edges)
    hist, cum = below[:, 1:] - below[:, :-1], below[:, :-1]  # per-bin counts; pixels in the bins below
    last = 255 - torch.flip(hist > 0, dims=[1]).long().argmax(1)  # the last non-empty bin
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    safe = step.clamp_min(1)[:, None]
    lut = ((safe // 2 + cum) // safe).clamp(max=255)
    out = lut.gather(1, flat).to(x.dtype)
    keep = (step == 0)[:, None]  # one non-empty bin, or too few pixels outside the last: identity (PIL)
    return torch.where(keep, flat.to(x.dtype), out).reshape(n, c, h, w)


def identity(x, v=None):
    return x


def posterize(x, v):
    bits = torch.clamp(torch.trunc(v), min=1)
    q = _per_sample(torch.pow(2.0, 8 - bits), x)
    return torch.floor(x / q) * q


def smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded, border pixels unchanged."""
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(x.shape[1], 1, 3, 3)
    inner = torch.floor(F.conv2d(x, kernel, groups=x.shape[1]) + 0.5).clamp(0, 255)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def sharpness(x, v):
    return _blend(smooth(x), x, v)


def solarize(x, v):
    return torch.where(x >= _per_sample(v, x), 255 - x, x)


def affine(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST) per sample: output pixel (i, j) takes the input pixel
    (floor(a (j+.5) + b (i+.5) + c), floor(d (j+.5) + e (i+.5) + f)) (column, row), black outside."""
    n, c, h, w = x.shape
    coeffs = coeffs.double()
    cols = torch.arange(w, device=x.device, dtype=torch.float64) + 0.5
    rows = torch.arange(h, device=x.device, dtype=torch.float64) + 0.5
    a, b, cc, d, e, f = (coeffs[:, k].view(n, 1, 1) for k in range(6))
    xin = torch.floor(a * cols.view(1, 1, w) + b * rows.view(1, h, 1) + cc).long()  # (n, h, w)
    yin = torch.floor(d * cols.view(1, 1, w) + e * rows.view(1, h, 1) + f).long()
    valid = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    idx = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)
    return torch.where(valid[:, None], out, torch.zeros_like(out))


def _coeffs(v: torch.Tensor, kind: str, h: int, w: int) -> torch.Tensor:
    v = v.double()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if kind == "rotate":  # PIL Image.rotate(angle): matrix of -angle about the centre (w/2, h/2)
        t = -v * math.pi / 180.0
        cos, sin = torch.cos(t), torch.sin(t)
        cx, cy = w / 2.0, h / 2.0
        return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)
    if kind == "shear_x":
        return torch.stack([one, v, zero, zero, one, zero], 1)
    if kind == "shear_y":
        return torch.stack([one, zero, zero, v, one, zero], 1)
    if kind == "translate_x":
        return torch.stack([one, zero, v * w, zero, one, zero], 1)
    return torch.stack([one, zero, zero, zero, one, v * h], 1)  # translate_y


def _geometric(kind):
    def op(x, v):
        return affine(x, _coeffs(v, kind, x.shape[2], x.shape[3]))
    op.__name__ = kind
    return op


OP_FUNCTIONS = {"auto_contrast": auto_contrast, "brightness": brightness, "color": color, "contrast": contrast,
                "equalize": equalize, "identity": identity, "posterize": posterize, "rotate": _geometric("rotate"),
                "sharpness": sharpness, "shear_x": _geometric("shear_x"), "shear_y": _geometric("shear_y"),
                "solarize": solarize, "translate_x": _geometric("translate_x"),
                "translate_y": _geometric("translate_y")}


def cutout(x: torch.Tensor, fraction: torch.Tensor, centres: torch.Tensor,
           color: tuple[float, float, float] = CUTOUT_COLOR) -> torch.Tensor:
    """FixMatch's Cutout(v) per sample: side = v * W, corner int(max(0, c - side/2)), inclusive to int(corner + side)
    clipped to the image, filled with `color`; v = 0 leaves the image alone."""
    n, c, h, w = x.shape
    side = fraction.double() * w
    x0 = torch.floor(torch.clamp(centres[:, 0].double() - side / 2, min=0))
    y0 = torch.floor(torch.clamp(centres[:, 1].double() - side / 2, min=0))
    x1 = torch.floor(torch.clamp(x0 + side, max=w))
    y1 = torch.floor(torch.clamp(y0 + side, max=h))
    cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    inside = ((cols >= x0.view(n, 1, 1)) & (cols <= x1.view(n, 1, 1)) & (rows >= y0.view(n, 1, 1))
              & (rows <= y1.view(n, 1, 1)) & (fraction > 0).view(n, 1, 1))
    fill = torch.tensor(color, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return torch.where(inside[:, None], fill, x)


def apply_plan(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """RandAugment(plan.ops, plan.magnitudes) then Cutout on (N, 3, H, W) integer-valued 0..255 images. Every op is
    computed for the whole batch and each image keeps its own (no per-op host sync)."""
    for ops, magnitudes in zip(plan.ops, plan.magnitudes):
        out = x
        for k, name in enumerate(OPS):
            if name == "identity":
                continue
            out = torch.where((ops == k).view(-1, 1, 1, 1), OP_FUNCTIONS[name](x, magnitudes), out)
        x = out
    return cutout(x, plan.cutout, plan.centres)


def strong_view(inputs: torch.Tensor, mean, std, generator: torch.Generator, n_ops: int = 2,
                cutout_max: float = 0.5) -> torch.Tensor:
    """A strongly augmented copy of normalised `inputs`: de-normalise to [0, 1] (x * std + mean), round to the 0..255
    grid the reference's PIL images live on, RandAugment + Cutout with draws from `generator`, back to [0, 1] and
    re-normalise. No gradient flows through it (an input transform); autocast is off inside."""
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):  # exact integer ops, never in bf16
        m = torch.tensor(mean, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=inputs.dtype, device=inputs.device).view(1, -1, 1, 1)
        x = torch.round((inputs.float() * s.float() + m.float()).clamp(0, 1) * 255)
        plan = draw_plan(x.shape[0], x.shape[2], x.shape[3], generator, n_ops, cutout_max, device=x.device)
        x = apply_plan(x, plan) / 255.0
        return ((x - m.float()) / s.float()).to(inputs.dtype)
