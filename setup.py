"""Package discovery (the rest of the packaging is in pyproject.toml).

Every package under mats_scale/, plus ``mats_scale.ds_configs``: the DeepSpeed templates live in the
checkout's top-level ds_configs/ and are installed inside the package, so that importlib.resources
finds them in a wheel and in an editable install alike. pyproject.toml alone cannot add a package
from outside the discovered tree, hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["mats_scale*"]), "mats_scale.ds_configs"])
