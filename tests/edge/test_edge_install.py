"""The edge install: the wheel with ``[cpu]`` in a fresh virtual environment has no torch, scores
a bundle exported by the development environment exactly as the development Detector does, and
refuses build-side commands with one line naming the extra to install.

Builds the wheel from this checkout and installs it from PyPI (network to the package index is
needed, as for ``make test`` itself). The run side's packages are pinned to the versions of the
development environment (numpy, Pillow, ONNX Runtime), so the two environments compute the same
floats and the scores must be bit-identical. The environment's size and package count are
printed (``pytest -s``) and written to ``edge_install.json`` under the test's temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PINNED = ("numpy", "pillow", "onnxruntime", "jsonschema", "tqdm")
TIMEOUT = 900  # seconds for the install (a fresh pip cache downloads ~60 MB)


def _run(cmd: list[str], timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False, **kwargs
    )


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.fixture(scope="module")
def edge_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed as ``cops-deploy[cpu]``."""
    work = tmp_path_factory.mktemp("edge_install")
    # Built from a copy of what the sdist holds, so setuptools' build/ folder lands there, not
    # in the checkout.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "cops_deploy", source / "cops_deploy", ignore=ignore)
    wheels = work / "wheels"
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(source)],
        timeout=TIMEOUT,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("cops_deploy-*.whl")
    env = work / "env"
    made = _run([sys.executable, "-m", "venv", str(env)])
    assert made.returncode == 0, made.stderr
    pins = [f"{name}=={metadata.version(name)}" for name in PINNED]
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input"]
    installed = _run([*pip, f"{wheel}[cpu]", *pins], timeout=TIMEOUT)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env


def test_edge_env_has_no_torch(edge_env: Path) -> None:
    python = str(edge_env / "bin" / "python")
    probe = _run([python, "-c", "import torch"])
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    listed = _run([python, "-m", "pip", "list", "--format=json"])
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "cops-deploy" in names and "onnxruntime" in names
    build_side = {"torch", "torchvision", "open-clip-torch", "onnx", "scipy", "safetensors"}
    assert not names & build_side, sorted(names & build_side)
    size = _tree_bytes(edge_env)
    report = {"packages": len(names), "bytes": size, "names": sorted(names)}
    (edge_env.parent / "edge_install.json").write_text(json.dumps(report, indent=2))
    print(f"\nedge install: {len(names)} packages, {size / 2**20:.0f} MiB in the environment")


def test_edge_env_scores_equal_the_development_detector(
    edge_env: Path, plain_bundle: Path, image_files: dict[str, Path], tmp_path: Path
) -> None:
    from cops_deploy.runtime import Detector

    files = [image_files[n] for n in ("rgb.png", "photo.jpg", "grey16.png", "rotated.jpg")]
    out = tmp_path / "out"
    cops = str(edge_env / "bin" / "cops")
    result = _run(
        [cops, "predict", *map(str, files), "--bundle", str(plain_bundle), "--out", str(out)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "scores.json").read_text())
    got = {Path(r["source"]).name: r["score"] for r in report["results"]}
    with Detector.open(plain_bundle, backend="onnxruntime") as detector:
        want = {Path(p.source).name: p.score for p in detector.predict(files)}
    assert report["backend"] == "onnxruntime"
    assert got == want  # bit-identical: same graphs, same pinned numpy/Pillow/ONNX Runtime


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "d", "--dataset", "synth", "--out", "o"],
        ["eval", "--data", "d", "--dataset", "synth", "--weights", "w", "--out", "o"],
        ["demo", "--out", "o"],
        ["predict", "x.png", "--model", "cops-tiny", "--random-weights", "--out", "o"],
    ],
    ids=["train", "eval", "demo", "predict-from-weights"],
)
def test_edge_env_refuses_build_commands_with_the_extra(
    edge_env: Path, argv: list[str], tmp_path: Path
) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    result = _run([str(edge_env / "bin" / "cops"), *argv], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pip install 'cops-deploy[build,cpu]'" in lines[0]


def test_edge_env_refuses_cops_export_with_the_extra(edge_env: Path, tmp_path: Path) -> None:
    exe = str(edge_env / "bin" / "cops-export")
    result = _run([exe, "--model", "cops-tiny", "--random-weights", "--out", str(tmp_path / "b")])
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cops-deploy[build,cpu]'" in lines[0], result.stderr


def test_edge_env_refuses_the_torch_backend_with_the_extra(
    edge_env: Path, edge_graphs: Path, image_files: dict[str, Path], tmp_path: Path
) -> None:
    import cops_tiny_bundle  # tests/runtime, put on sys.path by conftest.py

    bundle = cops_tiny_bundle.write_tiny_bundle(tmp_path / "b", edge_graphs, torch_weights=True)
    cops = str(edge_env / "bin" / "cops")
    argv = [str(image_files["rgb.png"]), "--bundle", str(bundle), "--out", str(tmp_path / "o")]
    result = _run([cops, "predict", *argv, "--backend", "torch"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'cops-deploy[build,cpu]'" in result.stderr


def test_wheel_holds_the_package_data(edge_env: Path) -> None:
    probe = _run(
        [
            str(edge_env / "bin" / "python"),
            "-c",
            "from cops_deploy.runtime.manifest import load_schema; "
            "from cops_deploy.configs import list_configs; "
            "print(len(load_schema()['properties']), list_configs())",
        ]
    )
    assert probe.returncode == 0, probe.stderr
    assert "cops-tiny" in probe.stdout and "cops-vit-l-14-336" in probe.stdout
    assert shutil.which("cops", path=str(edge_env / "bin"))
