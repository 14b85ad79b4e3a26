"""The ``kdjax`` command: ``list``, ``train`` and ``reproduce``.

Config overrides follow ml_collections: ``--config.loss.temperature=20`` (or ``--config.KEY VALUE``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kdjax.errors import (
  DatasetUnavailableError,
  MissingCheckpointError,
  NonFiniteError,
  UnknownNameError,
  WorkdirError,
)

USER_ERRORS = (UnknownNameError, MissingCheckpointError, DatasetUnavailableError, NonFiniteError, WorkdirError,
               FileNotFoundError, ValueError)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Separates ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` overrides from the other arguments."""
  rest, overrides = [], {}
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg} needs a value: {arg}=VALUE")
        value = argv[i + 1]
        i += 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _multihost_parser() -> argparse.ArgumentParser:
  """The flags of a run over several processes (one per host); see kdjax.parallel.initialize_multihost."""
  p = argparse.ArgumentParser(add_help=False)
  g = p.add_argument_group("several hosts (one process per host, JAX's distributed runtime; give all three, or none "
                           "under SLURM / Open MPI / Cloud TPU, where JAX reads them from the environment)")
  g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="process 0's address and a free port that every process can reach")
  g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's rank, 0..N-1")
  return p


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="kdjax", description="Knowledge-distillation papers in JAX/Flax.")
  multihost = _multihost_parser()
  sub = p.add_subparsers(dest="command", required=True)
  ls = sub.add_parser("list", help="show the papers, methods, datasets and models available")
  ls.add_argument("what", nargs="?", choices=["papers", "methods", "datasets", "models", "all"], default="all")
  tr = sub.add_parser("train", help="run one training stage (resumes from the workdir's checkpoints)",
                      parents=[multihost], epilog="override any config field with --config.KEY=VALUE")
  tr.add_argument("--config", required=True, help="papers/<key>/config.py[:variant]")
  tr.add_argument("--workdir", required=True, help="where checkpoints, metrics and results go")
  tr.add_argument("--no-progress", action="store_true", help="no progress bar")
  tr.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                  help="keep compiled programs in DIR for later runs (default: $KDJAX_COMPILATION_CACHE, else off)")
  rp = sub.add_parser("reproduce", help="run a paper's reproduction protocol over seeds",
                      parents=[multihost], epilog="override any field of every stage with --config.KEY=VALUE")
  rp.add_argument("paper", help="paper key (see `kdjax list papers`)")
  rp.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
  rp.add_argument("--workdir", default=None, help="default runs/<paper>")
  rp.add_argument("--dataset", default=None, help="dataset for every stage (default: the paper config's)")
  rp.add_argument("--full", action="store_true", help="the paper's full-scale setting (TFDS data, paper nets)")
  rp.add_argument("--protocol", default=None,
                  help="one of the paper's further protocols, e.g. transfer_set (see `kdjax list papers`; "
                       "default: its main protocol; default workdir runs/<paper>_<protocol>)")
  rp.add_argument("--no-progress", action="store_true", help="no progress bars")
  rp.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                  help="keep compiled programs in DIR, so later seeds skip compiling (default: "
                       "$KDJAX_COMPILATION_CACHE, else <workdir>/compilation_cache)")
  return p


def cmd_list(what: str) -> None:
  from kdjax import config as kconfig
  from kdjax import data, models
  from kdjax.reproduce import locate_papers
  locate_papers()
  if what in ("papers", "all"):
    print("papers (kdjax reproduce KEY):")
    for key in kconfig.paper_keys():
      module = kconfig.load_module(kconfig.papers_dir() / key / "config.py")
      further = ", ".join(getattr(module, "PROTOCOLS", {}))  # one line per paper: its key comes first
      print(f"  {key:22s} {module.PAPER}" + (f" (also --protocol {further})" if further else ""))
  if what in ("methods", "all"):
    from kdjax.methods.objective import METHODS
    print("methods (--config.method=NAME; its fields are --config.loss.*):")
    for name, entry in METHODS.items():
      print(f"  {name:28s} {entry.description}")
  if what in ("datasets", "all"):
    print("datasets (--config.dataset=NAME):")
    for name, text in data.BUILTIN_DESCRIPTIONS.items():
      print(f"  {name:22s} {text}")
    print(f"  {'<tfds name>':22s} any TFDS catalogue dataset you have prepared (mnist, cifar10, cifar100, ...)")
    print(f"  {'<path>.npz':22s} your own arrays x_train, y_train, x_test, y_test")
  if what in ("models", "all"):
    print("models (--config.model=NAME): parameters and multiply-accumulates (conv + dense, one example) at the "
          "default input size; features by name")
    from kdjax.models.macs import describe_model
    for name in models.names():
      spec = models.spec(name)
      count, feats, macs = describe_model(spec.factory(), spec.input_shape)
      print(f"  {name:22s} {count:>12,d} params {macs / 1e6:>10,.1f}M MACs  input {spec.input_shape}  "
            f"{spec.description}")
      print(f"  {'':22s} features: {', '.join(feats)}")


def cmd_train(args, overrides) -> None:
  from kdjax.config import apply_overrides, load_config
  from kdjax.reproduce import describe_result
  from kdjax.train import ensure_stage_fields, train_and_evaluate
  config = ensure_stage_fields(load_config(args.config))
  apply_overrides(config, overrides)
  use_compilation_cache(args.compilation_cache, None)
  result = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
  print(f"{args.workdir}: {describe_result(result)} after {result['steps']} steps")


def use_compilation_cache(flag: str | None, default: str | None) -> None:
  from kdjax import compilation_cache
  directory = compilation_cache.choose(flag, default)
  if directory is not None:
    logging.getLogger("kdjax").info("compilation cache: %s", compilation_cache.enable(directory))
  elif flag is not None or os.environ.get(compilation_cache.ENV_VAR):  # asked for "off"
    compilation_cache.disable()


def cmd_reproduce(args, overrides) -> None:
  from kdjax.reproduce import default_workdir, load_paper, protocol_variants, run_protocol
  protocol_variants(load_paper(args.paper), args.protocol)  # a misspelt paper or protocol creates no directory
  use_compilation_cache(args.compilation_cache, os.path.join(
      args.workdir or default_workdir(args.paper, protocol=args.protocol, full=args.full), "compilation_cache"))
  run_protocol(args.paper, seeds=args.seeds, workdir=args.workdir, full=args.full, dataset=args.dataset,
               overrides=overrides, protocol=args.protocol, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
  """Entry point of the ``kdjax`` command; user errors print one clear line and exit 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  argv = sys.argv[1:] if argv is None else argv
  try:
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command == "list":
      raise ValueError("--config.* overrides apply to `train` and `reproduce` only")
    if args.command != "list":  # before anything touches JAX's devices
      from kdjax.parallel import initialize_multihost
      initialize_multihost(args.coordinator_address, args.num_processes, args.process_id)
    if args.command == "list":
      cmd_list(args.what)
    elif args.command == "train":
      cmd_train(args, overrides)
    else:
      cmd_reproduce(args, overrides)
  except USER_ERRORS as e:
    print(f"kdjax: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
