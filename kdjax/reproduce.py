"""``kdjax reproduce <paper>``: run a paper's protocol over seeds and set it beside the paper's numbers.

A paper folder ``papers/<key>/config.py`` declares ``PROTOCOL`` (the variants to train, teacher
first), ``PAPER`` (the citation), ``PAPER_RESULTS`` (what the paper reports, by variant) and
``get_config(variant)``. For every seed each variant is trained by the generic stage
(:func:`kdjax.train.train_and_evaluate`) in ``<workdir>/seed_<s>/<variant>``; students that need
a teacher get that seed's ``teacher`` run. A config may name another variant's run of the same seed
with ``"@<variant>"`` in ``init_from`` or ``teacher_workdir`` (e.g. ``c.init_from =
"@student_fitnet_stage1"`` for the second stage of a two-stage method): it is resolved to
``<workdir>/seed_<s>/<variant>``, and that variant must come earlier in ``PROTOCOL`` (checked before
anything is trained). A file a stage wrote is named with ``"@<variant>/<path>"`` in ``dataset``,
``test_dataset`` or any string field of ``loss`` (e.g. ``c.dataset = "@reconstruct/reconstructed.npz"``).
Finished stages are not retrained when the command is run again (each stage
resumes from its checkpoints). The table printed and ``results.json`` hold only what this run
measured; the paper's numbers stand beside them, labelled as the paper's.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
from typing import Any

from kdjax import config as kconfig
from kdjax.errors import unknown_name
from kdjax.methods.objective import needs_teacher


def locate_papers() -> None:
  """Lets :func:`kdjax.config.papers_dir` find the paper configs of a wheel install.

  A checkout has ``papers/`` beside the package; a wheel ships it inside, as ``kdjax/papers`` (setup.py). When no
  ``papers/`` folder is found the usual ways and ``$KDJAX_PAPERS_DIR`` is unset, it is set to the shipped copy.
  """
  packaged = pathlib.Path(__file__).resolve().parent / "papers"
  if os.environ.get(kconfig.PAPERS_DIR_ENV) or not (packaged / "soft_targets").is_dir():
    return
  try:
    kconfig.papers_dir()
  except FileNotFoundError:
    os.environ[kconfig.PAPERS_DIR_ENV] = str(packaged)


def load_paper(key: str):
  """The ``papers/<key>/config.py`` module; an unknown key lists the known papers."""
  locate_papers()
  keys = kconfig.paper_keys()
  if key not in keys:
    raise unknown_name("paper", key, keys)
  return kconfig.load_module(kconfig.papers_dir() / key / "config.py")


DEFAULT_PROTOCOL = "default"


def protocol_variants(paper, protocol: str | None = None) -> tuple[str, ...]:
  """The variants protocol ``protocol`` of ``paper`` trains, in order: ``PROTOCOL`` for the default, else
  ``PROTOCOLS[protocol]`` (a paper's further protocols, e.g. ``"transfer_set"``); an unknown name lists them."""
  protocols = {DEFAULT_PROTOCOL: tuple(paper.PROTOCOL), **{k: tuple(v) for k, v in getattr(paper, "PROTOCOLS",
                                                                                         {}).items()}}
  name = protocol or DEFAULT_PROTOCOL
  if name not in protocols:
    raise unknown_name(f"protocol of {paper.PAPER!r}", name, list(protocols))
  return protocols[name]


def resolve_run_references(config, *, seed_dir: str, variant: str, done: tuple[str, ...]) -> None:
  """Replaces ``"@<variant>"`` and ``"@<variant>/<path>"`` by that run's folder (joined with ``path``).

  Looked for in ``init_from``, ``teacher_workdir`` (comma-separated lists may mix both forms),
  ``dataset``, ``test_dataset`` and every string field of ``loss``. ``done`` are the variants already
  trained in ``seed_dir`` (earlier in the protocol); a reference to any other name is an error that
  lists them.
  """
  def resolve(field: str, value: str) -> str:
    parts = []
    for part in value.split(","):
      if part.startswith("@"):
        name, _, rest = part[1:].partition("/")
        if name not in done:
          raise unknown_name(f"run referenced by {variant}'s {field} (a variant trained earlier in the "
                             "protocol)", name, done)
        part = os.path.join(seed_dir, name, rest) if rest else os.path.join(seed_dir, name)
      parts.append(part)
    return ",".join(parts)

  for field in ("init_from", "teacher_workdir", "dataset", "test_dataset"):
    if "@" in config[field]:
      with config.unlocked():
        config[field] = resolve(field, config[field])
  for key, value in config.loss.items():
    if isinstance(value, str) and value.startswith("@"):
      with config.unlocked():
        config.loss[key] = resolve(f"loss.{key}", value)


def describe_result(result: dict) -> str:
  """One line of a stage's results: test accuracy, retrieval, or (a stage that exports no model) its extras."""
  parts = []
  if "test_accuracy" in result:
    parts.append(f"test accuracy {result['test_accuracy']:.4f} ({result['test_errors']} errors / "
                 f"{result['test_examples']})")
  if "retrieval" in result:
    parts.append("retrieval " + ", ".join(f"{k} {v:.4f}" for k, v in result["retrieval"].items() if k != "queries"))
  if not parts:
    parts.append(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in result.get("extra", {}).items()) or "done")
  return "; ".join(parts)


def _dataset_facts(name: str) -> dict[str, Any] | None:
  """Train-set size and image height/width of a dataset, or ``None`` when it cannot be loaded here."""
  from kdjax import data as kdata
  try:
    ds = kdata.load(name, require_test=False)
  except Exception:  # noqa: BLE001 - a dataset not prepared here: the notice says so instead
    return None
  shape = tuple(ds.example_shape)
  return {"train": len(ds.train), "height": shape[0] if len(shape) == 3 else None,
          "width": shape[1] if len(shape) == 3 else None, "classes": ds.num_classes, "shape": shape}


def dataset_notice(paper, dataset: str, *, full: bool = False, protocol: str | None = None) -> list[str]:
  """What ``kdjax reproduce --dataset`` keeps from a protocol designed for another dataset, as lines to print.

  The protocol's settings stay as written — jitter in pixels, the number of labelled examples, epochs or
  steps, channel statistics, held-out classes — so each line sets the value beside the designed dataset's
  size and the chosen one's (``[]`` when ``dataset`` is the protocol's own).
  """
  suffix = ",full" if full else ""
  configs = {v: paper.get_config(v + suffix) for v in protocol_variants(paper, protocol)}
  designed = next((c.dataset for c in configs.values() if not c.dataset.startswith("@")), None)
  if designed is None or dataset == designed:
    return []
  ours, theirs = _dataset_facts(designed), _dataset_facts(dataset)
  lines = [f"note: this protocol was designed for {designed!r}; on {dataset!r} its settings are used as written, "
           "not rescaled, so compare results with care:"]
  if ours is None or theirs is None:
    lines.append(f"  (could not load {designed if ours is None else dataset!r} here to compare sizes)")
  if ours and theirs and ours["classes"] != theirs["classes"]:
    lines.append(f"  classes: {ours['classes']} in {designed!r}, {theirs['classes']} in {dataset!r}")
  for variant, c in configs.items():
    parts = []
    if c.jitter:
      text = f"jitter {c.jitter} px"
      if ours and theirs and ours["height"] and theirs["height"]:
        text += (f" ({c.jitter / ours['height']:.0%} of {designed}'s {ours['height']}-px height, "
                 f"{c.jitter / theirs['height']:.0%} of {dataset}'s {theirs['height']} px)")
      parts.append(text)
    if c.labelled_examples:
      text = f"{c.labelled_examples} labelled examples"
      if ours and theirs:
        text += (f" ({c.labelled_examples / ours['train']:.0%} of {designed}'s {ours['train']} training examples, "
                 + (f"{c.labelled_examples / theirs['train']:.0%} of {dataset}'s {theirs['train']})"
                    if c.labelled_examples < theirs["train"] else
                    f"but {dataset!r} has only {theirs['train']}: every example is labelled, none is left for "
                    "the teacher alone)"))
      parts.append(text)
    if c.num_steps:
      parts.append(f"{c.num_steps} steps")
    elif ours and theirs:
      n_ours = c.labelled_examples if c.labelled_examples and not c.include_unlabelled else ours["train"]
      n_theirs = (min(c.labelled_examples, theirs["train"]) if c.labelled_examples and not c.include_unlabelled
                  else theirs["train"])
      parts.append(f"{c.num_epochs} epochs ({c.num_epochs * (n_ours // c.batch_size)} steps on {designed!r}, "
                   f"{c.num_epochs * (n_theirs // c.batch_size)} on {dataset!r})")
    if c.image_mean:
      parts.append(f"inputs standardised with {designed}'s channel statistics {tuple(c.image_mean)}")
    if c.held_out_classes:
      parts.append(f"held-out classes {tuple(c.held_out_classes)} chosen for {designed!r}")
    if parts:
      lines.append(f"  {variant}: " + "; ".join(parts))
  return lines


def _stats(values: list[float]) -> dict[str, float]:
  return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def default_workdir(key: str, *, protocol: str | None = None, full: bool = False) -> str:
  """``runs/<paper>[_<protocol>][_full]``: where ``kdjax reproduce`` writes when not given ``--workdir``."""
  named = protocol not in (None, DEFAULT_PROTOCOL)
  return os.path.join("runs", key + (f"_{protocol}" if named else "") + ("_full" if full else ""))


def run_protocol(key: str, *, seeds: int = 3, workdir: str | None = None, full: bool = False,
                 dataset: str | None = None, overrides: dict[str, str] | None = None,
                 protocol: str | None = None, progress: bool = True, echo=print) -> dict[str, Any]:
  """Runs paper ``key``'s protocol (``protocol``: one of its ``PROTOCOLS``; default ``PROTOCOL``); returns
  (and writes to ``workdir/results.json``) the results."""
  from kdjax.train import ensure_stage_fields, train_and_evaluate  # heavy imports only when training
  paper = load_paper(key)
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  variants = protocol_variants(paper, protocol)
  workdir = workdir or default_workdir(key, protocol=protocol, full=full)
  for index, variant in enumerate(variants):  # a bad "@<variant>" or scale fails before any training
    resolve_run_references(paper.get_config(variant + (",full" if full else "")), seed_dir=workdir,
                           variant=variant, done=tuple(variants[:index]))
  os.makedirs(workdir, exist_ok=True)
  if dataset:
    for line in dataset_notice(paper, dataset, full=full, protocol=protocol):
      echo(line)
  runs: dict[str, dict[str, list]] = {}
  configs: dict[str, Any] = {}
  for seed in range(seeds):
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    for index, variant in enumerate(variants):
      config = ensure_stage_fields(paper.get_config(variant + (",full" if full else "")))
      with config.unlocked():
        config.seed = seed
        config.split_seed = seed
        if dataset and config.dataset.startswith("@"):  # a file an earlier stage wrote: test on the chosen set
          config.test_dataset = dataset if not config.test_dataset.startswith("@") else config.test_dataset
        elif dataset:
          config.dataset = dataset
      kconfig.apply_overrides(config, overrides or {})
      stage_dir = os.path.join(seed_dir, variant)
      resolve_run_references(config, seed_dir=seed_dir, variant=variant, done=tuple(variants[:index]))
      if needs_teacher(config.method, config.loss) and not config.teacher_workdir:
        config.teacher_workdir = os.path.join(seed_dir, "teacher")
      echo(f"[seed {seed}] {variant}: training in {stage_dir}")
      result = train_and_evaluate(config, stage_dir, progress=progress)
      echo(f"[seed {seed}] {variant}: {describe_result(result)}")
      run = runs.setdefault(variant, {"test_accuracy": [], "test_errors": [], "test_examples": []})
      if "test_accuracy" in result:  # a stage that exports no model (statistics, inputs) has none
        run["test_accuracy"].append(result["test_accuracy"])
        run["test_errors"].append(result["test_errors"])
        run["test_examples"].append(result["test_examples"])
      if "train_accuracy" in result:  # config.report_train_accuracy: accuracy on the labelled training images
        run.setdefault("extra", {}).setdefault("train_accuracy", []).append(float(result["train_accuracy"]))
      for name, value in result.get("retrieval", {}).items():  # held-out-class retrieval
        if name != "queries":
          run.setdefault("retrieval", {}).setdefault(name, []).append(float(value))
      for name, value in result.get("extra", {}).items():  # e.g. a jointly trained booster's accuracy
        if isinstance(value, int | float) and not isinstance(value, bool):
          run.setdefault("extra", {}).setdefault(name, []).append(float(value))
      configs[variant] = config.to_dict()
  for run in runs.values():
    if run["test_accuracy"]:
      run.update({f"test_accuracy_{k}": v for k, v in _stats(run["test_accuracy"]).items()})
      run.update({f"test_errors_{k}": v for k, v in _stats([float(e) for e in run["test_errors"]]).items()})
    for group in ("retrieval", "extra"):
      if group in run:
        run[f"{group}_stats"] = {name: _stats(values) for name, values in run[group].items()}
  results = {
      "paper": paper.PAPER, "paper_key": key,
      "settings": {"seeds": seeds, "full": full, "dataset": dataset or configs[variants[0]]["dataset"],
                   "protocol": protocol or DEFAULT_PROTOCOL,
                   "workdir": workdir, "overrides": overrides or {}, "configs": configs},
      "runs": runs,
      "paper_results": paper.PAPER_RESULTS,
  }
  table = format_table(results)
  import jax
  if jax.process_index() != 0:  # several hosts share the work directory: one writer
    return results
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  echo(table)
  chart = os.path.join(workdir, "results.png")
  plot_results(results, chart)
  echo(f"wrote {os.path.join(workdir, 'results.json')}, {os.path.join(workdir, 'results.md')} and {chart}")
  return results


def format_table(results: dict[str, Any]) -> str:
  """A Markdown table: measured mean ± std per run beside the paper's reported numbers."""
  s = results["settings"]
  has_extra = any("extra_stats" in run for run in results["runs"].values())
  has_retrieval = any("retrieval_stats" in run for run in results["runs"].values())
  protocol = s.get("protocol", DEFAULT_PROTOCOL)
  lines = [f"{results['paper']} — measured by kdjax on `{s['dataset']}` over {s['seeds']} seed(s)"
           + (f", protocol `{protocol}`" if protocol != DEFAULT_PROTOCOL else "")
           + f"{' (full scale)' if s['full'] else ' (small scale)'}; paper's numbers are the paper's own setting.",
           "",
           "| run | measured test accuracy (mean ± std) | measured test errors (mean ± std) | "
           + ("measured held-out-class retrieval (mean ± std) | " if has_retrieval else "")
           + ("other measured (mean ± std) | " if has_extra else "") + "paper (reported) |",
           "|---|---|---|" + ("---|" if has_retrieval else "") + ("---|" if has_extra else "") + "---|"]

  def stats_text(stats: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in stats.items()) or "—"

  for name, run in results["runs"].items():
    paper = results["paper_results"].get(name)
    paper_text = "—"
    if paper:
      parts = [f"accuracy {paper['test_accuracy']:.4f}"] if "test_accuracy" in paper else []
      if "test_errors" in paper:
        parts.append(f"{paper['test_errors']} errors / {paper.get('test_examples', '?')}")
      parts += [f"{k} {v}" for k, v in paper.items() if k not in ("test_accuracy", "test_errors", "test_examples")]
      paper_text = ", ".join(parts)
    retrieval_text = stats_text(run.get("retrieval_stats", {})) + " | " if has_retrieval else ""
    extra_text = stats_text(run.get("extra_stats", {})) + " | " if has_extra else ""
    if run["test_accuracy"]:
      accuracy_text = (f"{run['test_accuracy_mean']:.4f} ± {run['test_accuracy_std']:.4f} | "
                       f"{run['test_errors_mean']:.1f} ± {run['test_errors_std']:.1f} / {run['test_examples'][0]}")
    else:
      accuracy_text = "— | —"  # the stage trains no model
    lines.append(f"| {name} | {accuracy_text} | {retrieval_text}{extra_text}{paper_text} |")
  return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str) -> None:
  """A bar chart of measured test error (%) per run with seed std, the paper's error as markers."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [n for n, run in results["runs"].items() if run["test_accuracy"]]  # stages that export a model
  means = [100 * (1 - results["runs"][n]["test_accuracy_mean"]) for n in names]
  stds = [100 * results["runs"][n]["test_accuracy_std"] for n in names]
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
  ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0", label="measured (kdjax, this run)")
  paper = [(i, 100 * (1 - results["paper_results"][n]["test_accuracy"])) for i, n in enumerate(names)
           if "test_accuracy" in results["paper_results"].get(n, {})]
  if paper:
    ax.scatter([i for i, _ in paper], [v for _, v in paper], marker="D", color="#C44E52", zorder=3,
               label="paper (its own full-scale setting)")
  s = results["settings"]
  ax.set_ylabel("test error (%)")
  ax.set_title(f"{results['paper_key']}: {s['dataset']}, {s['seeds']} seed(s)")
  ax.legend(fontsize=8)
  plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
