"""A short training job that ends the way user programs do: ``hvd.shutdown()`` (Horovod's
own, no barrier) or a plain exit.  Run repeatedly at P = 3 by test_torch_robustness.py: every
rank issues the same operations, so no rank may still be inside an exchange when another
shuts Horovod down."""
import sys

import torch
from _common import Recorder, same_on_every_rank
from optimizer_worker import flat_params, loss_for, make_model, train

import horovod.torch as plain_hvd
import gtopk_hvd.torch as hvd


def main(how):
    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()
    rec = Recorder(rank)
    with rec("train_then_exit"):
        model = make_model(5)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), density=0.1)
        train(hvd, model, opt, loss_for(5), steps=3)
        hvd.allreduce(torch.ones(1))  # unnamed, right after the last step
        assert same_on_every_rank(hvd, flat_params(model), "final")
        train(hvd, model, opt, loss_for(6), steps=1)  # the last thing before the exit
    rec.save()
    if how == "shutdown":
        plain_hvd.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
