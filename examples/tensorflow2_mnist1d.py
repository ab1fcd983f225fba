"""Train a small 1-D CNN on MNIST-1D with gTop-k S-SGD (gtopk_hvd.tensorflow), or dense Horovod,
in a custom tf.GradientTape loop.

    horovodrun -np 4 -H localhost:4 --gloo python examples/tensorflow2_mnist1d.py
    horovodrun -np 4 -H localhost:4 --gloo python examples/tensorflow2_mnist1d.py --dense

MNIST-1D (Greydanus, 2020) is generated locally by the ``mnist1d`` package (4000 training
and 1000 test sequences of length 40, 10 classes): nothing is downloaded.  Lines marked
``# gtopk_hvd:`` are what changes from a plain Horovod script; with ``--dense`` the same
script runs horovod.tensorflow's own DistributedGradientTape as the baseline.  Set
TF_USE_LEGACY_KERAS=1 (tf.keras from tf-keras).
"""
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import horovod.tensorflow as plain_hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mnist1d.data import get_dataset_args, make_dataset  # noqa: E402

import gtopk_hvd.tensorflow as hvd  # noqa: E402  gtopk_hvd: instead of `import horovod.tensorflow as hvd`
from mnist1d_shared import keras_conv_net, parse_args  # noqa: E402


def main():
    args = parse_args(__doc__.split("\n")[0],
                      "horovod.tensorflow.DistributedGradientTape, dense allreduce")
    tf.config.threading.set_intra_op_parallelism_threads(1)  # several ranks share few cores
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if args.dense:
        plain_hvd.init()
    else:
        hvd.init()  # gtopk_hvd: hvd.init() plus the pair process sets gTop-k exchanges in
    rank, size = hvd.rank(), hvd.size()
    tf.keras.utils.set_random_seed(args.seed)

    data = make_dataset(get_dataset_args())  # deterministic (seed 42), the same on every rank
    x_train, y_train = data["x"][rank::size].astype(np.float32), data["y"][rank::size]
    x_test, y_test = data["x_test"][rank::size].astype(np.float32), data["y_test"][rank::size]

    model = keras_conv_net()
    optimizer = tf.keras.optimizers.SGD(args.lr * size, momentum=args.momentum)
    optimizer.build(model.trainable_variables)
    # gtopk_hvd: the residuals (error feedback) live in a state object you can checkpoint
    state = None if args.dense else hvd.GTopkState(args.density)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        if args.dense:
            tape = plain_hvd.DistributedGradientTape(tape)
        else:
            tape = hvd.DistributedGradientTape(tape, gtopk_state=state)  # gtopk_hvd: + state
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def correct(x, y):
        return tf.reduce_sum(tf.cast(tf.argmax(model(x), 1) == y, tf.float64))

    hvd.broadcast_variables(model.variables, root_rank=0)
    hvd.broadcast_variables(optimizer.variables, root_rank=0)

    d = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    dense_bytes_per_step = 2 * (size - 1) * 4 * d // size
    sent = dense_sent = 0
    if rank == 0:
        mode = "dense allreduce" if args.dense else f"gTop-k, density {args.density}"
        print(f"MNIST-1D: {len(data['x'])} train / {len(data['x_test'])} test, {d} parameters, "
              f"{size} ranks, {mode}", flush=True)
    rng = np.random.default_rng([args.seed, rank])
    steps = len(x_train) // args.batch_size  # the same on every rank
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        loss_sum = 0.0
        for i in range(steps):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss_sum += float(train_step(x_train[batch], y_train[batch]))
            dense_sent += dense_bytes_per_step
            # gtopk_hvd: bytes this rank sent in the last step (the dense baseline sends all)
            sent += dense_bytes_per_step if args.dense else state.gtopk_stats()["bytes_sent"]
        totals = hvd.allreduce(tf.constant([loss_sum, steps], tf.float64), op=hvd.Sum,
                               name="loss").numpy()
        counts = hvd.allreduce(tf.constant([float(correct(x_test, y_test)), len(y_test)],
                                           tf.float64), op=hvd.Sum, name="eval").numpy()
        accuracy = counts[0] / counts[1]
        if rank == 0:
            print(f"epoch {epoch + 1:3d}  loss {totals[0] / totals[1]:.4f}  "
                  f"test accuracy {accuracy:.4f}  sent {sent / 2**20:7.2f} MiB "
                  f"(dense would send {dense_sent / 2**20:7.2f} MiB, "
                  f"{dense_sent / max(sent, 1):.1f}x more)", flush=True)
    if rank == 0:
        print(f"final test accuracy {accuracy:.4f} after {args.epochs} epochs in "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
