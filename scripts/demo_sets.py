#!/usr/bin/env python3
"""Small evaluation sets built from Fashion-MNIST, for the documented runs of `dino eval
retrieval`, `dino eval copydetection` and `dino attention --frames` (BENCHMARKS.md, section
"Retrieval, copy detection, fine-tuning and attention over frames on Fashion-MNIST").

    python3 scripts/demo_sets.py /usr/share/datasets/fashion-mnist OUT

writes, under OUT:
  fmnist-retrieval/  jpg/db0000..db1999.jpg (the first 2000 training images), jpg/q000..q099.jpg
                     (the first 100 test images) and gnd_fmnist.pkl in the Revisited format: each
                     query's positives ("easy") are the database images of its class; "hard" and
                     "junk" are empty, so the Hard setup has no positives (mAP H is nan, as the
                     official script prints it).
  fmnist-copydays/   the Copydays layout from the first 200 test images: original/NNNN00.jpg,
                     strong/NNNN01.jpg (rotated 90 degrees, cropped to 80 % and overlaid with a
                     bar), jpegqual/10/ (JPEG quality 10), crops/50/ (the central half of the
                     area).
  fmnist-distractors/, fmnist-whitening/  training images 0-1999 and 2000-3999, outside the
                     Copydays folder (every folder in it is a block of queries).
  clip.gif           24 frames: a test-set garment gliding across a 56 x 56 px dark canvas.

Needs numpy and Pillow. Deterministic.
"""
import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def main(src, out):
    src, out = Path(src), Path(out)
    train, train_labels = idx(src / "train-images-idx3-ubyte.gz"), idx(src / "train-labels-idx1-ubyte.gz")
    test, test_labels = idx(src / "t10k-images-idx3-ubyte.gz"), idx(src / "t10k-labels-idx1-ubyte.gz")
    rgb = lambda a: Image.fromarray(a).convert("RGB")

    ret = out / "fmnist-retrieval"
    (ret / "jpg").mkdir(parents=True, exist_ok=True)
    imlist = [f"db{i:04}" for i in range(2000)]
    qimlist = [f"q{i:03}" for i in range(100)]
    for i, name in enumerate(imlist):
        rgb(train[i]).save(ret / "jpg" / f"{name}.jpg", quality=95)
    for i, name in enumerate(qimlist):
        rgb(test[i]).save(ret / "jpg" / f"{name}.jpg", quality=95)
    gnd = [
        {"bbx": [0.0, 0.0, 28.0, 28.0], "easy": [j for j in range(2000) if train_labels[j] == test_labels[i]],
         "hard": [], "junk": []}
        for i in range(100)
    ]
    with open(ret / "gnd_fmnist.pkl", "wb") as f:
        pickle.dump({"gnd": gnd, "imlist": imlist, "qimlist": qimlist}, f, protocol=4)

    cd = out / "fmnist-copydays"
    for d in ["original", "strong", "jpegqual/10", "crops/50"]:
        (cd / d).mkdir(parents=True, exist_ok=True)
    for d in ["fmnist-distractors", "fmnist-whitening"]:
        (out / d).mkdir(parents=True, exist_ok=True)
    for i in range(200):
        img = rgb(test[i])
        img.save(cd / "original" / f"{i:04}00.jpg", quality=95)
        img.save(cd / "jpegqual/10" / f"{i:04}00.jpg", quality=10)
        img.crop((7, 7, 27, 27)).save(cd / "crops/50" / f"{i:04}00.jpg", quality=95)
        strong = img.crop((0, 0, 23, 28)).rotate(90, expand=True)
        ImageDraw.Draw(strong).rectangle((2, 2, 20, 6), fill=(255, 220, 0))
        strong.save(cd / "strong" / f"{i:04}01.jpg", quality=75)
    for i in range(2000):
        rgb(train[i]).save(out / "fmnist-distractors" / f"d{i:04}.jpg", quality=95)
        rgb(train[2000 + i]).save(out / "fmnist-whitening" / f"w{i:04}.jpg", quality=95)

    frames = []
    garment = test[0]
    for t in range(24):
        canvas = np.full((56, 56), 10, np.uint8)
        x, y = 2 + t, 14 + int(8 * np.sin(t / 24 * 2 * np.pi))
        canvas[y : y + 28, x : x + 28] = np.maximum(canvas[y : y + 28, x : x + 28], garment)
        frames.append(rgb(canvas))
    frames[0].save(out / "clip.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
