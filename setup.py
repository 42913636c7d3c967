"""The one packaging rule pyproject.toml cannot say: `recipes/` at the repository top level (the single source of
the recipes, read by clone users as `recipes/<name>.yaml`) ships inside the wheel as `soft_peft/recipes/`, so that an
installed `soft-peft` finds them by name. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    # find_packages: any package added under soft_peft/ ships without editing this file
    packages=[
        *find_packages(include=["soft_peft", "soft_peft.*"]),
        "soft_peft.recipes",
        "soft_peft.recipes.accelerate",
    ],
    package_dir={"soft_peft.recipes": "recipes"},
    package_data={"soft_peft.recipes": ["*.yaml", "README.md"], "soft_peft.recipes.accelerate": ["*.yaml"]},
)
