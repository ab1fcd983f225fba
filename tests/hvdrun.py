"""``horovodrun`` for the test suite: Horovod's own launcher, without its build probe.

Before it starts anything, ``horovodrun`` asks whether Horovod was built with Gloo
(``horovod.common.util.gloo_built``) in a forked process that imports ``horovod.tensorflow``,
and so TensorFlow: about 5 s of CPU and wall time per launch on the 2-core machine, some
60 launches in the suite.  scripts/setup_env.sh builds Horovod with Gloo, and a worker whose
Horovod had no Gloo fails at ``hvd.init()`` anyway, so the suite answers the probe here and
runs the rest of the launcher unchanged (argument parsing, host assignment, the Gloo
rendezvous, Elastic's driver).  The plain ``horovodrun`` command runs in the demo test
(tests/torch/test_torch_example.py).

Usage: ``python tests/hvdrun.py <horovodrun arguments>``.
"""
import sys

from horovod.runner import launch


def _gloo_built(verbose=False):
    return True


if __name__ == "__main__":
    launch.gloo_built = _gloo_built
    sys.exit(launch.run_commandline())
