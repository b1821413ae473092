"""microattn complexity: the exponent fit, the measurement at tiny sizes, the command."""

import math

import numpy as np
import pytest

from microattn.demo import complexity, plots
from tests.demo.command import run_cli, status_of


def test_fit_recovers_the_exponent_of_a_power_law():
    ns = np.array([512, 1024, 2048, 4096])
    assert complexity.fit_exponent(ns, 3e-9 * ns**2.0) == pytest.approx(2.0)
    assert complexity.fit_exponent(ns, 7.0 * ns**1.0) == pytest.approx(1.0)
    assert complexity.fit_exponent(ns, ns**1.5 * 0.1) == pytest.approx(1.5)


def test_fit_uses_only_the_largest_sizes():
    ns = np.array([512, 1024, 2048, 4096, 8192])
    values = ns**2.0
    values[0] *= 50  # per-call overhead at the smallest size: not fitted
    assert complexity.fit_exponent(ns, values) == pytest.approx(2.0)
    assert complexity.fit_exponent(ns, values, points=5) < 1.5
    assert math.isnan(complexity.fit_exponent(ns[:1], values[:1]))


def test_a_tiny_measurement_fills_the_tables():
    results = complexity.measure(0.2, start=16, max_n=64, min_time=0.0, variants=["full", "linear"])
    assert [s.name for s in results] == ["full", "linear"]  # the table's order
    for series in results:
        assert [p.n for p in series.points] == [16, 32, 64]  # FIT_POINTS sizes even past the budget
        for p in series.points:
            assert 0 < p.fwd_s <= p.fwdbwd_s and 0 < p.fwd_bytes <= p.fwdbwd_bytes
            assert p.repeats >= complexity.MIN_REPEATS
    report = complexity.format_report(results)
    for text in ("O(n^2)", "O(n)", "N=16", "N=64", "fitted", "fitted exponents within 0.25"):
        assert text in report
    assert "KV cache" not in report  # only with the gqa variant


def test_the_reference_memory_grows_with_the_square_of_n():
    """The reference holds (B, H, N, N) scores: doubling N quadruples its peak."""
    (series,) = complexity.measure(0.1, start=256, max_n=512, min_time=0.0, variants=["full"])
    small, large = series.points
    assert 3.6 < large.fwd_bytes / small.fwd_bytes < 4.4
    assert 3.3 < large.fwdbwd_bytes / small.fwdbwd_bytes < 4.4


def test_tracemalloc_sees_what_numba_kernels_allocate():
    """The memory columns count the flash kernels' own buffers (docs/complexity.md says so)."""
    assert complexity.numba_allocations_traced()


def test_kv_cache_bytes():
    assert complexity.kv_cache_bytes(1024, 4) == 2 * 1 * 4 * 1024 * 32 * 4
    assert complexity.kv_cache_bytes(1024, 4) == 4 * complexity.kv_cache_bytes(1024, 1)


def test_the_command_prints_the_table_and_writes_the_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(complexity, "START", 16)
    out = tmp_path / "c.png"
    assert run_cli("complexity", "--budget", "0.1", "--max-n", 64, "--variants", "full,gqa", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "peak memory" in printed and "KV cache" in printed and "GQA (1 kv head)" in printed
    if plots.pyplot() is not None:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_table_is_printed_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(complexity, "START", 16)
    monkeypatch.setattr(plots, "pyplot", lambda: None)
    assert run_cli("complexity", "--budget", "0.1", "--max-n", 32, "--variants", "full",
                   "--out", tmp_path / "c.png") == 0
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and "time (CPU" in printed
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("argv, status, message", [
    (["--budget", "0"], 2, "expected a finite positive number"),
    (["--variants", "full,quadratic"], 2, "expected a comma-separated list"),
    (["--max-n", "100"], 1, "--max-n 100 is below the first size, 512"),
])
def test_bad_arguments_are_one_line(argv, status, message, capsys):
    assert status_of("complexity", *argv) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("microattn: error: ") and message in err and len(err.splitlines()) == 1


def test_out_must_be_a_file_name(tmp_path, capsys):
    assert run_cli("complexity", "--out", tmp_path) == 1
    assert "is a directory" in capsys.readouterr().err
