"""Train a small 1-D CNN on MNIST-1D with gTop-k S-SGD (gtopk_hvd.torch), or dense Horovod.

    horovodrun -np 4 -H localhost:4 --gloo python examples/pytorch_mnist1d.py
    horovodrun -np 4 -H localhost:4 --gloo python examples/pytorch_mnist1d.py --dense

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package (4000 training
and 1000 test sequences of length 40, 10 classes): nothing is downloaded.  Lines marked
``# gtopk_hvd:`` are what changes from a plain Horovod script; with ``--dense`` the same
script runs horovod.torch's own DistributedOptimizer as the baseline.
"""
import sys
import time

import horovod.torch as plain_hvd
import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import gtopk_hvd.torch as hvd  # gtopk_hvd: instead of `import horovod.torch as hvd`
from mnist1d_shared import parse_args


class ConvNet(nn.Module):
    """The MNIST-1D paper's CNN (three stride-2 convolutions and a linear classifier), with 64
    channels instead of 25: at density 0.01 it then reaches 80% in fewer steps."""

    def __init__(self, channels=64):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.unsqueeze(1)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.linear(x.flatten(1))


def datasets():
    data = make_dataset(get_dataset_args())  # deterministic (seed 42), the same on every rank

    def tensors(x, y):
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    return tensors(data["x"], data["y"]), tensors(data["x_test"], data["y_test"])


def evaluate(model, loader):
    """Accuracy over the whole test set: every rank scores its shard, then one allreduce."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    model.train()
    counts = hvd.allreduce(torch.tensor([correct, total], dtype=torch.float64), op=hvd.Sum,
                           name="eval")
    return (counts[0] / counts[1]).item()


def main():
    args = parse_args(__doc__.split("\n")[0],
                      "horovod.torch.DistributedOptimizer, dense allreduce")
    torch.set_num_threads(1)  # several ranks share few cores
    if args.dense:
        plain_hvd.init()
    else:
        hvd.init()  # gtopk_hvd: hvd.init() plus the pair process sets gTop-k exchanges in
    torch.manual_seed(args.seed)
    rank, size = hvd.rank(), hvd.size()

    train_set, test_set = datasets()
    train_sampler = DistributedSampler(train_set, num_replicas=size, rank=rank, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler)
    test_loader = DataLoader(test_set, batch_size=250, sampler=DistributedSampler(
        test_set, num_replicas=size, rank=rank, shuffle=False))

    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * size,
                                momentum=args.momentum)
    if args.dense:
        optimizer = plain_hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters())
    else:
        optimizer = hvd.DistributedOptimizer(  # gtopk_hvd: same arguments as Horovod's ...
            optimizer, named_parameters=model.named_parameters(),
            density=args.density)  # gtopk_hvd: ... plus the fraction of entries to send
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)  # gtopk_hvd: no gTop-k step taken

    d = sum(p.numel() for p in model.parameters())
    dense_bytes_per_step = 2 * (size - 1) * 4 * d // size
    sent = dense_sent = 0
    if rank == 0:
        mode = "dense allreduce" if args.dense else f"gTop-k, density {args.density}"
        print(f"MNIST-1D: {len(train_set)} train / {len(test_set)} test, {d} parameters, "
              f"{size} ranks, {mode}", flush=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        train_sampler.set_epoch(epoch)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        # a bar on rank 0 at a terminal only: through horovodrun's pipes a bar arrives in
        # prefixed fragments, and the epoch line below is the progress
        for x, y in tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}",
                         disable=rank != 0 or not sys.stderr.isatty(), leave=False,
                         mininterval=2):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64)
            dense_sent += dense_bytes_per_step
            # gtopk_hvd: bytes this rank sent in the last step (the dense baseline sends all)
            sent += dense_bytes_per_step if args.dense else optimizer.gtopk_stats()["bytes_sent"]
        totals = hvd.allreduce(loss_sum, op=hvd.Sum, name="loss")
        accuracy = evaluate(model, test_loader)
        if rank == 0:
            ratio = f", {dense_sent / sent:.1f}x more" if sent else ""
            print(f"epoch {epoch + 1:3d}  loss {totals[0].item() / totals[1].item():.4f}  "
                  f"test accuracy {accuracy:.4f}  sent {sent / 2**20:7.2f} MiB "
                  f"(dense would send {dense_sent / 2**20:7.2f} MiB{ratio})", flush=True)
    if rank == 0:
        print(f"final test accuracy {accuracy:.4f} after {args.epochs} epochs in "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
