"""What the three MNIST-1D examples share: their command line and the Keras CNN.

Imported by examples/pytorch_mnist1d.py, tensorflow2_mnist1d.py and
tensorflow2_keras_mnist1d.py (Python puts the script's folder on sys.path, so
``horovodrun ... python examples/<name>.py`` finds it from any directory).
"""
import argparse


def parse_args(description, baseline):
    """The examples' flags; ``baseline`` names what ``--dense`` runs instead of gTop-k."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--density", type=float, default=0.01,
                        help="fraction of gradient entries sent per step (default 0.01)")
    parser.add_argument("--dense", action="store_true", help=f"baseline: {baseline}")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.075, help="per rank, scaled by size()")
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def keras_conv_net(channels=64):
    """The MNIST-1D paper's CNN (three stride-2 convolutions and a linear classifier), with 64
    channels instead of 25: at density 0.01 it then reaches 80% in fewer steps.  The same
    network as ``ConvNet`` of examples/pytorch_mnist1d.py, in tf.keras."""
    import tensorflow as tf  # after the example has set TF_USE_LEGACY_KERAS
    layers = tf.keras.layers
    return tf.keras.Sequential([
        layers.Reshape((40, 1), input_shape=(40,)),
        layers.Conv1D(channels, 5, strides=2, padding="same", activation="relu"),
        layers.Conv1D(channels, 3, strides=2, padding="same", activation="relu"),
        layers.Conv1D(channels, 3, strides=2, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(10),
    ])
