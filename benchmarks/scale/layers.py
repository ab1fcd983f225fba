"""Layer lists of the projected models, built from the architectures (no weights, no
torchvision): per layer, its gradient's entries and the floating-point operations of its
forward pass for one sample, in forward order.  The backward pass of a layer is taken as twice
its forward (the usual 1:2 split), so a measured or published iteration time is spread over
the layers by these FLOPs.

- ``resnet20``, ``vgg16_cifar``, ``mlp25m``: benchmarks/models.py (CIFAR-10 shapes), the
  models of this project's end-to-end benchmark (the parameter counts are checked against the
  torch modules in tests/benchmarks/test_scale_model.py);
- ``resnet50`` (He et al. 2016, ImageNet 224x224, 25.56M), ``vgg16`` (Simonyan & Zisserman
  2015, ImageNet, 138.36M), ``bert_base`` (Devlin et al. 2019, 12 layers, hidden 768,
  sequence 128, vocabulary 30522: 110M with the pooler, no MLM head).
"""
__all__ = ["MODELS", "layers_of", "total_params", "total_flops"]


def _conv(cin, cout, k, hw, bias=False, bn=False):
    """A conv layer on an output map of hw x hw: its entries and forward FLOPs (2 per MAC)."""
    entries = cin * cout * k * k + (cout if bias else 0)
    out = [(entries, 2.0 * cin * cout * k * k * hw * hw)]
    if bn:
        out.append((2 * cout, 4.0 * cout * hw * hw))
    return out


def _linear(n_in, n_out, tokens=1, bias=True):
    return [(n_in * n_out + (n_out if bias else 0), 2.0 * n_in * n_out * tokens)]


def resnet20():
    layers = _conv(3, 16, 3, 32, bn=True)
    cin = 16
    for cout, hw in ((16, 32), (32, 16), (64, 8)):
        for _ in range(3):
            layers += _conv(cin, cout, 3, hw, bn=True) + _conv(cout, cout, 3, hw, bn=True)
            cin = cout
    return layers + _linear(64, 10)


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


def _vgg_features(hw, bn):
    layers, cin = [], 3
    for c in VGG16:
        if c == "M":
            hw //= 2
            continue
        layers += _conv(cin, c, 3, hw, bias=True, bn=bn)
        cin = c
    return layers


def vgg16_cifar():
    return _vgg_features(32, bn=True) + _linear(512, 10)


def mlp25m():
    dims = [3072, 4096, 2048, 2048, 10]
    return [layer for a, b in zip(dims, dims[1:]) for layer in _linear(a, b)]


def resnet50():
    layers = _conv(3, 64, 7, 112, bn=True)
    cin = 64
    for width, blocks, hw in ((64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)):
        for b in range(blocks):
            out = width * 4
            layers += _conv(cin, width, 1, hw, bn=True) + _conv(width, width, 3, hw, bn=True)
            layers += _conv(width, out, 1, hw, bn=True)
            if b == 0:
                layers += _conv(cin, out, 1, hw, bn=True)  # projection shortcut
            cin = out
    return layers + _linear(2048, 1000)


def vgg16():
    return (_vgg_features(224, bn=False) + _linear(512 * 7 * 7, 4096) + _linear(4096, 4096)
            + _linear(4096, 1000))


def bert_base(seq=128, hidden=768, layers_n=12, vocab=30522, ffn=3072):
    # embeddings: word, position (512), token type (2), LayerNorm; FLOPs of a lookup ~ 0
    layers = [(vocab * hidden, 0.0), (512 * hidden, 0.0), (2 * hidden, 0.0), (2 * hidden, 0.0)]
    for _ in range(layers_n):
        layers += _linear(hidden, 3 * hidden, seq)      # Q, K, V
        # attention scores and weighted sum: 2 x (seq x seq x hidden) MACs, no parameters
        layers += [(0, 4.0 * seq * seq * hidden)]
        layers += _linear(hidden, hidden, seq) + [(2 * hidden, 0.0)]  # output, LayerNorm
        layers += _linear(hidden, ffn, seq) + _linear(ffn, hidden, seq) + [(2 * hidden, 0.0)]
    return layers + _linear(hidden, hidden)  # pooler


MODELS = {"resnet20": resnet20, "vgg16_cifar": vgg16_cifar, "mlp25m": mlp25m,
          "resnet50": resnet50, "vgg16": vgg16, "bert_base": bert_base}


def layers_of(model):
    """[(entries, forward FLOPs per sample)] of ``model`` (a key of :data:`MODELS`); layers
    without parameters (attention products) are kept for their FLOPs."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    return MODELS[model]()


def total_params(model):
    return sum(e for e, _ in layers_of(model))


def total_flops(model):
    return sum(f for _, f in layers_of(model))
