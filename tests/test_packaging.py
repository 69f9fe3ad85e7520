"""What an installed wheel carries, and what the command line says when an extra is missing."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources (setuptools writes build/ beside them), offline."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("namm_core", "namm_eval", "workers", "orchestrator", "namm_cli", "namms"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out)], check=True, capture_output=True, text=True)
    (built,) = out.glob("namm-*.whl")
    return built


def test_the_wheel_carries_the_shipped_namms(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for namm in ("smollm2", "smollm2-warm-start"):
        for file in ("namm.safetensors", "namm_config.json"):
            assert f"namms/{namm}/{file}" in names, f"{namm}/{file} missing from {wheel.name}"
    assert "namms/smollm2/README.md" in names   # the model card
    assert "namms/smollm2/evolve.yaml" in names   # the board reads the trained tasks from it
    assert "namm_eval/data/" in "".join(names)
    assert not any(n.endswith(".png") for n in names), "plots stay in the repository"


def test_the_installed_namm_loads_from_outside_the_repository(wheel, tmp_path):
    """The wheel unpacked away from the checkout: `namm` and a shipped name resolve to its own files."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import namm_core, namms\n"
            "from namm_core import parse_policy\n"
            "namm = parse_policy('namm'); warm = parse_policy('namm:smollm2-warm-start@0.5')\n"
            "print(namm_core.__file__); print(namms.shipped_namm()); print(warm.describe()); print(namm.num_params)\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    core_file, source, warm, params = out.stdout.split("\n")[:4]
    assert core_file.startswith(str(site)) and source.startswith(str(site)), out.stdout
    assert warm == "namm:smollm2-warm-start@0.5" and int(params) == 4172


def test_a_missing_extra_ends_in_one_line_naming_it(monkeypatch, capsys):
    from namm_cli.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)   # as if `pip install namm` without [evolve]
    monkeypatch.delitem(sys.modules, "orchestrator.driver", raising=False)
    assert main(["evolve", str(ROOT / "jobs" / "smoke.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[evolve]" in err and 'pip install "namm[evolve]"' in err, err
