"""Repository rules: the README's two commands, and CI runs the same tests."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
  text = open(os.path.join(ROOT, "README.md")).read()
  block = text.split("```", 2)[1]
  lines = [l for l in block.splitlines()[1:] if l.strip()]
  return text, lines


def test_readme_starts_with_two_commands():
  text, lines = readme_commands()
  assert text.index("```") < 400, "the commands come first"
  assert len(lines) == 2
  train, test = lines
  assert "pip install" in train and "bitnet_jax.train --config=configs/tiny.py" in train
  assert "pip install" in test and "pytest" in test


def test_ci_runs_the_readme_test_command():
  _, (_, test) = readme_commands()
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert test in ci
