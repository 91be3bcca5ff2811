"""An installable package: pyproject.toml lists every package folder and
every pinned runtime requirement; the wheel built from it carries the
configs and the GPU targets, and, installed, trains from any directory with
`--config=configs/tiny.py` resolved against the package; ruff passes."""
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT, subprocess_env


def pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_every_package_folder_is_listed():
  folders = sorted(
      os.path.relpath(d, ROOT).replace(os.sep, ".")
      for d, _, files in os.walk(os.path.join(ROOT, "bitnet_jax"))
      if "__init__.py" in files)
  listed = pyproject()["tool"]["setuptools"]["packages"]
  assert sorted(set(listed) - {"bitnet_jax.configs"}) == folders


def test_dependencies_cover_the_pinned_requirements():
  """Each pin of requirements.txt is a dependency whose lower bound the pin
  satisfies (the pins are the tested lock of these ranges)."""
  deps = {}
  for d in pyproject()["project"]["dependencies"]:
    name, lower = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups()
    deps[name.lower()] = tuple(int(x) for x in lower.split("."))
  for line in open(os.path.join(ROOT, "requirements.txt")):
    line = line.split("#")[0].strip()
    if not line:
      continue
    name, pin = line.split("==")
    assert name.lower() in deps, name
    pinned = tuple(int(x) for x in pin.split("."))
    assert pinned[:len(deps[name.lower()])] >= deps[name.lower()], name


def test_a_config_is_found_from_any_directory(tmp_path, monkeypatch):
  from bitnet_jax import config_files
  monkeypatch.chdir(tmp_path)
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  assert config_files.resolve("configs/tiny.py") == tiny
  assert config_files.resolve("tiny.py") == tiny
  assert config_files.resolve_argv(["x", "--config", "configs/tiny.py:a"]) == [
      "x", "--config", tiny + ":a"]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny.py").write_text("")
  assert config_files.resolve("configs/tiny.py") == "configs/tiny.py"  # own file
  assert config_files.resolve("configs/none.py") == "configs/none.py"


def test_ruff_passes():
  ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or \
      shutil.which("ruff")
  assert ruff, "ruff is in requirements-test.txt"
  out = subprocess.run([ruff, "check", "--no-cache", ROOT], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout[-3000:]


@pytest.mark.slow
def test_the_installed_wheel_trains_from_another_directory(tmp_path):
  """pip builds the wheel (build isolation: setuptools from the registry)
  from a copy of the sources, installs it (no dependencies: this
  environment has them) and trains the tiny config for two steps from an
  empty directory, the package imported from the install, not the repo."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "bitnet_jax", "configs"):
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name,
                      ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "-w", str(tmp_path / "wheel"), str(src)], check=True,
                 capture_output=True, timeout=600)
  site = tmp_path / "site"
  wheel = next((tmp_path / "wheel").glob("*.whl"))
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--target", str(site), str(wheel)], check=True,
                 capture_output=True, timeout=600)
  assert (site / "bitnet_jax" / "configs" / "tiny.py").exists()
  assert list((site / "bitnet_jax" / "scale" / "gpu_targets").glob("*.txtpb"))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(subprocess_env(), PYTHONPATH=str(site))
  out = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.train", "--config=configs/tiny.py",
       f"--workdir={elsewhere / 'run'}", "--config.train.stop_step=2",
       "--config.model.d_model=32", "--config.model.d_ff=64",
       "--config.model.vocab_size=512", "--config.model.seq_len=32",
       "--config.data.tokenizer_train_docs=300", "--config.data.batch_size=4",
       "--config.train.log_every=1"],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  where = subprocess.run([sys.executable, "-c", "import bitnet_jax; print("
                          "bitnet_jax.__file__)"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=True).stdout
  assert where.startswith(str(site))
  summary = (elsewhere / "run" / "summary.json").read_text()
  assert '"final_step": 2' in summary
