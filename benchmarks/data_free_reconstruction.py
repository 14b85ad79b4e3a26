"""Images reconstructed per second by data-free KD's reconstruction (Lopes et al. 2017; issue 10).

Reconstruction is the expensive stage of the data-free pipeline: every input is optimised with Adam against the
frozen teacher for a fixed number of iterations. This measures the library's own class program
(:func:`kdjax.methods.data_free.optimise_class` over :func:`~kdjax.methods.data_free.class_values_and_grads`
of :func:`~kdjax.methods.data_free.per_example_objective`, jitted, ``iterations_per_step`` Adam iterations per
call as the stage runs them) for each metadata kind, on the small-scale protocol's teacher (MLP
784-256-256-10, trained briefly on ``mnist5k``; speed does not depend on how well it is trained) and metadata
recorded from it. One "image" = one input optimised for ``--adam-steps`` iterations (the protocol's 200).
Compilation and a warm-up call are excluded; kinds are timed in interleaved rounds so every kind sees the same
machine load, and the median and best round are reported. The fit loop's own overhead (checkpoints, logging,
writing the set) is not included: the protocol's stage wall times in ``papers/data_free/README.md`` include it.

Usage::

  python benchmarks/data_free_reconstruction.py --examples-per-class 100,400 --rounds 3 \\
      --out benchmarks/results/cpu_data_free_reconstruction.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import checkpoint as ckpt
from kdjax import models
from kdjax.config import default_stage_config
from kdjax.methods import data_free as df
from kdjax.train import train_and_evaluate

KINDS = ("top_layer", "all_layers", "all_layers_spectral", "layer_pairs_spectral")


def make_metadata(workdir: str, teacher_steps: int) -> tuple[str, str]:
  """Trains the protocol's teacher briefly and records its metadata; returns (teacher dir, metadata path)."""
  teacher_dir, metadata_dir = os.path.join(workdir, "teacher"), os.path.join(workdir, "metadata")
  c = default_stage_config()
  c.dataset, c.model, c.num_steps, c.batch_size = "mnist5k", "mlp", teacher_steps, 100
  c.model_kwargs = ml_collections.ConfigDict({"hidden": (256, 256), "dropout_input": 0.2, "dropout_hidden": 0.5})
  train_and_evaluate(c, teacher_dir, progress=False)
  m = default_stage_config()
  m.dataset, m.method, m.teacher_workdir, m.batch_size, m.num_epochs = "mnist5k", "data_free_metadata", teacher_dir, \
      500, 1
  m.loss = ml_collections.ConfigDict(df.default_metadata_config())
  train_and_evaluate(m, metadata_dir, progress=False)
  return teacher_dir, os.path.join(metadata_dir, df.METADATA_FILE)


def class_runner(teacher, variables, meta: df.Metadata, kind: str, n: int, iterations_per_step: int):
  """A jitted call running ``iterations_per_step`` Adam iterations on class 0's ``n`` inputs."""
  targets, bases = df.sample_all_targets(meta, kind, 0, n, target_sampling="gaussian")
  targets = {k: jnp.asarray(v[0]) for k, v in targets.items()}
  bases = {k: jnp.asarray(v[0]) for k, v in bases.items()}
  tx = optax.adam(0.07)
  values_and_grads = df.class_values_and_grads(df.per_example_objective(teacher, meta, kind))

  @jax.jit
  def run(x, opt_state):
    return df.optimise_class(values_and_grads, tx, x, opt_state, targets, bases, variables,
                             iterations=iterations_per_step)
  x = df.initial_inputs(0, 1, n, tuple(meta.info["example_shape"]), init_mean=0.15, init_std=0.1)[0]
  return run, x, tx.init(x)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples-per-class", default="100", help="comma-separated batch sizes (inputs per class)")
  parser.add_argument("--adam-steps", type=int, default=200, help="Adam iterations per image (the protocol's 200)")
  parser.add_argument("--iterations-per-step", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--teacher-steps", type=int, default=200)
  parser.add_argument("--out", default="benchmarks/results/cpu_data_free_reconstruction.json")
  args = parser.parse_args()
  calls = args.adam_steps // args.iterations_per_step
  sizes = [int(s) for s in args.examples_per_class.split(",")]

  with tempfile.TemporaryDirectory() as workdir:
    teacher_dir, metadata_path = make_metadata(workdir, args.teacher_steps)
    variables, tconfig, _ = ckpt.load_teacher_variables(teacher_dir)
    teacher = models.get(tconfig["model"], num_classes=tconfig["num_classes"], **tconfig["model_kwargs"])
    meta = df.read_metadata(metadata_path)
    runners = {}
    for n in sizes:
      for kind in KINDS:
        run, x, opt = class_runner(teacher, variables, meta, kind, n, args.iterations_per_step)
        compile_start = time.perf_counter()
        jax.block_until_ready(run(x, opt))  # compile + warm-up
        runners[(kind, n)] = (run, x, opt, time.perf_counter() - compile_start)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runners}
    for _ in range(args.rounds):
      for key, (run, x, opt, _) in runners.items():
        start = time.perf_counter()
        state = (x, opt)
        for _ in range(calls):
          new_x, new_opt, _ = run(*state)
          state = (new_x, new_opt)
        jax.block_until_ready(state)
        times[key].append(time.perf_counter() - start)

  rows = []
  for (kind, n), seconds in times.items():
    rows.append({"kind": kind, "examples_per_class": n, "adam_steps_per_image": args.adam_steps,
                 "seconds_per_class_median": statistics.median(seconds), "seconds_per_class_best": min(seconds),
                 "images_per_second_median": n / statistics.median(seconds), "images_per_second_best": n / min(seconds),
                 "adam_iterations_per_second_median": n * args.adam_steps / statistics.median(seconds),
                 "first_call_seconds": runners[(kind, n)][3]})
  result = {"benchmark": "data_free_reconstruction", "device": str(jax.devices()[0].device_kind),
            "platform": jax.default_backend(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "machine": platform.machine(), "load_average_at_end": os.getloadavg(),
            "teacher": "mlp 784-256-256-10 (mnist5k)", "settings": vars(args), "rows": rows}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print("| kind | inputs per class | images/s (median) | images/s (best) | s per class (median) |")
  print("|---|---:|---:|---:|---:|")
  for row in rows:
    print(f"| {row['kind']} | {row['examples_per_class']} | {row['images_per_second_median']:.1f} | "
          f"{row['images_per_second_best']:.1f} | {row['seconds_per_class_median']:.2f} |")
  print(f"wrote {args.out}; load average at the end {np.round(os.getloadavg(), 2).tolist()}")


if __name__ == "__main__":
  main()
