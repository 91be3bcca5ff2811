"""--dry_run --topology: the real step compiled for a TPU slice from this host
(libtpu, no TPU), read as a program: what each chip holds, computes and
communicates."""
import pytest

from bitnet_jax import chips
from bitnet_jax.scale import dry_run
from bitnet_jax.scale import fit_table
from bitnet_jax.scale import hlo_stats


def test_cpu_topology_report_and_errors():
  c = fit_table.load_config("400m")
  c.model.num_layers = 2
  c.data.batch_size = 64
  r = dry_run.report(c, "cpu:8")
  assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert "estimate" not in r  # no peaks known for a host CPU
  assert 0.8 < r["program_flops"] / r["needed_flops"] < 1.2
  text = dry_run.format_report(r)
  assert "memory per chip" in text and "ZeRO-3" in text
  with pytest.raises(dry_run.TopologyError, match="XLA_FLAGS"):
    dry_run.topology_devices("cpu:64")
  with pytest.raises(dry_run.TopologyError, match="expected cpu:N"):
    dry_run.topology_devices("cpu:eight")


def test_roofline_arithmetic():
  """One compute-bound op, one memory-bound op, collectives overlapped."""
  chip = chips.Chip("test", 100.0, 200.0, 1e9, 10.0, 5.0)
  stats = hlo_stats.ProgramStats(
      ops=[hlo_stats.Op("dot", {"bf16": 400.0}, 20.0, 2.0),   # 4 s each
           hlo_stats.Op("add", {}, 30.0, 1.0),                # 3 s
           hlo_stats.Op("int", {"s8": 400.0}, 0.0, 1.0),      # 2 s
           # float32 at HIGHEST: six bf16 passes (no f32 peak given) 6 s;
           # at default precision the bf16 peak, 1 s
           hlo_stats.Op("f32", {"f32": 100.0}, 0.0, 1.0),
           hlo_stats.Op("f32d", {hlo_stats.F32_DEFAULT: 100.0}, 0.0, 1.0)],
      collectives=[hlo_stats.Collective("all-gather", "g", "", 2, 40.0, 20.0,
                                        1.0)],                 # 4 s
      unknown_trip_counts=[])
  r = dry_run.roofline(stats, chip)
  assert r["ops_s"] == pytest.approx(4 * 2 + 3 + 2 + 6 + 1)
  assert r["collective_s"] == pytest.approx(4.0)
  assert r["step_s"] == pytest.approx(20.0)
  gpu = chips.Chip("gpu", 100.0, 200.0, 1e9, 10.0, 5.0, 1.0, f32_flops=10.0)
  assert dry_run.roofline(stats, gpu)["ops_s"] == pytest.approx(
      4 * 2 + 3 + 2 + 10 + 1)


def test_a_gpu_program_fits_in_its_allocators_share():
  """A GPU run gets XLA_PYTHON_CLIENT_MEM_FRACTION of its memory (0.92 as
  the train command sets it); a TPU program may use the whole HBM."""
  h100, v5p = chips.CHIPS["h100"], chips.CHIPS["v5p"]
  assert h100.usable_bytes({}) == pytest.approx(0.92 * 80e9)
  assert h100.usable_bytes({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75"}) == \
      pytest.approx(60e9)
  assert v5p.usable_bytes({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}) == \
      v5p.hbm_bytes
  with pytest.raises(MemoryError, match="69.0 GiB for it"):
    dry_run.check_fits({"fits": False, "total_gib": 73.3, "hbm_gib": 74.5,
                        "usable_gib": 69.0})


def test_unknown_tpu_topology_is_one_line():
  pytest.importorskip("libtpu")
  with pytest.raises(dry_run.TopologyError, match="--topology=v5p:3x3x3"):
    dry_run.topology_devices("v5p:3x3x3")


@pytest.mark.slow
def test_paper_400m_compiled_for_a_v5p_cube():
  """configs/bitnet_v2_400m.py at the paper batch (512 x 2048) on v5p:4x4x4:
  the compiled program holds 512 / 64 = 8 sequences per chip in every
  activation, does the model's FLOPs (no redundant compute), gathers weights
  one layer at a time as int8 codes (train_matmul auto on TPU) and moves no
  more than 1.5x what ZeRO-3 needs."""
  pytest.importorskip("libtpu")
  config = fit_table.load_config("400m")
  devices, chip = dry_run.topology_devices("v5p:4x4x4")
  setup, compiled, seconds = dry_run.compile_step(config, devices)
  r = dry_run.summarize(setup, compiled, chip, "v5p:4x4x4", seconds)
  assert r["fits"] and r["total_gib"] < 0.5 * r["hbm_gib"]
  assert 0.8 < r["program_flops"] / r["needed_flops"] < 1.2
  assert r["collective_payload"] <= 1.5 * r["zero3_payload"]
  assert not r["unknown_trip_counts"]
  text = compiled.as_text()
  seq, d = config.model.seq_len, config.model.d_model
  assert hlo_stats.activation_batch_dims(text, [(seq, d)]) == {8}
  stats = hlo_stats.analyze(text, 64)
  for c in stats.collectives:
    if c.kind in ("all-gather", "all-reduce") and c.payload >= 16 << 20:
      (dtype, dims), = hlo_stats.arrays(c.shape)[:1]
      # int8 codes (the TPU packs four to a u32) or bf16; never f32 latents
      assert dtype in ("s8", "u32", "bf16"), c.shape
      assert dims[0] != config.model.num_layers, c.shape  # one layer at a time
      assert seq not in dims, c.shape           # no activation all-reduce
  # the same numbers as the committed fit table's cell (docs/fit_table/)
  import json
  import os
  cached = json.load(open(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
      "fit_table", "400m_v5p_4x4x4.json")))
  assert r["total_gib"] == pytest.approx(cached["total_gib"], rel=0.02)
  assert r["estimate"]["mfu"] == pytest.approx(cached["estimate"]["mfu"],
                                               rel=0.02)


def test_readme_fit_table_is_the_commands_output():
  """docs/scale.md's fit table = docs/fit_table.md = the table fit_table
  writes from its cached per-cell reports (no number typed by hand)."""
  import json
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  md = open(os.path.join(root, "docs", "fit_table.md")).read()
  readme = open(os.path.join(root, "docs", "scale.md")).read()
  section = readme.split(fit_table.BEGIN)[1].split(fit_table.END)[0]
  assert section.strip() == md.strip()
  cells = [tuple(c.strip() for c in line.split("|")[1:3])
           for line in md.splitlines()[2:]]
  results = {}
  for size, topology in cells:
    path = os.path.join(root, "docs", "fit_table",
                        f"{size}_{topology.replace(':', '_')}.json")
    results[(size, topology)] = json.load(open(path))
  assert fit_table.table(results) == md
  for r in results.values():  # the acceptance of the pod-scale issue
    assert r["fits"] and 0.8 < r["program_flops"] / r["needed_flops"] < 1.2
    assert r["collective_payload"] <= 1.5 * r["zero3_payload"]
  seven = results[("7b", "v5p:4x4x4")]
  assert seven["microbatches"] == 1 and seven["total_gib"] <= 24
  assert seven["estimate"]["mfu"] >= 0.45
  assert results[("7b", "v5e:16x16")]["total_gib"] <= 8
