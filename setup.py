"""Packaging lives in pyproject.toml; this file is where optional compiled extensions get built."""
from setuptools import setup

setup()
