"""environment.yml, pyproject.toml and the Makefile install the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Packages of the toolkit's stack that the set-up must install.
PROMISED = {
    "torch", "einops", "nibabel", "simpleitk", "jupyterlab", "ipywidgets",
    "plotly", "papermill", "nbval", "pytest",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0].lower()


def test_environment_pins_makefile_torch():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lines = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    makefile_torch = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)

    assert environment["name"] == "hurmacl-kit"
    assert makefile_torch in pip_lines
    assert '-e ".[notebooks,test,bench]"' in pip_lines


def test_extras_install_promised_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["notebooks"] + extras["test"] + extras["bench"]

    missing = PROMISED - {_name(line) for line in requirements}

    assert not missing, f"pyproject.toml does not install {sorted(missing)}"
