"""The GPU measurement script runs end to end (at toy sizes, on the CPU):
every section is in its JSON; the numbers mean nothing here."""
import json
import subprocess
import sys

import pytest

from conftest import subprocess_env


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "m.json"
  proc = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.scale.gpu_measure", "--small",
       "--rounds=1", f"--out={out}"], env=subprocess_env(),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(out.read_text())
  assert r["small"] and r["platform"] == "cpu"
  assert set(r) >= {"train", "fwht", "kernel", "gemm", "decode"}
  assert len(r["train"]) == 6 and "v2 int8+stages cudnn" in r["train"]
  assert r["train"]["fp float xla"]["x_fp_step"] == 1.0
  assert r["train"]["fp float cudnn"]["x_fp_step"] == 1.0
  assert all(row["step_s"] > 0 for row in r["train"].values())
  assert r["fwht"]["x_copy"] > 0 and r["gemm"]["bf16_over_int8"] > 0
  assert r["kernel"]["impl"] == "triton_interpret"
  assert r["kernel"]["fwd_x_stages"] > 0 and r["kernel"]["bwd_x_stages"] > 0
  assert any(k.startswith("decode batch 8") for k in r["decode"])
  assert "wrote" in proc.stdout
