"""Parameters-vs-error table and Pareto plot of a ``kdjax reproduce moonshine`` run.

Usage::

  python papers/moonshine/pareto.py RUN_DIR [RUN_DIR ...] [--out papers/moonshine/results]

Each ``RUN_DIR`` is a reproduce workdir (``runs/moonshine``, ``runs/moonshine_more_blocks``). The per-stage
``results.json`` of ``RUN_DIR/seed_<s>/<variant>/`` are read directly, so the script also works on a run that
has not finished all variants (each row says how many seeds it has); a variant both runs trained (the teacher)
is read from the first that has it, seed by seed. Writes ``pareto.json``, ``pareto.md`` and ``pareto.png``
(:func:`kdjax.methods.moonshine.write_pareto`): parameters and MACs (28×28×1 inputs, 10 classes) of each
variant's model and its test error, mean ± sample std over the seeds found.
"""

import argparse
import json
import pathlib
import sys

from kdjax.methods import moonshine as ms
from kdjax.reproduce import load_paper


def collect(run_dirs, variants) -> dict:
  """``{"runs": {variant: {"test_accuracy": [per seed]}}}`` from the finished stages under ``run_dirs``."""
  found: dict[str, dict[int, float]] = {}
  for run_dir in run_dirs:
    for seed_dir in run_dir.glob("seed_*"):
      seed = int(seed_dir.name.split("_")[1])
      for variant in variants:
        path = seed_dir / variant / "results.json"
        if path.exists() and seed not in found.get(variant, {}):
          accuracy = json.loads(path.read_text()).get("test_accuracy")
          if accuracy is not None:
            found.setdefault(variant, {})[seed] = accuracy
  return {"runs": {variant: {"test_accuracy": [by_seed[s] for s in sorted(by_seed)]}
                   for variant, by_seed in found.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run_dirs", type=pathlib.Path, nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
  args = parser.parse_args(argv)
  paper = load_paper("moonshine")
  variants = list(dict.fromkeys([*paper.PROTOCOL, *(v for vs in paper.PROTOCOLS.values() for v in vs)]))
  models_of = {}
  for variant in variants:
    c = paper.get_config(variant)
    models_of[variant] = (c.model, dict(c.model_kwargs))
  results = collect(args.run_dirs, variants)
  if not results["runs"]:
    print(f"no finished stage under {', '.join(map(str, args.run_dirs))}", file=sys.stderr)
    return 1
  rows = ms.pareto_rows(results, models_of, input_shape=(28, 28, 1), num_classes=10)
  paths = ms.write_pareto(rows, args.out, title=f"Moonshine small scale (mnist5k, WRN-10-{paper.WIDEN_FACTOR} "
                                                 "teacher): parameters vs test error")
  print(ms.pareto_markdown(rows))
  print("wrote " + ", ".join(map(str, paths)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
