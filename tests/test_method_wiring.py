"""Wiring of the method plugins: the layer between a correct loss function and the number a run publishes.

The loss functions themselves are checked against NumPy elsewhere (test_methods_seed/benchmark/online, test_kd_loss).
Here, for every conf/method/*.yaml (discovered from the directory, so a new config without an entry in the tables
below fails `test_every_method_config_has_an_entry_in_every_wiring_table`):

1. the published total is the weighted sum of the logged terms, with the weights read from the composed config (not
   from the method object), warm-ups recomputed here as min(epoch / 20, 1) on exactly the warmed-up terms, and
   weight-0 terms logged but kept out of the sum (a NaN in such a term must not reach the total);
2. each named term equals the plain loss function of that name, applied to the right taps (and to the method's own
   head modules), with the hyper-parameters taken from the REFERENCE table below, not from the method;
3. the shipped defaults (composed config and built-method attributes) equal the reference implementations' values,
   cited from /work/shared/reference/methods.md, plus a few structural facts (FitNet's regressor ends in a ReLU).
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdbench.config import CONF_DIR
from kdbench.methods.common import match_spatial
from kdbench.distill import create_method
from tests.conftest import make_batch, make_pair, method_config

CONF = CONF_DIR / "method"
METHOD_YAMLS = sorted(p.stem for p in CONF.glob("*.yaml"))
TEACHER_FREE = {"dml", "tf_kd", "vanilla", "uskd", "one", "okddip", "ffl", "ktg", "rocket", "cs_kd", "byot", "sla_sd",
                "multi_exit", "multi_exit_ce"}  # no pre-trained teacher: nothing of a teacher's to depend on

NUM_CLASSES, SHAPE, N_TRAIN, BATCH = 10, (3, 16, 16), 40, 8
EPOCHS = (1, 10, 20, 240)
RTOL, ATOL = 1e-5, 1e-7

# ----------------------------------------------------------------------------- the reference table (part 3)
# Per config file: `config` = every non-weight key of the composed method config (a new option must be pinned here),
# `weights` = the composed method.weights exactly (names and values), `attrs` = attributes of the method built on the
# SETUP pair (dotted paths). Values cite reference/methods.md (§1.3 weights table, §1.4 warm-ups/stages, §2.x).
# Methods that methods.md does not cover are pinned to the paper/code values their own yaml/docstring cite.

REFERENCE: dict[str, dict] = {
    # §1.3 KD row, §2.1: T 4, CE 0.1, KD 0.9 (RD -r 0.1 -a 0.9; MD CE 0.1, KD 0.9)
    # (+ LSKD's logit_standardization option, off by default: methods-modern.md "LSKD")
    "kd": dict(config={"name": "kd", "temperature": 4.0, "logit_standardization": False},
               weights={"ce": 0.1, "kd": 0.9},
               attrs={"kd_temperature": 4.0, "logit_standardization": False}),
    # §1.3 FitNet row, §2.2: gamma 1, beta 100, hint layer 2 (= feat[2] = stage2 on both nets)
    "fitnet": dict(config={"name": "fitnet", "hint_layer": "stage2"},
                   weights={"ce": 1.0, "hint": 100.0},
                   attrs={"hint_layer": "stage2", "student_taps": ("stage2",), "teacher_taps": ("stage2",)}),
    # §1.3 AT row, §2.3: beta 1000, p 2, every stage output
    "at": dict(config={"name": "at", "p": 2.0},
               weights={"ce": 1.0, "at": 1000.0},
               attrs={"p": 2.0, "student_taps": ("stage1", "stage2", "stage3"),
                      "teacher_taps": ("stage1", "stage2", "stage3")}),
    # §1.3 SP row, §2.4: beta 3000 on the last feature map
    "sp": dict(config={"name": "sp", "temperature": 4.0},
               weights={"ce": 1.0, "sp": 3000.0},
               attrs={"student_taps": ("stage3",), "teacher_taps": ("stage3",)}),
    # §1.3 CC row, §2.5: beta 0.02, feat_dim 128, RD's (reference) loss; the paper variant's gamma 0.4 / P 2 (TD)
    "cc": dict(config={"name": "cc", "variant": "reference", "gamma": 0.4, "p_order": 2, "feat_dim": 128,
                       "temperature": 4.0},
               weights={"ce": 1.0, "cc": 0.02},
               attrs={"variant": "reference", "embed_s.out_features": 128, "embed_t.out_features": 128,
                      "gamma": 0.4, "order": 2}),
    # §1.3 VID row, §2.6: beta 1, INIT_PRED_VAR 5.0, EPS 1e-5; RD trains the variance (fixed_variance false)
    "vid": dict(config={"name": "vid", "init_pred_var": 5.0, "eps": 1e-5, "fixed_variance": False, "temperature": 4.0},
                weights={"ce": 1.0, "vid": 1.0},
                attrs={"levels.0.eps": 1e-5, "student_taps": ("stage1", "stage2", "stage3"),
                       "teacher_taps": ("stage1", "stage2", "stage3")}),
    # §1.3 RKD row, §2.7: outer weight 1 with inner weights distance 25, angle 50
    "rkd": dict(config={"name": "rkd", "temperature": 4.0},
                weights={"ce": 1.0, "rkd_distance": 25.0, "rkd_angle": 50.0},
                attrs={"student_taps": ("embedding",), "teacher_taps": ("embedding",)}),
    # §1.3 PKT row, §2.8: beta 30000 on the pooled vectors
    "pkt": dict(config={"name": "pkt", "temperature": 4.0},
                weights={"ce": 1.0, "pkt": 30000.0},
                attrs={"student_taps": ("embedding",), "teacher_taps": ("embedding",)}),
    # §1.3 AB row, §1.4, §2.9: 30-epoch stage at the base LR, margin 1, main stage CE only (beta unused)
    "ab": dict(config={"name": "ab", "stage_epochs": 30, "stage_lr": None, "margin": 1.0, "preact_fallback": True},
               weights={"ce": 1.0},
               attrs={"margin": 1.0, "stage_epochs": 30, "stage_lr": 0.05, "student_taps": (),
                      "stage_student_taps": ("stage1_pre", "stage2_pre", "stage3_pre"),
                      "stage_teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre")}),
    # §1.3 FT row, §1.4, §2.10: beta 200, rate 0.5, 30-epoch paraphraser stage at 0.01 for resnet students
    "ft": dict(config={"name": "ft", "variant": "reference", "rate": 0.5, "stage_epochs": 30, "stage_lr": None},
               weights={"ce": 1.0, "ft": 200.0},
               attrs={"variant": "reference", "stage_epochs": 30, "stage_lr": 0.01,
                      "student_taps": ("stage3",), "teacher_taps": ("stage3",)}),
    # §1.3 FSP row, §1.4, §2.11: 30-epoch stage at the base LR, then CE only (beta 50 unused -> weight 0)
    "fsp": dict(config={"name": "fsp", "protocol": "reference", "stage_epochs": 30, "stage_lr": None},
                weights={"ce": 1.0, "fsp": 0.0},
                attrs={"reduction": "mean", "stage_epochs": 30, "stage_lr": 0.05,
                       "student_taps": ("stem", "stage1", "stage2", "stage3"),
                       "teacher_taps": ("stem", "stage1", "stage2", "stage3")}),
    # §1.3 NST row, §2.12: beta 50
    "nst": dict(config={"name": "nst", "temperature": 4.0},
                weights={"ce": 1.0, "nst": 50.0},
                attrs={"student_taps": ("stage1", "stage2", "stage3")}),
    # §1.3 CRD row, §2.13: beta 0.8, dim 128, K 16384, T 0.07, momentum 0.5, mode exact (K clamped to n_train here)
    "crd": dict(config={"name": "crd", "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact",
                        "temperature": 4.0},
                weights={"ce": 1.0, "crd": 0.8},
                attrs={"nce_t": 0.07, "momentum": 0.5, "nce_k": N_TRAIN, "sampler.mode": "exact",
                       "embed_s.linear.out_features": 128, "embed_t.linear.out_features": 128}),
    # §1.3 CRD row (CRD+KD: -a 1 -b 0.8), §2.13; KD T 4 (RD --kd_T 4)
    "crd_kd": dict(config={"name": "crd", "label": "crd_kd", "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                           "nce_m": 0.5, "mode": "exact", "temperature": 4.0},
                   weights={"ce": 1.0, "kd": 1.0, "crd": 0.8},
                   attrs={"nce_t": 0.07, "momentum": 0.5, "sampler.mode": "exact",
                          "kd_temperature": 4.0}),
    # §1.3 KDSVD row, §2.14: MD CE 1, FEAT 1, K 1; RD's (HW x C) reshape
    "kdsvd": dict(config={"name": "kdsvd", "k": 1, "reshape": "rd", "temperature": 4.0},
                  weights={"ce": 1.0, "kdsvd": 1.0},
                  attrs={"k": 1, "reshape": "rd"}),
    # §1.3 OFD row, §2.15: FEAT 0.001, connector kernel 1, teacher in train mode (MD)
    "ofd": dict(config={"name": "ofd", "kernel_size": 1, "levels": None, "teacher_train_mode": True, "temperature": 4.0},
                weights={"ce": 1.0, "ofd": 0.001},
                attrs={"teacher_train_mode": True, "connectors.0.0.kernel_size": (1, 1),
                       "student_taps": ("stage1_pre", "stage2_pre", "stage3_pre"),
                       "teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre")}),
    # §1.3 ReviewKD row (5.0 in configs/cifar100/reviewkd.yaml), §1.4 warm-up 20, §2.16 C_mid = min(512, ...)
    "reviewkd": dict(config={"name": "reviewkd", "warmup_epochs": 20, "max_mid_channel": 512, "student_preact": False,
                             "temperature": 4.0},
                     weights={"ce": 1.0, "reviewkd": 5.0},
                     attrs={"warmup_epochs": 20.0, "student_preact": False, "student_taps": ("stage1", "stage2", "stage3", "embedding"),
                            "teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")}),
    # §1.3 DKD row, §1.4 warm-up 20, §2.17: CE 1, alpha 1, beta 8 (res32x4 -> res8x4 default), T 4
    "dkd": dict(config={"name": "dkd", "temperature": 4.0, "warmup_epochs": 20, "logit_standardization": False},
                weights={"ce": 1.0, "tckd": 1.0, "nckd": 8.0},
                attrs={"temperature": 4.0, "warmup_epochs": 20.0, "logit_standardization": False}),
    # §2.17 per-pair beta table (+ MD issue #6: ResNet50 -> wrn_16_2 beta 6); composed for resnet56 -> resnet20 (beta 2)
    "dkd_per_pair": dict(config={"name": "dkd", "label": "dkd", "temperature": 4.0, "warmup_epochs": 20,
                                 "logit_standardization": False,
                                 "beta_by_pair": {"resnet32x4": {"resnet8x4": 8.0, "ShuffleV1": 8.0, "ShuffleV2": 8.0},
                                                  "wrn_40_2": {"ShuffleV1": 8.0, "wrn_16_2": 6.0, "wrn_40_1": 6.0},
                                                  "ResNet50": {"MobileNetV2": 8.0, "wrn_16_2": 6.0},
                                                  "resnet56": {"resnet20": 2.0},
                                                  "resnet110": {"resnet32": 2.0},
                                                  "vgg13": {"vgg8": 6.0, "MobileNetV2": 6.0}}},
                         weights={"ce": 1.0, "tckd": 1.0, "nckd": 2.0},
                         attrs={"temperature": 4.0, "warmup_epochs": 20.0}),
    # ---- not in methods.md: pinned to the values the configs cite from the papers / authors' code
    # Born-Again Networks (Furlanello et al. 2018): KD from the previous generation, plain softmax, no label term
    "ban": dict(config={"name": "tf_kd_self", "label": "ban", "temperature": 1.0, "require_same_architecture": True},
                weights={"ce": 0.0, "kd": 1.0},
                attrs={"kd_temperature": 1.0}),
    # Tf-KD_self (Yuan et al. 2020, code loss_kd_self, ResNet18 CIFAR-100 params.json): alpha 0.95, T 6, x50 -> /K
    "tf_kd_self": dict(config={"name": "tf_kd_self", "temperature": 6.0, "require_same_architecture": True},
                       weights={"ce": 0.05, "kd": 0.475},
                       attrs={"kd_temperature": 6.0}),
    # Tf-KD_reg (Yuan et al. 2020, code loss_kd_regularization, ResNet18): a 0.99, T 20, alpha 0.1, x100 -> /K
    "tf_kd": dict(config={"name": "tf_kd", "temperature": 20.0, "correct_prob": 0.99},
                  weights={"ce": 0.9, "tf_kd": 0.1},
                  attrs={"temperature": 20.0, "correct_prob": 0.99}),
    # DML (Zhang et al. 2018): one peer of the student's architecture, all weights 1, pairwise mimicry (Eq. 11)
    "dml": dict(config={"name": "dml", "peers": ["${student.model}"], "mimic": "pairwise"},
                weights={"ce": 1.0, "mimic": 1.0, "peer_ce": 1.0, "peer_mimic": 1.0},
                attrs={"mimic_mode": "pairwise", "peer_names": ["resnet8"]}),
    # Conditional T-S (Meng et al. 2019): the conditional loss alone, T 1, CE soft branch
    "cond_ts": dict(config={"name": "cond_ts", "temperature": 1.0, "soft_loss": "ce"},
                    weights={"ce": 0.0, "cts": 1.0},
                    attrs={"temperature": 1.0, "soft_loss": "ce"}),
    # Ba & Caruana 2014: logit regression only (no hard labels), MSE reduction
    "logit_l2": dict(config={"name": "logit_l2", "reduction": "mean"},
                     weights={"ce": 0.0, "l2": 1.0},
                     attrs={"reduction": "mean"}),
    # DarkRank (Chen et al. 2018): alpha 3, beta 3 (paper), hard (ListMLE) mode
    "darkrank": dict(config={"name": "darkrank", "mode": "hard", "alpha": 3.0, "beta": 3.0, "normalize": True,
                             "top_k": 4, "hard_top_k": None},
                     weights={"ce": 1.0, "darkrank": 1.0},
                     attrs={"mode": "hard", "alpha": 3.0, "beta": 3.0, "normalize": True, "top_k": 4,
                            "hard_top_k": None}),
    "vanilla": dict(config={"name": "vanilla"}, weights={"ce": 1.0}, attrs={}),
    # ---- post-2021 logit methods: methods-modern.md sections, confirmed in each reference repository
    # LSKD (§LSKD; README `--logit-stand --base-temp 2 --kd-weight 9`, cfg CE_WEIGHT 0.1): T 2, eps 1e-7, unbiased std
    "lskd": dict(config={"name": "lskd", "temperature": 2.0, "eps": 1e-7, "unbiased": True},
                 weights={"ce": 0.1, "lskd": 9.0},
                 attrs={"temperature": 2.0, "eps": 1e-7, "unbiased": True, "teacher_taps": ("logits",)}),
    # LSKD per pair (the released logs' kd,<t>,<s>,<T>,<weight>); composed for resnet110 -> resnet20: T 4, weight 12
    "lskd_per_pair": dict(config={"name": "lskd", "label": "lskd", "eps": 1e-7, "unbiased": True,
                                  "temperature": "${oc.select:method.by_pair.${teacher.label}.${student.label}.0,2.0}",
                                  "by_pair": {"resnet32x4": {"resnet8x4": [2.0, 9.0], "ShuffleV2": [2.0, 9.0],
                                                             "wrn_16_2": [3.0, 9.0], "wrn_40_2": [3.0, 9.0]},
                                              "vgg13": {"vgg8": [3.0, 9.0], "MobileNetV2": [3.0, 9.0]},
                                              "wrn_40_2": {"wrn_40_1": [2.0, 9.0], "wrn_16_2": [2.0, 9.0],
                                                           "resnet8x4": [2.0, 9.0], "MobileNetV2": [3.0, 9.0]},
                                              "resnet56": {"resnet20": [2.0, 9.0]},
                                              "resnet110": {"resnet32": [2.0, 9.0], "resnet20": [4.0, 12.0]},
                                              "ResNet50": {"MobileNetV2": [3.0, 1.0]}}},
                          weights={"ce": 0.1, "lskd": 12.0},
                          attrs={"temperature": 4.0}),
    # DIST (§DIST; dist_cifar.yaml: dist_t4 = tau 4, beta = gamma = 1, kd_loss_weight 2, ori 1), eps 1e-8
    "dist": dict(config={"name": "dist", "tau": 4.0, "eps": 1e-8},
                 weights={"ce": 1.0, "inter": 2.0, "intra": 2.0},
                 attrs={"tau": 4.0, "eps": 1e-8, "teacher_taps": ("logits",)}),
    # TTM (§TTM/WTTM; README: --ttm_l 0.1 -r 1 -b 45, vgg13 -> vgg8)
    "ttm": dict(config={"name": "ttm", "gamma": 0.1}, weights={"ce": 1.0, "ttm": 45.0},
                attrs={"gamma": 0.1, "teacher_taps": ("logits",)}),
    # WTTM (README's CRD + WTTM command: --add wttm --ttm_l 0.2 -a 4; CE -r default 1)
    "wttm": dict(config={"name": "wttm", "gamma": 0.2}, weights={"ce": 1.0, "wttm": 4.0},
                 attrs={"gamma": 0.2, "teacher_taps": ("logits",)}),
    # NKD (§NKD; cls_KD res34_distill_res18_cifar.py: temp 3, gamma 3.5)
    "nkd": dict(config={"name": "nkd", "temperature": 3.0},
                weights={"ce": 1.0, "nkd_target": 1.0, "nkd_non_target": 3.5},
                attrs={"temperature": 3.0, "teacher_taps": ("logits",)}),
    # USKD (§USKD; res18_sd_cifar.py: alpha 0.1, beta 0.1, mu 0.1; weak head on the second-to-last stage)
    "uskd": dict(config={"name": "uskd", "smoothing": 0.1, "rank_student": "log_softmax"},
                 weights={"ce": 1.0, "uskd_target": 0.1, "uskd_non_target": 0.1, "uskd_weak": 0.1},
                 attrs={"mid_tap": "stage2", "student_taps": ("stage2",), "fc.in_features": 32,
                        "fc.out_features": NUM_CLASSES, "needs_teacher": False}),
    # WSLD (§WSLD; cls_KD WSLDLoss CIFAR-100: T 4, alpha 2.25; official hard CE weight 1)
    "wsld": dict(config={"name": "wsld", "temperature": 4.0, "eps": 1e-7},
                 weights={"ce": 1.0, "wsld": 2.25},
                 attrs={"temperature": 4.0, "eps": 1e-7, "teacher_taps": ("logits",)}),
    # SSKD (Xu et al. 2020; methods-modern.md "ICKD, SRD, PAD, SSKD"): xuguodong03/SSKD student.py defaults --
    # weights ce/kd/tf/ss 0.1/0.9/2.7/10, T kd/tf/ss 4/4/0.5, ratio tf/ss 1.0/0.75, head stage --t-epoch 60 --t-lr 0.05
    "sskd": dict(config={"name": "sskd", "temperature": 4.0, "tf_temperature": 4.0, "ss_temperature": 0.5,
                         "tf_ratio": 1.0, "ss_ratio": 0.75, "stage_epochs": 60, "stage_lr": 0.05,
                         "stage_milestones": [30, 45]},
                 weights={"ce": 0.1, "kd": 0.9, "tf": 2.7, "ss": 10.0},
                 attrs={"kd_temperature": 4.0, "tf_temperature": 4.0, "ss_temperature": 0.5, "tf_ratio": 1.0,
                        "ss_ratio": 0.75, "stage_epochs": 60, "stage_lr": 0.05, "stage_milestones": (30, 45),
                        "teacher_cache": False, "student_taps": ("embedding",),
                        "teacher_taps": ("embedding",), "student_head.body.0.in_features": 64,
                        "teacher_head.body.2.out_features": 64}),
    # ---- post-2021 logit methods: pinned to methods-modern.md and the reference code cited in their YAMLs
    # MLKD (Jin-Ying/Multi-Level-Logit-Distillation @ 77b91ec7, KD_ours.py; mdistiller cfg T 4, CE 0.1, KD 0.9): five
    # levels [T, 3, 5, 2, 6], masks scale the batch means, the strong T = 2/6 terms on the weak logits, the strong
    # cc/bc terms never added (weight 0); RandAugment(2, 10) + Cutout 0.5 for the strong view
    "mlkd": dict(config={"name": "mlkd", "temperature": 4.0, "extra_temperatures": [3.0, 5.0, 2.0, 6.0],
                         "mask_mode": "scale", "strong_copy_paste": True, "logit_standardization": False,
                         "randaugment_ops": 2, "cutout": 0.5},
                 weights={"ce": 0.1, "ce_strong": 0.1, "kd_weak": 0.9, "kd_strong": 0.9, "cc_weak": 0.9,
                          "bc_weak": 0.9, "cc_strong": 0.0, "bc_strong": 0.0},
                 attrs={"temperatures": (4.0, 3.0, 5.0, 2.0, 6.0), "mask_mode": "scale", "strong_copy_paste": True,
                        "logit_standardization": False, "n_ops": 2, "cutout": 0.5, "teacher_taps": ("logits",)}),
    # CTKD (zhengli97/CTKD run_cifar_distill.sh: -r 0.1 -a 0.9, Global_T init 1, t_start 1, t_end 20, cosine
    # lambda 0 -> -1 over 10 epochs); the temperature logged with weight 0
    "ctkd": dict(config={"name": "ctkd", "temperature_module": "global", "t_start": 1.0, "t_end": 20.0, "init": 1.0,
                         "lambda_max": 0.0, "lambda_min": -1.0, "lambda_loops": 10, "instance_hidden": 256,
                         "teacher_eps": None, "logit_standardization": False},
                 weights={"ce": 0.1, "kd": 0.9, "temperature": 0.0},
                 attrs={"temperature_module.kind": "global", "temperature_module.t_start": 1.0,
                        "temperature_module.t_end": 20.0, "temperature_module.lambda_max": 0.0,
                        "temperature_module.lambda_min": -1.0, "temperature_module.lambda_loops": 10.0,
                        "teacher_eps": 0.0, "logit_standardization": False}),
    # ---- post-2021 feature/module methods, pinned to their reference code (reference/methods-modern.md and each
    # method's docstring). SimKD (DefangChen/SimKD scripts/run_distill.sh `-c 0 -d 0 -b 1`, factor 2)
    "simkd": dict(config={"name": "simkd", "factor": 2, "eval_head": "teacher_classifier", "temperature": 4.0},
                  weights={"ce": 0.0, "simkd": 1.0},
                  attrs={"factor": 2, "eval_head": "teacher_classifier", "student_taps": ("stage3",),
                         "teacher_taps": ("stage3",), "t_relu": False, "projector.0.out_channels": 32}),
    # SemCKD (`-r 1 -a 1 -b 400`, SelfA(feat_dim = batch size, factor 4, soft 1)); composed with trainer.batch_size=8
    "semckd": dict(config={"name": "semckd", "batch_size": "${trainer.batch_size}", "factor": 4, "soft": 1.0,
                           "temperature": 4.0},
                   weights={"ce": 1.0, "kd": 1.0, "semckd": 400.0},
                   attrs={"batch_size": BATCH, "factor": 4, "soft": 1.0, "kd_temperature": 4.0,
                          "student_taps": ("stage1", "stage2", "stage3"), "teacher_taps": ("stage1", "stage2", "stage3"),
                          "queries.0.linear1.in_features": BATCH, "queries.0.linear2.out_features": BATCH // 4}),
    # SRRL as SimKD's code runs it (`-c 1 -d 1 -b 1`)
    "srrl": dict(config={"name": "srrl", "temperature": 4.0},
                 weights={"ce": 1.0, "kd": 1.0, "srrl_fm": 1.0, "srrl_sr": 1.0},
                 attrs={"student_taps": ("embedding",), "teacher_taps": ("embedding",), "kd_temperature": 4.0}),
    # CAT-KD (configs/cifar100/CAT_KD/*.yaml per pair; res32x4_res8x4: weight 15, R 2, no normalisation)
    "cat_kd": dict(config={"name": "cat_kd", "by_pair": {
                               "resnet32x4": {"resnet8x4": {"cat": 15.0, "resolution": 2, "normalize": False},
                                              "ShuffleV1": {"cat": 600.0, "resolution": 4, "normalize": True},
                                              "ShuffleV2": {"cat": 600.0, "resolution": 4, "normalize": True}},
                               "resnet56": {"resnet20": {"cat": 0.7, "resolution": 2, "normalize": False}},
                               "resnet110": {"resnet32": {"cat": 1.8, "resolution": 2, "normalize": False}},
                               "wrn_40_2": {"wrn_16_2": {"cat": 12.0, "resolution": 2, "normalize": False},
                                            "wrn_40_1": {"cat": 1.5, "resolution": 2, "normalize": False},
                                            "ShuffleV1": {"cat": 80.0, "resolution": 4, "normalize": True}},
                               "vgg13": {"vgg8": {"cat": 4.5, "resolution": 2, "normalize": False},
                                         "MobileNetV2": {"cat": 15.0, "resolution": 2, "normalize": True}},
                               "ResNet50": {"MobileNetV2": {"cat": 40.0, "resolution": 2, "normalize": True}}},
                           "cam_resolution": "${oc.select:method.by_pair.${teacher.label}.${student.label}.resolution,2}",
                           "normalize": "${oc.select:method.by_pair.${teacher.label}.${student.label}.normalize,false}",
                           "student_fc_bias": False, "temperature": 4.0},
                   weights={"ce": 1.0, "cat": 15.0},
                   attrs={"resolution": 2, "normalize": False, "student_fc_bias": False, "student_taps": ("stage3",),
                          "teacher_taps": ("stage3",)}),
    # ICKD-C (ADLab-AutoDrive/ICKD CIFAR README `-a 0 -b 2.5`; 1x1 embed, / (C N))
    "ickd": dict(config={"name": "ickd", "embed_kernel": 1, "normalizer": "batch", "temperature": 4.0},
                 weights={"ce": 1.0, "ickd": 2.5},
                 attrs={"normalizer": "batch", "embed.0.kernel_size": (1, 1), "student_taps": ("stage3",),
                        "teacher_taps": ("stage3",)}),
    # ICKD-C + KL (`-a 1 -b 2.5`, T 4)
    "ickd_kd": dict(config={"name": "ickd", "label": "ickd_kd", "embed_kernel": 1, "normalizer": "batch",
                            "temperature": 4.0},
                    weights={"ce": 1.0, "kd": 1.0, "ickd": 2.5},
                    attrs={"normalizer": "batch", "kd_temperature": 4.0}),
    # SRD (authors' ImageNet OurDistillationLoss: 2 * log-sum |.|^4 + KL(T 1), BN eps 1e-4)
    "srd": dict(config={"name": "srd", "exponent": 4.0, "bn_eps": 1e-4, "temperature": 1.0},
                weights={"ce": 1.0, "srd": 2.0, "kd": 1.0},
                attrs={"exponent": 4.0, "eps": 1e-4, "kd_temperature": 1.0, "student_taps": ("embedding",),
                       "teacher_taps": ("embedding",)}),
    # ITRD (README command: -b 1 -r 1 --lambda_corr 2 --lambda_mutual 1 --alpha_it 1.01)
    "itrd": dict(config={"name": "itrd", "alpha": 1.01, "std_eps": 0.0, "temperature": 4.0},
                 weights={"ce": 1.0, "itrd_corr": 2.0, "itrd_mutual": 1.0},
                 attrs={"alpha": 1.01, "std_eps": 0.0, "embed_mutual": False, "student_taps": ("embedding",),
                        "teacher_taps": ("embedding",)}),
    # KD++ (ND repo CIFAR/train_cifar.sh: per pair; resnet32x4 -> resnet8x4's 1 / 3.5 / 2.0 for unlisted pairs)
    "kd_nd": dict(config={"name": "kd_nd", "weights_by_pair": {
                              "resnet56": {"resnet20": {"kd": 1.0, "nd": 2.0}},
                              "resnet32x4": {"resnet8x4": {"kd": 3.5, "nd": 2.0}, "ShuffleV1": {"kd": 2.5, "nd": 1.5},
                                             "ShuffleV2": {"kd": 4.0, "nd": 0.5}},
                              "wrn_40_2": {"wrn_40_1": {"kd": 1.0, "nd": 1.5}},
                              "ResNet50": {"MobileNetV2": {"kd": 3.0, "nd": 0.5}},
                              # ImageNet/train.sh KD++
                              "tv_resnet34": {"tv_resnet18": {"kd": 2.5, "nd": 1.0}},
                              "tv_resnet50": {"mobilenet_v1": {"kd": 4.0, "nd": 1.0}}},
                          "temperature": 4.0, "warmup_epochs": 20, "warmup_offset": 1, "centres": "train_pass",
                          "stage_epochs": 1},
                  weights={"ce": 1.0, "kd": 3.5, "nd": 2.0},
                  attrs={"kd_temperature": 4.0, "warmup_epochs": 20.0, "warmup_offset": 1, "centre_source": "train_pass",
                         "stage_epochs": 1, "stage_lr": 0.0, "emb_trans": None,
                         "student_taps": ("embedding",), "teacher_taps": ("logits", "embedding")}),
    # DKD++ (train_cifar.sh; resnet32x4 -> resnet8x4: tckd 2, nckd 8, nd 0.5)
    "dkd_nd": dict(config={"name": "dkd_nd", "weights_by_pair": {
                               "resnet56": {"resnet20": {"tckd": 2.5, "nckd": 4.0, "nd": 3.5}},
                               "resnet32x4": {"resnet8x4": {"tckd": 2.0, "nckd": 8.0, "nd": 0.5},
                                              "ShuffleV1": {"tckd": 0.5, "nckd": 8.0, "nd": 4.0},
                                              "ShuffleV2": {"tckd": 0.5, "nckd": 6.0, "nd": 0.5}},
                               "wrn_40_2": {"wrn_40_1": {"tckd": 1.0, "nckd": 6.0, "nd": 1.0}},
                               "ResNet50": {"MobileNetV2": {"tckd": 0.5, "nckd": 8.0, "nd": 1.0}},
                               # ImageNet/train.sh DKD++
                               "tv_resnet34": {"tv_resnet18": {"tckd": 0.8, "nckd": 0.5, "nd": 1.0}},
                               "tv_resnet50": {"mobilenet_v1": {"tckd": 0.8, "nckd": 1.0, "nd": 1.0}}},
                           "temperature": 4.0, "warmup_epochs": 20, "warmup_offset": 1, "centres": "train_pass",
                           "stage_epochs": 1},
                   weights={"ce": 1.0, "tckd": 2.0, "nckd": 8.0, "nd": 0.5},
                   attrs={"temperature": 4.0, "warmup_epochs": 20.0, "warmup_offset": 1, "stage_epochs": 1,
                          "stage_lr": 0.0, "teacher_taps": ("logits", "embedding")}),
    # ReviewKD++ (ReviewKD++/train_reviewkd.sh; resnet32x4 -> resnet8x4: reviewkd 8, nd 1)
    "reviewkd_nd": dict(config={"name": "reviewkd_nd", "weights_by_pair": {
                                    "resnet56": {"resnet20": {"reviewkd": 1.2, "nd": 1.0}},
                                    "resnet32x4": {"resnet8x4": {"reviewkd": 8.0, "nd": 1.0},
                                                   "ShuffleV1": {"reviewkd": 7.0, "nd": 1.0},
                                                   "ShuffleV2": {"reviewkd": 8.0, "nd": 1.5}},
                                    "wrn_40_2": {"wrn_40_1": {"reviewkd": 5.0, "nd": 4.0}},
                                    "ResNet50": {"MobileNetV2": {"reviewkd": 6.0, "nd": 2.0}},
                                    # ImageNet/ReviewKD++/train_reviewkd.sh
                                    "tv_resnet34": {"tv_resnet18": {"reviewkd": 1.0, "nd": 3.0}},
                                    "tv_resnet50": {"mobilenet_v1": {"reviewkd": 8.0, "nd": 4.0}}},
                                "warmup_epochs": 20, "warmup_offset": 1, "max_mid_channel": 512,
                                "centres": "train_pass", "stage_epochs": 1, "temperature": 4.0},
                        weights={"ce": 1.0, "reviewkd": 8.0, "nd": 1.0},
                        attrs={"warmup_epochs": 20.0, "warmup_offset": 1, "stage_epochs": 1, "stage_lr": 0.0,
                               "student_taps": ("stage1", "stage2", "stage3", "embedding"),
                               "teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre", "embedding")}),
    # DIST++ (CIFAR/DIST++/train_dist.sh; resnet32x4 -> resnet8x4: kd 1.5 on both DIST terms, nd 4; tau 4)
    "dist_nd": dict(config={"name": "dist_nd", "weights_by_pair": {
                                "resnet56": {"resnet20": {"kd": 2.0, "nd": 1.0}},
                                "resnet32x4": {"resnet8x4": {"kd": 1.5, "nd": 4.0}, "ShuffleV1": {"kd": 2.5, "nd": 3.0},
                                               "ShuffleV2": {"kd": 3.0, "nd": 4.0}},
                                "wrn_40_2": {"wrn_40_1": {"kd": 2.5, "nd": 3.0}},
                                "ResNet50": {"MobileNetV2": {"kd": 7.0, "nd": 1.0}}},
                            "tau": 4.0, "eps": 1e-8, "warmup_epochs": 20, "warmup_offset": 1, "centres": "train_pass",
                            "stage_epochs": 1},
                    weights={"ce": 1.0, "inter": 1.5, "intra": 1.5, "nd": 4.0},
                    attrs={"tau": 4.0, "eps": 1e-8, "warmup_epochs": 20.0, "warmup_offset": 1, "stage_epochs": 1,
                           "stage_lr": 0.0, "teacher_taps": ("logits", "embedding")}),
    # ---- multi-teacher methods (they learn from every entry of `teachers`). Here on the SETUP pair's teacher, plus a
    # second teacher's logits for kd_avg / ae_kd (EXTRA_VIEWS: multi_teacher_view); MEAL's loss sees the drawn teacher.
    # kd_avg (AE-KD's AVER baseline: README -r 1 -a 0.9, --kd_T 4): KL to the averaged soft predictions
    "kd_avg": dict(config={"name": "kd_avg", "temperature": 4.0, "average": "probs"},
                   weights={"ce": 1.0, "kd": 0.9},
                   attrs={"temperature": 4.0, "average": "probs", "multi_teacher": True, "teacher_taps": ("logits",)}),
    # AE-KD (AnTuo1998/AE-KD README -r 1 -a 0.9 -b 0 -C 0.6 --kd_T 4, --svm_norm off; one problem per batch on the
    # batch-mean logit gradients, libsvm on the raw Gram matrix as find_optimal_svm)
    "ae_kd": dict(config={"name": "ae_kd", "temperature": 4.0, "tolerance": 0.6, "granularity": "batch",
                          "normalize_gradients": False, "rescale_gram": False},
                  weights={"ce": 1.0, "aekd": 0.9},
                  attrs={"temperature": 4.0, "tolerance": 0.6, "granularity": "batch", "normalize_gradients": False,
                         "rescale_gram": False, "multi_teacher": True, "teacher_taps": ("logits",)}),
    # MEAL (AaronHeee/MEAL scripts/ensemble_densenet.sh: --out_layer [-1] --loss ce --adv 1 --gamma [1] --eta [1]
    # --d_lr 1e-3 --teacher_eval 0, no labels, no --grl); the logit discriminator 10 -> 5 -> 2 -> 2 here
    "meal": dict(config={"name": "meal", "blocks": ["logits"], "block_dims": [], "similarity": "ce",
                         "adversarial": "joint", "final_relu": True, "discriminator_lr": 0.001,
                         "discriminator_momentum": 0.9, "discriminator_weight_decay": 5e-4,
                         "teacher_train_mode": True},
                 weights={"ce": 0.0, "sim_logits": 1.0, "adv_logits": 1.0},
                 attrs={"teacher_train_mode": True, "multi_teacher": True, "blocks": ("logits",), "student_taps": (),
                        "similarity": "ce", "adversarial": "joint", "discriminator_lr": 1e-3,
                        "discriminators.logits.body.0.in_features": NUM_CLASSES,
                        "discriminators.logits.body.0.out_features": 5, "discriminators.logits.body.2.out_features": 2,
                        "discriminators.logits.body.4.out_features": 2, "discriminators.logits.final_relu": True}),
    # ---- online methods (issue "self-, online and multi-teacher distillation"): the authors' code, cited per entry
    # ONE (ONE_NeurIPS2018 cifar_one.py, ONE_ResNet, kl_loss.py T 3 + 1e-7, ONE_ResNet*.sh --consistency_rampup 80):
    # three branches, every weight 1; branches cut after stage2 of a CIFAR ResNet
    "one": dict(config={"name": "one", "branches": 3, "branch_model": "${student.model}", "temperature": 3.0,
                        "eps": 1e-7, "rampup_epochs": 80},
                weights={"ce": 1.0, "branch_ce": 1.0, "ensemble_ce": 1.0, "kl": 1.0, "branch_kl": 1.0},
                attrs={"num_branches": 3, "temperature": 3.0, "eps": 1e-7, "rampup_epochs": 80.0,
                       "branch_tap": "stage2", "student_taps": ("stage2", "logits"), "gate_fc.out_features": 3}),
    # OKDDip (OKDDip train_GL.py defaults: --num_branches 4 = 3 peers + leader, --temperature 3, --alpha 1,
    # --length 80; resnet_GL.py factor 8; utils.KL_Loss +1e-7, target not detached)
    "okddip": dict(config={"name": "okddip", "peers": 3, "share": "branch", "peer_model": "${student.model}",
                           "temperature": 3.0, "eps": 1e-7, "factor": 8, "rampup_epochs": 80,
                           "detach_targets": False},
                   weights={"ce": 1.0, "peer_ce": 1.0, "peer_kl": 1.0, "leader_kl": 1.0},
                   attrs={"num_peers": 3, "share": "branch", "temperature": 3.0, "factor": 8, "rampup_epochs": 80.0,
                          "detach_targets": False, "branch_tap": "stage2", "query.out_features": 8,
                          "key.out_features": 8}),
    # FFL (FFL-pytorch train_FFL.py: every weight 1, --consistency_rampup 80, utils.KLLoss T 3 + 1e-7; the fusion
    # module's optimizer weight decay 1e-5 against the run's)
    "ffl": dict(config={"name": "ffl", "share": "branch", "peer_model": "${student.model}", "temperature": 3.0,
                        "eps": 1e-7, "rampup_epochs": 80, "fusion_channels": None, "fusion_weight_decay": 1e-5,
                        "run_weight_decay": "${optim.weight_decay}"},
                weights={"ce": 1.0, "sub_ce": 1.0, "fused_ce": 1.0, "kl": 1.0, "sub_kl": 1.0, "fused_kl": 1.0},
                attrs={"share": "branch", "temperature": 3.0, "rampup_epochs": 80.0, "branch_tap": "stage2",
                       "last_tap": "stage3", "fusion_weight_decay": 1e-5, "run_weight_decay": 5e-4,
                       "fusion.decay_delta": 1e-5 - 5e-4, "fusion.pwconv.out_channels": 64}),
    # KTG (DCL train.py: the search template with every edge present, KLLoss T 1, loss_weight 1; here gate through)
    "ktg": dict(config={"name": "ktg", "nodes": ["${student.model}", "${student.model}"], "temperature": 1.0,
                        "edges": [{"target": t, "source": s, "loss": "ce" if t == s else "kl", "gate": "through"}
                                  for t, s in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 0), (1, 2), (2, 2), (2, 0), (2, 1))]},
                weights={"ce": 1.0, "kl_0_from_1": 1.0, "kl_0_from_2": 1.0, "ce_1": 1.0, "kl_1_from_0": 1.0,
                         "kl_1_from_2": 1.0, "ce_2": 1.0, "kl_2_from_0": 1.0, "kl_2_from_1": 1.0},
                attrs={"temperature": 1.0, "node_names": ["resnet8", "resnet8", "resnet8"]}),
    # Rocket Launching (README: --gamma 0.03, gradient block and parameter sharing on by default in rocket_interval.py)
    "rocket": dict(config={"name": "rocket", "booster": "${teacher.model}", "share": "interval", "gradient_block": True},
                   weights={"ce": 1.0, "booster_ce": 1.0, "hint": 0.03},
                   attrs={"booster_name": "resnet14", "share": "interval", "gradient_block": True}),
    # ---- self-, online and multi-exit distillation (the survey list): pinned to the reference code in each docstring
    # CS-KD (alinlab/cs-kd README CIFAR-100 command `-cls --lamda 1`, train.py --temp 4.0)
    "cs_kd": dict(config={"name": "cs_kd", "temperature": 4.0},
                  weights={"ce": 1.0, "cls": 1.0},
                  attrs={"temperature": 4.0, "needs_teacher": False, "student_taps": ()}),
    # BYOT (MMRazor byot_resnet18_8xb16_cifar100.py: CE 1.0, label 0.7, KL tau 3 0.3, L2Loss(dist) 0.03 on exits 1-2,
    # 0 on exit 3; BYOTConnector); on resnet8 the exits sit on stage1 and stage2 (64 = deepest width)
    "byot": dict(config={"name": "byot", "temperature": 3.0, "exits": None, "feature_exits": ["stage1", "stage2"],
                         "feature_loss": "mmrazor", "feature_chunk": 16},
                 weights={"ce": 1.0, "exit_ce": 0.7, "exit_kd": 0.3, "exit_feat": 0.03},
                 attrs={"temperature": 3.0, "exit_taps": ("stage1", "stage2"), "feature_taps": ("stage1", "stage2"),
                        "feature_loss": "mmrazor", "feature_chunk": 16, "needs_teacher": False,
                        "student_taps": ("stage1", "stage2", "embedding"), "exits.0.fc.in_features": 64,
                        "exits.0.fc.out_features": NUM_CLASSES}),
    # SLA+SD (hankook/SLA trainers.py create_sla_sd_trainer, train.py --T 1): joint Linear(d, 4K) on the embedding
    "sla_sd": dict(config={"name": "sla_sd", "temperature": 1.0},
                   weights={"ce": 1.0, "joint": 1.0, "sd": 1.0},
                   attrs={"temperature": 1.0, "needs_teacher": False, "student_taps": ("embedding",),
                          "joint_head.in_features": 64, "joint_head.out_features": 4 * NUM_CLASSES}),
    # Multi-exit distillation (mary-phuong/multiexit-distillation train_cifar.py cf_loss: C 0.5, maxprob 0.5, Tmult 1.05,
    # T from 1, global_scale 2 * 5 / n_exits -> 10 / 3 for resnet8's 3 classifiers; exit_width 128)
    "multi_exit": dict(config={"name": "multi_exit", "exits": None, "exit_width": 128, "temperature": 1.0,
                               "anneal": True, "max_prob": 0.5, "anneal_factor": 1.05, "global_scale": None},
                       weights={"ce": 0.5, "exit_ce": 0.5, "exit_kd": 0.5, "temperature": 0.0},
                       attrs={"anneal": True, "max_prob": 0.5, "anneal_factor": 1.05, "global_scale": 10 / 3,
                              "n_classifiers": 3, "exit_taps": ("stage1", "stage2"), "exits.0.fc.in_features": 128,
                              "needs_teacher": False}),
    # ... its CE-only baseline (ClassificationOnlyLoss: every exit's CE, unscaled)
    "multi_exit_ce": dict(config={"name": "multi_exit", "label": "multi_exit_ce", "exits": None, "exit_width": 128,
                                  "temperature": 1.0, "anneal": False, "max_prob": 0.5, "anneal_factor": 1.05,
                                  "global_scale": 1.0},
                          weights={"ce": 1.0, "exit_ce": 1.0, "exit_kd": 0.0, "temperature": 0.0},
                          attrs={"anneal": False, "global_scale": 1.0, "exit_taps": ("stage1", "stage2")}),
    # Label Refinery (hessamb/label-refinery RefineryLoss: soft-target CE, label ignored; the refinery in train mode)
    "label_refinery": dict(config={"name": "label_refinery", "teacher_train_mode": True},
                           weights={"ce": 0.0, "refinery": 1.0},
                           attrs={"teacher_train_mode": True, "teacher_taps": ("logits",)}),
    # ---- the survey's remaining methods (data-free, few-shot and others), pinned to their reference code
    # PAD (torchdistill PADL2Loss / VarianceBranch4PAD; rrpr2020 config: ce 1, pad_l2 1, eps 1e-6)
    "pad": dict(config={"name": "pad", "eps": 1e-6, "temperature": 4.0},
                weights={"ce": 1.0, "pad_l2": 1.0},
                attrs={"eps": 1e-6, "projector": None, "var_estimator.0.out_features": 64,
                       "student_taps": ("embedding",), "teacher_taps": ("embedding",)}),
    # IRG (Knowledge-Distillation-Zoo kd_losses/irg.py, train_kd.py: w_irg_vert 0.1, w_irg_edge 5, w_irg_tran 5)
    "irg": dict(config={"name": "irg", "temperature": 4.0},
                weights={"ce": 1.0, "irg_vertex": 0.1, "irg_edge": 5.0, "irg_transformation": 5.0},
                attrs={"student_taps": ("stage2", "stage3", "embedding"),
                       "teacher_taps": ("stage2", "stage3", "embedding")}),
    # MGD (kaiyuyue/mgd: --mgd-reducer amp, --mgd-update-freq 1, --loss-factor 1e4, tracking <= 20,000 images)
    "mgd": dict(config={"name": "mgd", "reducer": "amp", "update_freq": 1, "track_images": 20000, "temperature": 4.0},
                weights={"ce": 1.0, "mgd": 1e-4},
                attrs={"update_freq": 1, "track_images": 20000, "reducer": "amp",
                       "student_taps": ("stage1_pre", "stage2_pre", "stage3_pre"),
                       "teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre")}),
    # TOFD (distill.py: --alpha 0.05, --beta 0.03, --t 3 over 250 epochs; teacher aux classifiers: kdbench's stage)
    "tofd": dict(config={"name": "tofd", "t_start": 1.0, "t_growth": 3.0, "t_epochs": 250, "stage_epochs": 30,
                         "stage_lr": None, "temperature": 4.0},
                 weights={"ce": 1.0, "aux_ce": 1.0, "tofd_kd": 1.0, "tofd_feat": 0.05, "orth": 0.03},
                 attrs={"t_start": 1.0, "t_growth": 3.0, "t_epochs": 250.0, "stage_epochs": 30, "stage_lr": 0.05,
                        "student_taps": ("stage1", "stage2", "embedding"),
                        "teacher_taps": ("stage1", "stage2", "embedding")}),
    # MHGD (KD_methods_with_TF Relation.MHGD: 8 heads, student 4 / teacher 1 singular vectors, init_epoch 40)
    "mhgd": dict(config={"name": "mhgd", "heads": 8, "student_vectors": 4, "reverse_kl": True, "clip_to_ce": True,
                         "stage_epochs": 40, "stage_lr": None, "temperature": 4.0},
                 weights={"ce": 1.0, "mhgd": 1.0},
                 attrs={"heads": 8, "student_vectors": 4, "reverse_kl": True, "clip_to_ce": True, "stage_epochs": 40,
                        "stage_lr": 0.05, "student_taps": ("stage1", "stage2", "stage3"),
                        "teacher_taps": ("stage1", "stage2", "stage3")}),
    # RCO (paper's equal-epoch-interval anchors; KD T 4, ce 0.1, kd 0.9: kdbench's choice); no anchors on a fresh pair
    "rco": dict(config={"name": "rco", "anchors": [], "require_anchors": True, "temperature": 4.0},
                weights={"ce": 0.1, "kd": 0.9},
                attrs={"kd_temperature": 4.0, "num_anchors": 1, "teacher_taps": ("logits",)}),
    # FSKD (LTH14/FSKD recover_one_layer / absorb_pwconv; transfer-set training: Hinton KD as RD runs it)
    "fskd": dict(config={"name": "fskd", "align": True, "temperature": 4.0},
                 weights={"ce": 0.1, "kd": 0.9},
                 attrs={"align": True, "kd_temperature": 4.0, "student_taps": ("stage1_pre", "stage2_pre", "stage3_pre"),
                        "teacher_taps": ("logits", "stage1_pre", "stage2_pre", "stage3_pre")}),
    # NetGraft (zju-vipa/NetGraft parser_cifar100.py: lrs [0.00025, 0.001, 0.001], adapters 0.001, net 1e-4,
    # epochs [1000, 200, 200] + [150, 150], blocks 3, 4 and the classifier grafted, normalised-logit MSE)
    "netgraft": dict(config={"name": "netgraft", "graft_from": 3, "shots": 10, "lrs_student": [0.00025, 0.001, 0.001],
                             "lr_adapter": 0.001, "lr_net": 1e-4, "block_epochs": [1000, 200, 200],
                             "net_epochs": [150, 150], "temperature": 4.0},
                     weights={"graft": 1.0},
                     attrs={"graft_from": 3, "lrs_student": [0.00025, 0.001, 0.001], "lr_adapter": 0.001,
                            "lr_net": 1e-4, "block_epochs": [1000, 200, 200], "net_epochs": [150, 150],
                            "units": [3, 4, "head"], "teacher_taps": ("logits",)}),
    # L2T-ww (alinlab/L2T-ww train_l2t_ww.py: --beta 0.5, --T 2, --meta-lr 1e-4, --meta-wd 1e-4, relu6 init 1.0)
    "l2t_ww": dict(config={"name": "l2t_ww", "pairs": "all", "lookahead_steps": 2, "meta_lr": 1e-4, "meta_wd": 1e-4,
                           "loss_weight_init": 1.0, "order": "student_first", "temperature": 4.0},
                   weights={"ce": 1.0, "l2t_match": 0.5},
                   attrs={"lookahead": 2, "meta_lr": 1e-4, "meta_wd": 1e-4, "order": "student_first",
                          "student_taps": ("stage1", "stage2", "stage3"), "teacher_taps": ("stage1", "stage2", "stage3"),
                          "lwnet.0.fc.out_features": 1}),
    # ---- data-free methods (not in methods.md): the reference scripts' values, cited in each yaml and module docstring
    # DAFL (DAFL-train.py; README CIFAR-100 command: --batch_size 1024 --lr_G 0.02 --latent_dim 1000 --oh 0.5 --ie 20
    # --a 0.1; 120 iterations; BatchNorm2d(c, 0.8) = eps 0.8; log10; KL at T 1)
    "dafl": dict(config={"name": "dafl", "batch_size": 1024, "iterations": 120, "latent_dim": 1000, "generator_lr": 0.02,
                         "generator_schedule": "constant", "generator_milestones": [], "generator_gamma": 0.1,
                         "generator_width": 64, "generator_bn_eps": 0.8, "feature_tap": "embedding",
                         "activation_reduction": "mean", "entropy_log_base": 10.0, "temperature": 1.0},
                 weights={"one_hot": 0.5, "info_entropy": 20.0, "activation": 0.1, "kd": 1.0},
                 attrs={"batch_size": 1024, "iterations": 120, "generator.latent_dim": 1000, "generator_lr_base": 0.02,
                        "generator.bn1.eps": 0.8, "generator.bn2.eps": 0.8, "generator.tanh": True,
                        "generator.bn3.affine": False, "teacher_taps": ("embedding",), "kd_temperature": 1.0,
                        "entropy_log_base": 10.0, "activation_reduction": "mean", "teacher_cache": False}),
    # DAFL on MNIST (DAFL-train.py argparse defaults: batch 512, latent 100, lr_G 0.2, oh 1, ie 5, a 0.1; LeNet feature)
    "dafl_mnist": dict(config={"name": "dafl", "label": "dafl", "batch_size": 512, "iterations": 120, "latent_dim": 100,
                               "generator_lr": 0.2, "generator_schedule": "constant", "generator_milestones": [],
                               "generator_gamma": 0.1, "generator_width": 64, "generator_bn_eps": 0.8,
                               "feature_tap": "stage3", "activation_reduction": "mean", "entropy_log_base": 10.0,
                               "temperature": 1.0},
                       weights={"one_hot": 1.0, "info_entropy": 5.0, "activation": 0.1, "kd": 1.0},
                       attrs={"batch_size": 512, "generator.latent_dim": 100, "generator_lr_base": 0.2,
                              "teacher_taps": ("stage3",)}),
    # DAFL on CIFAR-10 (README command: --oh 0.05 --ie 5 --a 0.01, the rest as the CIFAR-100 command)
    "dafl_cifar10": dict(config={"name": "dafl", "label": "dafl", "batch_size": 1024, "iterations": 120,
                                 "latent_dim": 1000, "generator_lr": 0.02, "generator_schedule": "constant",
                                 "generator_milestones": [], "generator_gamma": 0.1, "generator_width": 64,
                                 "generator_bn_eps": 0.8, "feature_tap": "embedding", "activation_reduction": "mean",
                                 "entropy_log_base": 10.0, "temperature": 1.0},
                         weights={"one_hot": 0.05, "info_entropy": 5.0, "activation": 0.01, "kd": 1.0},
                         attrs={"batch_size": 1024, "generator.latent_dim": 1000, "teacher_taps": ("embedding",)}),
    # DFAD (DFAD_cifar.py, README CIFAR-100 command with --scheduler: batch 256, 50 its, nz 256, lr_G 1e-3, 5 S steps
    # per G step, MultiStepLR([100, 200]) stepped before each epoch = milestones [99, 199] in the epoch > m rule)
    "dfad": dict(config={"name": "dfad", "batch_size": 256, "iterations": 50, "student_steps": 5, "latent_dim": 256,
                         "generator_lr": 0.001, "generator_schedule": "step", "generator_milestones": [99, 199],
                         "generator_gamma": 0.1, "generator_width": 64, "generator_bn_eps": 1e-5,
                         "generator_loss": "negative_l1"},
                 weights={"l1": 1.0, "adversarial": 1.0},
                 attrs={"batch_size": 256, "iterations": 50, "student_steps": 5, "generator.latent_dim": 256,
                        "generator_milestones": (99, 199), "generator.bn1.eps": 1e-5, "generator.tanh": True,
                        "generator.bn3.affine": False, "generator_loss": "negative_l1", "teacher_cache": False}),
    # DFAD on MNIST (DFAD_mnist.py defaults, no --scheduler: batch 512, nz 100, lr_G 1e-3 constant)
    "dfad_mnist": dict(config={"name": "dfad", "label": "dfad", "batch_size": 512, "iterations": 50, "student_steps": 5,
                               "latent_dim": 100, "generator_lr": 0.001, "generator_schedule": "constant",
                               "generator_milestones": [], "generator_gamma": 0.1, "generator_width": 64,
                               "generator_bn_eps": 1e-5, "generator_loss": "negative_l1"},
                       weights={"l1": 1.0, "adversarial": 1.0},
                       attrs={"batch_size": 512, "generator.latent_dim": 100, "generator_schedule": "constant"}),
    # ZSKT (scripts/ZeroShot/main*.sh, CIFAR-10: batch 128, z 100, n_G 1, n_S 10, lr_G 1e-3 cosine, T 1, beta 250,
    # clip 5; solver.py's F.kl_div default reduction = elementwise mean)
    "zskt": dict(config={"name": "zskt", "batch_size": 128, "iterations": 400, "student_steps": 10, "generator_steps": 1,
                         "latent_dim": 100, "generator_lr": 0.001, "generator_schedule": "cosine",
                         "generator_milestones": [], "generator_gamma": 0.1, "generator_width": 64,
                         "generator_bn_eps": 1e-5, "temperature": 1.0, "kl_reduction": "elementwise",
                         "at_form": "code", "clip_grad_norm": 5.0},
                 weights={"kl": 1.0, "at": 250.0, "adversarial": 1.0},
                 attrs={"student_steps": 10, "generator_steps": 1, "temperature": 1.0, "kl_reduction": "elementwise",
                        "clip_grad_norm": 5.0, "generator.tanh": False, "generator.bn3.affine": True,
                        "student_taps": ("stage1", "stage2", "stage3"), "teacher_taps": ("stage1", "stage2", "stage3"),
                        "teacher_cache": False}),
    # DeepInversion (cifar10/README.md paper parameters: bs 256, r_feature 10, di_lr 0.05, TV 2.5e-5, l2 0, 2000 its;
    # issue #6: 1000 batches of 256; issue #9: KD T 3)
    "deepinversion": dict(config={"name": "deepinversion", "batch_size": 256, "iterations": 1000, "temperature": 3.0,
                                  "synthesis_batch_size": 256, "synthesis_iterations": 2000, "synthesis_lr": 0.05,
                                  "jitter": 2, "flip": False, "random_labels": False, "competition_temperature": 3.0,
                                  "competition_form": "code", "pool_batches": 1000, "initial_batches": 1000,
                                  "synthesis_every": 50,
                                  "synthesis": {"ce": 1.0, "bn": 10.0, "tv": 2.5e-5, "l2": 0.0, "competition": 0.0}},
                          weights={"kd": 1.0},
                          attrs={"kd_temperature": 3.0, "synthesis_iterations": 2000, "synthesis_lr": 0.05,
                                 "jitter": 2, "pool_batches": 1000, "initial_batches": 1000, "synthesis_every": 50,
                                 "synthesis_weights": {"ce": 1.0, "bn": 10.0, "tv": 2.5e-5, "l2": 0.0,
                                                       "competition": 0.0}, "teacher_cache": False}),
    # ADI: DeepInversion + competition 0.2 (the README's --adi_scale for the paper), the pool grown during distillation
    "adi": dict(config={"name": "deepinversion", "label": "adi", "batch_size": 256, "iterations": 1000,
                        "temperature": 3.0, "synthesis_batch_size": 256, "synthesis_iterations": 2000,
                        "synthesis_lr": 0.05, "jitter": 2, "flip": False, "random_labels": False,
                        "competition_temperature": 3.0, "competition_form": "code", "pool_batches": 1000,
                        "initial_batches": 1,
                        "synthesis_every": 50,
                        "synthesis": {"ce": 1.0, "bn": 10.0, "tv": 2.5e-5, "l2": 0.0, "competition": 0.2}},
                weights={"kd": 1.0},
                attrs={"initial_batches": 1, "synthesis_every": 50,
                       "synthesis_weights": {"ce": 1.0, "bn": 10.0, "tv": 2.5e-5, "l2": 0.0, "competition": 0.2}}),
    # ---- ImageNet settings (conf/method/*_in1k.yaml; the base configs keep CIFAR-100's). SETUP composes the per-pair
    # ones for tv_resnet50 -> mobilenet_v1 (test_imagenet_tables.py checks tv_resnet34 -> tv_resnet18 too).
    # mdistiller configs/imagenet/*/kd.yaml: T 1, CE 0.5, KD 0.5
    "kd_in1k": dict(config={"name": "kd", "label": "kd", "temperature": 1.0, "logit_standardization": False},
                    weights={"ce": 0.5, "kd": 0.5},
                    attrs={"kd_temperature": 1.0, "logit_standardization": False}),
    # CTKD scripts/run_imagenet_distill.sh -r 1 -a 1 --kd_T 4 (DIST's KD (T=4) baseline)
    "kd_t4_in1k": dict(config={"name": "kd", "label": "kd", "temperature": 4.0, "logit_standardization": False},
                       weights={"ce": 1.0, "kd": 1.0},
                       attrs={"kd_temperature": 4.0}),
    # mdistiller configs/imagenet/{r34_r18,r50_mv1}/dkd.yaml: CE 1, alpha 1, beta 0.5 / 2.0, T 1, warm-up 1 (no ramp)
    "dkd_in1k": dict(config={"name": "dkd", "label": "dkd", "temperature": 1.0, "warmup_epochs": 1,
                             "logit_standardization": False,
                             "beta_by_pair": {"tv_resnet34": {"tv_resnet18": 0.5}, "tv_resnet50": {"mobilenet_v1": 2.0}}},
                     weights={"ce": 1.0, "tckd": 1.0, "nckd": 2.0},
                     attrs={"temperature": 1.0, "warmup_epochs": 1.0}),
    # mdistiller configs/imagenet/*/reviewkd.yaml + dvlab-research/ReviewKD ImageNet: STU_PREACT, weight 1 / 8,
    # middle width 512 / 256 (build_review_kd), warm-up 1 (no ramp)
    "reviewkd_in1k": dict(config={"name": "reviewkd", "label": "reviewkd", "warmup_epochs": 1, "student_preact": True,
                                  "temperature": 4.0,
                                  "settings_by_pair": {"tv_resnet34": {"tv_resnet18": {"reviewkd": 1.0, "max_mid_channel": 512}},
                                                       "tv_resnet50": {"mobilenet_v1": {"reviewkd": 8.0, "max_mid_channel": 256}}},
                                  "max_mid_channel": "${oc.select:method.settings_by_pair.${teacher.label}.${student.label}.max_mid_channel,512}"},
                          weights={"ce": 1.0, "reviewkd": 8.0},
                          attrs={"warmup_epochs": 1.0, "student_preact": True,
                                 "student_taps": ("stage1_pre", "stage2_pre", "stage3_pre", "embedding"),
                                 "teacher_taps": ("stage1_pre", "stage2_pre", "stage3_pre", "embedding"),
                                 "abfs.0.conv1.0.out_channels": 64}),  # min(256, the resnet8 embedding's 64)
    # mdistiller configs/imagenet/r50_mv1/ofd.yaml FEAT 1e-4 (authors: sum / batch / 10000), deepest 3 levels for
    # ResNet-50 -> MobileNet-V1 (mdistiller), teacher in train mode
    "ofd_in1k": dict(config={"name": "ofd", "label": "ofd", "kernel_size": 1, "teacher_train_mode": True,
                             "temperature": 4.0, "levels_by_pair": {"tv_resnet50": {"mobilenet_v1": 3}},
                             "levels": "${oc.select:method.levels_by_pair.${teacher.label}.${student.label},null}"},
                     weights={"ce": 1.0, "ofd": 1e-4},
                     attrs={"teacher_train_mode": True, "student_taps": ("stage1_pre", "stage2_pre", "stage3_pre")}),
    # DIST on ImageNet (dist.yaml: tau 1, beta = gamma = 1, kd_loss_weight 1)
    "dist_in1k": dict(config={"name": "dist", "label": "dist", "tau": 1.0, "eps": 1e-8},
                      weights={"ce": 1.0, "inter": 1.0, "intra": 1.0},
                      attrs={"tau": 1.0}),
    # CTKD scripts/run_imagenet_distill.sh: -r 1 -a 1, --decay_loops 5
    "ctkd_in1k": dict(config={"name": "ctkd", "label": "ctkd", "temperature_module": "global", "t_start": 1.0,
                              "t_end": 20.0, "init": 1.0, "lambda_max": 0.0, "lambda_min": -1.0, "lambda_loops": 5,
                              "instance_hidden": 256, "teacher_eps": None, "logit_standardization": False},
                      weights={"ce": 1.0, "kd": 1.0, "temperature": 0.0},
                      attrs={"temperature_module.lambda_loops": 5.0, "temperature_module.kind": "global"}),
}

# §1.4: the DKD / ReviewKD warm-up min(epoch / 20, 1) and the terms it scales (CE is never warmed up)
WARMUP_EPOCHS = 20
WARMED_TERMS = {"dkd": {"tckd", "nckd"}, "dkd_per_pair": {"tckd", "nckd"}, "reviewkd": {"reviewkd"},
                "kd_nd": {"kd"}, "dkd_nd": {"tckd", "nckd"}, "reviewkd_nd": {"reviewkd"}, "dist_nd": {"inter", "intra"}}
# The ND repo's loops count epochs from 0: its ramp is min((epoch - 1) / 20, 1) in kdbench's 1-indexed epochs
WARMUP_OFFSET = {"kd_nd": 1, "dkd_nd": 1, "reviewkd_nd": 1, "dist_nd": 1}
# The ONE / OKDDip / FFL codes' sigmoid ramp-up exp(-5 (1 - min(e, L) / L)^2) over L epochs, e = the 0-indexed epoch
# (kdbench epoch - 1), on exactly these terms (ONE utils/ramps.py, FFL-pytorch utils.sigmoid_rampup, OKDDip train_GL.py)
SIGMOID_RAMPS = {"one": ({"kl", "branch_kl"}, 80), "okddip": ({"peer_kl", "leader_kl"}, 80),
                 "ffl": ({"kl", "sub_kl", "fused_kl"}, 80)}

# ----------------------------------------------------------------------------- the pair each config is built on
# (teacher, student, extra compose overrides). Default: resnet14 -> resnet8 at 16x16 (maps 16/8/4, equal widths, so FSP
# and KDSVD's rd reshape work). Self-training needs the student's architecture; DML / Tf-KD_reg / vanilla need none.
DEFAULT_SETUP = ("resnet14", "resnet8", ())
SETUP = {
    "ban": ("resnet8", "resnet8", ()),
    "tf_kd_self": ("resnet8", "resnet8", ()),
    "dml": (None, "resnet8", ("student=resnet8",)),  # the peer is ${student.model}
    "tf_kd": (None, "resnet8", ()),
    "vanilla": (None, "resnet8", ()),
    # the config is composed for resnet56 -> resnet20 (beta 2 from the table); the loss itself only needs logits
    "dkd_per_pair": ("resnet14", "resnet8", ("teacher=resnet56", "student=resnet20")),
    "uskd": (None, "resnet8", ()),
    # composed for resnet110 -> resnet20 (T 4, weight 12 from the table); the loss itself only needs logits
    "lskd_per_pair": ("resnet14", "resnet8", ("teacher=resnet110", "student=resnet20")),
    "semckd": ("resnet14", "resnet8", (f"trainer.batch_size={BATCH}",)),  # its attention MLPs take whole batches
    # the online methods build their extra networks from ${student.model} (rocket's booster from ${teacher.model})
    "one": (None, "resnet8", ("student=resnet8",)),
    "okddip": (None, "resnet8", ("student=resnet8",)),
    "ffl": (None, "resnet8", ("student=resnet8",)),
    "ktg": (None, "resnet8", ("student=resnet8",)),
    "rocket": (None, "resnet8", ("teacher=resnet14", "student=resnet8")),
    "cs_kd": (None, "resnet8", ()),
    "byot": (None, "resnet8", ()),
    "sla_sd": (None, "resnet8", ()),
    "multi_exit": (None, "resnet8", ()),
    "multi_exit_ce": (None, "resnet8", ()),
    "netgraft": ("vgg16", "vgg16_graft", ()),  # NetGraft grafts kdbench VGG blocks (the student copies blocks 0-2)
    # composed for tv_resnet50 -> mobilenet_v1 (their per-pair values); built on the default small pair
    "dkd_in1k": ("resnet14", "resnet8", ("teacher=tv_resnet50", "student=mobilenet_v1")),
    "reviewkd_in1k": ("resnet14", "resnet8", ("teacher=tv_resnet50", "student=mobilenet_v1")),
    "ofd_in1k": ("resnet14", "resnet8", ("teacher=tv_resnet50", "student=mobilenet_v1")),
}


def setup_of(name):
    return SETUP.get(name, DEFAULT_SETUP)


@lru_cache(maxsize=None)
def composed(name: str, *overrides: str):
    """The composed method config (cached: tests must not mutate it)."""
    return method_config(name, *setup_of(name)[2], *overrides)


def build(name: str, *overrides: str, seed: int = 0):
    """(method, pair, batch, student outputs, teacher outputs) for a config on its SETUP pair."""
    teacher, student, _ = setup_of(name)
    pair = make_pair(teacher, student, NUM_CLASSES, SHAPE, N_TRAIN, seed)
    method = create_method(composed(name, *overrides), pair)
    batch = make_batch(BATCH, NUM_CLASSES, SHAPE)
    s_out, t_out = forward(pair, method, batch, method.student_taps, method.teacher_taps)
    if name in EXTRA_VIEWS:
        s_out, t_out = EXTRA_VIEWS[name](pair, method, batch, s_out, t_out)
    return method, pair, batch, s_out, t_out


def forward(pair, method, batch, student_taps, teacher_taps):
    s_out = pair.student.forward_taps(batch.inputs, student_taps)
    t_out = None
    if pair.teacher is not None and method.needs_teacher:
        pair.teacher.train(method.teacher_train_mode)
        with torch.no_grad():
            t_out = pair.teacher.forward_taps(batch.inputs, teacher_taps)
    return s_out, t_out


def mlkd_views(pair, method, batch, s_out, t_out):
    """MLKD's forward_loss runs both nets on a strong view too: its logits under `strong_logits` on both sides."""
    from kdbench.methods.mlkd import STRONG
    strong = method.strong_inputs(batch.inputs, 1)
    with torch.no_grad():
        t_strong = pair.teacher.forward_taps(strong, method.teacher_taps)["logits"]
    return {**s_out, STRONG: pair.student.forward_taps(strong, method.student_taps)["logits"]}, {**t_out, STRONG: t_strong}


def multi_teacher_view(pair, method, batch, s_out, t_out):
    """kd_avg / ae_kd learn from every teacher: a second teacher (another SETUP-architecture net, its own seed, eval
    mode) joins the first, their logits stacked under ENSEMBLE as the methods' forward_loss does."""
    from kdbench.methods.teacher_ensemble import ensemble_outputs
    from tests.conftest import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        other = build_model(pair.teacher_name, NUM_CLASSES, SHAPE).eval()
    with torch.no_grad():
        t2 = other.forward_taps(batch.inputs, method.teacher_taps)
    return s_out, ensemble_outputs([t_out, t2])


# Methods that own their forward (a second view of the batch): how build() adds the extra outputs their terms read
def cs_kd_views(pair, method, batch, s_out, t_out):
    """CS-KD's forward_loss adds the partners' logits (a second student forward, no gradient) under PAIR."""
    from kdbench.methods.cs_kd import PAIR
    partners = make_batch(BATCH, NUM_CLASSES, SHAPE, seed=2)
    with torch.no_grad():
        pair_logits = pair.student.forward_taps(partners.inputs, ())["logits"]
    return {**s_out, PAIR: pair_logits}, t_out


EXTRA_VIEWS = {"mlkd": mlkd_views, "kd_avg": multi_teacher_view, "ae_kd": multi_teacher_view, "cs_kd": cs_kd_views}
# Logged terms that do not involve the teacher (the strong view's CE, a learned temperature)
TEACHER_FREE_TERMS = {"mlkd": {"ce_strong"}, "ctkd": {"temperature"}, "ctkd_in1k": {"temperature"},
                      # MEAL's fresh logit discriminator (10 -> 5 -> 2 -> 2, a ReLU after every layer as the repo's)
                      # scores the untrained nets' near-zero logits all 0, whatever the teacher: its BCE is log 2 here.
                      # tests/methods/test_meal.py checks the teacher dependence on a discriminator that responds.
                      "meal": {"adv_logits"},
                      "tofd": {"aux_ce", "orth"}}  # TOFD's student auxiliary CE and its links' orthogonality


# Methods whose term_weights scale every weight by a constant of the built method: multi_exit's global_scale
# (train_cifar.py: 2 * 5 / n_exits; resnet8 has 2 early exits + its own classifier)
WEIGHT_SCALE = {"multi_exit": 10 / 3}


def ramp(name: str, term: str, epoch: int) -> float:
    if name in SIGMOID_RAMPS:
        terms, length = SIGMOID_RAMPS[name]
        return math.exp(-5.0 * (1.0 - min(epoch - 1, length) / length) ** 2) if term in terms else 1.0
    shifted = max(epoch - WARMUP_OFFSET.get(name, 0), 0)
    scale = WEIGHT_SCALE.get(name, 1.0)
    return scale * (min(shifted / WARMUP_EPOCHS, 1.0) if term in WARMED_TERMS.get(name, ()) else 1.0)


def get_attr(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- expected terms (part 2)
# For each config: the terms recomputed from the plain loss functions on the named taps, with the reference
# hyper-parameters (REFERENCE[...]), calling the method's own trainable heads where it has them.


def _ce(s, b):
    return F.cross_entropy(s["logits"], b.targets)


def _stages(out, suffix=""):
    return [out[f"stage{i}{suffix}"] for i in (1, 2, 3)]


def _kd(s, t, T=4.0):
    from kdbench.methods.kd import kd_loss
    return kd_loss(s["logits"], t["logits"], T)


def exp_kd(m, pair, b, s, t, ref):
    return {"ce": _ce(s, b), "kd": _kd(s, t, ref["config"]["temperature"])}


def exp_fitnet(m, pair, b, s, t, ref):
    from kdbench.methods.fitnet import hint_loss
    return {"ce": _ce(s, b), "hint": hint_loss(m.regressor(s["stage2"]), t["stage2"])}


def exp_at(m, pair, b, s, t, ref):
    from kdbench.methods.at import at_loss
    return {"ce": _ce(s, b), "at": at_loss(_stages(s), _stages(t), p=ref["config"]["p"])}


def exp_sp(m, pair, b, s, t, ref):
    from kdbench.methods.sp import sp_loss
    return {"ce": _ce(s, b), "sp": sp_loss(s["stage3"], t["stage3"])}


def exp_cc(m, pair, b, s, t, ref):
    from kdbench.methods.cc import cc_reference_loss
    return {"ce": _ce(s, b), "cc": cc_reference_loss(m.embed_s(s["embedding"]), m.embed_t(t["embedding"]))}


def exp_vid(m, pair, b, s, t, ref):
    from kdbench.methods.vid import softplus_variance, vid_nll
    total = 0.0
    for level, f_s, f_t in zip(m.levels, _stages(s), _stages(t), strict=True):
        f_s, f_t = match_spatial(f_s, f_t)
        total = total + vid_nll(level.regressor(f_s), f_t, softplus_variance(level.alpha, ref["config"]["eps"]))
    return {"ce": _ce(s, b), "vid": total}


def exp_rkd(m, pair, b, s, t, ref):
    from kdbench.methods.rkd import rkd_angle_loss, rkd_distance_loss
    return {"ce": _ce(s, b), "rkd_distance": rkd_distance_loss(s["embedding"], t["embedding"]),
            "rkd_angle": rkd_angle_loss(s["embedding"], t["embedding"])}


def exp_pkt(m, pair, b, s, t, ref):
    from kdbench.methods.pkt import pkt_loss
    return {"ce": _ce(s, b), "pkt": pkt_loss(s["embedding"], t["embedding"])}


def exp_ab(m, pair, b, s, t, ref):
    return {"ce": _ce(s, b)}  # main training is CE only (§1.4); the AB loss lives in the stage (EXPECTED_STAGE)


def exp_ft(m, pair, b, s, t, ref):
    from kdbench.methods.ft import ft_loss
    with torch.no_grad():
        factor_t = m.paraphraser.encoder(t["stage3"])
    return {"ce": _ce(s, b), "ft": ft_loss(m.translator(s["stage3"]), factor_t, ref["config"]["variant"])}


def exp_fsp(m, pair, b, s, t, ref):
    from kdbench.methods.fsp import fsp_loss
    return {"ce": _ce(s, b), "fsp": fsp_loss([s["stem"], *_stages(s)], [t["stem"], *_stages(t)], "mean")}


def exp_nst(m, pair, b, s, t, ref):
    from kdbench.methods.nst import nst_loss
    return {"ce": _ce(s, b), "nst": nst_loss(_stages(s), _stages(t))}


def exp_crd(m, pair, b, s, t, ref):
    """Called on a deep copy of the method taken before its loss, with the same RNG seed (the sampler draws)."""
    from kdbench.methods.crd import contrast_scores, nce_loss
    cfg = ref["config"]
    n = len(pair.train_labels)
    idx = b.indices
    e_s, e_t = m.embed_s(s["embedding"]), m.embed_t(t["embedding"])
    contrast = m.sampler(idx)
    assert torch.equal(contrast[:, 0], idx)  # mode exact: the positive is the sample itself
    out_s = contrast_scores(m.bank_t, e_s, contrast, cfg["nce_t"])  # student anchor vs teacher bank
    out_t = contrast_scores(m.bank_s, e_t, contrast, cfg["nce_t"])  # teacher anchor vs student bank
    z_s, z_t = out_s.mean() * n, out_t.mean() * n  # Z fixed from the first batch
    terms = {"ce": _ce(s, b), "crd": nce_loss(out_s / z_s, n) + nce_loss(out_t / z_t, n)}
    if "kd" in ref["weights"]:
        terms["kd"] = _kd(s, t, cfg["temperature"])
    return terms


def exp_kdsvd(m, pair, b, s, t, ref):
    from kdbench.methods.kdsvd import kdsvd_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "kdsvd": kdsvd_loss(_stages(s), _stages(t), cfg["k"], cfg["reshape"])}


def exp_ofd(m, pair, b, s, t, ref):
    from kdbench.methods.ofd import ofd_loss, ofd_margin
    margins = [ofd_margin(bn.weight, bn.bias) for bn in pair.teacher.bn_before_relu()]  # stage1..3 BN-before-ReLU
    g_s = [conn(f) for conn, f in zip(m.connectors, _stages(s, "_pre"), strict=True)]
    return {"ce": _ce(s, b), "ofd": ofd_loss(g_s, _stages(t, "_pre"), margins)}


def exp_reviewkd(m, pair, b, s, t, ref):
    """§2.16: student [stage1, stage2, stage3, pooled] fused deepest first by the ABFs; teacher pre-activation maps."""
    from kdbench.methods.reviewkd import hcl_loss
    s_feats = [*_stages(s), s["embedding"][:, :, None, None]]
    t_feats = [*_stages(t, "_pre"), t["embedding"][:, :, None, None]]
    deep_first = list(zip(s_feats[::-1], [f.shape[-2:] for f in t_feats][::-1]))
    out, residual = m.abfs[0](deep_first[0][0], out_size=deep_first[0][1])
    fused = [out]
    for (x, size), abf in zip(deep_first[1:], m.abfs[1:], strict=True):
        out, residual = abf(x, residual, size)
        fused.insert(0, out)
    return {"ce": _ce(s, b), "reviewkd": hcl_loss(fused, t_feats)}


def exp_dkd(m, pair, b, s, t, ref):
    from kdbench.methods.dkd import nckd_loss, tckd_loss
    T = ref["config"]["temperature"]
    return {"ce": _ce(s, b), "tckd": tckd_loss(s["logits"], t["logits"], b.targets, T),
            "nckd": nckd_loss(s["logits"], t["logits"], b.targets, T)}


def exp_tf_kd(m, pair, b, s, t, ref):
    from kdbench.methods.tf_kd import tf_kd_reg_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "tf_kd": tf_kd_reg_loss(s["logits"], b.targets, cfg["temperature"], cfg["correct_prob"])}


def exp_dml(m, pair, b, s, t, ref):
    from kdbench.methods.dml import dml_loss
    return dml_loss(s["logits"], [peer(b.inputs) for peer in m.peers], b.targets, ref["config"]["mimic"])


def exp_cond_ts(m, pair, b, s, t, ref):
    from kdbench.methods.cond_ts import conditional_ts_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "cts": conditional_ts_loss(s["logits"], t["logits"], b.targets, cfg["temperature"],
                                                        cfg["soft_loss"])}


def exp_logit_l2(m, pair, b, s, t, ref):
    from kdbench.methods.logit_l2 import logit_l2_loss
    return {"ce": _ce(s, b), "l2": logit_l2_loss(s["logits"], t["logits"], ref["config"]["reduction"])}


def exp_darkrank(m, pair, b, s, t, ref):
    from kdbench.methods.darkrank import darkrank_hard_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "darkrank": darkrank_hard_loss(s["embedding"], t["embedding"], cfg["alpha"], cfg["beta"],
                                                            cfg["normalize"], cfg["hard_top_k"])}


def exp_vanilla(m, pair, b, s, t, ref):
    return {"ce": _ce(s, b)}


def exp_lskd(m, pair, b, s, t, ref):
    from kdbench.methods.lskd import lskd_loss
    cfg = ref["config"]
    T = ref["attrs"]["temperature"]  # lskd_per_pair's T is an interpolation in the config
    return {"ce": _ce(s, b), "lskd": lskd_loss(s["logits"], t["logits"], T, cfg["eps"], cfg["unbiased"])}


def exp_dist(m, pair, b, s, t, ref):
    from kdbench.methods.dist import dist_inter_loss, dist_intra_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "inter": dist_inter_loss(s["logits"], t["logits"], cfg["tau"], cfg["eps"]),
            "intra": dist_intra_loss(s["logits"], t["logits"], cfg["tau"], cfg["eps"])}


def exp_ttm(m, pair, b, s, t, ref):
    from kdbench.methods.ttm import ttm_loss
    return {"ce": _ce(s, b), "ttm": ttm_loss(s["logits"], t["logits"], ref["config"]["gamma"])}


def exp_wttm(m, pair, b, s, t, ref):
    from kdbench.methods.ttm import wttm_loss
    return {"ce": _ce(s, b), "wttm": wttm_loss(s["logits"], t["logits"], ref["config"]["gamma"])}


def exp_nkd(m, pair, b, s, t, ref):
    from kdbench.methods.nkd import nkd_non_target_loss, nkd_target_loss
    T = ref["config"]["temperature"]
    return {"ce": _ce(s, b), "nkd_target": nkd_target_loss(s["logits"], t["logits"], b.targets),
            "nkd_non_target": nkd_non_target_loss(s["logits"], t["logits"], b.targets, T)}


def exp_uskd(m, pair, b, s, t, ref):
    from kdbench.methods.uskd import uskd_non_target_loss, uskd_target_loss, uskd_weak_loss, zipf_non_target_labels
    cfg = ref["config"]
    z_w = m.fc(s["stage2"].mean(dim=(2, 3)))  # the weak head on the pooled second-to-last stage
    labels = zipf_non_target_labels(s["logits"], z_w, b.targets, cfg["rank_student"])
    return {"ce": _ce(s, b), "uskd_target": uskd_target_loss(s["logits"], b.targets),
            "uskd_non_target": uskd_non_target_loss(s["logits"], labels, b.targets),
            "uskd_weak": uskd_weak_loss(z_w, b.targets, cfg["smoothing"])}


def exp_wsld(m, pair, b, s, t, ref):
    from kdbench.methods.wsld import wsld_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "wsld": wsld_loss(s["logits"], t["logits"], b.targets, cfg["temperature"], cfg["eps"])}
def exp_sskd(m, pair, b, s, t, ref):
    """SSKD's loss reads a view batch: rows 4i..4i+3 are image i at 0/90/180/270 degrees (here 8 rows = 2 groups).
    CE/KD on rows 4i with label y_4i; tf on the other rows (image-major) with their image's label; ss on the heads."""
    from kdbench.methods.kd import kd_loss
    from kdbench.methods.sskd import sskd_ss_loss, sskd_tf_loss
    cfg = ref["config"]
    orig = torch.arange(BATCH) % 4 == 0
    y = b.targets[orig]
    with torch.no_grad():
        h_t = m.teacher_head(t["embedding"])
    return {"ce": F.cross_entropy(s["logits"][orig], y),
            "kd": kd_loss(s["logits"][orig], t["logits"][orig], cfg["temperature"]),
            "tf": sskd_tf_loss(s["logits"][~orig], t["logits"][~orig], y.repeat_interleave(3), cfg["tf_temperature"],
                               cfg["tf_ratio"]),
            "ss": sskd_ss_loss(m.student_head(s["embedding"]), h_t, cfg["ss_temperature"], cfg["ss_ratio"])}
def exp_mlkd(m, pair, b, s, t, ref):
    from kdbench.methods.mlkd import STRONG, mlkd_terms
    cfg = ref["config"]
    temps = (cfg["temperature"], *cfg["extra_temperatures"])
    return {"ce": _ce(s, b), **mlkd_terms(s["logits"], s[STRONG], t["logits"], t[STRONG], b.targets, temps,
                                          cfg["mask_mode"], cfg["strong_copy_paste"], cfg["logit_standardization"])}


def exp_ctkd(m, pair, b, s, t, ref):
    """The temperature from the method's own module (at the test's epoch 240: lambda -1, which changes no value)."""
    from kdbench.methods.ctkd import temperature_kd_loss
    temp = m.temperature_module(s["logits"], t["logits"], 240)
    return {"ce": _ce(s, b), "kd": temperature_kd_loss(s["logits"], t["logits"], temp), "temperature": temp.mean()}
def exp_simkd(m, pair, b, s, t, ref):
    """SimKD: MSE(projector(student stage3), teacher stage3) (equal 4x4 sizes on the SETUP pair); ce on the student's
    own logits."""
    from kdbench.methods.simkd import simkd_loss
    return {"ce": _ce(s, b), "simkd": simkd_loss(m.projector(s["stage3"]), t["stage3"])}


def exp_semckd(m, pair, b, s, t, ref):
    """SemCKD: every (student stage i, teacher stage j), the larger map pooled, projected by projs[3 i + j]; the
    attention from the query/key MLPs on the batch Gram matrices, softmax over teacher stages at soft."""
    from kdbench.methods.semckd import gram_rows, semckd_attention, semckd_loss
    f_s, f_t = _stages(s), _stages(t)
    q = torch.stack([mlp(gram_rows(f)) for mlp, f in zip(m.queries, f_s, strict=True)], 1)
    k = torch.stack([mlp(gram_rows(f)) for mlp, f in zip(m.keys, f_t, strict=True)], 1)
    s_values, t_values = [], []
    for i, fs in enumerate(f_s):
        pairs = [match_spatial(fs, ft) for ft in f_t]
        s_values.append([m.projs[3 * i + j](a) for j, (a, _) in enumerate(pairs)])
        t_values.append([c for _, c in pairs])
    att = semckd_attention(q, k, ref["config"]["soft"])
    return {"ce": _ce(s, b), "kd": _kd(s, t, ref["config"]["temperature"]), "semckd": semckd_loss(s_values, t_values, att)}


def exp_srrl(m, pair, b, s, t, ref):
    """SRRL: connector(student embedding) vs the teacher embedding, and through the teacher's own fc vs its logits."""
    from kdbench.methods.srrl import srrl_feature_loss, srrl_regression_loss
    mapped = m.connector(s["embedding"])
    fc = pair.teacher.fc
    return {"ce": _ce(s, b), "kd": _kd(s, t, ref["config"]["temperature"]),
            "srrl_fm": srrl_feature_loss(mapped, t["embedding"]),
            "srrl_sr": srrl_regression_loss(mapped, fc.weight.detach(), fc.bias.detach(), t["logits"])}


def exp_cat_kd(m, pair, b, s, t, ref):
    """CAT-KD: CAMs of stage3 with the student's fc weight and the teacher's fc weight (no bias), R 2, no norm."""
    from kdbench.methods.cat_kd import cat_loss, class_activation_maps
    cfg = ref["attrs"]
    return {"ce": _ce(s, b), "cat": cat_loss(class_activation_maps(s["stage3"], pair.student.fc.weight),
                                             class_activation_maps(t["stage3"], pair.teacher.fc.weight.detach()),
                                             cfg["resolution"], cfg["normalize"])}


def exp_ickd(m, pair, b, s, t, ref):
    from kdbench.methods.ickd import ickd_loss
    terms = {"ce": _ce(s, b), "ickd": ickd_loss(m.embed(s["stage3"]), t["stage3"], ref["config"]["normalizer"])}
    if "kd" in ref["weights"]:
        terms["kd"] = _kd(s, t, ref["config"]["temperature"])
    return terms


def exp_srd(m, pair, b, s, t, ref):
    from kdbench.methods.srd import srd_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "srd": srd_loss(m.projector(s["embedding"]), t["embedding"], cfg["exponent"], cfg["bn_eps"]),
            "kd": _kd(s, t, cfg["temperature"])}


def exp_itrd(m, pair, b, s, t, ref):
    """ITRD: correlation on embed(z_s); mutual on z_s itself (equal widths on the SETUP pair)."""
    from kdbench.methods.itrd import itrd_correlation_loss, itrd_mutual_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "itrd_corr": itrd_correlation_loss(m.embed(s["embedding"]), t["embedding"], cfg["alpha"]),
            "itrd_mutual": itrd_mutual_loss(s["embedding"], t["embedding"])}


def _nd(m, b, s, t):
    """ND on the embeddings (equal widths: no EmbTrans); no centre pass ran, so the centres are the running class means
    of the teacher embeddings seen so far, this batch included (m is the method's state before its loss)."""
    from kdbench.methods.nd import nd_loss
    sums = m.centre_sum.clone().index_add(0, b.targets, t["embedding"].detach())
    return nd_loss(s["embedding"], t["embedding"], sums, b.targets)


def exp_kd_nd(m, pair, b, s, t, ref):
    return {**exp_kd(m, pair, b, s, t, ref), "nd": _nd(m, b, s, t)}


def exp_dkd_nd(m, pair, b, s, t, ref):
    return {**exp_dkd(m, pair, b, s, t, ref), "nd": _nd(m, b, s, t)}


def exp_reviewkd_nd(m, pair, b, s, t, ref):
    return {**exp_reviewkd(m, pair, b, s, t, ref), "nd": _nd(m, b, s, t)}


def exp_dist_nd(m, pair, b, s, t, ref):
    return {**exp_dist(m, pair, b, s, t, ref), "nd": _nd(m, b, s, t)}


def _teacher_stack(t):
    """Every teacher's logits (M, N, C): the stacked ENSEMBLE entry multi_teacher_view adds (M = 2)."""
    from kdbench.methods.teacher_ensemble import ENSEMBLE
    assert t[ENSEMBLE].shape[0] == 2 and torch.equal(t[ENSEMBLE][0], t["logits"])
    return t[ENSEMBLE]


def exp_kd_avg(m, pair, b, s, t, ref):
    from kdbench.methods.kd_avg import kd_avg_loss
    cfg = ref["config"]
    return {"ce": _ce(s, b), "kd": kd_avg_loss(s["logits"], _teacher_stack(t), cfg["temperature"], cfg["average"])}


def exp_ae_kd(m, pair, b, s, t, ref):
    from kdbench.methods.ae_kd import ae_kd_loss
    cfg = ref["config"]
    loss, _ = ae_kd_loss(s["logits"], _teacher_stack(t), cfg["temperature"], cfg["tolerance"], cfg["granularity"],
                         cfg["normalize_gradients"], cfg["rescale_gram"])
    return {"ce": _ce(s, b), "aekd": loss}


def exp_meal(m, pair, b, s, t, ref):
    """MEAL on the logits of the (drawn) teacher: soft CE at T 1, and the method's own logit discriminator's BCE."""
    from kdbench.methods.meal import meal_discriminator_loss, meal_similarity_loss
    d = m.discriminators["logits"]
    return {"ce": _ce(s, b), "sim_logits": meal_similarity_loss(s["logits"], t["logits"], ref["config"]["similarity"]),
            "adv_logits": meal_discriminator_loss(d(s["logits"]), d(t["logits"]))}
def exp_one(m, pair, b, s, t, ref):
    from kdbench.methods.one import gate_weights, one_loss
    x = s["stage2"]
    z = [s["logits"], *(tail(x)[2] for tail in m.tails)]
    cfg = ref["config"]
    return one_loss(z, gate_weights(x, m.gate_fc, m.gate_bn), b.targets, cfg["temperature"], cfg["eps"])


def exp_okddip(m, pair, b, s, t, ref):
    from kdbench.methods.okddip import okddip_loss, peer_attention
    outs = [net(s["stage2"]) for net in m.peer_nets]
    h = torch.stack([o[1] for o in outs], dim=1)
    cfg = ref["config"]
    return okddip_loss([o[2] for o in outs], peer_attention(m.query(h), m.key(h)), s["logits"], b.targets,
                       cfg["temperature"], cfg["eps"], cfg["detach_targets"])


def exp_ffl(m, pair, b, s, t, ref):
    from kdbench.methods.ffl import ffl_loss
    f2, _, z2 = m.sub2(s["stage2"])
    cfg = ref["config"]
    return ffl_loss([s["logits"], z2], m.fusion([s["stage3"], f2]), b.targets, cfg["temperature"], cfg["eps"])


def exp_ktg(m, pair, b, s, t, ref):
    from kdbench.methods.ktg import ktg_edge_loss
    z = [s["logits"], *(node(b.inputs) for node in m.nodes)]
    T = ref["config"]["temperature"]
    out = {}
    for e in ref["config"]["edges"]:
        name = ("ce" if e["target"] == 0 else f"ce_{e['target']}") if e["loss"] == "ce" \
            else f"kl_{e['target']}_from_{e['source']}"
        out[name] = ktg_edge_loss(e["loss"], e["gate"], z[e["target"]], z[e["source"]], b.targets, T)
    return out


def exp_rocket(m, pair, b, s, t, ref):
    from kdbench.methods.rocket import rocket_loss
    return rocket_loss(s["logits"], m.booster(b.inputs), b.targets, ref["config"]["gradient_block"])
def exp_cs_kd(m, pair, b, s, t, ref):
    from kdbench.methods.cs_kd import PAIR, cs_kd_loss
    return {"ce": _ce(s, b), "cls": cs_kd_loss(s["logits"], s[PAIR], ref["config"]["temperature"])}


def exp_byot(m, pair, b, s, t, ref):
    """BYOT: each exit module on its stage tap; the deepest = the student's logits and embedding."""
    from kdbench.methods.byot import byot_feature_loss, exit_ce_loss, exit_kd_loss
    cfg = ref["config"]
    outs = [head(s[tap]) for head, tap in zip(m.exits, ("stage1", "stage2"))]
    return {"ce": _ce(s, b), "exit_ce": exit_ce_loss([z for _, z in outs], b.targets),
            "exit_kd": exit_kd_loss([z for _, z in outs], s["logits"], cfg["temperature"]),
            "exit_feat": byot_feature_loss([f for f, _ in outs], s["embedding"], cfg["feature_loss"],
                                           cfg["feature_chunk"])}


def exp_sla_sd(m, pair, b, s, t, ref):
    """SLA+SD reads a view batch: rows 4i..4i+3 are image i's rotations (here 8 rows = 2 images, labels of rows 4i)."""
    from kdbench.methods.sla_sd import sla_joint_loss, sla_sd_loss
    y = b.targets[::4]
    joint = m.joint_head(s["embedding"])
    return {"ce": F.cross_entropy(s["logits"][::4], y), "joint": sla_joint_loss(joint, y),
            "sd": sla_sd_loss(s["logits"][::4], joint, ref["config"]["temperature"])}


def exp_multi_exit(m, pair, b, s, t, ref):
    """Multi-exit: the exits on stage1 and stage2, the soft targets at the starting temperature (no step has run)."""
    from kdbench.methods.multi_exit import multi_exit_ce_loss, multi_exit_kd_loss
    logits = [head(s[tap]) for head, tap in zip(m.exits, ("stage1", "stage2"))]
    T = ref["config"]["temperature"]
    return {"ce": _ce(s, b), "exit_ce": multi_exit_ce_loss(logits, b.targets),
            "exit_kd": multi_exit_kd_loss(logits, s["logits"], T), "temperature": torch.tensor(T)}


def exp_label_refinery(m, pair, b, s, t, ref):
    from kdbench.methods.label_refinery import refinery_loss
    return {"ce": _ce(s, b), "refinery": refinery_loss(s["logits"], t["logits"])}
def exp_pad(m, pair, b, s, t, ref):
    from kdbench.methods.pad import pad_l2_loss
    return {"ce": _ce(s, b), "pad_l2": pad_l2_loss(s["embedding"], t["embedding"], m.var_estimator(s["embedding"]),
                                                   ref["config"]["eps"])}


def exp_irg(m, pair, b, s, t, ref):
    from kdbench.methods.irg import irg_edge_loss, irg_transformation_loss, irg_vertex_loss
    terms = {"ce": _ce(s, b), "irg_vertex": irg_vertex_loss(s["logits"], t["logits"]),
             "irg_edge": irg_edge_loss([s["embedding"], s["stage2"], s["stage3"]],
                                       [t["embedding"], t["stage2"], t["stage3"]]),
             "irg_transformation": irg_transformation_loss(s["stage2"], s["stage3"], t["stage2"], t["stage3"])}
    return terms


def exp_mgd(m, pair, b, s, t, ref):
    """MGD: the student's pre-activation maps through the method's BNs, the flows as built (one group: arange)."""
    from kdbench.methods.mgd import mgd_loss
    pre = _stages(s, "_pre")
    return {"ce": _ce(s, b), "mgd": mgd_loss([bn(f) for bn, f in zip(m.bns, pre)], _stages(t, "_pre"), m.margins,
                                             m.flows)}


def exp_tofd(m, pair, b, s, t, ref):
    """TOFD at epoch 240: T = 1 + 3 * 240 / 250; the aux classifiers on stage1, stage2, the nets' heads last."""
    from kdbench.methods.tofd import orthogonal_loss, soft_cross_entropy, tofd_feature_loss
    m.teacher_head.eval()
    s_out = [head(s[k]) for head, k in zip(m.student_heads, ("stage1", "stage2"))]
    with torch.no_grad():
        t_out = [head(t[k]) for head, k in zip(m.teacher_head, ("stage1", "stage2"))]
    f_s, z_s = [f for f, _ in s_out] + [s["embedding"]], [z for _, z in s_out] + [s["logits"]]
    f_t, z_t = [f for f, _ in t_out] + [t["embedding"]], [z for _, z in t_out] + [t["logits"]]
    T = 1.0 + 3.0 * 240 / 250
    return {"ce": _ce(s, b), "aux_ce": sum(F.cross_entropy(z, b.targets) for z in z_s[:-1]),
            "tofd_kd": sum(soft_cross_entropy(a, c, T) for a, c in zip(z_s, z_t)),
            "tofd_feat": tofd_feature_loss([link(f) for link, f in zip(m.links, f_s)], f_t),
            "orth": orthogonal_loss([link.weight for link in m.links])}


def exp_mhgd(m, pair, b, s, t, ref):
    from kdbench.methods.mhgd import align_to_teacher, leading_right_singular_vectors, mhgd_loss
    m.attention.eval()
    v_t = [leading_right_singular_vectors(f, 1).squeeze(2) for f in _stages(t)]
    v_s = [align_to_teacher(leading_right_singular_vectors(f, 4), v.unsqueeze(2)) for f, v in zip(_stages(s), v_t)]
    g_t = [att(v_t[i], v_t[i - 1]) for i, att in enumerate(m.attention, start=1)]
    g_s = [att(v_s[i], v_s[i - 1]) for i, att in enumerate(m.attention, start=1)]
    return {"ce": _ce(s, b), "mhgd": mhgd_loss(g_s, g_t, reverse=True)}


def exp_rco(m, pair, b, s, t, ref):
    """No anchors on a fresh pair: the converged teacher is the only anchor, so the term is Hinton's KD."""
    return {"ce": _ce(s, b), "kd": _kd(s, t, ref["config"]["temperature"])}


def exp_fskd(m, pair, b, s, t, ref):
    return {"ce": _ce(s, b), "kd": _kd(s, t, ref["config"]["temperature"])}


def exp_netgraft(m, pair, b, s, t, ref):
    from kdbench.methods.netgraft import normalized_logit_mse
    return {"graft": normalized_logit_mse(s["logits"], t["logits"])}


def exp_l2t_ww(m, pair, b, s, t, ref):
    from kdbench.methods.l2t_ww import l2t_pair_loss
    total = 0.0
    for k, (ts, ss) in enumerate(m.pairs):
        total = total + l2t_pair_loss(t[ts], m.regressors[k](s[ss]), m.wnet[k](t[ts]), m.lwnet[k](t[ts]))
    return {"ce": _ce(s, b), "l2t_match": total}
def exp_dafl(m, pair, b, s, t, ref):
    from kdbench.methods.dafl import activation_loss, information_entropy_loss, one_hot_loss
    cfg = ref["config"]
    return {"one_hot": one_hot_loss(t["logits"]),
            "activation": activation_loss(t[cfg["feature_tap"]], cfg["activation_reduction"]),
            "info_entropy": information_entropy_loss(t["logits"], cfg["entropy_log_base"]),
            "kd": _kd(s, t, cfg["temperature"])}


def exp_dfad(m, pair, b, s, t, ref):
    from kdbench.methods.dfad import dfad_generator_loss, dfad_student_loss
    return {"l1": dfad_student_loss(s["logits"], t["logits"]),
            "adversarial": dfad_generator_loss(s["logits"], t["logits"], ref["config"]["generator_loss"])}


def exp_zskt(m, pair, b, s, t, ref):
    from kdbench.methods.at import at_loss
    from kdbench.methods.datafree import kl_divergence
    cfg = ref["config"]
    kl = kl_divergence(s["logits"], t["logits"], cfg["temperature"], cfg["kl_reduction"])
    return {"kl": kl, "at": at_loss(_stages(s), _stages(t)), "adversarial": -kl}


def exp_deepinversion(m, pair, b, s, t, ref):
    return {"kd": _kd(s, t, ref["config"]["temperature"])}
def exp_reviewkd_preact(m, pair, b, s, t, ref):
    """ReviewKD with student_preact (ImageNet): the student's PRE-activation stages + pooled embedding feed the ABFs."""
    from kdbench.methods.reviewkd import hcl_loss
    s_feats = [*_stages(s, "_pre"), s["embedding"][:, :, None, None]]
    t_feats = [*_stages(t, "_pre"), t["embedding"][:, :, None, None]]
    deep_first = list(zip(s_feats[::-1], [f.shape[-2:] for f in t_feats][::-1]))
    out, residual = m.abfs[0](deep_first[0][0], out_size=deep_first[0][1])
    fused = [out]
    for (x, size), abf in zip(deep_first[1:], m.abfs[1:], strict=True):
        out, residual = abf(x, residual, size)
        fused.insert(0, out)
    return {"ce": _ce(s, b), "reviewkd": hcl_loss(fused, t_feats)}


EXPECTED_TERMS = {
    "kd": exp_kd, "ban": exp_kd, "tf_kd_self": exp_kd, "fitnet": exp_fitnet, "at": exp_at, "sp": exp_sp, "cc": exp_cc,
    "vid": exp_vid, "rkd": exp_rkd, "pkt": exp_pkt, "ab": exp_ab, "ft": exp_ft, "fsp": exp_fsp, "nst": exp_nst,
    "crd": exp_crd, "crd_kd": exp_crd, "kdsvd": exp_kdsvd, "ofd": exp_ofd, "reviewkd": exp_reviewkd, "dkd": exp_dkd,
    "dkd_per_pair": exp_dkd, "tf_kd": exp_tf_kd, "dml": exp_dml, "cond_ts": exp_cond_ts, "logit_l2": exp_logit_l2,
    "darkrank": exp_darkrank, "vanilla": exp_vanilla, "sskd": exp_sskd, "mlkd": exp_mlkd, "ctkd": exp_ctkd,
    "lskd": exp_lskd, "lskd_per_pair": exp_lskd, "dist": exp_dist, "ttm": exp_ttm, "wttm": exp_wttm, "nkd": exp_nkd,
    "uskd": exp_uskd, "wsld": exp_wsld,
    "simkd": exp_simkd, "semckd": exp_semckd, "srrl": exp_srrl, "cat_kd": exp_cat_kd, "ickd": exp_ickd,
    "ickd_kd": exp_ickd, "srd": exp_srd, "itrd": exp_itrd, "kd_nd": exp_kd_nd, "dkd_nd": exp_dkd_nd,
    "reviewkd_nd": exp_reviewkd_nd, "dist_nd": exp_dist_nd,
    "kd_avg": exp_kd_avg, "ae_kd": exp_ae_kd, "meal": exp_meal,
    "one": exp_one, "okddip": exp_okddip, "ffl": exp_ffl, "ktg": exp_ktg, "rocket": exp_rocket,
    "cs_kd": exp_cs_kd, "byot": exp_byot, "sla_sd": exp_sla_sd, "multi_exit": exp_multi_exit,
    "multi_exit_ce": exp_multi_exit, "label_refinery": exp_label_refinery,
    "pad": exp_pad, "irg": exp_irg, "mgd": exp_mgd, "tofd": exp_tofd, "mhgd": exp_mhgd, "rco": exp_rco,
    "fskd": exp_fskd, "netgraft": exp_netgraft, "l2t_ww": exp_l2t_ww,
    "dafl": exp_dafl, "dafl_mnist": exp_dafl, "dafl_cifar10": exp_dafl, "dfad": exp_dfad, "dfad_mnist": exp_dfad, "zskt": exp_zskt,
    "deepinversion": exp_deepinversion, "adi": exp_deepinversion,
    "kd_in1k": exp_kd, "kd_t4_in1k": exp_kd, "dkd_in1k": exp_dkd, "reviewkd_in1k": exp_reviewkd_preact,
    "ofd_in1k": exp_ofd, "dist_in1k": exp_dist, "ctkd_in1k": exp_ctkd,
}


# Pre-training stages (§1.4): name -> (stage name, student taps, teacher taps, expected stage loss)
def stage_ab(m, pair, b, s, t):
    from kdbench.methods.ab import ab_loss
    g_s = [conn(f) for conn, f in zip(m.connectors, _stages(s, "_pre"), strict=True)]
    return ab_loss(g_s, _stages(t, "_pre"), REFERENCE["ab"]["config"]["margin"])


def stage_ft(m, pair, b, s, t):
    from kdbench.methods.ft import paraphraser_loss
    return paraphraser_loss(m.paraphraser(t["stage3"]), t["stage3"])


def stage_fsp(m, pair, b, s, t):
    from kdbench.methods.fsp import fsp_loss
    return fsp_loss([s["stem"], *_stages(s)], [t["stem"], *_stages(t)], "mean")


def stage_sskd(m, pair, b, s, t):
    """The teacher head's CE over the cosines of the 4 rotations of each image, from one 4N teacher forward."""
    from kdbench.methods.sskd import rotate_views, ss_head_loss
    with torch.no_grad():
        emb = pair.teacher.forward_taps(rotate_views(b.inputs), ("embedding",))["embedding"]
    return ss_head_loss(m.teacher_head(emb))


def stage_nd(m, pair, b, s, t):
    return torch.zeros(())  # the ND centre pass accumulates the teacher's class sums and trains nothing


def stage_tofd(m, pair, b, s, t):
    """TOFD: CE of the teacher's auxiliary classifiers (stage1, stage2) on the frozen teacher maps."""
    m.teacher_head.train()
    return sum(F.cross_entropy(head(t[k])[1], b.targets) for head, k in zip(m.teacher_head, ("stage1", "stage2")))


def stage_mhgd(m, pair, b, s, t):
    """MHGD: the estimators' cosine loss on the teacher's singular vectors (same head-drop draws: seeded here)."""
    from kdbench.methods.mhgd import drop_heads, estimator_loss, leading_right_singular_vectors
    v = [leading_right_singular_vectors(f, 1).squeeze(2) for f in _stages(t)]
    total = 0.0
    for i, (att, est) in enumerate(zip(m.attention, m.estimators), start=1):
        graph = att(v[i], v[i - 1])
        total = total + estimator_loss(est(v[i - 1], graph, drop_heads(8, graph.shape[1])), v[i])
    return total


PRE = ("stage1_pre", "stage2_pre", "stage3_pre")
FSP_TAPS = ("stem", "stage1", "stage2", "stage3")
EXPECTED_STAGES = {  # §1.4: AB trains connectors + feature layers, FT the paraphraser only, FSP the student
    "ab": ("ab_init", PRE, PRE, stage_ab, "connectors+features"),
    "ft": ("paraphraser", (), ("stage3",), stage_ft, "paraphraser"),
    "fsp": ("fsp", FSP_TAPS, FSP_TAPS, stage_fsp, "student"),
    "sskd": ("ss_head", (), ("embedding",), stage_sskd, "teacher_head"),  # SSKD: the teacher's self-supervision head
    "kd_nd": ("nd_centres", (), ("embedding",), stage_nd, "nothing"),  # ND: the teacher's class-centre pass
    "dkd_nd": ("nd_centres", (), ("embedding",), stage_nd, "nothing"),
    "reviewkd_nd": ("nd_centres", (), ("embedding",), stage_nd, "nothing"),
    "dist_nd": ("nd_centres", (), ("embedding",), stage_nd, "nothing"),
    "tofd": ("teacher_aux", (), ("stage1", "stage2"), stage_tofd, "teacher_head"),  # the teacher's aux classifiers
    "mhgd": ("mha", (), ("stage1", "stage2", "stage3"), stage_mhgd, "mha"),  # attention + estimators on the teacher
}

# Variants that add an optional term or zero a weight, beyond the shipped configs
OPTIONAL_KD = ["sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "kdsvd", "ofd", "reviewkd",
               "simkd", "cat_kd", "ickd", "itrd", "pad", "irg", "mgd", "ofd_in1k", "reviewkd_in1k"]
VARIANTS = [(name, ()) for name in METHOD_YAMLS] + [
    ("kd", ("method.weights.ce=0",)),  # soft targets only: ce logged, not summed
    ("dkd", ("method.weights.tckd=0",)),  # a warmed-up term with weight 0
    *[(name, ("+method.weights.kd=0.5",)) for name in OPTIONAL_KD],  # OptionalKD's Hinton term (never warmed up)
    ("kd", ("method.logit_standardization=true",)),  # LSKD's KD+LS: KD.terms() makes the kd term
    ("dkd", ("method.logit_standardization=true",)),
    ("mlkd", ("method.mask_mode=select", "method.strong_copy_paste=false", "method.weights.cc_strong=0.9",
              "method.weights.bc_strong=0.9")),  # the paper variant: the strong cc/bc terms summed
    ("ctkd", ("method.temperature_module=instance",)),
]


def variant_id(v):
    return v[0] + "".join(f"[{o.split('weights.')[-1]}]" for o in v[1])


def expected_weights(name, overrides=()):
    """The weights as the composed config gives them (independent of the method object)."""
    return {str(k): float(v) for k, v in OmegaConf.to_container(composed(name, *overrides).weights, resolve=True).items()}


# ============================================================================= tests


def test_every_method_config_has_an_entry_in_every_wiring_table():
    assert len(METHOD_YAMLS) >= 27
    for table, what in ((REFERENCE, "REFERENCE"), (EXPECTED_TERMS, "EXPECTED_TERMS")):
        assert sorted(table) == METHOD_YAMLS, f"{what} does not cover exactly conf/method/*.yaml"
    for name in list(WARMED_TERMS) + list(SETUP) + list(EXPECTED_STAGES) + OPTIONAL_KD + list(EXTRA_VIEWS) \
            + list(TEACHER_FREE_TERMS) + list(WEIGHT_SCALE):
        assert name in METHOD_YAMLS, f"{name} is in a wiring table but has no conf/method/{name}.yaml"


# ----------------------------------------------------------------------------- 1. weighted sum


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_total_is_the_weighted_sum_of_the_logged_terms_with_warmups_on_exactly_the_warmed_terms(variant):
    name, overrides = variant
    weights = expected_weights(name, overrides)
    method, pair, batch, s_out, t_out = build(name, *overrides)
    for epoch in EPOCHS:
        total, terms = method.loss(batch, s_out, t_out, epoch)
        assert set(terms) == set(weights), f"{name}: logged terms {sorted(terms)} != configured weights {sorted(weights)}"
        assert all(torch.isfinite(v) for v in terms.values())
        expected = sum(weights[k] * ramp(name, k, epoch) * terms[k].detach().double() for k in terms if weights[k] != 0)
        close(total.detach().double(), torch.as_tensor(expected, dtype=torch.float64), f"{name} epoch {epoch}")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_loss_scales_each_term_by_its_weight_times_ramp_and_a_nan_zero_weight_term_stays_out(variant):
    """Method.loss + term_weights on stand-in terms: d total / d term_k = w_k * ramp_k(epoch), exactly the configured
    weights; weight-0 terms are NaN here, and must neither reach the total nor receive a gradient."""
    name, overrides = variant
    weights = expected_weights(name, overrides)
    method, *_ = build(name, *overrides)
    for epoch in EPOCHS:
        fake = {k: torch.tensor(float("nan") if w == 0 else 1.0 + 0.37 * i, requires_grad=True)
                for i, (k, w) in enumerate(weights.items())}
        method.all_terms = lambda batch, student, teacher, fake=fake: dict(fake)
        total, terms = method.loss(None, None, None, epoch)
        assert terms.keys() == fake.keys()  # every term logged, zero-weight ones included
        assert torch.isfinite(total), f"{name} epoch {epoch}: a weight-0 (NaN) term leaked into the total"
        total.backward()
        for k, v in fake.items():
            w = weights[k] * ramp(name, k, epoch)
            if w == 0:  # a weight-0 term, or a warmed-up term whose ramp is 0 in this epoch (the ND repo's epoch 1)
                assert v.grad is None or v.grad.item() == 0, f"{name}: weight-0 term '{k}' got a gradient"
            else:
                assert v.grad is not None and v.grad.item() == pytest.approx(w, rel=1e-6), \
                    f"{name} epoch {epoch}: term '{k}' weighted {None if v.grad is None else v.grad.item()}, expected {w}"


def test_kd_total_drops_the_zero_weight_ce_but_logs_it():
    method, pair, batch, s, t = build("kd", "method.weights.ce=0")
    total, terms = method.loss(batch, s, t, 1)
    assert terms["ce"].item() > 0
    close(total, 0.9 * terms["kd"], "kd soft-targets-only total")


def test_ban_total_is_the_kd_term_alone():
    method, pair, batch, s, t = build("ban")
    total, terms = method.loss(batch, s, t, 1)
    assert set(terms) == {"ce", "kd"} and terms["ce"].item() > 0
    close(total, terms["kd"], "ban total")


@pytest.mark.parametrize("name", ["dkd", "reviewkd"])
def test_warmup_ramps_the_distillation_terms_linearly_over_20_epochs_and_never_ce(name):
    method, *_ = build(name)
    base = expected_weights(name)
    for epoch, factor in ((1, 0.05), (10, 0.5), (19, 0.95), (20, 1.0), (21, 1.0), (240, 1.0)):
        got = method.term_weights(epoch)
        for k, w in base.items():
            want = w * factor if k in WARMED_TERMS[name] else w
            assert got[k] == pytest.approx(want, rel=1e-12), f"{name} epoch {epoch} term {k}"


# ----------------------------------------------------------------------------- 2. terms bound to the right functions


@pytest.mark.parametrize("variant", [(n, ()) for n in METHOD_YAMLS] + [(n, ("+method.weights.kd=0.5",)) for n in OPTIONAL_KD],
                         ids=variant_id)
def test_each_term_equals_its_loss_function_on_the_right_taps(variant):
    name, overrides = variant
    method, pair, batch, s_out, t_out = build(name, *overrides)
    twin = copy.deepcopy(method)  # CRD updates its banks and Z inside the loss; the twin keeps the state before it
    torch.manual_seed(123)
    _, terms = method.loss(batch, s_out, t_out, 240)
    torch.manual_seed(123)
    ref = REFERENCE[name]
    expected = EXPECTED_TERMS[name](twin, pair, batch, s_out, t_out, ref)
    if overrides:
        expected["kd"] = _kd(s_out, t_out, ref["config"]["temperature"])
    assert set(terms) == set(expected), f"{name}: terms {sorted(terms)}, expected {sorted(expected)}"
    for k in expected:
        close(terms[k], expected[k], f"{name} term '{k}'")


@pytest.mark.parametrize("name", [n for n in METHOD_YAMLS if n not in TEACHER_FREE])
def test_distillation_terms_depend_on_the_teacher_outputs(name):
    """Guards against a term computed from the student alone (e.g. student taps passed on both sides)."""
    method, pair, batch, s_out, t_out = build(name)
    assert t_out is not None
    twin = copy.deepcopy(method)
    torch.manual_seed(5)
    _, terms = method.loss(batch, s_out, t_out, 240)
    gen = torch.Generator().manual_seed(9)  # an unrelated teacher: same shapes, independent values
    t_other = {k: torch.randn(v.shape, generator=gen) * (v.std() + 1e-3) + v.mean() for k, v in t_out.items()}
    torch.manual_seed(5)
    _, terms_other = twin.loss(batch, s_out, t_other, 240)
    for k in set(terms) - {"ce"} - TEACHER_FREE_TERMS.get(name, set()):
        assert not torch.allclose(terms[k], terms_other[k]), f"{name}: term '{k}' ignores the teacher"


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_pre_training_stages_are_the_reference_ones(name):
    teacher, student, _ = setup_of(name)
    pair = make_pair(teacher, student, NUM_CLASSES, SHAPE, N_TRAIN)
    method = create_method(composed(name), pair)
    stages = method.stages(pair.student, pair.teacher)
    if name not in EXPECTED_STAGES:
        assert stages == [], f"{name}: unexpected pre-training stage(s) {[s.name for s in stages]}"
        return
    stage_name, s_taps, t_taps, loss_fn, trained = EXPECTED_STAGES[name]
    (stage,) = stages
    ref = REFERENCE[name]
    assert (stage.name, stage.epochs, stage.lr) == (stage_name, ref["config"]["stage_epochs"], ref["attrs"]["stage_lr"])
    assert (stage.momentum, stage.weight_decay) == (0.9, 5e-4)  # §1.4: SGD momentum 0.9, wd 5e-4
    assert tuple(stage.milestones) == tuple(ref["attrs"].get("stage_milestones", ()))  # constant LR unless decayed
    # a stage that trains no student parameter runs no student forward (its BN statistics stay, as RD's eval mode)
    assert stage.uses_student == (trained not in ("paraphraser", "teacher_head", "nothing", "mha"))
    assert tuple(stage.student_taps) == s_taps and tuple(stage.teacher_taps) == t_taps
    params = {id(p) for p in stage.parameters}
    if trained == "paraphraser":
        assert params == {id(p) for p in method.paraphraser.parameters()}
    elif trained == "teacher_head":
        assert params == {id(p) for p in method.teacher_head.parameters()}
    elif trained == "student":
        assert params == {id(p) for p in pair.student.parameters()}
    elif trained == "mha":  # MHGD: its attention heads and estimators, nothing of the nets
        assert params == {id(p) for p in (*method.attention.parameters(), *method.estimators.parameters())}
    elif trained == "nothing":  # a pass that only reads the teacher (ND's centres): no model or head parameter moves
        owned = {id(p) for p in (*pair.student.parameters(), *pair.teacher.parameters(), *method.parameters())}
        assert not params & owned
    else:  # AB: connectors + every student parameter but the classifier
        head = {id(p) for p in pair.student.fc.parameters()}
        assert params == {id(p) for p in method.connectors.parameters()} | \
            {id(p) for p in pair.student.parameters() if id(p) not in head}
    batch = make_batch(BATCH, NUM_CLASSES, SHAPE)
    s_out, t_out = forward(pair, method, batch, stage.student_taps, stage.teacher_taps)
    torch.manual_seed(77)  # a stage that draws (MHGD's head drop) draws alike in both computations
    got = stage.loss(batch, s_out, t_out)
    torch.manual_seed(77)
    close(got, loss_fn(method, pair, batch, s_out, t_out), f"{name} stage loss")


# ----------------------------------------------------------------------------- 3. shipped defaults vs the reference


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_shipped_config_defaults_match_the_reference(name):
    cfg = composed(name)
    ref = REFERENCE[name]
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("weights")
    if name in ("dkd_per_pair", "lskd_per_pair") or name.endswith("_in1k"):  # keys come in through defaults
        raw.pop("defaults", None)
    assert raw == ref["config"], f"{name}: composed config differs from the reference defaults"
    weights = OmegaConf.to_container(cfg.weights, resolve=True)
    assert weights == ref["weights"] and all(type(v) is float for v in weights.values()), \
        f"{name}: weights {weights} != reference {ref['weights']}"


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_built_method_carries_the_reference_defaults(name):
    teacher, student, _ = setup_of(name)
    method = create_method(composed(name), make_pair(teacher, student, NUM_CLASSES, SHAPE, N_TRAIN))
    ref = REFERENCE[name]
    assert method.method_name == ref["config"]["name"]
    for path, want in ref["attrs"].items():
        got = get_attr(method, path)
        got = tuple(got) if isinstance(want, tuple) else list(got) if isinstance(want, list) else got
        assert got == want, f"{name}: method.{path} = {got!r}, reference {want!r}"


def test_dkd_per_pair_beta_is_mdistillers_table():
    """§2.17 beta per (teacher, student) config, plus issue #6; unlisted pairs keep beta 8."""
    table = {("resnet32x4", "resnet8x4"): 8.0, ("resnet32x4", "ShuffleV1"): 8.0, ("resnet32x4", "ShuffleV2"): 8.0,
             ("wrn_40_2", "ShuffleV1"): 8.0, ("ResNet50", "MobileNetV2"): 8.0, ("resnet56", "resnet20"): 2.0,
             ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "MobileNetV2"): 6.0,
             ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0, ("ResNet50", "wrn_16_2"): 6.0,
             ("resnet56", "resnet8"): 8.0}
    for (teacher, student), beta in table.items():
        cfg = method_config("dkd_per_pair", f"teacher={teacher}", f"student={student}")
        assert float(cfg.weights.nckd) == beta, f"dkd_per_pair {teacher} -> {student}"
        assert float(cfg.weights.tckd) == 1.0 and float(cfg.weights.ce) == 1.0


def test_vid_variance_starts_at_init_pred_var_and_is_trained():
    """§2.6: sigma^2 = softplus(alpha) + eps = 5.0 at start; RD trains alpha (fixed_variance: false)."""
    method, *_ = build("vid")
    for level in method.levels:
        var = F.softplus(level.alpha) + 1e-5
        close(var, torch.full_like(var, 5.0), "vid initial variance")
        assert isinstance(level.alpha, torch.nn.Parameter)
    assert {id(level.alpha) for level in method.levels} <= {id(p) for p in method.trainable_parameters()}


def test_fitnet_regressor_ends_with_a_relu():
    """§2.2 ConvReg: conv, BatchNorm, then ReLU (use_relu=True); AB's connectors reuse it without the ReLU (§2.9)."""
    method, pair, batch, s_out, t_out = build("fitnet")
    reg = method.regressor
    x = s_out["stage2"].detach()
    pre = reg.bn(reg.conv(x))
    assert (pre < 0).any(), "the check needs pre-activations of both signs"
    out = reg(x)
    assert out.min().item() >= 0
    close(out, F.relu(pre), "fitnet regressor = relu(bn(conv(f_s)))")


def test_ab_connectors_keep_negative_pre_activations():
    """§2.9: a width-changing AB connector is ConvReg without ReLU, so the boundary loss sees the sign of s."""
    pair = make_pair("resnet8x4", "resnet8", NUM_CLASSES, SHAPE, N_TRAIN)
    method = create_method(composed("ab"), pair)
    conn = method.connectors[0]
    x = torch.randn(4, *pair.student_shapes["stage1_pre"], generator=torch.Generator().manual_seed(3))
    out = conn(x)
    assert out.shape[1:] == pair.teacher_shapes["stage1_pre"] and (out < 0).any()
    close(out, conn.bn(conn.conv(x)), "ab connector = bn(conv(f_s))")


def test_crd_memory_banks_move_by_nce_m_and_z_is_fixed_after_the_first_batch():
    """§2.13: bank_s[idx] <- normalize(m bank_s[idx] + (1-m) e_s), bank_t likewise with e_t, m = 0.5; other rows stay;
    Z is set from the first batch and then frozen."""
    method, pair, batch, s, t = build("crd")
    m = REFERENCE["crd"]["config"]["nce_m"]
    before = {"bank_s": method.bank_s.clone(), "bank_t": method.bank_t.clone()}
    emb = {"bank_s": method.embed_s(s["embedding"]).detach(), "bank_t": method.embed_t(t["embedding"]).detach()}
    method.loss(batch, s, t, 1)
    idx, rest = batch.indices, torch.arange(BATCH, N_TRAIN)
    for name in ("bank_s", "bank_t"):
        bank = getattr(method, name)
        close(bank[idx], F.normalize(m * before[name][idx] + (1 - m) * emb[name], dim=1), f"crd {name} update")
        assert torch.equal(bank[rest], before[name][rest]), f"crd {name}: rows outside the batch moved"
    z = method.z.clone()
    assert (z > 0).all()
    method.loss(make_batch(BATCH, NUM_CLASSES, SHAPE, indices=range(8, 16), seed=2), s, t, 1)
    assert torch.equal(method.z, z), "crd: Z changed after the first batch"
