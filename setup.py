"""Which packages the wheel holds: bngraph/ and every package under it, with passes/ and zoo/
installed as bngraph.passes and bngraph.zoo (and their subpackages). Found, not listed, so a new
subpackage cannot be left out (`pip install .` once lacked bngraph.commands). The rest of the
metadata is in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = {"bngraph.passes": "passes", "bngraph.zoo": "zoo"}  # installed name -> folder here

packages = find_packages(include=["bngraph", "bngraph.*"])
package_dir = {"bngraph": "bngraph"}
for name, folder in MAPPED.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
