"""Train a small 1-D CNN on MNIST-1D with gTop-k S-SGD and tf.keras ``model.fit``
(gtopk_hvd.tensorflow.keras), or dense Horovod.

    horovodrun -np 4 -H localhost:4 --gloo python examples/tensorflow2_keras_mnist1d.py
    horovodrun -np 4 -H localhost:4 --gloo python examples/tensorflow2_keras_mnist1d.py --dense

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package (4000 training
and 1000 test sequences of length 40, 10 classes): nothing is downloaded.  Lines marked
``# gtopk_hvd:`` are what changes from a plain Horovod script; with ``--dense`` the same
script runs horovod.tensorflow.keras' own DistributedOptimizer as the baseline.  The gTop-k
statistics (density, bytes_sent, residual_norm) are in the progress bar and in the History.
Needs tf.keras from tf-keras: TF_USE_LEGACY_KERAS=1 (set below if unset).
"""
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.keras = tf-keras, not Keras 3
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow.keras as plain_hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mnist1d.data import get_dataset_args, make_dataset  # noqa: E402

import gtopk_hvd.tensorflow.keras as hvd  # noqa: E402  gtopk_hvd: instead of horovod.tensorflow.keras
from mnist1d_shared import keras_conv_net, parse_args  # noqa: E402


def main():
    args = parse_args(__doc__.split("\n")[0],
                      "horovod.tensorflow.keras.DistributedOptimizer")
    tf.config.threading.set_intra_op_parallelism_threads(1)  # several ranks share few cores
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if args.dense:
        plain_hvd.init()
    else:
        hvd.init()  # gtopk_hvd: hvd.init() plus the pair process sets gTop-k exchanges in
    rank, size = hvd.rank(), hvd.size()
    tf.keras.utils.set_random_seed(args.seed + rank)  # broadcast makes the weights agree

    data = make_dataset(get_dataset_args())  # deterministic (seed 42), the same on every rank
    x_train, y_train = data["x"][rank::size].astype(np.float32), data["y"][rank::size]
    x_test, y_test = data["x_test"].astype(np.float32), data["y_test"]

    model = keras_conv_net()
    optimizer = tf.keras.optimizers.SGD(args.lr * size, momentum=args.momentum)
    if args.dense:
        optimizer = plain_hvd.DistributedOptimizer(optimizer)
    else:
        optimizer = hvd.DistributedOptimizer(  # gtopk_hvd: same arguments as Horovod's ...
            optimizer, density=args.density)  # gtopk_hvd: ... plus the fraction to send
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),
    ]
    if not args.dense:
        # gtopk_hvd: density, bytes_sent and residual_norm in the logs, the History and the
        # progress bar (after MetricAverageCallback: rank 0's own values)
        callbacks.append(hvd.callbacks.GTopkStatsCallback())

    d = model.count_params()
    if rank == 0:
        mode = "dense allreduce" if args.dense else f"gTop-k, density {args.density}"
        print(f"MNIST-1D: {len(data['x'])} train / {len(x_test)} test, {d} parameters, "
              f"{size} ranks, {mode}", flush=True)
    start = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        validation_data=(x_test, y_test), callbacks=callbacks,
                        verbose=2 if rank == 0 else 0)
    if rank == 0:
        logs = history.history
        print(f"final test accuracy {logs['val_accuracy'][-1]:.4f} after {args.epochs} epochs "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        if not args.dense:
            steps = int(np.ceil(len(x_train) / args.batch_size))
            dense_bytes = 2 * (size - 1) * 4 * d // size
            print(f"History keys: {sorted(logs)}", flush=True)
            print(f"last epoch: density {logs['density'][-1]}, bytes_sent per step "
                  f"{logs['bytes_sent'][-1]:.0f} (dense allreduce: {dense_bytes}, "
                  f"{dense_bytes / logs['bytes_sent'][-1]:.1f}x more), residual_norm "
                  f"{logs['residual_norm'][-1]:.4f}, {steps} steps per epoch", flush=True)


if __name__ == "__main__":
    main()
