"""Package discovery: every package under fxsparse/, and the top-level passes/ installed as fxsparse.passes.

pyproject.toml alone cannot both discover packages and map one folder to another package name, so this is
the one thing configured here; everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fxsparse", "fxsparse.*"]) + ["fxsparse.passes"],
    package_dir={"fxsparse.passes": "passes"},
)
