"""gtopk_hvd: gTop-k S-SGD (Shi et al., ICDCS 2019; IJCAI 2019) as a drop-in for Horovod.

Use ``gtopk_hvd.torch`` for PyTorch and ``gtopk_hvd.tensorflow`` / ``gtopk_hvd.tensorflow.keras``
for TensorFlow 2 and Keras.  The framework-free core lives in ``gtopk_hvd.common``.
"""
__version__ = "0.1.0.dev0"
