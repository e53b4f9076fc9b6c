"""pyproject.toml: `pip install .` installs the library (quant with its C sources, diffusion, models) and nothing of
the scripts; the installed copy imports from a directory outside the checkout; the public API is quant.__all__."""
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(out), ROOT], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_the_library_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"quant", "diffusion", "models.py"}, tops
    for src in os.listdir(os.path.join(ROOT, "quant", "kernels", "csrc")):
        assert f"quant/kernels/csrc/{src}" in names, src  # the C kernels compile from the installed copy
    for root, _, files in os.walk(os.path.join(ROOT, "quant")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), ROOT).replace(os.sep, "/")
                assert rel in names, rel


def test_installed_copy_imports_outside_the_checkout(wheel, tmp_path):
    """The issue's check: from a clean directory, `import quant; quant.QuantConfig; quant.quantize_dit`, resolved
    from the installed copy alone (-S: no .pth files, so the editable checkout is not on the path)."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import quant; quant.QuantConfig; quant.quantize_dit; quant.fp_calibration_loop; import quant.nn.int_linear; "
            "print(quant.__file__); print(sorted(quant.__all__))")
    env = {"PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]), "PATH": os.environ["PATH"]}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, api = proc.stdout.splitlines()
    assert where.startswith(str(site)), where
    assert "QuantConfig" in api and "quantize_dit" in api


def test_public_api_resolves_every_name():
    import quant
    for name in quant.__all__:
        assert getattr(quant, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        quant.nothing  # noqa: B018


def test_quant_config_imports_no_torch():
    """QuantConfig is a leaf: importing it (and the package) loads neither torch nor another quant module."""
    code = ("import sys; import quant; from quant import QuantConfig; QuantConfig(weight_bit=4).alphas(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('quant.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['quant.quant_config']", proc.stdout
