"""Models of the end-to-end benchmark, defined here (no torchvision): CIFAR-10 shapes.

- ResNet-20 (He et al. 2016, the CIFAR variant: 3 stages of 3 basic blocks, 16/32/64 channels,
  identity shortcuts with zero padding): about 0.27M parameters;
- VGG-16 with batch norm, CIFAR variant (one 512 -> 10 classifier): about 14.7M parameters;
- an MLP 3072 -> 4096 -> 2048 -> 2048 -> 10: about 25.2M parameters (communication-bound).
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["resnet20", "vgg16", "mlp25m", "MODELS", "count_parameters"]


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option A: subsample and zero-pad the identity
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, ::self.stride, ::self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGGCifar(nn.Module):
    def __init__(self, cfg=_VGG16, num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    def __init__(self, sizes=(3072, 4096, 2048, 2048, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def resnet20():
    return ResNetCifar(20)


def vgg16():
    return VGGCifar()


def mlp25m():
    return MLP()


MODELS = {"resnet20": resnet20, "vgg16": vgg16, "mlp25m": mlp25m}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for name, build in MODELS.items():
        m = build()
        out = m(torch.randn(2, 3, 32, 32))
        print(f"{name}: {count_parameters(m) / 1e6:.2f}M parameters, output {tuple(out.shape)}")
