"""mlkd (multi-level logit distillation): its terms against NumPy re-computations of the reference's KD_ours, its
strong view against PIL (the library the reference augments with), its two-view forward, and end-to-end runs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdbench.distill import create_method
from kdbench.errors import IncompatibleModels
from kdbench.methods import randaugment as ra
from kdbench.methods.mlkd import (STRONG, batch_correlation_loss, class_correlation_loss, confidence_masks,
                                  kd_per_sample, mlkd_terms)
from kdbench.models import count_parameters
from kdbench.teachers import TeacherOutputs
from tests.conftest import TINY_SYNTHETIC, make_batch, make_pair
from tests.helpers import close, method_options, rand64

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


# ----------------------------------------------------------------------------- NumPy references (the code's formulas)


def np_probs(z, T):
    e = np.exp(z / T - (z / T).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_kd_rows(zs, zt, T):
    """Per sample T^2 * sum_c pt (log pt - log ps), one row at a time."""
    out = []
    for i in range(zs.shape[0]):
        ps, pt = np_probs(zs[i:i + 1], T)[0], np_probs(zt[i:i + 1], T)[0]
        out.append(T * T * sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(len(pt))))
    return np.array(out)


def np_gram_loss(zs, zt, T, axis, column_mask=None):
    """Sum over entries of (G_t - G_s)^2 with G[i, j] = sum_k P[k, i] P[k, j] (classes, axis 0) or
    sum_k P[i, k] P[j, k] (samples, axis 1), by explicit loops; divided by C resp. B."""
    ps, pt = np_probs(zs, T), np_probs(zt, T)
    if axis == 0:
        ps, pt = ps.T, pt.T  # rows are classes now
    n, k = ps.shape
    total = 0.0
    for i in range(n):
        for j in range(n):
            if column_mask is not None and not column_mask[j]:
                continue
            gs = sum(ps[i, m] * ps[j, m] for m in range(k))
            gt = sum(pt[i, m] * pt[j, m] for m in range(k))
            total += (gt - gs) ** 2
    return total / n


def np_masks(zt):
    p = np_probs(zt, 1.0)
    conf, class_conf = p.max(1), p.sum(0)
    return conf <= np.percentile(conf, 50), class_conf <= np.percentile(class_conf, 50)


def np_standardize(z):
    return (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))


def np_mlkd(sw, ss, tw, ts, y, temps=TEMPS, mask_mode="scale", copy_paste=True, ls=False):
    """The terms of KD_ours.forward_train (each kd/cc/bc sum before KD_WEIGHT), recomputed term by term."""
    mask, cmask = np_masks(tw)
    frac, cfrac = mask.mean(), cmask.mean()
    z = np_standardize if ls else (lambda v: v)
    out = dict(kd_weak=0.0, kd_strong=0.0, cc_weak=0.0, bc_weak=0.0, cc_strong=0.0, bc_strong=0.0)
    for level, T in enumerate(temps):
        src = (sw, tw) if copy_paste and level >= 3 else (ss, ts)
        kd_w = np_kd_rows(z(sw), z(tw), T)
        out["kd_strong"] += np_kd_rows(z(src[0]), z(src[1]), T).mean()
        out["cc_strong"] += np_gram_loss(*src, T, 0)
        if mask_mode == "scale":
            out["kd_weak"] += kd_w.mean() * frac
            out["cc_weak"] += np_gram_loss(sw, tw, T, 0) * cfrac
            out["bc_weak"] += np_gram_loss(sw, tw, T, 1) * frac
            out["bc_strong"] += np_gram_loss(ss, ts, T, 1) * frac
        else:
            out["kd_weak"] += kd_w[mask].sum() / len(kd_w)
            out["cc_weak"] += np_gram_loss(sw, tw, T, 0, cmask)
            out["bc_weak"] += np_gram_loss(sw, tw, T, 1, mask)
            out["bc_strong"] += np_gram_loss(ss, ts, T, 1, mask)
    e = np.exp(ss - ss.max(1, keepdims=True))
    out["ce_strong"] = float(np.mean([-math.log(e[i, y[i]] / e[i].sum()) for i in range(len(y))]))
    return out


def logits(seed, n=6, c=5, scale=3.0):
    return rand64(n, c, seed=seed, scale=scale)


def four_views(seed=0, n=6, c=5):
    return [logits(seed + k, n, c) for k in range(4)]  # student weak, student strong, teacher weak, teacher strong


# ----------------------------------------------------------------------------- the plain loss functions


def test_kd_per_sample_is_t_squared_kl_per_row():
    zs, zt = logits(1), logits(2)
    got = kd_per_sample(zs, zt, 3.0)
    for i, want in enumerate(np_kd_rows(zs.numpy(), zt.numpy(), 3.0)):
        close(got[i], want)


@pytest.mark.parametrize("masked", [False, True])
def test_class_and_batch_correlation_losses_match_explicit_gram_loops(masked):
    zs, zt = logits(3), logits(4)
    cmask = np.array([True, False, True, True, False]) if masked else None
    smask = np.array([True, True, False, True, False, False]) if masked else None
    tm = (lambda m: None if m is None else torch.tensor(m))
    close(class_correlation_loss(zs, zt, 2.0, tm(cmask)), np_gram_loss(zs.numpy(), zt.numpy(), 2.0, 0, cmask))
    close(batch_correlation_loss(zs, zt, 2.0, tm(smask)), np_gram_loss(zs.numpy(), zt.numpy(), 2.0, 1, smask))


def test_confidence_masks_select_the_low_confidence_half_and_the_low_mass_classes():
    zt = logits(5, n=7, c=6)
    mask, cmask = confidence_masks(zt)
    want_mask, want_cmask = np_masks(zt.numpy())
    assert mask.tolist() == want_mask.tolist() and cmask.tolist() == want_cmask.tolist()
    assert mask.sum() == 4  # 7 samples: the median sample and the three below it
    p = np_probs(zt.numpy(), 1.0)
    assert p.max(1)[mask.numpy()].max() <= p.max(1)[~mask.numpy()].min()


def test_masks_by_hand_on_a_batch_of_two():
    zt = torch.tensor([[4.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # confidences 0.982, 0.731
    mask, cmask = confidence_masks(zt)
    assert mask.tolist() == [False, True]  # median 0.8566: only the less confident sample
    # class sums 0.982 + 0.731 = 1.713 and 0.018 + 0.269 = 0.287: median 1.0, the second class
    assert cmask.tolist() == [False, True]


@pytest.mark.parametrize("mask_mode, copy_paste, ls", [("scale", True, False), ("select", False, False),
                                                       ("scale", False, True), ("select", True, True)])
def test_mlkd_terms_match_the_reference_formulas(mask_mode, copy_paste, ls):
    sw, ss, tw, ts = four_views(10)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    got = mlkd_terms(sw, ss, tw, ts, y, TEMPS, mask_mode, copy_paste, ls)
    want = np_mlkd(*(v.numpy() for v in (sw, ss, tw, ts)), y.numpy(), TEMPS, mask_mode, copy_paste, ls)
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k])


def test_the_code_default_puts_the_weak_logits_into_the_strong_sums_at_t2_and_t6():
    sw, ss, tw, ts = four_views(20)
    y = torch.zeros(6, dtype=torch.long)
    code = mlkd_terms(sw, ss, tw, ts, y)
    strong_only = sum(kd_per_sample(ss, ts, T).mean() for T in TEMPS[:3])
    weak_low = sum(kd_per_sample(sw, tw, T).mean() for T in TEMPS[3:])
    close(code["kd_strong"], float(strong_only + weak_low))
    paper = mlkd_terms(sw, ss, tw, ts, y, strong_copy_paste=False)
    close(paper["kd_strong"], float(sum(kd_per_sample(ss, ts, T).mean() for T in TEMPS)))


def test_scale_mode_multiplies_the_batch_mean_by_the_selected_fraction():
    """KD_ours reduces each kd term to a scalar before (loss * mask).mean(): half the batch selected = half the loss."""
    sw, ss, tw, ts = four_views(30)
    y = torch.zeros(6, dtype=torch.long)
    got = mlkd_terms(sw, ss, tw, ts, y, temperatures=(4.0,))
    close(got["kd_weak"], 0.5 * float(kd_per_sample(sw, tw, 4.0).mean()))  # 6 samples, 3 at or below the median


def test_logit_standardization_changes_only_the_kd_terms():
    sw, ss, tw, ts = four_views(40)
    y = torch.zeros(6, dtype=torch.long)
    raw, ls = mlkd_terms(sw, ss, tw, ts, y), mlkd_terms(sw, ss, tw, ts, y, logit_standardization=True)
    for k in ("cc_weak", "bc_weak", "cc_strong", "bc_strong", "ce_strong"):
        close(ls[k], float(raw[k]))
    assert abs(float(ls["kd_weak"]) - float(raw["kd_weak"])) > 1e-3
    # Z makes the kd terms blind to an affine change of the student's logits
    shifted = mlkd_terms(2.5 * sw + 1.0, 2.5 * ss - 3.0, tw, ts, y, logit_standardization=True)
    close(shifted["kd_weak"], float(ls["kd_weak"]))
    close(shifted["kd_strong"], float(ls["kd_strong"]))


def test_no_gradient_reaches_either_teacher_view():
    sw, ss = (v.clone().requires_grad_() for v in four_views(50)[:2])
    tw, ts = (v.clone().requires_grad_() for v in four_views(50)[2:])
    terms = mlkd_terms(sw, ss, tw, ts, torch.zeros(6, dtype=torch.long), mask_mode="select")
    sum(terms.values()).backward()
    assert tw.grad is None and ts.grad is None
    assert sw.grad.abs().sum() > 0 and ss.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the strong view against PIL


def pil_op(name, im, v):
    """The reference's ops (mdistiller/dataset/cifar100.py at 6327e733), called on PIL images."""
    if name == "auto_contrast":
        return ImageOps.autocontrast(im)
    if name == "brightness":
        return ImageEnhance.Brightness(im).enhance(v)
    if name == "color":
        return ImageEnhance.Color(im).enhance(v)
    if name == "contrast":
        return ImageEnhance.Contrast(im).enhance(v)
    if name == "equalize":
        return ImageOps.equalize(im)
    if name == "identity":
        return im
    if name == "posterize":
        return ImageOps.posterize(im, max(1, int(v)))
    if name == "rotate":
        return im.rotate(v)
    if name == "sharpness":
        return ImageEnhance.Sharpness(im).enhance(v)
    if name == "shear_x":
        return im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0))
    if name == "shear_y":
        return im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0))
    if name == "solarize":
        return ImageOps.solarize(im, v)
    if name == "translate_x":
        return im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0))
    assert name == "translate_y"
    return im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1]))


def pil_cutout(im, v, cx, cy):
    """FixMatch's Cutout(img, v) with the centre given: side v * width, PIL rectangle in (125, 123, 114)."""
    if v <= 0:
        return im
    side = v * im.size[0]
    w, h = im.size
    x0, y0 = int(max(0, cx - side / 2.0)), int(max(0, cy - side / 2.0))
    im = im.copy()
    ImageDraw.Draw(im).rectangle((x0, y0, min(w, x0 + side), min(h, y0 + side)), (125, 123, 114))
    return im


def images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    a[0] = 9  # a flat image: autocontrast / equalize leave it alone
    a[1, :, :, 0] = rng.integers(100, 103, (32, 32))  # a channel with 3 levels
    a[2, :16] = 0  # a half-black image
    return a


def to_tensor(a):
    return torch.tensor(a).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("name", ra.OPS)
def test_each_tensor_op_matches_pil_on_uint8_images(name):
    a = images()
    lo, hi = ra.RANGES[name]
    v = torch.tensor(np.random.default_rng(1).uniform(lo, hi, len(a)), dtype=torch.float64)
    ours = ra.OP_FUNCTIONS[name](to_tensor(a), v).permute(0, 2, 3, 1).numpy()
    ref = np.stack([np.asarray(pil_op(name, Image.fromarray(a[i]), float(v[i]))) for i in range(len(a))])
    off = (ours != ref).any(-1)
    if name == "rotate":  # PIL's fixed-point coordinates round a handful of border pixels the other way
        assert off.sum() <= 0.001 * off.size
    else:
        assert not off.any(), f"{name}: {int(off.sum())} pixels differ from PIL"


def test_cutout_matches_pils_inclusive_rectangle():
    a = images(6)
    frac = torch.tensor([0.0, 0.01, 0.2, 0.31, 0.5, 0.45], dtype=torch.float64)
    centres = torch.tensor([[3.2, 4.9], [0.1, 0.2], [30.7, 28.1], [16.0, 16.0], [5.5, 31.9], [12.3, 7.7]],
                           dtype=torch.float64)
    ours = ra.cutout(to_tensor(a), frac, centres).permute(0, 2, 3, 1).numpy()
    for i in range(len(a)):
        ref = np.asarray(pil_cutout(Image.fromarray(a[i]), float(frac[i]), float(centres[i, 0]), float(centres[i, 1])))
        assert (ours[i] == ref).all(), i


def test_strong_view_is_two_random_ops_then_cutout_as_pil_applies_them():
    a = images(16, seed=3)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    inputs = (to_tensor(a) / 255 - m) / s
    out = ra.strong_view(inputs, mean, std, torch.Generator().manual_seed(7))
    got = torch.round((out * s + m) * 255).permute(0, 2, 3, 1).numpy()
    plan = ra.draw_plan(16, 32, 32, torch.Generator().manual_seed(7))  # the same draws
    for i in range(16):
        im = Image.fromarray(a[i])
        for r in range(2):
            im = pil_op(ra.OPS[int(plan.ops[r, i])], im, float(plan.magnitudes[r, i]))
        im = pil_cutout(im, float(plan.cutout[i]), float(plan.centres[i, 0]), float(plan.centres[i, 1]))
        off = (got[i] != np.asarray(im)).any(-1)
        assert off.sum() <= 3, (i, [ra.OPS[int(plan.ops[r, i])] for r in range(2)], int(off.sum()))


def test_plan_draws_ops_uniformly_with_magnitudes_in_their_ranges():
    n = 14_000
    plan = ra.draw_plan(n, 32, 32, torch.Generator().manual_seed(0))
    counts = torch.bincount(plan.ops.flatten(), minlength=len(ra.OPS))
    assert ((counts - 2 * n / 14).abs() < 0.1 * 2 * n / 14).all()
    for k, name in enumerate(ra.OPS):
        v = plan.magnitudes[plan.ops == k]
        lo, hi = ra.RANGES[name]
        assert v.min() >= lo and v.max() <= hi and (v.max() - v.min()) > 0.9 * (hi - lo)
    assert plan.cutout.min() >= 0 and plan.cutout.max() < 0.5 and plan.cutout.max() > 0.49
    assert (plan.centres >= 0).all() and (plan.centres < 32).all()


def test_strong_view_ignores_autocast_and_stays_on_the_uint8_grid():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.randn(8, 3, 32, 32)
    plain = ra.strong_view(x, mean, std, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ra.strong_view(x, mean, std, torch.Generator().manual_seed(1))
    assert plain.dtype == torch.float32 and torch.equal(plain, mixed)
    raw = plain * 0.25 + 0.5
    assert torch.allclose(raw * 255, torch.round(raw * 255), atol=1e-3) and raw.min() >= 0 and raw.max() <= 1


# ----------------------------------------------------------------------------- the method


def build(teacher="resnet14", student="resnet8", seed=0, **options):
    pair = make_pair(teacher, student, 10, (3, 16, 16), 40)
    pair.seed = seed
    return create_method(method_options("mlkd", **options), pair), pair


def test_strong_view_replays_per_run_seed_and_epoch():
    x = make_batch(4, 10).inputs
    m1, _ = build(seed=3)
    m2, _ = build(seed=3)
    first = m1.strong_inputs(x, 1)
    assert torch.equal(first, m2.strong_inputs(x, 1))  # same seed, same epoch: the same draws
    assert not torch.equal(first, m1.strong_inputs(x, 1))  # the generator moves on within the epoch
    assert not torch.equal(first, m2.strong_inputs(x, 2))  # a new epoch reseeds
    m3, _ = build(seed=3)
    m3.strong_inputs(x, 5)
    assert torch.equal(m3.strong_inputs(x, 1), first)  # back to epoch 1: replayed from its seed
    m4, _ = build(seed=4)
    assert not torch.equal(first, m4.strong_inputs(x, 1))


def test_forward_loss_runs_student_and_teacher_on_both_views(probe_calls):
    method, pair = build("probe_net", "probe_net")
    pair.student.tag, pair.teacher.tag = "student", "teacher"
    pair.student.train()
    batch = make_batch(6, 10)
    outputs = TeacherOutputs(pair.teacher, method.teacher_taps, train_mode=False)
    outputs.start_epoch()
    probe_calls.clear()  # building the pair probed both nets
    seen = {}

    def loss(b, s, t, epoch):
        seen.update(s=s, t=t, epoch=epoch)
        return torch.zeros(()), {}

    method.loss = loss
    step = SimpleNamespace(forward=pair.student.forward_taps, teacher=outputs, epoch=3)
    method.forward_loss(batch, step)
    assert [(c[0], c[1], c[2]) for c in probe_calls] == [("student", True, True), ("student", True, True),
                                                         ("teacher", False, False), ("teacher", False, False)]
    assert seen["epoch"] == 3 and {"logits", STRONG} <= set(seen["s"]) and {"logits", STRONG} <= set(seen["t"])
    strong = build("probe_net", "probe_net")[0].strong_inputs(batch.inputs, 3)  # the same seed and epoch
    pair.teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(seen["t"][STRONG], pair.teacher(strong))
        torch.testing.assert_close(seen["t"]["logits"], pair.teacher(batch.inputs))


def test_a_cached_teacher_serves_only_the_weak_view():
    method, pair = build()
    batch = make_batch(4, 10)
    outputs = TeacherOutputs(pair.teacher, method.teacher_taps, train_mode=False)
    outputs.cache = {"logits": torch.full((40, 10), 7.0)}  # a stand-in cache, by dataset index
    outputs.start_epoch()
    seen = {}
    method.loss = lambda b, s, t, epoch: (seen.update(t=t), (torch.zeros(()), {}))[1]
    method.forward_loss(batch, SimpleNamespace(forward=pair.student.forward_taps, teacher=outputs, epoch=1))
    assert (seen["t"]["logits"] == 7.0).all()
    strong = build()[0].strong_inputs(batch.inputs, 1)
    pair.teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(seen["t"][STRONG], pair.teacher(strong))


def test_the_method_adds_no_parameters_and_weights_are_the_codes(benchmark_pair):
    method = create_method(method_options("mlkd"), benchmark_pair)
    assert count_parameters(method) == 0
    assert method.temperatures == TEMPS
    w = method.term_weights(1)
    assert w == {"ce": 0.1, "ce_strong": 0.1, "kd_weak": 0.9, "kd_strong": 0.9, "cc_weak": 0.9, "bc_weak": 0.9,
                 "cc_strong": 0.0, "bc_strong": 0.0} == method.term_weights(480)


def test_total_is_the_reference_sum_of_kd_ours_losses():
    """0.1 (CE_weak + CE_strong) + 0.9 (kd_weak + kd_strong + cc_weak + bc_weak), the strong cc/bc left out."""
    method, pair = build()
    sw, ss, tw, ts = (v.float() for v in four_views(60, n=8, c=10))
    batch = make_batch(8, 10)
    total, terms = method.loss(batch, {"logits": sw, STRONG: ss}, {"logits": tw, STRONG: ts}, 1)
    want = np_mlkd(*(v.double().numpy() for v in (sw, ss, tw, ts)), batch.targets.numpy())
    e = np.exp(sw.double().numpy())
    ce = np.mean([-math.log(e[i, batch.targets[i]] / e[i].sum()) for i in range(8)])
    ref = 0.1 * (ce + want["ce_strong"]) + 0.9 * (want["kd_weak"] + want["kd_strong"] + want["cc_weak"]
                                                  + want["bc_weak"])
    close(total, ref, 1e-5)  # float32 logits


def test_mlkd_refuses_images_that_are_not_rgb_and_runs_without_a_teacher_nowhere():
    pair = make_pair("mlp_1200x2", "mlp_32", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(IncompatibleModels, match="method 'mlkd' cannot distill mlp_1200x2 -> mlp_32: .*3-channel"):
        create_method(method_options("mlkd"), pair)
    with pytest.raises(IncompatibleModels, match="needs a teacher"):
        create_method(method_options("mlkd"), make_pair(None, "resnet8", 10, (3, 16, 16)))


def test_unknown_mask_mode_is_refused():
    with pytest.raises(ValueError, match="mask_mode"):
        build(mask_mode="median")


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["resnet8x4", "ShuffleV2"])
def test_mlkd_job_trains_resnet32x4_students_on_synthetic_cifar(run_job, random_teacher_checkpoint, student):
    record = run_job(*TINY_SYNTHETIC, "teacher=resnet32x4", f"student={student}", "method=mlkd",
                     f"teacher.checkpoint={random_teacher_checkpoint}")
    assert record["status"] == "completed" and len(record["history"]) == 1 and record["method"] == "mlkd"
    assert set(record["history"][0]["train"]) == {"loss", *method_options("mlkd").weights}
    assert record["extra_params"] == 0 and 0 <= record["last_top1"] <= 100


def test_both_views_cross_entropies_are_the_task_terms():
    method, _ = build()
    terms = {k: torch.tensor(1.0) for k in method.term_weights(1)}
    close(method.task_loss(terms, 1), 0.2)  # 0.1 CE + 0.1 CE_strong
