"""Test set-up: 8 virtual CPU devices (set before JAX starts) so multi-device code is tested everywhere."""

import os

# Compilation, not execution, dominates the suite: the tests' tiny programs do not need LLVM's expensive
# optimisation passes (XLA's graph-level optimisations still run). Every exact comparison in the suite is
# between programs compiled alike; comparisons with references use float tolerances. (LLVM at -O0,
# --xla_backend_optimization_level=0, was tried too: the FSP stage of test_fsp_then_plain_training then turns
# NaN at its second step, so it is not used.)
_FAST_COMPILE = ["--xla_llvm_disable_expensive_passes=true"]
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
    + [f for f in _FAST_COMPILE if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests compile the same tiny programs (the same small model's step, the same evaluation): one persistent
# compilation cache for the whole run (kdjax.compilation_cache), shared by pytest-xdist's workers, which
# inherit the directory the controlling process chose, and deleted when the run ends. A hit runs the very
# executable a miss would build (tests/test_compilation_cache.py), so no result depends on it. Set before
# JAX is imported: JAX reads the setting at its first compilation.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_RUN_CACHE = "KDJAX_TEST_RUN_COMPILATION_CACHE"
_OWNS_RUN_CACHE = _RUN_CACHE not in os.environ  # the controlling process (or a run without xdist)
if _OWNS_RUN_CACHE:
  os.environ[_RUN_CACHE] = tempfile.mkdtemp(prefix="kdjax-tests-compilation-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_RUN_CACHE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ["KDJAX_COMPILATION_CACHE"] = os.environ[_RUN_CACHE]  # in-process `kdjax` commands use the same one

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Reference values computed by the public PyTorch code (copied from ../shared/golden, whose README gives the
# formulas and tolerances; tests/golden/README.md says where each file comes from), so a bare clone checks them.
GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"


def load_golden(name: str) -> dict[str, np.ndarray]:
  """Loads ``tests/golden/<name>.npz`` (reference values from the PyTorch code); a missing file fails the test."""
  path = GOLDEN_DIR / f"{name}.npz"
  if not path.exists():
    pytest.fail(f"golden reference file {path} is missing; it should be committed with the tests "
                f"(files present: {', '.join(sorted(p.stem for p in GOLDEN_DIR.glob('*.npz')))})")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def assert_trees_close(a, b, *, rtol=1e-5, atol=1e-5) -> None:
  """Leaf-by-leaf ``assert_allclose`` (in float64) of two pytrees with the same structure."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b), f"{len(leaves_a)} leaves against {len(leaves_b)}"
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def assert_pairs_match_golden(g: dict[str, np.ndarray], per_pair, loss, grads) -> None:
  """Checks per-pair losses, the summed loss and the NHWC gradients of a multi-pair feature loss against a
  golden file (NCHW gradients ``grad_student_feats_i``), with the golden README's float32 tolerances."""
  for i, value in enumerate(per_pair):
    np.testing.assert_allclose(value, g[f"loss_pair_{i}"], rtol=1e-4)
  np.testing.assert_allclose(loss, g["loss"], rtol=1e-4)
  for i, grad in enumerate(grads):
    want = np.transpose(g[f"grad_student_feats_{i}"], (0, 2, 3, 1))
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


@pytest.fixture
def golden():
  """Fixture form of :func:`load_golden`."""
  return load_golden


def pytest_unconfigure(config):
  if _OWNS_RUN_CACHE:
    shutil.rmtree(os.environ[_RUN_CACHE], ignore_errors=True)


# --- shared helpers of the stage tests ------------------------------------------------------------------------


class StopTraining(Exception):
  """Raised by :func:`crash_after` to interrupt a run between steps, as if the process had died."""


def crash_after(step: int):
  """A ``fit`` callback that stops the run after ``step`` as if the process had died there."""
  def callback(done, state):
    del state
    if done == step:
      raise StopTraining(f"interrupted after step {done}")
  return callback


class Capture:
  """A ``fit`` callback keeping the state after the last step (on the host)."""

  def __init__(self):
    self.state = None

  def __call__(self, done, state):
    self.state = jax.device_get(state)


def set_fields(config, fields):
  """Sets ``config``'s fields from ``fields``; a key ``loss_<name>`` sets ``config.loss.<name>``."""
  for key, value in fields.items():
    if key.startswith("loss_"):
      config.loss[key[5:]] = value
    else:
      config[key] = value
  return config
