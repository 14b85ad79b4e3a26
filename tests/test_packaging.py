"""A wheel install (no checkout around the package) finds the paper configs shipped as ``kdjax/papers``.

.ci/run builds the real wheel, installs it non-editable in a second venv and runs ``kdjax reproduce --help`` and
``kdjax list papers`` there; this test checks the same layout without building (the test run has no network).
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def shipped_patterns():
  """The ``package_data`` patterns setup.py gives ``kdjax.papers`` (read from setup.py, not repeated here)."""
  tree = ast.parse((ROOT / "setup.py").read_text())
  call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
  package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
  return package_data["kdjax.papers"]


def test_every_paper_config_is_shipped_and_found_without_a_checkout(tmp_path):
  site = tmp_path / "site"
  shutil.copytree(ROOT / "kdjax", site / "kdjax", ignore=shutil.ignore_patterns("__pycache__", "papers"))
  for pattern in shipped_patterns():  # the files setup.py puts in the wheel, where it puts them
    for source in (ROOT / "papers").glob(pattern):
      target = site / "kdjax" / "papers" / source.relative_to(ROOT / "papers")
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(source, target)
  work = tmp_path / "elsewhere"  # no papers/ in the working directory either
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "KDJAX_PAPERS_DIR"}
  env["PYTHONPATH"] = str(site)
  code = ("import kdjax, kdjax.cli; print(kdjax.__file__); raise SystemExit(kdjax.cli.main(['list', 'papers']))")
  done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[0].startswith(str(site))  # the copy, not the checkout
  keys = sorted(p.parent.name for p in (ROOT / "papers").glob("*/config.py"))
  listed = [line.split()[0] for line in done.stdout.splitlines()[2:]]
  assert listed == keys
