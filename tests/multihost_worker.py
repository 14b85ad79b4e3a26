"""One process of tests/test_multihost.py's multi-process runs.

``python multihost_worker.py RECORD_DIR STOP_AFTER kdjax-args... [--then STOP_AFTER kdjax-args...]`` runs each
``kdjax.cli.main(kdjax-args)`` in turn in this process (the real command: its ``--coordinator-address/
--num-processes/--process-id`` flags start JAX's distributed runtime; a second command with the same flags reuses
it, which saves the test a process start), with three test-only hooks installed by wrapping library functions
here, so that the library carries no test code:

* every ``TrainBatches.batch(step)`` call records the transfer-set positions this process read for that step;
* ``precompute_teacher_logits`` saves the teacher-logit cache this process assembled;
* ``STOP_AFTER`` > 0 stops that command's run after that step as if the process had died there (a ``fit``
  callback, as tests/conftest.py's ``crash_after``); 0 runs it to the end;
* what the command's ``--workdir`` held before it ran (checkpoint steps, a ``results.json``) is recorded.

Command ``j``'s records go to ``RECORD_DIR/run<j>_process_<i>.json`` and ``RECORD_DIR/run<j>_teacher_logits_<i>.npy``
(``i`` = JAX process index). The exit status is 0, or the first failing command's status, given at once (without
JAX's shutdown barrier); a run stopped on purpose is not a failure.
"""

import json
import logging
import os
import sys
import traceback

import numpy as np


class StopTraining(Exception):
  """Raised after step ``KDJAX_TEST_STOP_AFTER`` (as tests/conftest.py's ``crash_after``)."""


def main() -> int:
  record_dir, commands = sys.argv[1], [[]]
  for arg in sys.argv[2:]:
    if arg == "--then":
      commands.append([])
    else:
      commands[-1].append(arg)
  commands = [(int(stop_after), argv) for stop_after, *argv in commands]
  logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms  %(message)s")  # cli.main keeps this
  import jax

  from kdjax import cli, train
  from kdjax.data import pipeline

  current = {"run": 0, "stop_after": 0, "read": {}}
  original_batch = pipeline.TrainBatches.batch

  def recording_batch(self, step):
    out = original_batch(self, step)
    current["read"][int(step)] = out["index"].tolist()
    return out

  original_precompute = train.precompute_teacher_logits

  def saving_precompute(*args, **kwargs):
    logits = original_precompute(*args, **kwargs)
    np.save(os.path.join(record_dir, f"run{current['run']}_teacher_logits_{jax.process_index()}.npy"), logits)
    return logits

  original_fit = train.fit

  def stopping_fit(*args, callbacks=(), **kwargs):
    stop_after = current["stop_after"]

    def stop(done, state):
      del state
      if done == stop_after:
        raise StopTraining(f"stopped after step {done}")
    return original_fit(*args, callbacks=(*callbacks, stop) if stop_after else callbacks, **kwargs)

  pipeline.TrainBatches.batch = recording_batch
  train.precompute_teacher_logits = saving_precompute
  train.fit = stopping_fit
  status = 0
  for run, (stop_after, argv) in enumerate(commands):
    current.update(run=run, stop_after=stop_after, read={})
    workdir = argv[argv.index("--workdir") + 1]
    checkpoints = os.path.join(workdir, "checkpoints")
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    found = {"checkpoints_before": sorted(int(d) for d in names if d.isdigit()),
             "results_before": os.path.exists(os.path.join(workdir, "results.json"))}
    try:
      status = cli.main(argv)
    except StopTraining:
      status = 3
    except BaseException:  # noqa: BLE001 - any other failure ends the process below, its traceback printed
      traceback.print_exc()
      status = 1
    finally:
      if jax.distributed.is_initialized():
        record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                  "read": {str(k): v for k, v in sorted(current["read"].items())}, **found}
        with open(os.path.join(record_dir, f"run{run}_process_{jax.process_index()}.json"), "w") as f:
          json.dump(record, f)
    if status not in (0, 3):
      # Leave at once: a normal exit would wait up to 5 minutes at JAX's shutdown barrier for the partner, which
      # waits in a collective for this process; the test ends the partner when it sees this exit status.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
  return 0


if __name__ == "__main__":
  sys.exit(main())
