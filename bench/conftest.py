"""Options of the CPU benchmark suite (bench/test_bench_cpu.py)."""
from __future__ import annotations

SIZES = (64, 128, 256, 512, 1024, 2048)


def pytest_addoption(parser):
    parser.addoption("--cpu-sizes", default=",".join(map(str, SIZES)),
                     help="comma-separated batch sizes of the CPU benchmark")


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        sizes = [int(s) for s in metafunc.config.getoption("--cpu-sizes").split(",")]
        metafunc.parametrize("batch", sizes)
