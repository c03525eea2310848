"""The tools that stand in for a GPU here: the compile report (bench/gpu_report.py), the roofline predictions and
their column in the benchmark tables (bench/roofline.py, bench/common.py), and gpu-check's no-GPU path."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import common, gpu_check, gpu_report, roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(kw)
    return env


def test_gpu_report_compiles_a_subset(tmp_path):
    """The report end to end on one op and one target, in a process without the interpreter."""
    env = _env(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--ops", "token_kl", "--archs", "80", "--jobs", "1",
                        "--json", str(out), "--md", str(tmp_path / "r.md"), "--no-cuda"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["archs"] == [80] and rep["failures"] == []
    kernels = {u["kernel"] for u in rep["triton"]}
    assert kernels == {"_token_kl_fwd_kernel", "_token_kl_bwd_kernel"}
    for u in rep["triton"]:
        res = u["results"]["80"]
        assert res["compiled"] and 0 < res["regs"] <= 255 and u["in_configs"]
    assert "compile-time resource figures, not measurements" in (tmp_path / "r.md").read_text()


def test_resource_usage_of_a_binary_without_device_code_is_empty():
    """A CPU-only build of the extension has no cubins: the report says so (cuda_skipped) instead of failing."""
    if gpu_report._tool("cuobjdump") is None:
        pytest.skip("no cuobjdump")
    assert gpu_report.resource_usage(os.path.realpath(sys.executable)) == {}


def test_gpu_report_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "bench.gpu_report", "--ops", "token_kl"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr


def test_limit_checks():
    ok = {"compiled": True, "shared": 64 * 1024, "regs": 128, "local": 0}
    assert gpu_report.check(ok, 86, 128) == []
    assert gpu_report.check(dict(ok, shared=100 * 1024), 86, 128)  # 99 KB on sm_86
    assert gpu_report.check(dict(ok, shared=100 * 1024), 80, 128) == []  # 163 KB on sm_80
    assert gpu_report.check(dict(ok, regs=255), 90, 256) == []  # 255 x 256 -> 256-register warp units: 65536
    assert gpu_report.check(dict(ok, regs=129), 90, 512)  # rounded to 136 per thread: 136 x 512 > 65536
    assert gpu_report.check({"compiled": False, "error": "boom"}, 90, 128) == ["does not compile: boom"]


def test_roofline_prediction_is_the_slower_of_memory_and_compute():
    a100 = roofline.gpu_named("NVIDIA A100-SXM4-80GB")
    assert a100.name == "A100-SXM4-80GB"
    assert roofline.predict(a100, 2.039e9, 0) == pytest.approx(1e-3)  # 2.039 GB at 2.039 TB/s
    assert roofline.predict(a100, 1, 312e12, "bf16") == pytest.approx(1.0)
    assert roofline.predict(a100, 2.039e12, 312e12, "bf16") == pytest.approx(1.0)
    h100 = roofline.gpu_named("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100-SXM5" and roofline.predict(h100, 3.35e12, 67e12, "fp32") == pytest.approx(1.0)
    # parts with other figures get no prediction rather than a wrong one
    for other in ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090", "cpu"):
        assert roofline.gpu_named(other) is None


def test_roofline_cases_count_what_the_ops_move():
    by = {(c.op, c.shape, c.dtype): c for c in roofline.cases()}
    c = by[("linear_logprobs", "N=2048 H=4096 V=128256", "bf16")]
    assert c.flops == 8 * 2048 * 4096 * 128256
    c = by[("logprobs_from_logits", "N=16384 V=128256", "bf16")]
    assert c.nbytes == 3 * 16384 * 128256 * 2  # read twice, gradient written once
    text = roofline.table()
    assert "predicted A100-SXM4-80GB" in text and "predicted H100-SXM5" in text


def test_measured_over_predicted_column():
    results = {"rk triton": (2e-3, 2e-3, 2e-3, 1), "reference": (8e-3, 8e-3, 8e-3, 1)}
    name, cells = common.roofline_column(results, 2.039e9, None, "fp32", "NVIDIA A100-SXM4-80GB")
    assert "A100-SXM4-80GB" in name and "1.000 ms" in name
    assert cells == {"rk triton": "2.00", "reference": "8.00"}
    name, cells = common.roofline_column(results, None, 312e9, "bf16", "NVIDIA A100-SXM4-80GB")
    assert cells["rk triton"] == "2.00"
    # off a known GPU (or on the CPU) there is no column
    assert common.roofline_column(results, 1e9, None, "fp32", None) == (None, {})
    assert common.roofline_column(results, 1e9, None, "fp32", "NVIDIA GeForce RTX 4090") == (None, {})


def test_report_has_no_roofline_column_on_cpu():
    if common.DEVICE.type != "cpu":
        pytest.skip("checks the CPU table")
    results = {"a": (1e-3, 1e-3, 1e-3, 1), "b": (2e-3, 2e-3, 2e-3, 1)}
    text = common.report("t", results, "a", common.Ceilings(copy=1e10, gemm=1e11), csv_name="t", nbytes=1e6)
    assert "predicted" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_says_no_gpu_and_fails(tmp_path):
    out = tmp_path / "results.md"
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == gpu_check.NO_GPU != 0
    assert "NO GPU VISIBLE" in r.stderr
    assert not out.exists()


def test_gpu_check_gpu_path_is_importable():
    for fn in (gpu_check.run_tests, gpu_check.run_bench, gpu_check.head_memory, gpu_check.main):
        assert callable(fn)
    files = gpu_check.test_files()
    for f in files:
        assert os.path.exists(os.path.join(ROOT, "tests", f)), f
    # every op's GPU tests, this file's own helpers not counted
    assert {"test_group_advantages.py", "test_rollout_correction.py", "test_gpu_paths.py"} <= set(files)
    assert set(gpu_check.ALWAYS_TESTED) <= set(files) and "test_gpu_tools.py" not in files
    import bench.__main__ as bench_main
    assert set(gpu_check.BENCH_OPS) <= set(bench_main.ALL)


def test_linear_logprobs_plans_for_each_target():
    """The report plans the head for the target it compiles, fp32 with and without TF32, every launch in a
    configuration the module lists for that target."""
    from rlhf_kernels.triton import linear_logprobs as mod
    out = gpu_report._linear_logprobs(gpu_report._ForArch(mod, 86))
    assert out and all(plan for _dt, _label, plan in out)
    precs = {launch.constexprs.get("DOT_PREC") for dt, _l, plan in out if dt == torch.float32 for launch in plan}
    assert {"ieee", "tf32"} <= precs
    for dt, _label, plan in out:
        assert all(gpu_report.selectable(mod, launch, dt, 86) for launch in plan)
