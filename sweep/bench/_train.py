"""``python -m sweep bench train``: the engine's training throughput against a reference loop
written the way the public backdoor toolkits train (torch DataLoader + torchvision transforms on
CPU worker processes, fp32, contiguous memory), same model, same batch size, same run.

A benchmark, not a test: it prints figures and asserts nothing.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from trainables.data import load_dataset
from trainables.data.base import ImageSet
from trainables.engine import SGDConfig, pick_runtime, prepare, train
from trainables.models import build_model


class _PILDataset(torch.utils.data.Dataset):
    """uint8 tensors served as PIL images through torchvision transforms, per sample."""

    def __init__(self, data: ImageSet):
        from torchvision import transforms
        self.x, self.y = data.x.permute(0, 2, 3, 1).numpy(), data.y.numpy()
        self.tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                      transforms.ToTensor()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def reference_ips(model, data: ImageSet, batch_size: int, device: torch.device, workers: int) -> float:
    loader = torch.utils.data.DataLoader(_PILDataset(data), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1:                  # the first batches pay worker start-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        elif start is not None:
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def engine_ips(model_name: str, data: ImageSet, ds, batch_size: int, rt) -> float:
    torch.manual_seed(0)
    model = prepare(build_model(model_name, ds.num_classes, ds.mean, ds.std), rt)
    warm = ImageSet(data.x[: 4 * batch_size], data.y[: 4 * batch_size])
    train(model, warm, SGDConfig(epochs=1, lr=0.01, batch_size=batch_size), rt, seed=0)
    hist = train(model, data, SGDConfig(epochs=1, lr=0.01, batch_size=batch_size, schedule="constant"), rt, seed=1)
    return hist[0]["images_per_second"]


def bench_train(model_name: str = "wrn-16-1", images: int = 5120, batch_size: int = 128,
                workers: int | None = None, dataset: str = "synthetic") -> dict:
    rt = pick_runtime()
    ds = load_dataset(dataset if dataset != "synthetic" else f"synthetic:{images}:100")
    n = min(images, len(ds.train))
    data = ImageSet(ds.train.x[:n], ds.train.y[:n])
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    eng = engine_ips(model_name, data, ds, batch_size, rt)
    torch.manual_seed(0)
    ref_model = build_model(model_name, ds.num_classes, ds.mean, ds.std).to(rt.device)
    ref = reference_ips(ref_model, data, batch_size, rt.device, workers)
    return {"model": model_name, "device": str(rt.device), "engine_runtime": rt.description,
            "images": n, "batch_size": batch_size, "reference_workers": workers,
            "engine_ips": eng, "reference_ips": ref, "ratio": eng / ref}


def main(args) -> int:
    r = bench_train(args.model, args.images, args.batch_size, args.workers, args.dataset)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"model {r['model']}, batch {r['batch_size']}, {r['images']} images, device {r['device']}")
        print(f"engine    ({r['engine_runtime']}): {r['engine_ips']:8.0f} images/s")
        print(f"reference (DataLoader, {r['reference_workers']} workers, fp32): {r['reference_ips']:8.0f} images/s")
        print(f"ratio: {r['ratio']:.2f}x")
    return 0
