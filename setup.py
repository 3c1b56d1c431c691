# Metadata lives in pyproject.toml; this shim keeps `python setup.py develop` and old tooling working.
from setuptools import setup

setup()
