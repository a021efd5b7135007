"""Packaging: one import namespace (``speechbench``), and a wheel that cannot forget a sub-package or its data.

Another distribution that owns a generic top-level package (torchtune ships ``recipes``) must install beside
speechbench without either shadowing the other; pyproject.toml must list every sub-package and cover every tracked
data file (recipes, cards, bundled checkpoints, reference CSVs) with its package-data globs.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("benchmark", "upstreams", "downstreams", "leaderboard", "recipes")
MARKER = "tiny-recipes-distribution"

# A stand-in for a distribution like torchtune: a top-level ``recipes`` package with a module, a sub-package, and
# YAML files whose names speechbench does not ship (so a listing that looked there would show them).
TINY_FILES = {
    "recipes/__init__.py": f'MARKER = "{MARKER}"\n',
    "recipes/train.py": 'def which() -> str:\n    return "tiny"\n',
    "recipes/tiny_lora.yaml": "model: tiny\n",
    "recipes/synth/__init__.py": "",
    "recipes/synth/tiny_only.yaml": "task: tiny\n",
}


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


def build_tiny_wheel(out_dir: Path, files: dict[str, str], name: str = "tiny_recipes", version: str = "0.1") -> Path:
    """A minimal, valid pure-Python wheel holding ``files`` (written directly: no build backend, works offline)."""
    dist_info = f"{name}-{version}.dist-info"
    top_level = sorted({path.split("/")[0] for path in files})
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: speechbench-tests\nRoot-Is-Purelib: true\n" \
                                     b"Tag: py3-none-any\n"
    contents[f"{dist_info}/top_level.txt"] = ("\n".join(top_level) + "\n").encode()
    record = "".join(f"{path},{_record_hash(data)}\n" for path, data in contents.items()) + f"{dist_info}/RECORD,,\n"
    wheel = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    """A site directory where pip installed the tiny distribution that owns the top-level ``recipes`` package."""
    tmp = tmp_path_factory.mktemp("tiny-recipes")
    wheel = build_tiny_wheel(tmp, TINY_FILES)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, text=True, timeout=120)
    assert (site / "recipes" / "__init__.py").is_file() and (site / "tiny_recipes-0.1.dist-info").is_dir()
    return site


def _run_with_site(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run this interpreter with ``site`` first on PYTHONPATH, from a folder outside the checkout (as a user would:
    from the repository root, ``python`` would find the checkout's own folders first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def shipped_recipes() -> set[str]:
    return {str(p.relative_to(ROOT / "recipes").with_suffix("")) for p in (ROOT / "recipes").rglob("*.yaml")}


def test_tiny_wheel_is_installable_and_imports(tiny_site, tmp_path):
    proc = _run_with_site(tiny_site, tmp_path, "-c", "import recipes, recipes.train; "
                          "print(recipes.MARKER, recipes.train.which(), recipes.__file__)")
    marker, which, path = proc.stdout.split()
    assert (marker, which) == (MARKER, "tiny") and Path(path).is_relative_to(tiny_site)


def test_foreign_recipes_package_and_speechbench_side_by_side(tiny_site, tmp_path):
    script = (
        "import sys\n"
        "import recipes\n"
        "import speechbench.recipes\n"
        "from speechbench.benchmark.config import find_recipe, list_recipes\n"
        "import recipes.train\n"
        "assert recipes.MARKER == sys.argv[1] and recipes.train.which() == 'tiny'\n"
        "assert sys.modules['recipes'] is recipes and speechbench.recipes is not recipes\n"
        "assert not hasattr(speechbench.recipes, 'MARKER')\n"
        "print(recipes.__file__)\n"
        "print(speechbench.recipes.__file__)\n"
        "print(find_recipe('synth/ks'))\n"
        "print(' '.join(list_recipes()))\n"
    )
    out = _run_with_site(tiny_site, tmp_path, "-c", script, MARKER).stdout
    tiny_init, ours_init, ks_recipe, listed = out.splitlines()
    assert Path(tiny_init).is_relative_to(tiny_site)
    assert Path(ours_init).resolve().parent == Path(ks_recipe).resolve().parent.parent
    assert not Path(ours_init).is_relative_to(tiny_site) and Path(ks_recipe).is_file()
    assert set(listed.split()) == shipped_recipes()


def test_cli_lists_own_recipes_beside_foreign_recipes_package(tiny_site, tmp_path):
    out = _run_with_site(tiny_site, tmp_path, "-m", "speechbench", "list", "recipes").stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"synth/ks", "superb/ks", "pretrain/apc"} <= names
    assert names == shipped_recipes()
    assert "tiny_lora" not in out and "tiny_only" not in out


def test_cli_lists_upstreams_beside_foreign_recipes_package(tiny_site, tmp_path):
    out = _run_with_site(tiny_site, tmp_path, "-m", "speechbench", "list", "upstreams").stdout
    names = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert {"apc-synth", "hubert-synth", "wav2vec2-synth", "fbank"} <= names


# ---- pyproject.toml: one top-level package, every sub-package listed, every tracked data file covered ----


def _setuptools_config() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def _package_dir(package: str, package_dir: dict[str, str]) -> Path:
    """The source folder setuptools takes ``package`` from, through the ``package-dir`` mapping."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return (ROOT / package_dir[prefix]).joinpath(*parts[i:]).resolve()
    return ROOT.joinpath(*parts).resolve()


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    proc = subprocess.run(["git", "ls-files", "-z", "--", *PARTS], cwd=ROOT, capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in proc.stdout.decode().split("\0") if p]


def test_one_top_level_import_package():
    config = _setuptools_config()
    assert config["package-dir"] == {"speechbench": "."}
    packages = config["packages"]
    assert "speechbench" in packages
    assert all(p == "speechbench" or p.startswith("speechbench.") for p in packages), packages
    assert len(set(packages)) == len(packages)


def test_every_subpackage_is_listed():
    config = _setuptools_config()
    on_disk = {"speechbench"} | {
        "speechbench." + ".".join(init.parent.relative_to(ROOT).parts)
        for part in PARTS for init in (ROOT / part).rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk
    for package in config["packages"]:
        assert (_package_dir(package, config["package-dir"]) / "__init__.py").is_file(), package


def test_package_data_covers_every_tracked_data_file():
    config = _setuptools_config()
    packages, package_data = config["packages"], config.get("package-data", {})
    assert set(package_data) - {"", "*"} <= set(packages), "package-data names a package that is not listed"
    covered: set[Path] = set()
    for package in packages:
        src = _package_dir(package, config["package-dir"])
        # setuptools expands each pattern with glob(src / pattern, recursive=True) and keeps the files
        for pattern in [*package_data.get("", []), *package_data.get("*", []), *package_data.get(package, [])]:
            covered |= {Path(p).resolve() for p in glob.glob(str(src / pattern), recursive=True) if Path(p).is_file()}
    data_files = [p for p in _tracked_files() if not p.endswith(".py")]
    assert data_files, "no tracked data files found: the check would pass vacuously"
    missing = sorted(p for p in data_files if (ROOT / p).resolve() not in covered)
    assert not missing, f"tracked files no package-data glob puts in the wheel: {missing}"
