#!/usr/bin/env python3
"""Builds fixtures/resnet-reference/: what torchvision's ResNets and the official DINO loop
compute, for the ResNet parity tests (crates/dino-model/tests/resnet.rs,
crates/dino-train/tests/resnet.rs).

    python3 -m venv ~/.venvs/torch && ~/.venvs/torch/bin/pip install torch torchvision safetensors
    git clone https://github.com/facebookresearch/dino /path/to/dino   # commit 7c446df
    ~/.venvs/torch/bin/python scripts/make_resnet_fixtures.py --dino /path/to/dino

The networks are torchvision's: its BasicBlock and Bottleneck, its ResNet._make_layer and
_forward_impl. Only the stem's width is a parameter here (torchvision fixes 64), so that the
committed weights stay small; the full-size key -> shape maps of resnet18/34/50 come from
torchvision's own constructors. Nothing here is imported by the tests.
"""

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from safetensors.torch import save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


class SmallResNet(ResNet):
    """torchvision's ResNet with `width` stem channels instead of 64 and an optional CIFAR stem
    (3x3 conv1, stride 1, no max-pool); fc is nn.Identity() as in DINO."""

    def __init__(self, block, layers, width, cifar):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        if cifar:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def randomize_batch_norms(model, gen):
    """Non-trivial affine parameters and running statistics, so that eval and train mode differ."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(3)


def buffers(model, prefix=""):
    return {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in model.named_buffers()}


def state(model, prefix=""):
    return {f"{prefix}{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}


NETS = {
    # name: (block, layers, width, cifar stem, input shapes)
    "basic": (BasicBlock, [2, 1, 1, 1], 8, False, [[2, 3, 64, 64], [3, 3, 45, 37]]),
    "bottleneck": (Bottleneck, [1, 2, 1, 1], 4, True, [[2, 3, 32, 32], [3, 3, 20, 28]]),
}

TRAIN = dict(
    block="basic", layers=[1, 1, 1, 1], width=8, cifar=True, out_dim=32, hidden=48, bottleneck=16,
    use_bn_in_head=True, norm_last_layer=True, batch=4, global_px=32, local_px=16, ncrops_local=2,
    # The official RN50 recipe's optimizer: SGD, momentum 0.9, lr 0.03 (batch-scaled), weight
    # decay 1e-4 constant; a clip low enough to bind.
    lr=0.03 * 4 / 256, min_lr=1e-6, wd=1e-4, momentum=0.996, clip=0.3, warmup_tt=0.04, tt=0.07,
    warmup_tt_epochs=1, epochs=2, iters_per_epoch=1, warmup_epochs=0, freeze_last_layer=1,
)


def forward_fixtures(out, gen):
    for name, (block, layers, width, cifar, shapes) in NETS.items():
        model = SmallResNet(block, layers, width, cifar)
        randomize_batch_norms(model, gen)
        save_file(state(model), os.path.join(out, f"{name}.safetensors"))
        if name == "basic":  # the released-backbone layout: a bare state_dict, torch.save'd
            torch.save(model.state_dict(), os.path.join(out, f"{name}.pth"))
        io = {}
        for i, shape in enumerate(shapes):
            x = torch.randn(*shape, generator=gen)
            io[f"x{i}"] = x
            model.eval()
            with torch.no_grad():
                io[f"x{i}.eval"] = model(x)
            trained = SmallResNet(block, layers, width, cifar)
            trained.load_state_dict(model.state_dict())
            trained.train()
            with torch.no_grad():
                io[f"x{i}.train"] = trained(x)
            io.update(buffers(trained, f"x{i}.after_train."))
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, f"{name}_io.safetensors"))


def shapes_fixture(out):
    shapes = {}
    for arch in ["resnet18", "resnet34", "resnet50"]:
        model = torchvision.models.__dict__[arch]()
        model.fc = nn.Identity()
        shapes[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(out, "resnet_shapes.json"), "w") as f:
        json.dump(shapes, f, indent=0, sort_keys=True)


def train_fixture(out, gen, dino):
    sys.path.insert(0, dino)
    import utils  # noqa: E402  (the official utils.py)
    from main_dino import DINOLoss  # noqa: E402
    from vision_transformer import DINOHead  # noqa: E402

    c = TRAIN
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[c["block"]]
    student = SmallResNet(block, c["layers"], c["width"], c["cifar"])
    teacher = SmallResNet(block, c["layers"], c["width"], c["cifar"])
    embed_dim = 8 * c["width"] * block.expansion
    head = lambda: DINOHead(embed_dim, c["out_dim"], use_bn=c["use_bn_in_head"],  # noqa: E731
                            norm_last_layer=c["norm_last_layer"], hidden_dim=c["hidden"],
                            bottleneck_dim=c["bottleneck"])
    student = utils.MultiCropWrapper(student, head())
    teacher = utils.MultiCropWrapper(teacher, head())
    # main_dino.py converts BatchNorm to SyncBatchNorm, which with one process is BatchNorm. The
    # teacher starts as the student (buffers included) and is never put in eval mode.
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ncrops = 2 + c["ncrops_local"]
    its = c["epochs"] * c["iters_per_epoch"]
    dino_loss = DINOLoss(c["out_dim"], ncrops, c["warmup_tt"], c["tt"], c["warmup_tt_epochs"], c["epochs"])
    optimizer = torch.optim.SGD(utils.get_params_groups(student), lr=0, momentum=0.9)
    lr = utils.cosine_scheduler(c["lr"], c["min_lr"], c["epochs"], c["iters_per_epoch"], c["warmup_epochs"])
    wd = utils.cosine_scheduler(c["wd"], c["wd"], c["epochs"], c["iters_per_epoch"])
    momentum = utils.cosine_scheduler(c["momentum"], 1, c["epochs"], c["iters_per_epoch"])

    fx = state(student, "init.")
    for it in range(its):
        epoch = it // c["iters_per_epoch"]
        for i, g in enumerate(optimizer.param_groups):  # train_one_epoch, as written
            g["lr"] = lr[it]
            if i == 0:
                g["weight_decay"] = wd[it]
        sizes = [c["global_px"]] * 2 + [c["local_px"]] * c["ncrops_local"]
        images = [torch.randn(c["batch"], 3, s, s, generator=gen) for s in sizes]
        teacher_output = teacher(images[:2])
        student_output = student(images)
        loss = dino_loss(student_output, teacher_output, epoch)
        optimizer.zero_grad()
        loss.backward()
        norms = utils.clip_gradients(student, c["clip"])
        utils.cancel_gradients_last_layer(epoch, student, c["freeze_last_layer"])
        optimizer.step()
        with torch.no_grad():
            m = momentum[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        for i, img in enumerate(images):
            fx[f"iter{it}.crop{i}"] = img
        fx[f"iter{it}.loss"] = loss.detach().reshape(1)
        fx[f"iter{it}.grad_norms_before_clip"] = torch.tensor(norms)
        fx[f"iter{it}.center_after"] = dino_loss.center.clone()
        fx[f"iter{it}.lr"] = torch.tensor([lr[it]], dtype=torch.float64)
        fx[f"iter{it}.wd"] = torch.tensor([wd[it]], dtype=torch.float64)
        fx[f"iter{it}.momentum"] = torch.tensor([momentum[it]], dtype=torch.float64)
        fx[f"iter{it}.teacher_temp"] = torch.tensor([dino_loss.teacher_temp_schedule[epoch]], dtype=torch.float64)
        fx.update(state(student, f"iter{it}.student."))
        fx.update(state(teacher, f"iter{it}.teacher."))
    save_file({k: v.contiguous() for k, v in fx.items()}, os.path.join(out, "train_steps.safetensors"))
    # The checkpoint main_dino.py writes after the last iteration: both networks are
    # DistributedDataParallel there (a ResNet has BatchNorm), so every key starts with `module.`;
    # `args` is its argparse Namespace.
    ddp = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    args = argparse.Namespace(arch="resnet18", optimizer="sgd", use_bn_in_head=True, out_dim=c["out_dim"],
                              lr=c["lr"], batch_size_per_gpu=c["batch"], epochs=c["epochs"])
    torch.save({"student": ddp(student), "teacher": ddp(teacher), "optimizer": optimizer.state_dict(),
                "epoch": c["epochs"], "args": args, "dino_loss": dino_loss.state_dict()},
               os.path.join(out, "checkpoint.pth"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dino", required=True, help="a checkout of facebookresearch/dino (commit 7c446df)")
    ap.add_argument("--out", default="fixtures/resnet-reference")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # DINOLoss.update_center all-reduces: one process.
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    forward_fixtures(args.out, gen)
    shapes_fixture(args.out)
    train_fixture(args.out, gen, os.path.abspath(args.dino))
    manifest = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "nets": {k: dict(block=v[0].__name__, layers=v[1], width=v[2], cifar_stem=v[3], inputs=v[4])
                 for k, v in NETS.items()},
        "train": TRAIN,
        "files": {
            "<net>.safetensors": "state_dict of each small torchvision ResNet (fc = Identity), random weights, "
                                 "BatchNorm weight/bias/running stats randomised, num_batches_tracked 3; "
                                 "basic.pth is the same state_dict torch.save'd",
            "<net>_io.safetensors": "x<i> inputs; x<i>.eval = model.eval()(x); x<i>.train = a copy in train "
                                    "mode; x<i>.after_train.<buffer> = that copy's buffers after the one "
                                    "forward (momentum 0.1, unbiased variance)",
            "resnet_shapes.json": "key -> shape of torchvision resnet18/34/50 with fc = Identity",
            "checkpoint.pth": "main_dino.py's save_dict after the last iteration: student and teacher "
                              "state_dicts with DDP's module. prefix, optimizer, epoch, args (a Namespace), "
                              "dino_loss (the center); the networks equal the last iteration's in "
                              "train_steps.safetensors",
            "train_steps.safetensors": "init.<key>: student = teacher start (MultiCropWrapper keys, buffers "
                                       "included); per iteration: crops, loss, grad_norms_before_clip "
                                       "(named_parameters order), center_after, the schedules' lr/wd/momentum/"
                                       "teacher_temp, and student.<key>/teacher.<key> (parameters and buffers) "
                                       "after the SGD step and the EMA of parameters()",
        },
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    dist.destroy_process_group()
    if os.path.exists(store):  # gloo may have removed it
        os.unlink(store)


if __name__ == "__main__":
    main()
