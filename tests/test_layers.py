"""The method modules stay free of the data, plotting and notebook stacks."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["nibabel", "monai", "SimpleITK", "plotly", "ipywidgets", "scipy"])
def test_method_modules_skip_heavy_imports(module):
    code = (
        "import sys, hurmacl_kit, hurmacl_kit.uncertainty, hurmacl_kit.branches, hurmacl_kit.distill; "
        f"print({module!r} in sys.modules)"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "False"


def test_lazy_submodule_access():
    import hurmacl_kit as kit

    assert kit.models.HURMACLConfig().threshold == pytest.approx(1e-3)
    assert kit.data.LABELS["Mandible"] == 7


def test_unknown_attribute_raises():
    import hurmacl_kit as kit

    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        kit.missing  # noqa: B018
