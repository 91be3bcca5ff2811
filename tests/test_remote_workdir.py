"""A run on gs:// and nothing on local disk.

A Cloud Storage emulator (tests/gcs_emulator.py: gcp-storage-emulator, in
memory, on a local port) stands in for GCS: gcsfs (what etils.epath uses for gs://) and TensorStore's
own GCS driver (what orbax writes arrays with) both talk to it, as they would
to storage.googleapis.com. The corpus, the run directory, the compilation
cache, evaluation results, exports and figures all live in the bucket; the
test's working and temporary directories stay empty.
"""
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import SMALL, make_documents, small_run_config, subprocess_env

if not all(importlib.util.find_spec(m) for m in ("gcsfs", "gcp_storage_emulator")):
  pytest.skip("needs requirements-gcs.txt", allow_module_level=True)
# gcsfs's bucket-type lookup uses the Storage Control API, which the emulator
# lacks; it falls back to plain GCS after a warning on every call.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

BUCKET = "bitnet-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment (STORAGE_EMULATOR_HOST for gcsfs,
  TENSORSTORE_GCS_HTTP_URL for TensorStore), set in this process too."""
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"),
       str(port), BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert time.time() < deadline, "the storage emulator did not start"
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import gcsfs
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.kill()
    server.wait()


@pytest.fixture
def local_dirs(tmp_path, monkeypatch):
  """An empty working directory and temporary directory, checked by the
  test at its end."""
  cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
  cwd.mkdir()
  tmp.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp))
  return cwd, tmp


def _everything_under(path):
  return sorted(os.path.relpath(os.path.join(r, f), path)
                for r, ds, fs in os.walk(path) for f in fs + ds)


def _upload_corpus(folder):
  """The corpus as gs://BUCKET/<folder>/corpus.txt: a folder per test, as
  the tests share the module's emulator (one globs its folder)."""
  from etils import epath
  path = epath.Path(f"gs://{BUCKET}/{folder}/corpus.txt")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n\n".join(make_documents(400, seed=3)))
  return str(path)


def test_train_resume_evaluate_export_analyze_on_gcs(gcs, local_dirs, caplog):
  caplog.set_level(logging.INFO)  # train.log gets what the root logger passes
  from etils import epath
  from bitnet_jax.evaluation import activation_report, perplexity
  from bitnet_jax.inference import exported, generation, pretrained
  from bitnet_jax.training import trainer
  corpus = _upload_corpus("data")
  run = f"gs://{BUCKET}/runs/v2"
  config = small_run_config(corpus, **{
      "train.stop_step": 6, "train.ckpt_every": 3, "train.profile_start": 1,
      "train.profile_steps": 2, "train.eval_every": 3})
  first = trainer.train(config, run)
  assert first["final_step"] == 6
  config.train.stop_step = 9
  second = trainer.train(config, run)  # resumes from the bucket
  assert second["start_step"] == 6 and second["final_step"] == 9
  from bitnet_jax.storage import GrowingFileHandler
  assert not [h for h in logging.getLogger().handlers  # detached when done
              if isinstance(h, GrowingFileHandler)]
  from bitnet_jax.data import corpus as corpus_lib
  assert corpus_lib.expand_paths(f"gs://{BUCKET}/data/*.txt") == [corpus]
  root = epath.Path(run)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()
                if p.name.isdigit()) == ["3", "6", "9"]
  rows = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
  assert any(r.get("resumed_from") == 6 for r in rows)
  log = (root / "train.log").read_text()
  assert "step 6/6" in log and "resumed step 6" in log and "step 9/9" in log
  events = list((root / "tensorboard").glob("events.out.tfevents.*"))
  assert events and all(e.stat().length > 100 for e in events)
  traces = list((root / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1, traces
  assert json.loads((root / "summary.json").read_text())["final_step"] == 9
  assert not (root / "train.lock").exists()  # released

  pre = pretrained.load(run)
  docs = make_documents(20, seed=5)
  ppl = perplexity.perplexity(pre, docs, window=32, stride=32, batch_size=4)
  assert 1.0 < ppl["ppl"] < 400
  out = f"gs://{BUCKET}/exports/v2"
  report = exported.export(pre, out)
  assert epath.Path(out, exported.WEIGHTS_FILE).stat().length == report["file_bytes"]
  model = generation.load(out)
  assert model.params is not None
  acts = activation_report.analyze([pre], docs, f"gs://{BUCKET}/acts",
                                   num_seqs=2, figures=True)
  assert acts["figures"] and all(epath.Path(f).exists() for f in acts["figures"])
  assert (epath.Path(f"gs://{BUCKET}/acts") / "summary.json").exists()

  cwd, tmp = local_dirs
  assert _everything_under(cwd) == [] and _everything_under(tmp) == []


@pytest.mark.slow
def test_the_command_lines_take_gs_paths(gcs, local_dirs):
  """train, evaluate and export (Hugging Face) as a user types them, every
  path in the bucket, the compilation cache too."""
  corpus = _upload_corpus("cli_data")
  run, cwd = f"gs://{BUCKET}/cli/b158", local_dirs[0]
  env = subprocess_env(**gcs, TMPDIR=str(local_dirs[1]))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  settings = dict(SMALL, **{"data.paths": corpus, "train.stop_step": 4,
                            "model.variant": "b1.58",
                            "train.compile_cache_dir": f"gs://{BUCKET}/xla"})
  commands = [
      ["bitnet_jax.train", "--config=configs/tiny.py", f"--workdir={run}"] +
      [f"--config.{k}={v}" for k, v in settings.items()],
      ["bitnet_jax.evaluate", f"--workdir={run}", "--source=text",
       f"--paths={corpus}", "--max_docs=20"],
      ["bitnet_jax.export", f"--workdir={run}", f"--out=gs://{BUCKET}/cli/hf",
       "--format=hf"],
  ]  # (export's own format and analyze on gs://: the test above, in process)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args in commands:
    if args[0] == "bitnet_jax.train":
      args[1] = f"--config={os.path.join(root, 'configs', 'tiny.py')}"
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True,
                         text=True, env=env, cwd=cwd)
    assert out.returncode == 0, (args[0], out.stderr[-3000:])
  from etils import epath
  assert list(epath.Path(f"gs://{BUCKET}/xla").iterdir())  # cache entries
  assert list(epath.Path(run, "eval").glob("ppl_*.json"))
  for name in ("model.safetensors", "config.json"):
    assert epath.Path(f"gs://{BUCKET}/cli/hf", name).exists()
  assert _everything_under(cwd) == [] and _everything_under(local_dirs[1]) == []
