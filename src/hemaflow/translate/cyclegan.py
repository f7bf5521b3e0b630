"""CycleGAN networks (Zhu et al. 2017), following the reference implementation's defaults.

ResNet generator: reflection padding, instance norm without affine parameters, two stride-2
downsamplings, ``n_blocks`` residual blocks, two upsamplings (transposed convolution as in the
reference, or nearest-neighbour resize + convolution, which avoids checkerboard artefacts).
Discriminator: the 70x70 PatchGAN (three stride-2 layers). The class-keeping loss's auxiliary
classifier is the same network with one output channel per class, averaged over the patches.
Weights start from N(0, 0.02).
"""

from __future__ import annotations

import random

import torch
from torch import nn

__all__ = ["ImagePool", "PatchClassifier", "PatchDiscriminator", "ResnetGenerator", "init_weights"]


def _conv_block(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, padding), nn.InstanceNorm2d(out_ch), nn.ReLU(True)]


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_block(channels, channels, 3),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsample(in_ch: int, out_ch: int, mode: str) -> list[nn.Module]:
    if mode == "transpose":
        layer: list[nn.Module] = [nn.ConvTranspose2d(in_ch, out_ch, 3, 2, 1, output_padding=1)]
    else:
        layer = [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(in_ch, out_ch, 3)]
    return [*layer, nn.InstanceNorm2d(out_ch), nn.ReLU(True)]


class ResnetGenerator(nn.Module):
    """RGB in [-1, 1] -> RGB in [-1, 1] of the same size (a multiple of 4)."""

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "transpose"):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_block(3, ngf, 7)]
        layers += _conv_block(ngf, ngf * 2, 3, 2, 1) + _conv_block(ngf * 2, ngf * 4, 3, 2, 1)
        layers += [_ResidualBlock(ngf * 4) for _ in range(n_blocks)]
        layers += _upsample(ngf * 4, ngf * 2, upsample) + _upsample(ngf * 2, ngf, upsample)
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN: one real/fake score per overlapping patch (LSGAN targets 1 and 0)."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, outputs: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, 1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2, True)]
            channels = out
        layers.append(nn.Conv2d(channels, outputs, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchClassifier(PatchDiscriminator):
    """Class logits: each patch votes, the votes are averaged (the class-keeping loss's judge)."""

    def __init__(self, ndf: int, classes: int):
        super().__init__(ndf, outputs=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """N(0, 0.02) convolution weights and zero biases, drawn from ``generator`` (repeatable)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            with torch.no_grad():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
                layer.bias.zero_()


class ImagePool:
    """The discriminators' history buffer (Shrivastava et al.): half of each batch comes from old fakes."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.images = size, rng, []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                slot = self.rng.randrange(self.size)
                out.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)

    def state(self) -> torch.Tensor:
        return torch.cat(self.images) if self.images else torch.zeros(0)

    def load(self, images: torch.Tensor, device: torch.device) -> None:
        self.images = [image.unsqueeze(0).to(device) for image in images]
