"""JAX's persistent compilation cache in kdjax: which directory is used, and that a cache hit changes nothing."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kdjax import compilation_cache
from kdjax.compilation_cache import ENV_VAR, choose

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_flag_beats_environment_beats_default(monkeypatch):
  monkeypatch.delenv(ENV_VAR, raising=False)
  assert choose(None, "runs/x/compilation_cache") == "runs/x/compilation_cache"
  assert choose(None, None) is None
  monkeypatch.setenv(ENV_VAR, "/shared/cache")
  assert choose(None, "runs/x/compilation_cache") == "/shared/cache"
  assert choose("/mine", "runs/x/compilation_cache") == "/mine"
  assert choose("off", "runs/x/compilation_cache") is None
  monkeypatch.setenv(ENV_VAR, "OFF")
  assert choose(None, "runs/x/compilation_cache") is None


def test_a_file_where_the_cache_should_go_is_a_clear_error(tmp_path):
  path = tmp_path / "cache"
  path.write_text("not a directory")
  with pytest.raises(ValueError, match=r"must be a directory.*--compilation-cache off"):
    compilation_cache.enable(str(path))


@pytest.mark.slow  # three fresh processes, each compiling (or loading) a small stage: ~40 s on 2 cores
def test_a_second_run_loads_every_program_and_trains_bit_identically(tmp_path):
  """The second run with the same cache adds no entry (every program came from disk) and its per-step losses
  and test accuracy equal, bit for bit, both the first run's and a run without the cache."""
  cache = tmp_path / "cache"
  # not the test run's own cache (conftest.py); "off" must turn off even one JAX's environment variable set
  env = {**os.environ, ENV_VAR: "off", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_env_cache")}

  def train(name: str, cache_arg: str) -> tuple[list, dict]:
    workdir = tmp_path / name
    subprocess.run(
        [sys.executable, "-m", "kdjax.cli", "train", "--config", "papers/soft_targets/config.py:teacher",
         "--workdir", str(workdir), "--no-progress", "--compilation-cache", cache_arg, "--config.dataset=digits",
         "--config.num_steps=3", "--config.log_every_steps=1", "--config.batch_size=16",
         "--config.labelled_examples=300", "--config.eval_batch_size=160"],
        check=True, cwd=REPO, env=env, capture_output=True, text=True)
    losses = [(row["step"], row["train/loss"]) for row in map(json.loads, (workdir / "metrics.jsonl").open())
              if "train/loss" in row]
    result = json.loads((workdir / "results.json").read_text())
    return losses, {k: result[k] for k in ("test_accuracy", "test_errors", "steps")}

  first = train("first", str(cache))
  entries = set(os.listdir(cache))
  assert entries, "the first run wrote nothing to the cache"
  second = train("second", str(cache))
  assert set(os.listdir(cache)) == entries, "the second run compiled programs the first had cached"
  uncached = train("uncached", "off")
  assert not (tmp_path / "jax_env_cache").exists() or not os.listdir(tmp_path / "jax_env_cache")
  assert len(first[0]) == 3
  assert first == second == uncached
