"""Adversarial KD: Xu, Hsu & Huang (2017), *Training Shallow and Thin Networks for Acceleration via Knowledge
Distillation with Conditional Adversarial Networks* (arXiv 1709.00513; v1 "Learning Loss for Knowledge
Distillation with Conditional Adversarial Networks"). PAPERS.md §9.

The student is the "generator": for an input ``x`` it produces logits ``s(x)``; the fixed teacher's logits
``t(x)`` for the same input are the "real" samples. A small class-conditional discriminator
(:class:`LogitDiscriminator`) on logit vectors learns to tell them apart while also predicting the class
label (an auxiliary classifier), and so acts as a *learned* distillation loss. The student minimises

  ``L_S = CE(y, s) + λ_adv · [−log D_adv(s) + w_cls · (−log D_cls(y | s))] + λ_1 · ‖t − s‖₁``

and the discriminator minimises

  ``L_D = −log D_adv(t) − log(1 − D_adv(s)) + w_cls · (−log D_cls(y | t)) [+ w_cls · (−log D_cls(y | s))]``.

No official code exists; PAPERS.md §9 marks its sources. What comes from where:

* From the paper (abstract/intro [V-abs], third-party summaries [V-text-summary]): a discriminator on
  teacher vs student *logits* of the same inputs; "conditional" = it also predicts the class label; the
  student is trained with the supervised loss, the adversarial loss and an L1 instance-level alignment of
  the logits; the three together are best, adversarial alone is not better than plain training.
* Reconstructions [M] (PAPERS.md §9(a)/(b)): the exact form and weighting of every term above; the D
  class term on student logits (``disc_fake_class``, off by default, PAPERS.md: "possibly"); the class term
  in the student's loss (``student_class_term``, on by default); alternating D/G updates.
* kdjax's choices (documented, all loss fields): the discriminator MLP ``K → 64 → 64 → 1 + K`` with leaky
  ReLU (slope 0.2) on raw logits (PAPERS.md §9(e)); the **non-saturating** student loss ``−log D_adv(s)``
  (``generator_loss='non_saturating'``, the usual GAN practice and PAPERS.md §9(f)'s advice; the minimax
  ``log(1 − D_adv(s))`` is ``'minimax'``); the student's class term sits inside the ``λ_adv`` bracket, so
  ``adv_weight = 0`` removes every discriminator term from the student ("CE + L1"); ``‖·‖₁`` is the sum
  over classes (not the mean); class terms use only labelled examples (``batch["label_mask"]``), so in a
  label-scarce transfer set the conditional parts see the labelled part only, while the real/fake and the
  L1 terms use every example; the discriminator has its own Adam (``disc_learning_rate``, default 1e-4,
  PAPERS.md §9(e)); optional one-sided label smoothing of the real target (``label_smoothing``, 0 default).
* Step order (kdjax's choice): **discriminator first**, on the current student's logits, then the student
  against the *updated* discriminator, both inside one jitted step (``d_steps`` discriminator updates on the
  same batch before each student update, 1 by default). The two halves are separate functions
  (:func:`discriminator_update`, :func:`student_update`): the first takes no student parameters and the
  second returns no discriminator parameters, so neither update can move the other's parameters.

Everything is per example (``[batch]``) and pure: the losses take arrays (the discriminator's outputs) and
keyword-only hyperparameters, and work under ``jit``/``grad``/``vmap``. Teacher logits are not wrapped in
``stop_gradient`` here: the step does that (through :func:`kdjax.train.teacher_output`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kdjax.errors import check_same_shape, unknown_name
from kdjax.methods.soft_targets import hard_label_loss

GENERATOR_LOSSES = ("non_saturating", "minimax")


class LogitDiscriminator(nn.Module):
  """A class-conditional discriminator on logit vectors (PAPERS.md §9(a), sizes §9(e)).

  ``[batch, num_classes]`` logits → MLP (``hidden`` widths, leaky ReLU) → one real/fake logit (``> 0``:
  "teacher") and ``num_classes`` auxiliary class logits.

  Attributes:
    num_classes: the width of the logit vectors it judges (and the number of class outputs).
    hidden: hidden widths (default ``(64, 64)``).
    negative_slope: the leaky ReLU's slope for negative inputs.
  """
  num_classes: int
  hidden: Sequence[int] = (64, 64)
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(real_logit [batch], class_logits [batch, num_classes])``."""
    if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
      raise ValueError(f"the discriminator judges logit vectors [batch, {self.num_classes}] (num_classes="
                       f"{self.num_classes}); got an array of shape {tuple(logits.shape)}")
    x = logits
    for i, width in enumerate(self.hidden):
      x = nn.leaky_relu(nn.Dense(width, name=f"dense_{i}")(x), self.negative_slope)
    out = nn.Dense(1 + self.num_classes, name="head")(x)
    return out[:, 0], out[:, 1:]


def _masked_class_ce(class_logits: jax.Array, labels: jax.Array, label_mask: jax.Array | None) -> jax.Array:
  """``−log D_cls(y | ·)`` per example, 0 where ``label_mask`` is 0 (its label may then be anything)."""
  if label_mask is None:
    return hard_label_loss(class_logits, labels)
  return hard_label_loss(class_logits, jnp.where(label_mask > 0, labels, 0)) * label_mask


def discriminator_loss(real_logit: jax.Array, fake_logit: jax.Array, real_class_logits: jax.Array,
                       fake_class_logits: jax.Array, labels: jax.Array, *, label_mask: jax.Array | None = None,
                       class_weight: float = 1.0, fake_class: bool = False, label_smoothing: float = 0.0
                       ) -> jax.Array:
  """The discriminator's loss per example (PAPERS.md §9(a), reconstruction [M]).

  ``BCE(D(t), 1 − ε) + BCE(D(s), 0) + w_cls · CE(y, D_cls(t)) [+ w_cls · CE(y, D_cls(s))]`` where
  ``BCE(d, r) = −r log σ(d) − (1 − r) log(1 − σ(d))``; with ``ε = 0`` this is
  ``−log D_adv(t) − log(1 − D_adv(s)) − w_cls log D_cls(y | t)``, the negative of the paper's D objective.

  Args:
    real_logit: ``[batch]`` the discriminator's real/fake logit on the teacher's logits.
    fake_logit: ``[batch]`` the same on the student's logits (for the same inputs).
    real_class_logits: ``[batch, classes]`` its class logits on the teacher's logits.
    fake_class_logits: ``[batch, classes]`` its class logits on the student's logits.
    labels: ``[batch]`` integer labels (any value where ``label_mask`` is 0).
    label_mask: optional ``[batch]`` of 0/1: the class terms of unlabelled examples are 0.
    class_weight: ``w_cls ≥ 0``, the weight of the auxiliary class terms.
    fake_class: also ask D to classify the student's logits (PAPERS.md: "possibly"; off by default).
    label_smoothing: one-sided smoothing ``ε ∈ [0, 1)`` of the real target.

  Returns:
    ``[batch]``.
  """
  check_same_shape("discriminator_loss real/fake logits", fake_logit, real_logit)
  real_target = 1.0 - label_smoothing
  loss = (optax.sigmoid_binary_cross_entropy(real_logit, jnp.full_like(real_logit, real_target))
          + optax.sigmoid_binary_cross_entropy(fake_logit, jnp.zeros_like(fake_logit)))
  loss = loss + class_weight * _masked_class_ce(real_class_logits, labels, label_mask)
  if fake_class:
    loss = loss + class_weight * _masked_class_ce(fake_class_logits, labels, label_mask)
  return loss


def generator_adversarial_loss(fake_logit: jax.Array, *, generator_loss: str = "non_saturating") -> jax.Array:
  """The student's real/fake term per example: ``[batch] -> [batch]``.

  * ``'non_saturating'`` (default): ``−log D_adv(s) = softplus(−d)``. Its gradient stays large while D
    confidently rejects the student (the usual GAN practice; PAPERS.md §9(a) writes this form).
  * ``'minimax'``: ``log(1 − D_adv(s)) = −softplus(d)`` (the literal minimax game; saturates early on).
  """
  if generator_loss == "non_saturating":
    return jax.nn.softplus(-fake_logit)
  if generator_loss == "minimax":
    return -jax.nn.softplus(fake_logit)
  raise unknown_name("generator_loss", generator_loss, GENERATOR_LOSSES)


def l1_logit_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """The instance-level alignment ``‖t − s‖₁ = Σ_c |t_c − s_c|`` per example: ``[batch, K] -> [batch]``
  (PAPERS.md §9(a): it keeps a student from matching only the *distribution* of teacher logits)."""
  check_same_shape("l1_logit_loss logits", student_logits, teacher_logits)
  return jnp.sum(jnp.abs(teacher_logits - student_logits), axis=-1)


def student_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, fake_logit: jax.Array,
                 fake_class_logits: jax.Array, *, label_mask: jax.Array | None = None, adv_weight: float,
                 l1_weight: float, class_weight: float = 1.0, student_class_term: bool = True,
                 generator_loss: str = "non_saturating") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The student's loss per example (PAPERS.md §9(a), reconstruction [M]).

  ``CE(y, s) + λ_adv · [adv(D_adv(s)) + w_cls · CE(y, D_cls(s))] + λ_1 · ‖t − s‖₁``, with ``adv`` from
  :func:`generator_adversarial_loss`; CE and the class term only on labelled examples (``label_mask``).

  Args:
    student_logits: ``[batch, K]``.
    teacher_logits: ``[batch, K]``.
    labels: ``[batch]`` integer labels.
    fake_logit: ``[batch]`` the discriminator's real/fake logit on ``student_logits`` (differentiable
      through the student logits).
    fake_class_logits: ``[batch, K]`` its class logits on ``student_logits``.
    label_mask: optional ``[batch]`` 0/1.
    adv_weight: ``λ_adv ≥ 0`` (0 = no discriminator term at all).
    l1_weight: ``λ_1 ≥ 0``.
    class_weight: ``w_cls``, the weight of the class term inside the adversarial bracket.
    student_class_term: include ``−log D_cls(y | s)``.
    generator_loss: ``'non_saturating'`` or ``'minimax'``.

  Returns:
    ``(loss [batch], {"ce", "adversarial", "student_class", "l1"}: each [batch])``.
  """
  ce = _masked_class_ce(student_logits, labels, label_mask)
  adversarial = generator_adversarial_loss(fake_logit, generator_loss=generator_loss)
  student_class = (_masked_class_ce(fake_class_logits, labels, label_mask) if student_class_term
                   else jnp.zeros_like(adversarial))
  l1 = l1_logit_loss(student_logits, teacher_logits)
  loss = ce + adv_weight * (adversarial + class_weight * student_class) + l1_weight * l1
  return loss, {"ce": ce, "adversarial": adversarial, "student_class": student_class, "l1": l1}


def discriminator_accuracy(real_logit: jax.Array, fake_logit: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example 0/1: D calls the teacher's logits real (``d > 0``) / the student's fake (``d < 0``)."""
  return (real_logit > 0).astype(jnp.float32), (fake_logit < 0).astype(jnp.float32)


# --- the two halves of the alternating step -------------------------------------------------------------


def discriminator_update(disc_params: Any, disc_opt_state: Any, student_logits: jax.Array,
                         teacher_logits: jax.Array, labels: jax.Array, label_mask: jax.Array, *,
                         disc: LogitDiscriminator, disc_tx: optax.GradientTransformation,
                         class_weight: float = 1.0, fake_class: bool = False, label_smoothing: float = 0.0
                         ) -> tuple[Any, Any, dict[str, tuple[jax.Array, jax.Array]], jax.Array]:
  """One discriminator update on a batch of (teacher, student) logit pairs.

  It takes logits, not the student's parameters (and stops their gradient), so it cannot change the
  student. Metrics (``(sum, count)`` pairs) are those of the discriminator *before* this update:
  ``disc_loss``, ``disc_acc_real``, ``disc_acc_fake``, ``disc_class_acc`` (class head on the teacher's
  logits, labelled examples).

  Returns:
    ``(disc_params, disc_opt_state, metrics, finite)``; ``finite`` is a boolean scalar (loss and grads).
  """
  from kdjax.train import all_finite, mean_metric
  student_logits = jax.lax.stop_gradient(student_logits)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)

  def loss_fn(p):
    real_logit, real_cls = disc.apply({"params": p}, teacher_logits)
    fake_logit, fake_cls = disc.apply({"params": p}, student_logits)
    per_example = discriminator_loss(real_logit, fake_logit, real_cls, fake_cls, labels, label_mask=label_mask,
                                     class_weight=class_weight, fake_class=fake_class,
                                     label_smoothing=label_smoothing)
    return jnp.mean(per_example), (per_example, real_logit, fake_logit, real_cls)

  (loss, (per_example, real_logit, fake_logit, real_cls)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      disc_params)
  updates, new_opt_state = disc_tx.update(grads, disc_opt_state, disc_params)
  new_params = optax.apply_updates(disc_params, updates)
  acc_real, acc_fake = discriminator_accuracy(real_logit, fake_logit)
  class_correct = (jnp.argmax(real_cls, -1) == labels).astype(jnp.float32)
  metrics = {"disc_loss": mean_metric(per_example), "disc_acc_real": mean_metric(acc_real),
             "disc_acc_fake": mean_metric(acc_fake), "disc_class_acc": mean_metric(class_correct, label_mask)}
  return new_params, new_opt_state, metrics, all_finite(loss, grads)


def student_update(params: Any, batch_stats: Any, opt_state: Any, disc_params: Any, images: jax.Array,
                   teacher_logits: jax.Array, labels: jax.Array, label_mask: jax.Array, rng: jax.Array, *,
                   student: nn.Module, disc: LogitDiscriminator, tx: optax.GradientTransformation,
                   adv_weight: float, l1_weight: float, class_weight: float = 1.0, student_class_term: bool = True,
                   generator_loss: str = "non_saturating"
                   ) -> tuple[tuple[Any, Any, Any], dict[str, tuple[jax.Array, jax.Array]], jax.Array]:
  """One student update against a fixed discriminator (:func:`student_loss`, batch mean).

  Differentiates with respect to the student's parameters only; ``disc_params`` are a constant here and
  are not returned, so the student's update cannot change the discriminator. ``tx`` sees
  ``(params, {})`` (the optimizer convention of :func:`kdjax.train.create_train_state`).

  Returns:
    ``((params, batch_stats, opt_state), metrics, finite)``.
  """
  from kdjax import models
  from kdjax.train import _variables, all_finite, mean_metric
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  disc_params = jax.lax.stop_gradient(disc_params)

  def loss_fn(trainable):
    p, _ = trainable
    out = models.apply_model(student, _variables(p, batch_stats), images, train=True, rngs={"dropout": rng})
    fake_logit, fake_cls = disc.apply({"params": disc_params}, out.logits)
    per_example, parts = student_loss(out.logits, teacher_logits, labels, fake_logit, fake_cls,
                                      label_mask=label_mask, adv_weight=adv_weight, l1_weight=l1_weight,
                                      class_weight=class_weight, student_class_term=student_class_term,
                                      generator_loss=generator_loss)
    return jnp.mean(per_example), (out, per_example, parts)

  trainable = (params, {})
  (loss, (out, per_example, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, new_opt_state = tx.update(grads, opt_state, trainable)
  new_params, _ = optax.apply_updates(trainable, updates)
  correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32)
  metrics = {"loss": mean_metric(per_example), "train_accuracy": mean_metric(correct, label_mask),
             "ce": mean_metric(parts["ce"], label_mask), "adversarial": mean_metric(parts["adversarial"]),
             "student_class": mean_metric(parts["student_class"], label_mask), "l1": mean_metric(parts["l1"])}
  return (new_params, out.batch_stats, new_opt_state), metrics, all_finite(loss, grads)


class AdversarialState(flax.struct.PyTreeNode):
  """The adversarial stage's state (checkpointed whole).

  Attributes:
    step: int32 scalar, updates done (one = ``d_steps`` discriminator updates + one student update).
    params, batch_stats: the student's variables (the model the stage exports).
    opt_state: the student optimizer's state (``setup.tx`` over ``(params, {})``).
    rng: raw PRNG key; step ``s`` uses ``fold_in(rng, s)`` (student dropout).
    disc_params: the discriminator's parameters.
    disc_opt_state: the discriminator's Adam state.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  disc_params: Any
  disc_opt_state: Any


def make_adversarial_step(*, student: nn.Module, disc: LogitDiscriminator, tx: optax.GradientTransformation,
                          disc_tx: optax.GradientTransformation, teacher_models: Sequence[nn.Module] = (),
                          cached_teacher: bool = False, d_steps: int = 1, adv_weight: float, l1_weight: float,
                          class_weight: float = 1.0, student_class_term: bool = True, disc_fake_class: bool = False,
                          generator_loss: str = "non_saturating", label_smoothing: float = 0.0) -> Callable:
  """The un-jitted step ``step(state, batch, teacher_variables) -> (state, metrics)``.

  Order: the student's logits for the batch (current parameters, training mode) → ``d_steps``
  :func:`discriminator_update` on them → one :func:`student_update` against the updated discriminator.
  One non-finite guard covers both halves: if either loss or gradient is NaN/inf, the whole state but
  ``step`` stays as it was and ``nonfinite`` is set. Metrics: the discriminator's (from its first update
  of the step: accuracy before the update) and the student's.
  """
  from kdjax import models
  from kdjax.train import _variables, skip_if_nonfinite, teacher_output
  if d_steps < 1:
    raise ValueError(f"d_steps (discriminator updates per student update) must be >= 1, got {d_steps}")
  if not (teacher_models or cached_teacher):
    raise ValueError("adversarial KD needs a teacher: set teacher_workdir (or pass teacher_models)")
  disc_update = functools.partial(discriminator_update, disc=disc, disc_tx=disc_tx, class_weight=class_weight,
                                  fake_class=disc_fake_class, label_smoothing=label_smoothing)
  stu_update = functools.partial(student_update, student=student, disc=disc, tx=tx, adv_weight=adv_weight,
                                 l1_weight=l1_weight, class_weight=class_weight,
                                 student_class_term=student_class_term, generator_loss=generator_loss)

  def step(state: AdversarialState, batch: Mapping[str, jax.Array], teacher_variables: Sequence[Any] = ()):
    rng = jax.random.fold_in(state.rng, state.step)
    teacher = teacher_output(batch, teacher_models, teacher_variables, cached=cached_teacher).logits
    labels, mask = batch["label"], batch["label_mask"]
    # The current student's logits, as the student update will see them (same parameters and dropout key).
    student_logits = models.apply_model(student, _variables(state.params, state.batch_stats), batch["image"],
                                        train=True, rngs={"dropout": rng}).logits
    disc_params, disc_opt_state, finite, d_metrics = state.disc_params, state.disc_opt_state, jnp.bool_(True), None
    for _ in range(d_steps):
      disc_params, disc_opt_state, metrics, ok = disc_update(disc_params, disc_opt_state, student_logits, teacher,
                                                             labels, mask)
      d_metrics = d_metrics or metrics
      finite = finite & ok
    (params, batch_stats, opt_state), g_metrics, ok = stu_update(
        state.params, state.batch_stats, state.opt_state, disc_params, batch["image"], teacher, labels, mask, rng)
    finite = finite & ok
    new = (params, batch_stats, opt_state, disc_params, disc_opt_state)
    old = (state.params, state.batch_stats, state.opt_state, state.disc_params, state.disc_opt_state)
    (params, batch_stats, opt_state, disc_params, disc_opt_state), nonfinite = skip_if_nonfinite(finite, new, old)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              disc_params=disc_params, disc_opt_state=disc_opt_state)
    return new_state, {**g_metrics, **d_metrics, "nonfinite": nonfinite}

  return step


# --- the registry entry ------------------------------------------------------------------------------------


def default_loss_config() -> dict:
  """``config.loss`` fields of the ``adversarial`` method (kdjax's defaults; the paper gives none [M]).

  ``adv_weight`` λ_adv, ``l1_weight`` λ_1, ``class_weight`` w_cls (D's and the student's class terms),
  ``student_class_term``, ``disc_fake_class``, ``generator_loss``, ``label_smoothing`` (real target
  1 − ε), ``disc_learning_rate`` (the discriminator's Adam), ``d_steps`` (discriminator updates per student
  update), ``disc_hidden`` and ``leaky_slope`` (its MLP).
  """
  return {"adv_weight": 1.0, "l1_weight": 1.0, "class_weight": 1.0, "student_class_term": True,
          "disc_fake_class": False, "generator_loss": "non_saturating", "label_smoothing": 0.0,
          "disc_learning_rate": 1e-4, "d_steps": 1, "disc_hidden": (64, 64), "leaky_slope": 0.2}


def _check_fields(*, adv_weight, l1_weight, class_weight, generator_loss, label_smoothing, disc_learning_rate,
                  d_steps, disc_hidden) -> None:
  for name, value in (("adv_weight", adv_weight), ("l1_weight", l1_weight), ("class_weight", class_weight),
                      ("disc_learning_rate", disc_learning_rate)):
    if not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value!r}")
  if generator_loss not in GENERATOR_LOSSES:
    raise unknown_name("generator_loss", generator_loss, GENERATOR_LOSSES)
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing (of the discriminator's real target) must be in [0, 1), got {label_smoothing!r}")
  if not (isinstance(d_steps, int) and d_steps >= 1):
    raise ValueError(f"d_steps (discriminator updates per student update) must be an int >= 1, got {d_steps!r}")
  if not disc_hidden or not all(isinstance(w, int) and w > 0 for w in disc_hidden):
    raise ValueError(f"disc_hidden must be a non-empty tuple of positive widths, got {disc_hidden!r}")


def make_stage_program(*, adv_weight: float, l1_weight: float, class_weight: float, student_class_term: bool,
                       disc_fake_class: bool, generator_loss: str, label_smoothing: float,
                       disc_learning_rate: float, d_steps: int, disc_hidden: Sequence[int], leaky_slope: float):
  """The adversarial stage as a :class:`kdjax.train.StageProgram` (one teacher; logits cacheable).

  The student's optimizer is the config's (``setup.tx``); the discriminator's is
  ``optax.adam(disc_learning_rate)`` (constant). ``evaluate`` adds the final discriminator's accuracy on
  the test split (teacher logits called real, student logits called fake, class head on teacher logits)
  and the test-set mean ``‖t − s‖₁`` under ``results.json["extra"]``.
  """
  from kdjax import train as ktrain
  disc_hidden = tuple(disc_hidden)
  _check_fields(adv_weight=adv_weight, l1_weight=l1_weight, class_weight=class_weight, generator_loss=generator_loss,
                label_smoothing=label_smoothing, disc_learning_rate=disc_learning_rate, d_steps=d_steps,
                disc_hidden=disc_hidden)
  disc_tx = optax.adam(disc_learning_rate)

  def make_disc(setup) -> LogitDiscriminator:
    return LogitDiscriminator(setup.dataset.num_classes, hidden=disc_hidden, negative_slope=leaky_slope)

  def check_teacher(setup) -> None:
    if len(setup.teacher_models) != 1:
      raise ValueError(f"adversarial KD distils one teacher; teacher_workdir names {len(setup.teacher_models)} "
                       f"runs ({setup.config.teacher_workdir!r})")

  def init_state(setup) -> AdversarialState:
    check_teacher(setup)
    base = ktrain.create_train_state(setup.student, setup.tx, setup.example, setup.config.seed,
                                     init_variables=setup.init_variables)
    disc = make_disc(setup)
    disc_key = jax.random.fold_in(jax.random.PRNGKey(setup.config.seed), 0xD15C)
    # One compiled initialisation (eager init compiles every initializer op separately: seconds on a busy CPU).
    disc_params = jax.jit(disc.init)(disc_key, jnp.zeros((1, setup.dataset.num_classes), jnp.float32))["params"]
    return AdversarialState(step=base.step, params=base.params, batch_stats=base.batch_stats,
                            opt_state=base.opt_state, rng=base.rng, disc_params=disc_params,
                            disc_opt_state=disc_tx.init(disc_params))

  def make_step(setup) -> Callable:
    check_teacher(setup)
    return make_adversarial_step(
        student=setup.student, disc=make_disc(setup), tx=setup.tx, disc_tx=disc_tx,
        teacher_models=() if setup.cached_teacher else tuple(setup.teacher_models),
        cached_teacher=setup.cached_teacher, d_steps=d_steps, adv_weight=adv_weight, l1_weight=l1_weight,
        class_weight=class_weight, student_class_term=student_class_term, disc_fake_class=disc_fake_class,
        generator_loss=generator_loss, label_smoothing=label_smoothing)

  def evaluate(setup, state: AdversarialState) -> dict[str, float]:
    return evaluate_discriminator(setup, state, make_disc(setup))

  return ktrain.StageProgram(init_state, make_step, needs_teacher=True, cacheable_teacher=True, evaluate=evaluate)


def evaluate_discriminator(setup, state: AdversarialState, disc: LogitDiscriminator) -> dict[str, float]:
  """The final discriminator on the test split: ``disc_test_acc_real`` (teacher logits called real),
  ``disc_test_acc_fake`` (student logits called fake), ``disc_test_class_acc`` (its class head on the
  teacher's logits) and ``test_l1_to_teacher`` (mean ``‖t − s‖₁``)."""
  from kdjax import data as kdata
  from kdjax import models, parallel
  from kdjax.train import _round_up, _variables, add_metrics, mean_metric, summarize, teacher_forward

  @jax.jit
  def eval_step(params, batch_stats, disc_params, teacher_variables, batch):
    s = models.apply_model(setup.student, _variables(params, batch_stats), batch["image"], train=False).logits
    t = teacher_forward(setup.teacher_models, teacher_variables, batch["image"]).logits
    real_logit, real_cls = disc.apply({"params": disc_params}, t)
    fake_logit, _ = disc.apply({"params": disc_params}, s)
    acc_real, acc_fake = discriminator_accuracy(real_logit, fake_logit)
    w = batch["weight"]
    return {"disc_test_acc_real": mean_metric(acc_real, w), "disc_test_acc_fake": mean_metric(acc_fake, w),
            "disc_test_class_acc": mean_metric((jnp.argmax(real_cls, -1) == batch["label"]).astype(jnp.float32), w),
            "test_l1_to_teacher": mean_metric(l1_logit_loss(s, t), w)}

  batch_size = _round_up(setup.config.eval_batch_size, setup.mesh.size)
  teacher_variables = parallel.replicate(tuple(setup.teacher_variables), setup.mesh)
  total = None
  for batch in kdata.eval_batches(setup.dataset.test, batch_size=batch_size,
                                  host_slice=parallel.process_slice(batch_size)):
    batch.pop("index")
    total = add_metrics(total, eval_step(state.params, state.batch_stats, state.disc_params, teacher_variables,
                                         parallel.shard_batch(batch, setup.mesh)))
  return summarize(total)
