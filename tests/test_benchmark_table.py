"""The accelerator table (benchmarks/accelerator_table.py) end to end on CPU with tiny shapes.

The PyTorch worker is replaced by a stand-in speaking the same JSON-lines protocol (this venv has no
PyTorch), which reports a fixed step time, so the kdjax/PyTorch ratios can be checked exactly; the
largest-batch search is checked against a known memory limit.
"""

import json
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import accelerator_table as at  # noqa: E402
import step_throughput as st  # noqa: E402

TORCH_STEP_S = 0.002  # the stand-in's step time

FAKE_WORKER = textwrap.dedent(f"""
  import json, sys
  for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "quit":
      break
    if req["op"] == "build":
      spec = req["spec"]
      if spec["mode"] == "cached" and spec["compile"]:
        print(json.dumps({{"error": "ValueError: stand-in refuses compiled cached rows"}}), flush=True)
      else:
        print(json.dumps({{"id": req["id"], "ready": True, "build_s": 0.0, "peak_memory_bytes": None,
                          "info": {{"torch": "stand-in"}}}}), flush=True)
    else:
      n = -(-req["steps"] // req["sync_every"])
      print(json.dumps({{"times": [{TORCH_STEP_S}] * n}}), flush=True)
""")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("table")
  worker = tmp / "fake_worker.py"
  worker.write_text(FAKE_WORKER)
  out = tmp / "cpu.json"
  # A limit of batch 8 stands in for the device's memory in the largest-batch search (``batch_fits`` itself
  # compiles and runs the step; its out-of-memory test, ``is_out_of_memory``, is checked below).
  tried = []

  def fits(group, mode, batch, dtype, mesh):
    tried.append((group.student, mode, batch, dtype, mesh.size))
    return batch <= 8

  # One group (the ImageNet-shaped one, where the PyTorch targets apply) keeps compilation short.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(at, "batch_fits", fits)
    result = at.main(["--out", str(out), "--cifar-pairs", "", "--imagenet-pairs", "small_cnn:small_cnn",
                      "--imagenet-batches", "8", "--imagenet-size", "16", "--imagenet-classes", "10",
                      "--dtype", "float32", "--steps", "2", "--round-steps", "1", "--warmup", "1",
                      "--matmul-size", "64", "--torch-python", sys.executable, "--torch-worker", str(worker),
                      "--torch-compile-groups", "all", "--max-batch"])
  return result, out, tried


@pytest.mark.slow  # one shared end-to-end table run (~30 s of compiles): benchmarks, not library behaviour
def test_json_has_every_row_ratio_and_overhead(table):
  result, out, _ = table
  on_disk = json.loads(out.read_text())
  assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
  rows = on_disk["rows"]
  for group in ("imagenet",):
    kd = {r["mode"]: r for r in rows if r["group"] == group and r["framework"] == "kdjax"}
    assert set(kd) == {"live", "cached", "student_only", "teacher_forward"}
    for r in kd.values():
      assert r["images_per_s"] == pytest.approx(8 / r["step_s_median"])
      assert r["peak_bytes_in_use"] is None  # CPU: no memory statistics
      assert r["program_bytes"] > 0
      assert r["flops_per_step"] > 0 and r["flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s_median"])
      assert r["fraction_of_bf16_peak"] is None and r["fraction_of_tf32_peak"] is None  # no CPU peak
    # The live step = the cached one + the teacher's forward (the KD loss is the same in both).
    assert kd["live"]["flops_per_step"] == pytest.approx(
        kd["cached"]["flops_per_step"] + kd["teacher_forward"]["flops_per_step"], rel=0.02)
    torch_rate = 8 / TORCH_STEP_S
    for mode in ("live", "cached", "student_only"):
      assert kd[mode]["ratio_vs_pytorch_eager"] == pytest.approx(kd[mode]["images_per_s"] / torch_rate)
    assert kd["live"]["ratio_vs_torch_compile"] == pytest.approx(kd["live"]["images_per_s"] / torch_rate)
    assert "ratio_vs_torch_compile" not in kd["cached"]  # the stand-in refused that row...
    assert any("compile cached" in n and "stand-in refuses" in n for n in on_disk["notes"])  # ...and it says so
    torch_modes = sorted(r["mode"] for r in rows if r["group"] == group and r["framework"] == "pytorch_eager")
    assert torch_modes == ["cached", "live", "student_only"]
    (o,) = [o for o in on_disk["overhead"] if o["group"] == group]
    assert o["ratio"] == pytest.approx(kd["live"]["step_s_median"]
                                       / (kd["teacher_forward"]["step_s_median"] + kd["student_only"]["step_s_median"]))
    assert kd["live"]["live_teacher_overhead"] == o["ratio"]
  what = [t["what"] for t in on_disk["targets_measured"]]
  assert any("ImageNet-shaped KD step" in w and "eager" in w for w in what)
  assert any("ImageNet-shaped KD step" in w and "compile" in w for w in what)
  assert any("live-teacher overhead" in w for w in what)
  assert not any("Largest batch: not searched" in n for n in on_disk["notes"])


@pytest.mark.slow  # one shared end-to-end table run (~30 s of compiles): benchmarks, not library behaviour
def test_markdown_table(table):
  _, out, _ = table
  md = out.with_suffix(".md").read_text()
  assert "| pair | input | batch | mode | framework | img/s |" in md
  body = [line for line in md.splitlines() if line.startswith("| small_cnn") or line.startswith("| – → small_cnn")]
  assert len(body) == 4 + 3 + 2 + 1  # 4 kdjax, 3 eager, 2 compile rows; 1 overhead row
  kd_live = next(line for line in body if "| live | kdjax |" in line)
  assert kd_live.split("|")[11].strip() == "n/a"  # device peak memory on CPU
  assert "overhead" in md and "target ≤ 1.05" in md and "(target ≥ 1.3)" in md


def test_largest_batch_search():
  limit = 100
  found = at.largest_batch(lambda b: b <= limit, 8, cap=128, multiple=8, bisect_steps=2)
  # 8, 16, 32, 64 fit, 128 does not; bisection: 96 fits, 112 does not.
  assert [b for b, _ in found["tried"]] == [8, 16, 32, 64, 128, 96, 112]
  assert (found["largest"], found["first_failing"], found["capped"]) == (96, 112, False)
  capped = at.largest_batch(lambda b: True, 8, cap=64, multiple=8)
  assert (capped["largest"], capped["first_failing"], capped["capped"]) == (64, None, True)
  none = at.largest_batch(lambda b: False, 8, cap=64)
  assert none["largest"] is None and none["first_failing"] == 8
  with pytest.raises(ValueError, match="not a multiple of 8"):
    at.largest_batch(lambda b: True, 12, cap=64, multiple=8)
  assert at.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  assert not at.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: shape mismatch"))


def test_peak_flops_lookup():
  assert st.peak_flops("NVIDIA H200")["tf32"] == 494.7e12
  assert st.peak_flops("NVIDIA A100-SXM4-80GB")["bfloat16"] == 312e12
  assert st.peak_flops("NVIDIA L40S") == {}  # not an L4
  assert st.peak_flops("TPU v5 lite")["bfloat16"] == 197e12  # v5e, not v5p
  assert st.peak_flops("TPU v5")["bfloat16"] == 459e12
  assert st.peak_flops("cpu") == {}


@pytest.mark.slow  # one shared end-to-end table run (~30 s of compiles): benchmarks, not library behaviour
def test_largest_batch_column(table):
  """--max-batch: 8 fits, 16 does not; the bisection's midpoint 12 is not a multiple of the 8 devices, so the
  search stops there; only the live row (--max-batch-modes) is searched."""
  result, out, tried = table
  (found,) = result["largest_batch"]
  assert [tuple(t) for t in found["tried"]] == [(8, True), (16, False)]
  assert tried == [("small_cnn", "live", 8, "float32", 8), ("small_cnn", "live", 16, "float32", 8)]
  rows = {r["mode"]: r for r in result["rows"] if r["framework"] == "kdjax"}
  assert rows["live"]["largest_batch"] == {"largest": 8, "first_failing": 16, "capped": False}
  assert "largest_batch" not in rows["student_only"]
  live_line = next(line for line in out.with_suffix(".md").read_text().splitlines() if "| live | kdjax |" in line)
  assert live_line.split("|")[13].strip() == "8"  # the largest-batch column
