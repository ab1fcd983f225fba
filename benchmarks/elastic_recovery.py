"""Seconds from killing an Elastic worker to the survivors' next step, repeated.

The job of tests/torch/test_torch_elastic.py: 2 workers under horovodrun's elastic driver,
grown to 3 (the added worker on host 127.0.0.1), that worker SIGKILLed, the 2 survivors go
on (gtopk_hvd.torch.elastic.run, tests/torch/workers/elastic_worker.py).  Each run prints the
recovery and the survivors' Gloo failure lines; a survivor left waiting on a live peer whose
connections stayed open shows as a recovery of HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod's default,
30 s, unless --gloo-timeout) with "Timed out waiting ... ms" in its line (docs/building.md).

    .venv/bin/python -m benchmarks.elastic_recovery --runs 10
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import elastic_harness  # noqa: E402

WORKER = ROOT / "tests" / "torch" / "workers" / "elastic_worker.py"
STEPS = 30
FAILURE = re.compile(r"Timed out waiting|Read error|Connection closed")


def one_job(gloo_timeout):
    """(recovery seconds or None, horovodrun's exit code, the Gloo failure lines)."""
    rc, output, _, killed, events = elastic_harness.run_elastic_job(
        WORKER, STEPS, "gtopk", {"HOROVOD_GLOO_TIMEOUT_SECONDS": str(gloo_timeout)}, base=2)
    lines = [line for line in output.splitlines() if FAILURE.search(line)]
    return elastic_harness.recovery_after_kill(events, killed, 2), rc, lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--gloo-timeout", type=int, default=30,
                        help="HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod's default: 30)")
    args = parser.parse_args()
    recoveries = []
    for i in range(args.runs):
        recovery, rc, lines = one_job(args.gloo_timeout)
        recoveries.append(recovery)
        shown = "none" if recovery is None else f"{recovery:.2f} s"
        print(f"run {i}: recovery {shown}, horovodrun exit {rc}", flush=True)
        for line in lines[:4]:  # the rank and Gloo's words
            rank = line.split("]", 1)[0] + "]"
            print("   ", rank, line[FAILURE.search(line).start():][:160])
    stalled = [r for r in recoveries if r is None or r >= args.gloo_timeout / 2]
    print(f"{len(stalled)} of {args.runs} runs stalled; recoveries (s): "
          f"{[None if r is None else round(r, 2) for r in recoveries]}")


if __name__ == "__main__":
    main()
