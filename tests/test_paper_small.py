"""The paper in miniature: the --quick study end to end (structure, not numbers)."""
import json
import math
import os

import pytest

from bitnet_jax.experiments import paper_small, report, study


def finite_numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from finite_numbers(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from finite_numbers(v)
  elif isinstance(tree, float):
    yield tree


def test_split_text_keeps_wikitext_articles_whole():
  articles = [f" = Title {i} = \n \n Body {i} .\n \n = = Section = = \n \n More ."
              for i in range(12)]
  docs = study.split_text("\n".join(articles))
  assert len(docs) == 12 and all("= = Section = =" in d for d in docs)
  assert study.split_text("a\n\nb\n\nc") == ["a", "b", "c"]


def test_a4_start_is_a_kept_checkpoint_step():
  for steps in (6, 10, 12, 800, 1001):
    s = study.Settings(steps=steps)
    assert s.a4_start % s.ckpt_every == 0
    assert 0 < s.steps - s.a4_start <= max(1, round(0.05 * steps))


@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(corpus_file, tmp_path):
  out = str(tmp_path / "study")
  done = paper_small.run_study(corpus_file, out, study.QUICK, "test")
  assert sorted(done["trained"]) == sorted(f"{r.name}@seed0" for r in study.RUNS)
  results = done["results"]
  # Every row of every table, every number finite.
  one = results["replicas"]["0"]
  assert set(one["runs"]) == set(study.RUN_BY_NAME)
  assert set(one["ptq"]) == {name for name, _, _ in study.PTQ_RUNS}
  for name in ("v2_a8", "v2_a4"):
    assert [l for l, _ in study.ATTENTION_SETTINGS] == list(one["attention"][name])
  numbers = list(finite_numbers(results))
  assert numbers and all(math.isfinite(x) for x in numbers)
  text = open(os.path.join(out, "report.md")).read()
  for title, body in report.tables(results).items():
    assert title in text and body in text
    assert "diverged" not in body and "nan" not in body
  rows = sum(t.count("\n") - 1 for t in report.tables(results).values())
  assert rows == 8 + 8 + 5 + 7 + 2 * len(report.ROTATED_ROWS)
  claims = report.claims(results)
  assert len(claims) >= 13
  assert all("**inconclusive**" in c for c in claims)  # one seed in --quick
  # Three seeds (the quick replica, perturbed by a tiny noise): the tables
  # show mean ± sd and a finding far from its threshold gets a verdict.
  import copy
  three = dict(results, seeds=[0, 1, 2], replicas={})
  for k, factor in (("0", 1.0), ("1", 1.001), ("2", 0.999)):
    rep = copy.deepcopy(one)
    for score in rep["runs"].values():
      score["ppl"] *= factor
    three["replicas"][k] = rep
  assert " ± " in report.tables(three)["Table 1: main results"]
  verdicts = [c.rsplit("**", 2)[1] for c in report.claims(three)]
  assert set(verdicts) <= {"agrees", "differs", "inconclusive"}
  assert set(verdicts) - {"inconclusive"}
  assert len(done["figures"]) == 4
  for path in done["figures"]:
    assert os.path.getsize(path) > 1000 and path.endswith(".png")
  # The a4 runs continued their a8 parent at a4_start.
  rep = study.replica(out, 0)
  summary = json.load(open(os.path.join(rep, "runs", "v2_a4", "summary.json")))
  assert summary["start_step"] == study.QUICK.a4_start
  # Table 5's no-rotation a4 run continued the b1.58 (a8) checkpoint
  summary = json.load(open(os.path.join(rep, "runs", "v2_none_a4",
                                        "summary.json")))
  assert summary["start_step"] == study.QUICK.a4_start
  # The same command again: nothing retrained or re-evaluated.
  again = paper_small.run_study(corpus_file, out, study.QUICK, "test")
  assert again["trained"] == [] and again["evaluated"] == []
  assert again["results"]["replicas"] == results["replicas"]
  # Other settings in the same directory are refused.
  with pytest.raises(ValueError, match="other settings"):
    paper_small.run_study(corpus_file, out, study.Settings(steps=7), "test")


def test_readme_results_are_the_committed_report(tmp_path):
  """docs/results.md = what `paper_small --readme=docs/results.md` copies
  from docs/paper_small/report.md (no number typed by hand)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  readme = tmp_path / "results.md"
  original = open(os.path.join(root, "docs", "results.md")).read()
  readme.write_text(original)
  report.sync_readme(os.path.join(root, "docs", "paper_small", "report.md"),
                     str(readme))
  assert readme.read_text() == original
