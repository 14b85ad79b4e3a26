"""Parameters-vs-error table and Pareto plot of a ``kdjax reproduce moonshine`` run.

Usage::

  python papers/moonshine/pareto.py RUN_DIR [--out papers/moonshine/results]

``RUN_DIR`` is the reproduce workdir (``runs/moonshine`` by default). The per-stage ``results.json`` of
``RUN_DIR/seed_<s>/<variant>/`` are read directly, so the script also works on a run that has not finished
all variants (each row says how many seeds it has). Writes ``pareto.json``, ``pareto.md`` and ``pareto.png``
(:func:`kdjax.methods.moonshine.write_pareto`): parameters and MACs (28×28×1 inputs, 10 classes) of each
variant's model and its test error, mean ± sample std over the seeds found.
"""

import argparse
import json
import pathlib
import sys

from kdjax.methods import moonshine as ms
from kdjax.reproduce import load_paper


def collect(run_dir: pathlib.Path, variants) -> dict:
  """``{"runs": {variant: {"test_accuracy": [per seed]}}}`` from the finished stages under ``run_dir``."""
  runs = {}
  for seed_dir in sorted(run_dir.glob("seed_*"), key=lambda p: int(p.name.split("_")[1])):
    for variant in variants:
      path = seed_dir / variant / "results.json"
      if path.exists():
        accuracy = json.loads(path.read_text()).get("test_accuracy")
        if accuracy is not None:
          runs.setdefault(variant, {"test_accuracy": []})["test_accuracy"].append(accuracy)
  return {"runs": runs}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dir", type=pathlib.Path)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args(argv)
  paper = load_paper("moonshine")
  models_of = {}
  for variant in paper.PROTOCOL:
    c = paper.get_config(variant)
    models_of[variant] = (c.model, dict(c.model_kwargs))
  results = collect(args.run_dir, paper.PROTOCOL)
  if not results["runs"]:
    print(f"no finished stage under {args.run_dir}", file=sys.stderr)
    return 1
  rows = ms.pareto_rows(results, models_of, input_shape=(28, 28, 1), num_classes=10)
  paths = ms.write_pareto(rows, args.out, title=f"Moonshine small scale (mnist5k, WRN-10-{paper.WIDEN_FACTOR} "
                                                 "teacher): parameters vs test error")
  print(ms.pareto_markdown(rows))
  print("wrote " + ", ".join(map(str, paths)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
