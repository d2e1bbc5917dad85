"""Packaging details that pyproject.toml cannot express: the top-level ``prompts/`` folder is
shipped inside the package as ``icl_cl/prompts/`` (package data), beside the code that loads
it. Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["icl_cl", "icl_cl.*"], exclude=["*.__pycache__"]),
        "icl_cl.prompts",
    ],
    package_dir={"icl_cl.prompts": "prompts"},
    package_data={"icl_cl": ["py.typed"], "icl_cl.prompts": ["*.j2"]},
)
