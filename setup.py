"""What setup.cfg cannot say: the top-level ``papers/`` folder ships inside the package, as ``kdjax/papers``.

A checkout keeps ``papers/`` at the top (``kdjax reproduce`` finds it beside the package); a wheel, which has no
checkout around it, carries every paper's ``config.py`` and ``README.md`` as ``kdjax/papers/<key>/``, so
``pip install kdjax`` can run ``kdjax reproduce``. Everything else is declared in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kdjax", "kdjax.*"]) + ["kdjax.papers"],
    package_dir={"kdjax.papers": "papers"},
    package_data={"kdjax.models": ["*.cc"], "kdjax.papers": ["*/config.py", "*/README.md"]},
)
