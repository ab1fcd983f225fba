"""The end-to-end benchmark's models for TensorFlow (tf.keras), the same shapes as
benchmarks/models.py: ResNet-20 (CIFAR, option-A shortcuts), VGG-16 with batch norm (CIFAR
variant) and the 3072-4096-2048-2048-10 MLP (about 25.2M parameters).  Inputs are NHWC.
"""
import tensorflow as tf

__all__ = ["MODELS_TF"]

layers = tf.keras.layers


def _basic_block(x, cout, stride):
    cin = x.shape[-1]
    out = layers.Conv2D(cout, 3, stride, padding="same", use_bias=False)(x)
    out = layers.ReLU()(layers.BatchNormalization()(out))
    out = layers.Conv2D(cout, 3, 1, padding="same", use_bias=False)(out)
    out = layers.BatchNormalization()(out)
    short = x
    if stride != 1 or cin != cout:  # option A: subsample and zero-pad the channels
        pad = cout - cin
        short = layers.Lambda(lambda t: tf.pad(t[:, ::stride, ::stride, :],
                                               [[0, 0], [0, 0], [0, 0],
                                                [pad // 2, pad - pad // 2]]))(x)
    return layers.ReLU()(layers.Add()([out, short]))


def resnet20(num_classes=10):
    inp = layers.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            x = _basic_block(x, cout, stride if i == 0 else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inp, layers.Dense(num_classes)(x))


def vgg16(num_classes=10):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
    model = tf.keras.Sequential([layers.Input((32, 32, 3))])
    for v in cfg:
        if v == "M":
            model.add(layers.MaxPool2D(2))
        else:
            model.add(layers.Conv2D(v, 3, padding="same"))
            model.add(layers.BatchNormalization())
            model.add(layers.ReLU())
    model.add(layers.Flatten())
    model.add(layers.Dense(num_classes))
    return model


def mlp25m(num_classes=10):
    return tf.keras.Sequential([layers.Input((32, 32, 3)), layers.Flatten(),
                                layers.Dense(4096, activation="relu"),
                                layers.Dense(2048, activation="relu"),
                                layers.Dense(2048, activation="relu"),
                                layers.Dense(num_classes)])


MODELS_TF = {"resnet20": resnet20, "vgg16": vgg16, "mlp25m": mlp25m}
