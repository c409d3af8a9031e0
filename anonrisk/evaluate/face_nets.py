"""Face recognition network definitions, written for this project, whose parameter names follow the two
public weight layouts users have: insightface's ArcFace ``iresnet`` (112 px, 512-d) and FaceNet's
``InceptionResnetV1`` as laid out by facenet-pytorch (160 px, 512-d). Weights always come from a local file
(``anonrisk.evaluate.recognizers``); these classes start random.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ---- ArcFace iresnet -----------------------------------------------------------------------------------
IRESNET_LAYERS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3], "iresnet100": [3, 13, 30, 3]}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """Pre-activation residual network of ArcFace; input (N,3,112,112) in [-1, 1], output 512-d."""

    def __init__(self, layers: list[int], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), 1):
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
            blocks = [IBasicBlock(inplanes, planes, 2, down)] + [IBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# ---- FaceNet InceptionResnetV1 ------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def _seq(*convs) -> nn.Sequential:
    return nn.Sequential(*(BasicConv2d(*c[:3], **(c[3] if len(c) > 3 else {})) for c in convs))


class _Residual(nn.Module):
    """Inception-ResNet block: branches concatenated, projected by a 1x1 conv, scaled and added."""

    def __init__(self, channels: int, branches: list[nn.Module], width: int, scale: float, relu: bool = True):
        super().__init__()
        for i, b in enumerate(branches):
            setattr(self, f"branch{i}", b)
        self.n = len(branches)
        self.conv2d = nn.Conv2d(width, channels, 1)
        self.scale = scale
        self.relu = nn.ReLU(inplace=False) if relu else None

    def forward(self, x):
        out = torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n)], 1)
        out = self.conv2d(out) * self.scale + x
        return self.relu(out) if self.relu is not None else out


def block35(scale=0.17):
    return _Residual(256, [BasicConv2d(256, 32, 1), _seq((256, 32, 1), (32, 32, 3, {"padding": 1})),
                           _seq((256, 32, 1), (32, 32, 3, {"padding": 1}), (32, 32, 3, {"padding": 1}))], 96, scale)


def block17(scale=0.10):
    return _Residual(896, [BasicConv2d(896, 128, 1), _seq((896, 128, 1), (128, 128, (1, 7), {"padding": (0, 3)}),
                                                          (128, 128, (7, 1), {"padding": (3, 0)}))], 256, scale)


def block8(scale=0.20, relu=True):
    return _Residual(1792, [BasicConv2d(1792, 192, 1), _seq((1792, 192, 1), (192, 192, (1, 3), {"padding": (0, 1)}),
                                                            (192, 192, (3, 1), {"padding": (1, 0)}))], 384, scale, relu)


class _Mixed(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        for i, b in enumerate(branches):
            setattr(self, f"branch{i}", b)
        self.n = len(branches)

    def forward(self, x):
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n)], 1)


class InceptionResnetV1(nn.Module):
    """FaceNet embedding network; input (N,3,160,160) standardized as (x - 127.5) / 128, output unit 512-d."""

    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[block35() for _ in range(5)])
        self.mixed_6a = _Mixed([BasicConv2d(256, 384, 3, stride=2),
                                _seq((256, 192, 1), (192, 192, 3, {"padding": 1}), (192, 256, 3, {"stride": 2})),
                                nn.MaxPool2d(3, stride=2)])
        self.repeat_2 = nn.Sequential(*[block17() for _ in range(10)])
        self.mixed_7a = _Mixed([_seq((896, 256, 1), (256, 384, 3, {"stride": 2})),
                                _seq((896, 256, 1), (256, 256, 3, {"stride": 2})),
                                _seq((896, 256, 1), (256, 256, 3, {"padding": 1}), (256, 256, 3, {"stride": 2})),
                                nn.MaxPool2d(3, stride=2)])
        self.repeat_3 = nn.Sequential(*[block8() for _ in range(5)])
        self.block8 = block8(1.0, relu=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.6)
        self.last_linear = nn.Linear(1792, 512, bias=False)
        self.last_bn = nn.BatchNorm1d(512, eps=0.001, momentum=0.1, affine=True)

    def forward(self, x):
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "conv2d_4b",
                     "repeat_1", "mixed_6a", "repeat_2", "mixed_7a", "repeat_3", "block8", "avgpool_1a", "dropout"):
            x = getattr(self, name)(x)
        return F.normalize(self.last_bn(self.last_linear(x.flatten(1))), dim=1)
