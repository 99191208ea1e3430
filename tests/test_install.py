"""`pip install .` as a new user runs it: build isolation on, no -e, into a fresh virtual
environment. pyproject.toml brings torch into pip's isolated build, so both extensions are
built (pvm_kernels._C always, _C_cuda where torch has CUDA and nvcc is found); the install
records the torch it built against; an extension built for another torch is never loaded:
it is rebuilt just in time from the shipped sources, or the backend is off with one warning
line and the reason in backend_status().

One build for the whole module (about 2 minutes on the 2-core machine, most of it pip
installing torch into its build environment): the tree installed is the sdist's, unpacked,
so the same build also shows the sdist carries everything the compilers need.
"""
import importlib.metadata
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tomllib

import pytest
import torch
from packaging.requirements import Requirement
from install_support import DROP_EDITABLE_FINDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.install

# Runs in the installed venv: what it has, and the cpu backend against float64.
PROBE = DROP_EDITABLE_FINDER + """
import json, sys, torch, pvm_kernels
from pvm_kernels.ops import native_backend
from pvm_kernels.reference import retrieval_reference
loads = {n: dict(how=l.how, error=l.error) for n, l in native_backend.EXTENSION_LOADS.items()}
report = dict(file=pvm_kernels.__file__, available=pvm_kernels.available_backends("cpu"),
              status=pvm_kernels.backend_status("cpu"), loads=loads)
if "cpu" in report["available"]:
    q, k = torch.randn(2, 7, 4, 32), torch.randn(2, 9, 2, 32)
    got = pvm_kernels.pvm_retrieval(q, k, k, backend="cpu")
    ref = retrieval_reference(q.double(), k.double(), k.double())
    report["max_err"] = (got.double() - ref).abs().max().item()
print("REPORT" + json.dumps(report))
"""


def cuda_build_expected() -> bool:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return bool(torch.version.cuda) and os.path.exists(os.path.join(home, "bin", "nvcc")) \
        and os.environ.get("PVM_SKIP_CUDA") != "1"


def make_sdist(out_dir) -> str:
    """The sdist, built by setuptools' PEP 517 hook from a copy of the tracked tree (no
    extension is compiled for an sdist, so no torch is needed)."""
    tree = os.path.join(out_dir, "tree")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(tree, rel))
    code = "from setuptools import build_meta; print(build_meta.build_sdist(%r))" % out_dir
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         env=dict(os.environ, PVM_SKIP_EXTENSIONS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return os.path.join(out_dir, res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv (torch from the machine's site-packages, as on a box where torch is
    preinstalled) with `pip install .` run in the unpacked sdist: build isolation on."""
    base = tmp_path_factory.mktemp("install")
    sdist = make_sdist(str(base))
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "src", filter="data")
    (src,) = (base / "src").iterdir()
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)],
                   check=True, timeout=300)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PVM_SKIP_EXTENSIONS", "PVM_SKIP_CUDA", "PYTHONPATH")}
    # One CUDA architecture is enough to show the isolated build compiles _C_cuda (make
    # install builds sm_80 and sm_90); it saves ~20 s of nvcc on 2 cores.
    env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    res = subprocess.run([py, "-m", "pip", "install", "-v", "."], cwd=src, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return dict(python=py, package=os.path.join(site, "pvm_kernels"), base=base, sdist=sdist,
                log=res.stdout + res.stderr)


def probe(venv, cwd, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PVM_JIT_BUILD")}
    env.update(env_vars)
    res = subprocess.run([venv["python"], "-c", PROBE], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT"):]), res.stderr


def test_build_requirements_bring_the_runtime_torch_range():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        build = tomllib.load(f)["build-system"]["requires"]
    torch_of = lambda reqs: [Requirement(r).specifier for r in reqs  # noqa: E731
                             if Requirement(r).name == "torch"]
    assert torch_of(build) == torch_of(importlib.metadata.requires("pvm-kernels"))
    assert any(r.startswith("ninja") for r in build) and any(r.startswith("setuptools")
                                                               for r in build)


def test_sdist_carries_every_source_the_extensions_compile(venv):
    sys.path.insert(0, os.path.join(ROOT, "pvm_kernels"))
    try:
        import build_spec
    finally:
        sys.path.pop(0)
    with tarfile.open(venv["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {os.path.relpath(f, ROOT) for ext in build_spec.EXTENSIONS
              for f in build_spec.sources(os.path.join(ROOT, "csrc"), ext)}
    needed |= {os.path.join("csrc", f) for f in build_spec.shipped_files(os.path.join(ROOT, "csrc"))}
    assert needed and not needed - names, sorted(needed - names)
    assert {"pyproject.toml", "setup.py", "README.md", "triton_ops/retrieval.py",
            "triton_ops/configs/sm80.json", "triton_ops/configs/sm90.json"} <= names


def test_pip_install_dot_builds_the_extensions_and_cpu_matches_float64(venv, tmp_path):
    log = venv["log"]
    assert "torch is not importable" not in log and "skipping the CUDA extension" not in log
    files = set(os.listdir(venv["package"]))
    assert any(f.startswith("_C.") and f.endswith(".so") for f in files), sorted(files)
    if cuda_build_expected():
        assert any(f.startswith("_C_cuda.") and f.endswith(".so") for f in files), sorted(files)
    with open(os.path.join(venv["package"], "_build_info.json")) as f:
        info = json.load(f)
    assert info["extensions"]["_C"]["built"]
    assert info["extensions"]["_C_cuda"]["built"] == cuda_build_expected()
    # the sources of the just-in-time rebuild ship inside the package
    assert os.path.isfile(os.path.join(venv["package"], "_csrc", "ops.cpp"))
    assert os.path.isfile(os.path.join(venv["package"], "_csrc", "cuda", "retrieval_kernels.cu"))

    report, stderr = probe(venv, tmp_path)
    assert report["file"].startswith(venv["package"]), report["file"]
    assert "cpu" in report["available"], report["status"]
    assert report["loads"]["_C"] == dict(how="installed", error=None)
    assert report["max_err"] < 1e-5
    assert "pvm_kernels:" not in stderr, stderr  # a matching build says nothing


@pytest.fixture
def other_torch_build(venv):
    """The venv's extensions recorded as built against another torch (a user who installed
    with the torch of pip's isolated build while 2.11 runs, or upgraded torch since)."""
    path = os.path.join(venv["package"], "_build_info.json")
    with open(path) as f:
        original = f.read()
    info = json.loads(original)
    info.update(torch="2.11.0+cu128", torch_git="0" * 40)
    with open(path, "w") as f:
        json.dump(info, f)
    yield "2.11.0+cu128"
    with open(path, "w") as f:
        f.write(original)


def test_extension_built_for_another_torch_says_so_in_one_line(venv, other_torch_build, tmp_path):
    report, stderr = probe(venv, tmp_path, PVM_JIT_BUILD="0")
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    for part in (f"built for torch {other_torch_build}", f"torch {torch.__version__} is running",
                 "cpu backend is off", "pip install --no-build-isolation"):
        assert part in lines[0], (part, lines[0])
    assert "cpu" not in report["available"]
    assert f"built for torch {other_torch_build}" in report["status"]["cpu"]
    assert report["loads"]["_C"]["how"] == "none"


def test_extension_built_for_another_torch_is_rebuilt_once_and_cached(venv, other_torch_build,
                                                                      tmp_path):
    cache = str(tmp_path / "cache")
    report, stderr = probe(venv, tmp_path, PVM_KERNELS_CACHE=cache)
    assert "compiling the _C extension" in stderr and cache in stderr, stderr
    assert report["loads"]["_C"] == dict(how="jit", error=None)
    assert "cpu" in report["available"] and report["max_err"] < 1e-5
    again, stderr = probe(venv, tmp_path, PVM_KERNELS_CACHE=cache)
    assert "compiling" not in stderr and "pvm_kernels:" not in stderr, stderr  # the cache
    assert again["loads"]["_C"] == dict(how="jit", error=None) and again["max_err"] < 1e-5


def test_failed_rebuild_turns_the_backend_off_with_one_line(venv, other_torch_build, tmp_path):
    report, stderr = probe(venv, tmp_path, PVM_KERNELS_CACHE=str(tmp_path / "cache"),
                           CXX="/bin/false")
    warning = [x for x in stderr.splitlines() if "backend is off" in x]
    assert len(warning) == 1 and "rebuilding it for this torch failed" in warning[0], stderr
    assert "cpu" not in report["available"]
    assert "rebuilding it for this torch failed" in report["status"]["cpu"]


def test_without_torch_at_build_time_the_install_stops_naming_the_fix(monkeypatch):
    """--no-build-isolation with no torch: an error, not a silent pure-Python package."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.delenv("PVM_SKIP_EXTENSIONS", raising=False)
    monkeypatch.setattr(sys, "argv", ["setup.py", "--name"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(RuntimeError, match="PVM_SKIP_EXTENSIONS=1"):
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
