"""Loading experiment configs: ``papers/<key>/config.py[:variant]`` plus ``--config.KEY=VALUE``.

A config file defines ``get_config(variant: str | None = None) -> ml_collections.ConfigDict``
(the big_vision/ml_collections convention). :func:`default_stage_config` holds every field the
generic training stage reads, so papers only set what differs; configs are locked, and an
override of an unknown key is an error that lists the valid keys.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import sys

import ml_collections

from kdjax.errors import UnknownNameError, unknown_name

PAPERS_DIR_ENV = "KDJAX_PAPERS_DIR"


def default_stage_config() -> ml_collections.ConfigDict:
  """Every field a training stage (:func:`kdjax.train.train_and_evaluate`) reads, with defaults.

  Learning-rate schedules (``lr_schedule``, built by :func:`kdjax.train.make_lr_schedule` over the
  stage's total number of steps): ``constant``; ``cosine`` (decay to 0 over the stage); ``step``
  (piecewise constant: ``learning_rate`` times ``lr_decay_factor ** k`` once ``k`` of the
  ``lr_boundaries`` have been passed). ``lr_boundaries`` are fractions of the stage's steps, strictly
  increasing and in (0, 1), so one config fits any dataset size or epoch count: RepDistiller's ×0.1 at
  epochs 150, 180, 210 of 240 is ``lr_boundaries=(150 / 240, 180 / 240, 210 / 240)``,
  ``lr_decay_factor=0.1``. Both fields are read only by the ``step`` schedule.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data.
  c.dataset = "mnist5k"            # built-in name, TFDS catalogue name, or path/to/arrays.npz
  c.data_dir = ""                  # TFDS data_dir ("" = TFDS default)
  c.label_feature = "label"        # TFDS: the feature holding the class, e.g. "attributes/Attractive" (CelebA)
  c.image_size = ()                # TFDS: (height, width) to centre-crop and resize images to (empty = as stored)
  c.labelled_examples = 0          # keep labels for this many training examples (0 = all)
  c.include_unlabelled = True      # also train on the rest, labelled only by the teacher
  c.split_seed = 0                 # which examples are labelled
  c.jitter = 0                     # random input shifts of up to this many pixels (= pad-and-crop)
  c.hflip = False                  # random horizontal flips
  c.image_mean = ()                # per-channel standardisation (empty = none)
  c.image_std = ()
  c.num_classes = 0                # the class count when the labels do not show it (0 = from the data)
  c.test_dataset = ""              # evaluate on this dataset's test split ("" = the dataset's own)
  c.classes = ()                   # train and test on these class ids only, relabelled 0..k-1 (empty = all)
  c.held_out_classes = ()          # open-set retrieval: these classes are never trained on; their test
                                   # examples are the retrieval set (results.json "retrieval")
  c.embedding_feature = "embedding"  # the model feature retrieval ranks by (with held_out_classes)
  c.embedding_normalize = False    # rank by the L2-normalised feature (cosine), as re-ID evaluations do
  # Models.
  c.model = "mlp"
  c.model_kwargs = ml_collections.ConfigDict()
  c.teacher_workdir = ""           # the teacher's run; several, comma-separated = an ensemble
  c.init_from = ""                 # start the student from this run's layers (two-stage methods)
  c.init_layers = ()               # which top-level student layers to copy (empty = all)
  c.trainable = ()                 # train only these top-level student layers (empty = all)
  c.cache_teacher = True           # precompute teacher logits once when inputs are not augmented
  c.allow_partial_teacher = False  # accept an unfinished teacher / init_from run (recorded in config.json)
  # Method.
  c.method = "supervised"
  c.loss = ml_collections.ConfigDict()
  # Optimisation.
  c.optimizer = "adam"             # adam | sgd | rmsprop
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.lr_schedule = "constant"       # constant | cosine | step
  c.lr_boundaries = ()             # step: where the LR drops, as fractions of the stage's steps in (0, 1)
  c.lr_decay_factor = 0.1          # step: the LR is multiplied by this at each boundary
  c.batch_size = 100
  c.num_epochs = 10
  c.num_steps = 0                  # > 0 overrides num_epochs
  # Bookkeeping.
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.eval_batch_size = 500
  c.report_train_accuracy = False  # also measure the exported model on its labelled training examples (eval mode)
  return c


# Per-channel means and standard deviations of the CIFAR training sets (inputs scaled to [0, 1]), as the
# public CIFAR KD code normalises them (AT cifar.py, RepDistiller).
CIFAR_CHANNEL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def cifar_augmentation(config: ml_collections.ConfigDict, dataset: str) -> None:
  """The CIFAR recipes' input handling: zero-padded 4-px random crops, horizontal flips, per-channel
  standardisation."""
  config.dataset = dataset
  config.jitter = 4
  config.hflip = True
  config.image_mean, config.image_std = CIFAR_CHANNEL_STATS[dataset]


def wrn_cifar10_recipe(config: ml_collections.ConfigDict, *, lr_drop_epochs=(60, 120, 160)) -> None:
  """The CIFAR-10 WRN recipe of the attention-transfer authors' ``cifar.py`` (PAPERS.md §5(b)), which Rocket
  Launching's code and kdjax's adversarial-KD setting reuse: all 50,000 labelled images with
  :func:`cifar_augmentation`, SGD (LR 0.1, momentum 0.9, weight decay 5e-4), batch 128, 200 epochs, LR ×0.2
  at ``lr_drop_epochs`` (60/120/160; ``rocket_bottom.py`` uses 70/130/190)."""
  cifar_augmentation(config, "cifar10")
  config.labelled_examples = 0
  config.include_unlabelled = False
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.batch_size = 128
  config.num_epochs = 200
  config.lr_schedule = "step"
  config.lr_boundaries = tuple(e / config.num_epochs for e in lr_drop_epochs)
  config.lr_decay_factor = 0.2


TRANSFER_SET_PREFIX = "transfer_"
# The budget ladder of the transfer-set protocol (steps of batch 128), fixed before any of its runs: each
# paper's budget is the first rung at which its student alone reaches >= 0.99 accuracy on its 1,000 labelled
# training images (eval mode) on seed 0.
TRANSFER_SET_LADDER = (300, 600, 1200, 2400, 4800)
TRANSFER_SET_TRAIN_ACCURACY = 0.99


def transfer_set_regime(config: ml_collections.ConfigDict, *, steps: int, distils: bool) -> None:
  """The label-scarce transfer-set regime (PAPERS.md §0.4 run B, the soft-targets protocol), for students.

  The same 1,000 labelled images as the label-only protocols, plus — for a stage whose loss has a
  distillation term (``distils``) — the other training images as transfer inputs that carry only that term
  (cross-entropy is masked to the labelled rows). A stage with no distillation term (the student alone, a
  plain cross-entropy second stage) trains on the labelled images only: the unlabelled ones would carry no
  loss. Every student sees ±2-px jittered inputs (the regime's jittered transfer inputs; the same for the
  student alone, so augmentation is not what differs between rows), trains for ``steps`` steps, and reports
  its accuracy on its labelled training images (the budget rule: ``TRANSFER_SET_LADDER``).
  """
  config.labelled_examples = 1000
  config.include_unlabelled = distils
  config.jitter = 2
  config.num_epochs = 0
  config.num_steps = int(steps)
  config.report_train_accuracy = True


def transfer_set_variant(variant: str, *, full: bool) -> str:
  """The label-only variant a ``transfer_<variant>`` row is built from (the regime is small-scale only)."""
  if full:
    raise ValueError(f"{variant!r} belongs to the small-scale transfer-set protocol (mnist5k, 1,000 labels + "
                     "3,000 transfer inputs); it has no ',full' setting")
  return variant[len(TRANSFER_SET_PREFIX):]


def parse_variant(arg: str, variants) -> tuple[str, bool]:
  """Splits a paper config argument ``"variant"`` or ``"variant,full"`` into ``(variant, full)``."""
  variant, _, scale = arg.partition(",")
  if variant not in variants or scale not in ("", "full"):
    raise ValueError(f"unknown variant {arg!r}; expected one of {', '.join(variants)}, optionally "
                     "followed by ',full'")
  return variant, scale == "full"


def papers_dir() -> pathlib.Path:
  """The ``papers/`` folder: ``$KDJAX_PAPERS_DIR``, beside the package in a source checkout, inside the
  package (``kdjax/papers``, where a wheel installs the configs), or ``./papers``."""
  package = pathlib.Path(__file__).resolve().parent
  candidates = [os.environ.get(PAPERS_DIR_ENV, ""), package.parent / "papers", package / "papers",
                pathlib.Path.cwd() / "papers"]
  for candidate in candidates:
    if candidate and pathlib.Path(candidate, "soft_targets").is_dir():
      return pathlib.Path(candidate)
  raise FileNotFoundError("cannot find the papers/ folder of the kdjax source tree; run from a checkout "
                          f"(pip install -e .) or set {PAPERS_DIR_ENV}")


def paper_keys() -> list[str]:
  """Papers with a reproduction folder (``papers/<key>/config.py``)."""
  return sorted(p.parent.name for p in papers_dir().glob("*/config.py"))


def load_module(path: str | os.PathLike):
  """Imports a Python file by path."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")
  name = f"kdjax_config_{path.parent.name}_{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:variant]`` and returns its locked config."""
  path, _, variant = spec.partition(":")
  module = load_module(path)
  config = module.get_config(variant) if variant else module.get_config()
  config.lock()
  return config


def _parse_value(text: str, current):
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """Applies ``{"loss.temperature": "20", ...}`` (strings from the command line), type-checked."""
  for key, text in overrides.items():
    parent, leaf = config, key
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
      if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
        raise unknown_name("config key", ".".join(parts[:i + 1]), _all_keys(config))
      parent = parent[part]
    leaf = parts[-1]
    if leaf not in parent:
      raise unknown_name("config key", key, _all_keys(config))
    current = parent[leaf]
    try:
      value = _parse_value(text, current)
      with parent.unlocked() if isinstance(current, ml_collections.ConfigDict) else _nullcontext():
        parent[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"--config.{key}={text}: expected a value of type {type(current).__name__} "
                       f"(current value {current!r}): {e}") from e
  return config


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises if ``config`` lacks a field of :func:`default_stage_config` (a typo in a paper config)."""
  missing = set(default_stage_config().keys()) - set(config.keys())
  if missing:
    raise UnknownNameError(f"config is missing fields {sorted(missing)}; build it from "
                           "kdjax.config.default_stage_config()")
