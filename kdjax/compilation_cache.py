"""JAX's persistent compilation cache, for runs that compile the same programs again.

A reproduction protocol trains every variant once per seed, and a seed changes only the data and the initial
values, never a program's shapes: with the cache on, seeds after the first load each stage's compiled train,
evaluation and initialisation programs from disk instead of compiling them again (measured on 2 CPU cores: a
Moonshine stage's start-up fell from ~21 s to ~5 s). The cache is keyed by the program, the compiler flags and
the JAX/XLA versions, so a hit runs the very executable a miss would have built: results are bit-identical
(``tests/test_compilation_cache.py``).

``kdjax reproduce`` turns it on in ``<workdir>/compilation_cache`` unless told otherwise; ``kdjax train``
only when asked. ``--compilation-cache DIR`` (or the ``KDJAX_COMPILATION_CACHE`` environment variable) names a
directory to share between runs; ``off`` turns it off (even one JAX's own ``JAX_COMPILATION_CACHE_DIR`` set).
The cache holds executable code that the process runs: keep it in a directory only its user can write.
"""

from __future__ import annotations

import os

ENV_VAR = "KDJAX_COMPILATION_CACHE"
OFF = "off"


def choose(flag: str | None, default: str | None) -> str | None:
  """The cache directory to use: the command-line flag, else ``$KDJAX_COMPILATION_CACHE``, else ``default``;
  ``None`` when the chosen value is ``off`` (or there is none)."""
  value = flag if flag is not None else os.environ.get(ENV_VAR) or default
  if value is None or value.strip().lower() == OFF:
    return None
  return value


def enable(directory: str) -> str:
  """Points JAX's persistent compilation cache at ``directory`` (created if missing) and returns its path.

  Call it before the process compiles anything: JAX reads the setting once, at its first compilation.
  Every program is cached, however fast it compiled — a protocol's many small evaluation programs add up.
  """
  import jax
  path = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"the compilation cache must be a directory; {path!r} is a file "
                     f"(give another with --compilation-cache DIR, or --compilation-cache off)")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


def disable() -> None:
  """Turns JAX's persistent compilation cache off (also one set by ``JAX_COMPILATION_CACHE_DIR``)."""
  import jax
  jax.config.update("jax_compilation_cache_dir", None)
