"""Tiny copies of standard architectures, written the way torchvision and the common CIFAR repositories write them.

Every model is an ``nn.Module`` subclass with its own ``forward`` (in-place residual adds, ``torch.flatten``,
``x.view(x.size(0), -1)``, functional activations and pools, ``torch.cat`` for dense connections, in-place ReLUs),
at widths and input sizes small enough that a float64 double backward through autograd takes milliseconds.

Each factory takes ``(num_classes, train)`` (``dcgan_critic`` only ``train``) and returns ``(model, input_shape)``,
the shape without the batch dimension, with the model in float64 and in ``train()`` or ``eval()`` mode as asked.
Every normalisation layer gets non-trivial affine parameters and, for BatchNorm, running statistics, drawn from a
fixed-seed generator, so eval-mode BatchNorm is a genuine affine map and not the identity. All models work for any
batch size >= 2 (train-mode BatchNorm1d on (B, features) needs B >= 2); in eval mode each output row depends only on
its own input row.

    model, shape = build_zoo("resnet_basic", train=False)
    x = torch.randn(4, *shape, dtype=torch.float64)
"""
import torch
import torch.nn.functional as F
from torch import nn

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _finish(model: nn.Module, train: bool, seed: int = 12345) -> nn.Module:
    """float64, non-trivial normalisation parameters and running statistics, and the requested mode."""
    model = model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORMS):
                continue
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(10)
    return model.train(train)


# ----------------------------------------------------------------------------------------------------------------
# ResNet (torchvision style): BasicBlock and Bottleneck
# ----------------------------------------------------------------------------------------------------------------

def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """torchvision's ResNet with a CIFAR-style 3x3 stem (no max-pool) and one block per stage."""

    def __init__(self, block, planes, strides, num_classes, in_channels=3, stem=4):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(*[self._make_layer(block, p, s) for p, s in zip(planes, strides)])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layer = block(self.inplanes, planes, stride, downsample)
        self.inplanes = planes * block.expansion
        return layer

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layers(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet_basic(num_classes=5, train=False):
    """Stem, a stride-1 BasicBlock, a stride-2 BasicBlock with a 1x1 conv + BN shortcut; 9x9 input."""
    return _finish(ResNet(BasicBlock, planes=[4, 6], strides=[1, 2], num_classes=num_classes), train), (3, 9, 9)


def resnet_bottleneck(num_classes=3, train=False):
    """Two Bottleneck blocks (width 2 -> 8 channels, width 3 -> 12 channels, stride 2), both with a downsample."""
    return _finish(ResNet(Bottleneck, planes=[2, 3], strides=[1, 2], num_classes=num_classes), train), (3, 10, 10)


# ----------------------------------------------------------------------------------------------------------------
# Pre-activation ResNet and Wide ResNet (kuangliu/pytorch-cifar, xternalz/WideResNet style)
# ----------------------------------------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)

        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class WideBasic(nn.Module):
    def __init__(self, in_planes, planes, dropout_rate, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)

        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True),
            )

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out = out + self.shortcut(x)
        return out


class PreActResNet(nn.Module):
    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = PreActBlock(4, 4, stride=1)
        self.layer2 = PreActBlock(4, 5, stride=1)       # 1x1 shortcut taken from the pre-activated input
        self.layer3 = WideBasic(5, 6, dropout_rate=0.3, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.linear = nn.Linear(6, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 5)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def preact_resnet(num_classes=5, train=False):
    """Two pre-activation blocks and a wide-resnet block with dropout between its convs; 10x10 input."""
    return _finish(PreActResNet(num_classes), train), (3, 10, 10)


# ----------------------------------------------------------------------------------------------------------------
# VGG with BatchNorm (torchvision style)
# ----------------------------------------------------------------------------------------------------------------

class VGG(nn.Module):
    def __init__(self, features, num_classes, pooled=(2, 2), hidden=10, dropout=0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(pooled)
        self.classifier = nn.Sequential(
            nn.Linear(features[-4].out_channels * pooled[0] * pooled[1], hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_layers(cfg, in_channels=3, batch_norm=True):
    layers = []
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def vgg_bn(num_classes=5, train=False):
    """conv-BN-ReLU-maxpool x2 on 13x13 (-> 6x6 -> 3x3), overlapping adaptive avg pool to 2x2, classifier."""
    return _finish(VGG(make_layers([4, "M", 6, "M"]), num_classes), train), (3, 13, 13)


# ----------------------------------------------------------------------------------------------------------------
# DenseNet (kuangliu/pytorch-cifar style bottleneck layers, torchvision-style transition)
# ----------------------------------------------------------------------------------------------------------------

class DenseBottleneck(nn.Module):
    def __init__(self, in_planes, growth_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 2 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * growth_rate)
        self.conv2 = nn.Conv2d(2 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = torch.cat([out, x], 1)
        return out


class Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, num_classes, growth_rate=3, in_channels=3):
        super().__init__()
        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, num_planes, kernel_size=3, padding=1, bias=False)
        layers = []
        for _ in range(2):
            layers.append(DenseBottleneck(num_planes, growth_rate))
            num_planes += growth_rate
        self.dense1 = nn.Sequential(*layers)
        out_planes = num_planes // 2
        self.trans1 = Transition(num_planes, out_planes)
        self.dense2 = DenseBottleneck(out_planes, growth_rate)
        num_planes = out_planes + growth_rate
        self.bn = nn.BatchNorm2d(num_planes)
        self.linear = nn.Linear(num_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.dense2(out)
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def densenet_block(num_classes=3, train=False):
    """Dense block of two BN-ReLU-1x1-BN-ReLU-3x3 layers with torch.cat, a transition, one more dense layer."""
    return _finish(DenseNet(num_classes), train), (3, 10, 10)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision style)
# ----------------------------------------------------------------------------------------------------------------

class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup

        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        else:
            return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes, in_channels=3, dropout=0.2):
        super().__init__()
        # t (expansion), c (channels), n (repeats), s (stride)
        setting = [[1, 4, 1, 1], [2, 6, 2, 2]]
        input_channel, last_channel = 4, 10
        features = [ConvBNReLU(in_channels, input_channel, stride=2)]
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2(num_classes=5, train=False):
    """Stride-2 stem, a t=1 residual block, a t=2 stride-2 block, a t=2 residual block, 1x1 head conv; 9x9 input."""
    return _finish(MobileNetV2(num_classes), train), (3, 9, 9)


# ----------------------------------------------------------------------------------------------------------------
# DCGAN discriminator (pytorch/examples style) for 16x16 inputs, no sigmoid (a WGAN-GP critic)
# ----------------------------------------------------------------------------------------------------------------

class Discriminator(nn.Module):
    def __init__(self, nc=3, ndf=4):
        super().__init__()
        self.main = nn.Sequential(
            # input is (nc) x 16 x 16
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 8 x 8
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 4 x 4
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False),
            # state size. 1 x 1 x 1
        )

    def forward(self, input):
        return self.main(input)


def dcgan_critic(train=False):
    """Output shape (B, 1, 1, 1)."""
    return _finish(Discriminator(), train), (3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# Smooth activations and LayerNorm
# ----------------------------------------------------------------------------------------------------------------

class GeluMLP(nn.Module):
    def __init__(self, num_classes, in_features=7):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 10)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(10, 8)
        self.act2 = nn.GELU(approximate="tanh")
        self.fc3 = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        return self.fc3(x)


def gelu_mlp(num_classes=3, train=False):
    return _finish(GeluMLP(num_classes), train), (7,)


class SiluConvNet(nn.Module):
    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.elu = nn.ELU()
        self.pool = nn.AvgPool2d(2)
        self.softplus = nn.Softplus(beta=2)
        self.fc1 = nn.Linear(6 * 2 * 2, 10)
        self.mish = nn.Mish()
        self.fc2 = nn.Linear(10, 8)
        self.fc3 = nn.Linear(8, 6)
        self.fc4 = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.silu(self.conv1(x))
        x = self.elu(self.conv2(x))          # 9x9 -> 5x5
        x = self.softplus(self.pool(x))      # 5x5 -> 2x2 (floor)
        x = torch.flatten(x, 1)
        x = self.mish(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        x = torch.sigmoid(self.fc3(x))
        return self.fc4(x)


def silu_convnet(num_classes=5, train=False):
    """conv-SiLU-conv-ELU-avgpool-Softplus(beta=2)-flatten-Linear-Mish-Linear-Tanh-Linear-Sigmoid-Linear."""
    return _finish(SiluConvNet(num_classes), train), (3, 9, 9)


class LayerNormMLP(nn.Module):
    def __init__(self, num_classes, in_features=6):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 10)
        self.ln1 = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 8)
        self.ln2 = nn.LayerNorm(8)
        self.fc3 = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.ln1(self.fc1(x)))
        x = F.relu(self.ln2(self.fc2(x)))
        return self.fc3(x)


def layernorm_mlp(num_classes=3, train=False):
    """Linear-LayerNorm-ReLU-Linear-LayerNorm-ReLU-Linear."""
    return _finish(LayerNormMLP(num_classes), train), (6,)


# ----------------------------------------------------------------------------------------------------------------
# 1-d convolutions and BatchNorm1d
# ----------------------------------------------------------------------------------------------------------------

class Conv1dBN(nn.Module):
    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, 5, kernel_size=5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(5)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(5, 6, kernel_size=3)
        self.bn2 = nn.BatchNorm1d(6)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))   # 17 -> 8
        x = self.relu(self.bn2(self.conv2(x)))              # 8 -> 6
        x = self.gap(x)
        x = x.view(x.size(0), -1)
        return self.fc(x)


def conv1d_bn(num_classes=4, train=False):
    """Conv1d-BN1d-ReLU-MaxPool1d-Conv1d-BN1d-ReLU-AdaptiveAvgPool1d-view-Linear on (3, 17)."""
    return _finish(Conv1dBN(num_classes), train), (3, 17)


class BNMLP(nn.Module):
    def __init__(self, num_classes, in_features=8):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 10)
        self.bn1 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 7)
        self.bn2 = nn.BatchNorm1d(7)
        self.fc3 = nn.Linear(7, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


def bn_mlp(num_classes=5, train=False):
    """Linear-BatchNorm1d-ReLU twice, then Linear, on (B, 8)."""
    return _finish(BNMLP(num_classes), train), (8,)


ZOO = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "preact_resnet": preact_resnet,
    "vgg_bn": vgg_bn,
    "densenet_block": densenet_block,
    "mobilenet_v2": mobilenet_v2,
    "dcgan_critic": dcgan_critic,
    "gelu_mlp": gelu_mlp,
    "silu_convnet": silu_convnet,
    "layernorm_mlp": layernorm_mlp,
    "conv1d_bn": conv1d_bn,
    "bn_mlp": bn_mlp,
}


class _KinkDistance(torch.overrides.TorchFunctionMode):
    """Records min |z| over the inputs of every ReLU / ReLU6 / LeakyReLU call, module or functional, in-place or not."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
                    F.leaky_relu, F.leaky_relu_):
            self.found.append(args[0].detach().abs().min())
        elif func in (F.relu6, F.hardtanh, F.hardtanh_):
            z = args[0].detach()
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0) if func is not F.relu6 else 0.0
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0) if func is not F.relu6 else 6.0
            self.found.append(torch.minimum((z - lo).abs().min(), (z - hi).abs().min()))
        return func(*args, **kwargs)


def kink_distance(model, x):
    """Smallest distance of any ReLU/ReLU6/LeakyReLU input to a kink. Unlike a forward hook this sees functional
    calls (F.relu in forward) and the input of in-place ReLUs before it is overwritten."""
    state = torch.get_rng_state()
    with torch.no_grad(), _KinkDistance() as mode:
        model(x)
    torch.set_rng_state(state)
    return min(mode.found).item() if mode.found else float("inf")


def draw_zoo_input(model, shape, batch=4, seed=1, dtype=torch.float64, margin=1e-6):
    """Random input whose activation inputs all stay at least `margin` away from the kinks."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x = torch.randn(batch, *shape, generator=g, dtype=dtype)
        if kink_distance(model, x) > margin:
            return x
    raise RuntimeError("could not draw an input away from the kinks")


def build_zoo(name, train, seed=0, **kw):
    """Seed torch, then build ZOO[name]; returns (float64 model in the requested mode, input shape)."""
    torch.manual_seed(seed)
    return ZOO[name](train=train, **kw)
