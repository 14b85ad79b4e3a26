"""Moonshine: Distilling with Cheap Convolutions (Crowley, Gray & Storkey, NeurIPS 2018, arXiv 1711.02613).

Structural distillation (PAPERS.md §11): take the teacher's architecture, replace every 3×3 convolution of
each residual block by a cheap block (:mod:`kdjax.models.cheap`: grouped + pointwise ``G(g)``, depthwise
``G(N)``, bottleneck ``B(b)``, bottleneck + grouped ``BG(b, g)``), keep everything else — stem, shortcut
1×1 convolutions, head, *and the hyperparameters* — and train the cheap student from scratch with
attention transfer (AT) from the teacher at the output of every residual group.

Pieces:

* :func:`student_model` — the student builder: "the teacher architecture with block X", as a registry
  name and ``model_kwargs`` for a config.
* :func:`moonshine_loss` — the per-example objective (§11(a), the official ``main.py``/``funcs.py``):

  ``loss_b = task_b + (3β / n) · Σ_{j=1..n} at_loss(s_j, t_j)_b``

  with ``at_loss`` the attention-transfer code's (``kdjax.methods.attention_transfer.attention_loss``,
  ``mode='code'``: L2-normalised ``mean_c a²`` maps, mean squared difference over H·W; its batch mean is the
  official ``at_loss``), β = 1000, ``n`` the number of AT points (3 for a CIFAR WRN, 4 for ImageNet
  ResNets: the official code scales β by ``3 / len(points)``), and the task term

  ``task_b = (1 − α) · m_b · CE_b + α · (2T² / C) · KL(softmax(t/T) ‖ softmax(s/T))_b``

  where ``m_b`` masks cross-entropy to labelled rows (unlabelled transfer inputs carry only the
  distillation terms). ``α = 0`` (the official default, "AT only") is plain cross-entropy.
* :func:`make_objective` — the ``moonshine`` method of ``kdjax train`` (registry entry in
  :mod:`kdjax.methods.objective`): the objective above on the shared distillation step (teacher in
  evaluation mode, under ``stop_gradient``).
* :func:`pareto_rows` / :func:`write_pareto` — the parameters-vs-error table and Pareto plot of a
  ``kdjax reproduce moonshine`` run (``python papers/moonshine/pareto.py``).

Where the official code differs and what kdjax does:

* **KD form.** ``funcs.py::distillation`` is the attention-transfer repository's *old* KD (before its
  2018 "fix KL" commit): ``F.kl_div`` with the element mean over B·C (not the batch mean), times ``2T²α``
  — i.e. ``2/C`` times the now-standard ``T²·KL`` batchmean (×1/5 for CIFAR-10). kdjax's default
  ``kd_form='moonshine'`` reproduces it; ``kd_form='batchmean'`` gives the standard ``α·T²·KL`` of
  :func:`kdjax.methods.soft_targets.distillation_loss`. Irrelevant for the default α = 0.
* **β scaling.** ``3β/n`` as the official ``main.py`` (``beta * 3 / len(at_points)``-style); with the three
  WRN groups this is β itself, the attention-transfer paper's weight.
* **Cross-entropy on a transfer set.** The official code trains on fully labelled CIFAR; kdjax masks CE to
  the labelled rows (``label_mask``) so unlabelled transfer inputs carry only AT (and KD, if α > 0).
* The README's remark that "AT uses KD by default" contradicts ``main.py``'s default ``--alpha 0``; kdjax
  follows the code (α = 0).

All functions are pure in arrays and jit-ready (no data-dependent Python control flow).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from kdjax.errors import check_positive, unknown_name
from kdjax.methods.attention_transfer import attention_loss
from kdjax.methods.soft_targets import hard_label_loss, soft_target_loss

KD_FORMS = ("moonshine", "batchmean")
REFERENCE_AT_POINTS = 3  # the official code's β is set for the three groups of a CIFAR WRN


# --- the student builder --------------------------------------------------------------------------------


def student_model(teacher_model: str, block) -> tuple[str, dict]:
  """``(registry name, model_kwargs)`` of the teacher architecture with its block 3×3s replaced by ``block``.

  Args:
    teacher_model: a registry name of a net with a cheap family: ``wrn_10_1``, ``wrn_10_2``, ``wrn_16_2``,
      ``wrn_40_2``, ``resnet34_imagenet``.
    block: a :class:`kdjax.models.cheap.CheapBlock` or a name (``'G(4)'`` = 4 groups, ``'DConvG8'`` = 8
      channels per group, …; :func:`kdjax.models.cheap.parse_block`).

  Returns:
    The registered variant's name when one exists (``('wrn_40_2_g4', {})`` for ``G(4)``), else the
    teacher's name with ``{'block': label}`` for nets that take any block (``wrn_10_*``,
    ``resnet34_imagenet``). The dense block returns the teacher itself.

  Raises:
    ValueError: a teacher without cheap variants, or a block with no registered variant for a teacher
      that takes no ``block`` argument (the message lists both).
  """
  from kdjax import models
  from kdjax.models.cheap import BLOCK_NAMES, CheapResNet, CheapWideResNet, parse_block
  block = parse_block(block)
  families = sorted({n[:-len("_" + next(iter(BLOCK_NAMES)))] for n in models.names()
                     if n.endswith("_" + next(iter(BLOCK_NAMES)))})
  if teacher_model not in families:
    raise ValueError(f"moonshine: the teacher model {teacher_model!r} has no cheap variants; teachers with cheap "
                     f"students: {', '.join(families)}")
  if block.is_dense:
    return teacher_model, {}
  for suffix, known in BLOCK_NAMES.items():
    if known == block:
      return f"{teacher_model}_{suffix}", {}
  if isinstance(models.get(teacher_model), CheapWideResNet | CheapResNet):
    return teacher_model, {"block": block.label()}
  raise ValueError(
      f"moonshine: {teacher_model!r} has registered cheap variants for "
      f"{', '.join(b.label() for b in BLOCK_NAMES.values())} only, not {block.label()}; use one of those, or a "
      "teacher that takes any block (wrn_10_1, wrn_10_2, resnet34_imagenet with model_kwargs.block)")


# --- the loss --------------------------------------------------------------------------------------------


def old_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
  """Per-example soft term of Moonshine's (and the old attention-transfer code's) KD, before ``α``: ``[batch]``.

  ``(2T² / C) · Σ_c p_t,c (log p_t,c − log p_s,c)`` with ``p = softmax(z / T)``: the batch mean of this is
  ``F.kl_div(log_softmax(s/T), softmax(t/T)) · 2T²`` with PyTorch's old element-mean reduction over B·C.
  """
  num_classes = student_logits.shape[-1]
  return soft_target_loss(student_logits, teacher_logits, temperature=temperature) * (2.0 / num_classes)


def _check_hyperparameters(*, alpha, beta, temperature, kd_form) -> None:
  """Eager checks shared by :func:`moonshine_loss` and the ``moonshine`` method's builder."""
  if kd_form not in KD_FORMS:
    raise unknown_name("moonshine kd_form", kd_form, KD_FORMS)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"moonshine: alpha (the KD weight) must be in [0, 1]; got {alpha}")
  if isinstance(beta, bool) or not isinstance(beta, int | float) or beta < 0:
    raise ValueError(f"moonshine: beta must be a number >= 0 (1000 in the paper); got {beta!r}")
  check_positive("temperature", temperature)


def moonshine_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    labels: jax.Array,
    *,
    label_mask: jax.Array,
    beta: float = 1000.0,
    alpha: float = 0.0,
    temperature: float = 4.0,
    kd_form: str = "moonshine",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Moonshine's per-example objective (module docstring): task + ``(3β/n) · Σ_j at_loss``.

  Args:
    student_logits, teacher_logits: ``[batch, classes]`` (the teacher's under ``stop_gradient`` already).
    student_feats, teacher_feats: the ``n`` AT points, ``[batch, H_j, W_j, C]`` each (channel counts may
      differ between student and teacher; spatial sizes should agree, else the larger is pooled).
    labels: ``[batch]`` integer labels (any value where ``label_mask`` is 0).
    label_mask: ``[batch]`` 1 for labelled rows, 0 for transfer inputs (CE masked).
    beta: β (≥ 0), 1000 in the paper; the weight on the summed AT term is ``3β/n``.
    alpha: KD weight in ``[0, 1]``; 0 = cross-entropy only (the official default).
    temperature: KD temperature (> 0), 4 in the code.
    kd_form: ``'moonshine'`` (default; the official element-mean KL × 2T²) or ``'batchmean'`` (T²·KL).

  Returns:
    ``(loss [batch], {'attention': Σ_j at_loss [batch], 'cross_entropy': m·CE [batch]})``.
  """
  _check_hyperparameters(alpha=alpha, beta=beta, temperature=temperature, kd_form=kd_form)
  if len(student_feats) != len(teacher_feats) or not student_feats:
    raise ValueError(f"moonshine: needs as many student as teacher AT points (>= 1); got {len(student_feats)} "
                     f"student and {len(teacher_feats)} teacher features")
  n = len(student_feats)
  at = sum(attention_loss(s, t, p=2, mode="code") for s, t in zip(student_feats, teacher_feats))
  mask = label_mask.astype(jnp.float32)
  ce = hard_label_loss(student_logits, jnp.where(mask > 0, labels, 0)) * mask
  task = (1.0 - alpha) * ce
  if alpha > 0:
    if kd_form == "moonshine":
      soft = old_kd_loss(student_logits, teacher_logits, temperature=temperature)
    else:
      soft = soft_target_loss(student_logits, teacher_logits, temperature=temperature)
    task = task + alpha * soft
  weight = beta * REFERENCE_AT_POINTS / n
  return task + weight * at, {"attention": at, "cross_entropy": ce}


# --- the training objective (kdjax train / reproduce) ----------------------------------------------------


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``moonshine`` method (the official ``main.py`` defaults, CIFAR WRN)."""
  return {"student_layers": ("stage1", "stage2", "stage3"), "teacher_layers": ("stage1", "stage2", "stage3"),
          "beta": 1000.0, "alpha": 0.0, "temperature": 4.0, "kd_form": "moonshine"}


def make_objective(*, student_layers, teacher_layers, beta: float, alpha: float, temperature: float,
                   kd_form: str):
  """The ``moonshine`` method: :func:`moonshine_loss` on the named student/teacher feature pairs (every
  residual group's output: ``stage1..3`` for WRNs, ``stage1..4`` for ``resnet34_imagenet``)."""
  from kdjax.methods.objective import Objective
  student_layers, teacher_layers = tuple(student_layers), tuple(teacher_layers)
  if len(student_layers) != len(teacher_layers) or not student_layers:
    raise ValueError(f"moonshine needs as many student_layers as teacher_layers (>= 1, one per residual group); "
                     f"got {student_layers} and {teacher_layers}")
  _check_hyperparameters(alpha=alpha, beta=beta, temperature=temperature, kd_form=kd_form)

  def fn(student, teacher, batch, progress):
    del progress
    return moonshine_loss(student.logits, teacher.logits, [student.features[n] for n in student_layers],
                          [teacher.features[n] for n in teacher_layers], batch["label"],
                          label_mask=batch["label_mask"], beta=beta, alpha=alpha, temperature=temperature,
                          kd_form=kd_form)
  return Objective(fn, needs_teacher=True, student_features=student_layers, teacher_features=teacher_layers)


# --- parameters vs error: the Pareto table and plot ------------------------------------------------------


def pareto_rows(results: Mapping, models_of: Mapping[str, tuple[str, dict]], *,
                input_shape: tuple[int, ...], num_classes: int) -> list[dict]:
  """One row per protocol variant: parameters, MACs, test error mean ± std (over seeds).

  Args:
    results: a ``kdjax reproduce`` ``results.json`` (``runs[variant]["test_accuracy"]``: one per seed).
    models_of: ``{variant: (model name, model_kwargs)}``.
    input_shape: one example's shape (``(28, 28, 1)`` for mnist5k) for counting parameters and MACs.
    num_classes: the classifier width.

  Returns:
    ``[{variant, model, params, macs, error_mean, error_std, seeds}]`` sorted by parameters.
  """
  from kdjax import models
  from kdjax.models.macs import describe_model
  rows = []
  for variant, (name, kwargs) in models_of.items():
    errors = _errors(results, variant)
    if not errors:
      continue
    model = models.get(name, num_classes=num_classes, **kwargs)
    params, _, macs = describe_model(model, tuple(input_shape))
    mean = sum(errors) / len(errors)
    std = math.sqrt(sum((e - mean) ** 2 for e in errors) / (len(errors) - 1)) if len(errors) > 1 else 0.0
    rows.append({"variant": variant, "model": name, **kwargs, "params": params, "macs": macs,
                 "error_mean": mean, "error_std": std, "seeds": len(errors)})
  return sorted(rows, key=lambda r: (r["params"], r["variant"]))


def _errors(results: Mapping, variant: str) -> list[float]:
  """Test errors (1 − accuracy) per seed of ``variant`` from a ``kdjax reproduce`` ``results.json``
  (``runs[variant]["test_accuracy"]`` is the per-seed list)."""
  entry = results.get("runs", {}).get(variant) or {}
  accs = entry.get("test_accuracy") or []
  accs = accs if isinstance(accs, list) else [accs]
  return [1.0 - float(a) for a in accs if a is not None]


def pareto_markdown(rows: Sequence[Mapping]) -> str:
  """The parameters-vs-error table as Markdown (error in %, mean ± sample std over seeds)."""
  lines = ["| run | model | params | MACs | test error % (mean ± std) | seeds |", "|---|---|---|---|---|---|"]
  for r in rows:
    model = r["model"] + (f" ({r['block']})" if "block" in r else "")
    lines.append(f"| {r['variant']} | {model} | {r['params']:,} | {r['macs'] / 1e6:.2f}M | "
                 f"{100 * r['error_mean']:.2f} ± {100 * r['error_std']:.2f} | {r['seeds']} |")
  return "\n".join(lines) + "\n"


def write_pareto(rows: Sequence[Mapping], out_dir: str | pathlib.Path, *, title: str) -> list[pathlib.Path]:
  """Writes ``pareto.json``, ``pareto.md`` and ``pareto.png`` (parameters on a log x-axis, test error on y;
  students from scratch and with AT as two series joined by block, the teacher marked) into ``out_dir``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "pareto.json").write_text(json.dumps(list(rows), indent=1) + "\n")
  (out / "pareto.md").write_text(pareto_markdown(rows))
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  styles = {"scratch": ("o", "tab:blue", "cheap student from scratch"), "at": ("s", "tab:red", "cheap student + AT")}
  for kind, (marker, color, label) in styles.items():
    pts = sorted((r["params"], 100 * r["error_mean"], 100 * r["error_std"], r["variant"]) for r in rows
                 if r["variant"].endswith("_" + kind))
    if pts:
      xs, ys, es, names = zip(*pts)
      ax.errorbar(xs, ys, yerr=es, marker=marker, color=color, label=label, linestyle="-", capsize=3)
      for x, y, n in zip(xs, ys, names):
        ax.annotate(n.rsplit("_", 1)[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  for r in rows:
    if r["variant"] == "teacher":
      ax.errorbar([r["params"]], [100 * r["error_mean"]], yerr=[100 * r["error_std"]], marker="*", markersize=14,
                  color="black", linestyle="none", label="teacher (dense 3×3)")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("test error (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "pareto.png", dpi=120)
  plt.close(fig)
  return [out / "pareto.json", out / "pareto.md", out / "pareto.png"]
