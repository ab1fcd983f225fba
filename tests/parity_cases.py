"""What the re-written Horovod tests of both frameworks share (tests/*/workers/
horovod_parity_worker.py and tests/*/test_*_horovod_parity.py).

Each behaviour runs three ways: Horovod's own optimizer or tape (the oracle), the drop-in at
density 1, and Horovod's with ``Compression.gtopk(density=1.0)``.  Gradients are rounded to a
multiple of 1 / GRID in [-CLIP, CLIP], so that sums over up to 1024 ranks are exact in float32
in any order.
"""
MODES = ("horovod", "drop_in", "compressor")
GRID = 16
CLIP = 1024.0


def averages(size):
    """Whether the tests average (P a power of two) or sum: gTop-k divides by P, Horovod
    multiplies by float32(1 / P), which can differ in the last bit otherwise."""
    return size & (size - 1) == 0


def agree_with_horovod(results, what, equal):
    """Every mode in ``results`` (mode -> list of parts) equals the oracle's part by part,
    compared with ``equal(got, want, label)``; a mode may be absent where it refused."""
    assert "horovod" in results and len(results) > 1, (what, sorted(results))
    for mode in [m for m in MODES[1:] if m in results]:
        assert len(results[mode]) == len(results["horovod"]), (what, mode)
        for part, (got, want) in enumerate(zip(results[mode], results["horovod"])):
            equal(got, want, f"{what}: {mode} vs Horovod's (part {part})")
