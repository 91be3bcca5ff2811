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


def markdown_tables(text):
  """Each Markdown table of a text, as one string."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      current.append(line.rstrip())
    elif current:
      tables.append("\n".join(current))
      current = []
  return tables


def test_readme_results_are_the_committed_report():
  report_path = os.path.join(ROOT, "docs", "paper_small", "report.md")
  report = open(report_path).read()
  readme = open(os.path.join(ROOT, "docs", "results.md")).read()
  tables = markdown_tables(report)
  assert len(tables) == 5, "Tables 1, 2-3, 4, 5 and the rotated domain"
  for t in tables:
    assert t in readme, f"README Results differs from the report:\n{t}"
  findings = [l for l in report.splitlines() if l.startswith("- ") and "**" in l]
  assert findings
  for line in findings:
    assert line in readme, f"README lacks the report's finding:\n{line}"
  for line in report.splitlines():
    if line.startswith("!["):
      target = line.split("(", 1)[1].rstrip(")")
      assert os.path.exists(os.path.join(os.path.dirname(report_path), target))


def test_the_fault_table_names_tests_that_exist():
  """docs/reliability.md: each row's test is a test function of that file."""
  import re
  text = open(os.path.join(ROOT, "docs", "reliability.md")).read()
  section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
  rows = [l for l in section.splitlines() if l.startswith("| ") and "`test_" in l]
  assert len(rows) >= 20
  for row in rows:
    cell = row.rstrip(" |").rsplit("|", 1)[1]
    names = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", cell)
    assert names, row
    current = None
    for path, name in names:
      current = path or current
      source = open(os.path.join(ROOT, "tests", current)).read()
      assert f"def {name}(" in source, f"{current}::{name} (README: {row})"


def test_the_readme_fits_on_a_screen_and_its_pages_exist():
  """README about 200 lines; every docs page it links exists, every page
  under docs/ is linked from it (or from docs/index.md), and every
  relative link of a page resolves."""
  import re
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert len(readme.splitlines()) <= 250
  pages = sorted(f for f in os.listdir(os.path.join(ROOT, "docs"))
                 if f.endswith(".md"))
  index = open(os.path.join(ROOT, "docs", "index.md")).read()
  for page in pages:
    assert f"docs/{page}" in readme or f"({page})" in index, page
  for name in ["README.md"] + [os.path.join("docs", p) for p in pages]:
    text = open(os.path.join(ROOT, name)).read()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
      path = os.path.join(ROOT, os.path.dirname(name), target)
      assert os.path.exists(path), f"{name} links {target}"
