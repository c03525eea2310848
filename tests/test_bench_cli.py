"""`rlhf-kernels bench`: routing to the checkout's bench/ or the wheel's rlhf_kernels.bench, the error without
either, and --plot. (The installed-wheel path runs for real in `make sdist-check`.)"""
import importlib.util
import os

import pytest

import rlhf_kernels.__main__ as entry


def test_bench_runs_one_op_with_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert entry.bench_root() is not None  # tests run from the source checkout
    rc = entry.main(["bench", "--quick", "--only", "token_kl", "--csv", str(tmp_path / "csv"),
                     "--plot", str(tmp_path / "png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "### token_kl" in out and "rk cpu" in out
    assert os.listdir(tmp_path / "csv") == ["token_kl.csv"]
    pngs = os.listdir(tmp_path / "png")
    assert len(pngs) == 1 and pngs[0].startswith("token_kl")
    with open(tmp_path / "png" / pngs[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_prefers_the_checkout_then_the_installed_copy(monkeypatch):
    assert entry.bench_package() == "bench"  # tests run from the source checkout
    monkeypatch.setattr(entry, "bench_root", lambda: None)
    # an editable install maps rlhf_kernels.bench to the checkout's bench/; a plain checkout has no such module
    expected = "rlhf_kernels.bench" if importlib.util.find_spec("rlhf_kernels.bench") else None
    assert entry.bench_package() == expected


def test_bench_without_checkout_or_install_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(entry, "bench_package", lambda: None)
    assert entry.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "bench/" in err and "source checkout" in err


def test_other_commands_still_reach_the_trainer_cli(capsys):
    assert entry.main(["--help"]) == 0
    assert "rlhf-kernels bench" in capsys.readouterr().out


def test_plot_skips_tables_without_timings(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plot import _seconds, plot_all

    assert _seconds("1.500 ms") == pytest.approx(1.5e-3) and _seconds("2.000 s") == 2.0 and _seconds("-") is None
    timed = ("t", [{"impl": "a", "median": "1.000 ms", "extra peak MiB": "12"},
                   {"impl": "b", "median": "3.000 ms", "extra peak MiB": "-"}], ["impl", "median", "extra peak MiB"])
    agreement = ("agree", [{"peer": "x", "max abs diff": "skipped: ImportError"}], ["peer", "max abs diff"])
    paths = plot_all([timed, agreement], str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["t.png"]


def test_a_missing_peer_is_a_skipped_row_not_an_error(monkeypatch, capsys):
    from bench import common
    from bench.bench_logprobs_from_logits import _trl

    monkeypatch.setitem(__import__("sys").modules, "trl", None)  # as if TRL were not installed
    fns, skipped = common.peers({"TRL selective_log_softmax": lambda: _trl("selective_log_softmax"),
                                 "fails when run": lambda: (lambda: 1 / 0),
                                 "works": lambda: (lambda: None)})
    assert list(fns) == ["works"]
    assert skipped["TRL selective_log_softmax"].startswith("skipped: ModuleNotFoundError")
    assert skipped["fails when run"].startswith("skipped: ZeroDivisionError")
    ceil = common.Ceilings(copy=10e9, gemm=100e9)
    res = {"ref": (2e-3, 1e-3, 3e-3, 5), "fast": (1e-3, 1e-3, 2e-3, 5)}
    text = common.report("t", res, "ref", ceil, csv_name="t", nbytes=10 ** 7, peaks={"ref": 2 ** 21, "fast": None},
                         skipped=skipped, extra={"fast": {"max |Δ|": "1e-7"}})
    lines = text.splitlines()
    assert lines[2] == ("| impl | median | spread | speedup vs ref | peak MiB | GB/s (% of copy) | max \\|Δ\\| |")
    assert "| ref | 2.000 ms | 1.000 ms – 3.000 ms | 1.00x | 2.0 | 5 (50%) |  |" in lines
    assert "| fast | 1.000 ms | 1.000 ms – 2.000 ms | 2.00x | - | 10 (100%) | 1e-7 |" in lines
    assert any(ln.startswith("| TRL selective_log_softmax | skipped: ModuleNotFoundError") for ln in lines)
    # every row has as many cells as the header: no bare | inside a cell
    assert {ln.replace("\\|", "").count("|") for ln in lines if ln.startswith("|")} == {8}


def test_cpu_rows_are_the_cpu_kernels():
    import rlhf_kernels as rk
    from bench.common import DEVICE, rk_backends

    if DEVICE.type != "cpu":
        pytest.skip("the GPU path times triton and cuda")
    built = rk.available_backends()["cpu"] == "available"
    assert rk_backends("gae") == ({"rk cpu": "cpu"} if built else {})  # never the interpreted triton
