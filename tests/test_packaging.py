"""The installed layout: triton_ops/ (top of the repository) ships as pvm_kernels.triton_ops,
and nothing claims a generic top-level name. Checked on a built wheel and on a regular
(non-editable) install of it; the editable install is what the rest of the suite runs on."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from install_support import DROP_EDITABLE_FINDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # Extensions skipped: the layout of the Python packages is what is under test here,
    # and the compiled ones are built and loaded by the editable install.
    env = dict(os.environ, PVM_SKIP_EXTENSIONS="1")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-w", str(out), ROOT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (path,) = out.glob("pvm_kernels-*.whl")
    return path


def test_wheel_ships_the_triton_kernels_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.endswith((".so", "_build_info.json")) or "/_csrc/" in n for n in names), \
        "PVM_SKIP_EXTENSIONS=1 builds a pure-Python wheel"
    for f in ("__init__.py", "common.py", "retrieval.py", "merge.py", "tile_tables.py",
              "configs/sm80.json", "configs/sm90.json"):
        assert f"pvm_kernels/triton_ops/{f}" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("pvm_kernels-")}
    assert tops == {"pvm_kernels"}, tops  # no top-level triton_ops, tools, tests


def test_regular_install_runs_the_triton_kernels(wheel, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    code = DROP_EDITABLE_FINDER + (
        "import torch, pvm_kernels, pvm_kernels.triton_ops as t\n"
        "from pvm_kernels import pvm_retrieval\n"
        "from pvm_kernels.reference import retrieval_reference\n"
        f"assert pvm_kernels.__file__.startswith({str(target)!r}), pvm_kernels.__file__\n"
        f"assert t.__file__.startswith({str(target)!r}), t.__file__\n"
        f"q = torch.randn(2, 3, 4, 16, device={device!r})\n"
        f"k = torch.randn(2, 5, 2, 16, device={device!r})\n"
        "got = pvm_retrieval(q, k, k, backend='triton')\n"
        "assert torch.allclose(got, retrieval_reference(q, k, k), atol=1e-5)\n"
        # PVM_SKIP_EXTENSIONS=1: a pure-Python package on purpose, saying why cpu is off
        "why = pvm_kernels.backend_status('cpu')['cpu']\n"
        "assert 'not built' in why and 'PVM_SKIP_EXTENSIONS=1' in why, why\n"
        "print('ok')\n")
    # On a GPU machine the kernels compile for it; elsewhere they run in the interpreter.
    env = dict(os.environ, PYTHONPATH=str(target))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    assert "pvm_kernels:" not in res.stderr, res.stderr  # no warning for a choice made
