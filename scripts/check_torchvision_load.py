#!/usr/bin/env python3
"""Loads a ResNet backbone exported by `dino` into torchvision with strict=True and checks that
torchvision computes the features `dino extract` wrote for the same image.

    ~/.venvs/torch/bin/pip install torch torchvision safetensors pillow
    dino extract --weights runs/dino/teacher_backbone.safetensors --image photo.jpg \
        --resize 32 --crop 32 -o feats.safetensors
    ~/.venvs/torch/bin/python scripts/check_torchvision_load.py \
        runs/dino/teacher_backbone.safetensors --arch resnet18_cifar \
        --image photo.jpg --size 32 --features feats.safetensors

The `_cifar` variants are torchvision's network with the 3x3 stride-1 conv1 and no max-pool, as
lightly and solo-learn build it. The image goes through the same steps as `dino extract`
(resize the short side, center crop, ImageNet mean/std), so the two feature vectors agree to
float rounding. Exit status 0 when the load is strict and the features agree.
"""

import argparse
import sys

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file


def backbone(arch):
    cifar = arch.endswith("_cifar")
    model = getattr(torchvision.models, arch.removesuffix("_cifar"))(weights=None)
    if cifar:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def image_tensor(path, size):
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return t(Image.open(path).convert("RGB")).unsqueeze(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", help="a backbone .safetensors written by dino (train or export)")
    ap.add_argument("--arch", required=True, help="resnet18, resnet34, resnet50, or a _cifar variant")
    ap.add_argument("--image", help="an image to compare features on")
    ap.add_argument("--size", type=int, default=224, help="the --resize/--crop given to dino extract")
    ap.add_argument("--features", help="the features file dino extract wrote for --image")
    a = ap.parse_args()

    model = backbone(a.arch).eval()
    state = load_file(a.weights)
    model.load_state_dict(state, strict=True)  # raises on any missing, extra or misshapen key
    print(f"strict load: {len(state)} tensors into torchvision {a.arch}")
    if not a.image:
        return 0
    with torch.no_grad():
        theirs = model(image_tensor(a.image, a.size))[0]
    print(f"torchvision feature: {tuple(theirs.shape)}, norm {theirs.norm():.6f}")
    if a.features:
        ours = next(iter(load_file(a.features).values()))[0]
        err = ((ours - theirs).norm() / theirs.norm()).item()
        print(f"relative difference to dino extract: {err:.2e}")
        if not err < 1e-3:
            print("features differ: the export or the preprocessing does not match", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
