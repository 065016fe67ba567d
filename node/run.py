"""What a run is, built from its Config, for the simulator and the network alike: data shares, the seeded initial
model, the strategy, the run's ledger parameters, timestamps, the edge nodes and global evaluation."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from chain.keys import NodeKey
from chain.updates import AGGREGATE
from config import Config, ConfigError, local_test_fraction
from fl.aggregate import Weights
from fl.attacks import Attack, Coalition, Trainer, choose_attackers, parse_attack
from fl.cost import measure_gflops, train_flops_per_sample
from fl.data import Dataset, load_dataset
from fl.local import InProcessParticipant, Workbench
from fl.models import build_model, default_model_for
from fl.participant import FitIns, FitRes
from fl.partition import local_split, partition
from fl.robust import parse_rule
from fl.strategy import FedAvg, make_strategy
from fl.train import evaluate as evaluate_model
from fl.weights import load_numpy, state_to_numpy
from node.engine.clock import VirtualClock
from node.engine.edge import EdgeCore
from node.engine.scenario import Scenario, load_scenario
from node.engine.types import Plan

HOST_GFLOPS = "host_gflops"   # genesis params: the machine rate a scenario's relative devices were timed against


def configure_torch(cfg: Config) -> str:
    """Threads and device for this process; returns the device name."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return cfg.device


def model_name(cfg: Config) -> str:
    return default_model_for(cfg.dataset) if cfg.model == "auto" else cfg.model


def strategy_for(cfg: Config) -> FedAvg:
    return make_strategy(cfg.algo, lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                         momentum=cfg.momentum, fraction=cfg.fraction, seed=cfg.seed)


def initial_model(cfg: Config, dataset: Dataset) -> torch.nn.Module:
    """The round-0 model, initialised from the run's seed so every node and every rerun agrees."""
    torch.manual_seed(cfg.seed)
    return build_model(model_name(cfg), dataset.num_classes, dataset.input_shape)


def client_shares(cfg: Config, dataset: Dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every client's (train indices, local test indices), seeded by the run's seed."""
    if cfg.share_size is not None:   # overlapping shares: each client draws its own images (1,000 x 40 of 4,000)
        total = len(dataset.train_y)
        if cfg.share_size > total:
            raise ConfigError(f"--share-size {cfg.share_size} is more than the {total} training images")
        parts = [np.sort(np.random.default_rng([cfg.seed, i, 0x5A]).choice(total, cfg.share_size, replace=False))
                 for i in range(count)]
    else:
        parts = partition(dataset.train_y.numpy(), count, cfg.partition, cfg.seed, alpha=cfg.alpha,
                          shards_per_client=cfg.shards_per_client)
    holdout = local_test_fraction(cfg)
    return [local_split(idx, holdout, cfg.seed + i) for i, idx in enumerate(parts)]


def run_params(cfg: Config, strategy: FedAvg, data_source: str, super_nodes: int = 1) -> dict[str, str]:
    """What fixes a run; stored in the genesis block so a resumed run can check it continues the same one.
    ``super_nodes`` is recorded only when above 1, so a one-super-node chain keeps the parameters it always had."""
    params = dict(strategy.params())
    params.update(dataset=cfg.dataset, data=data_source, model=model_name(cfg), partition=cfg.partition,
                  alpha=repr(cfg.alpha), shards_per_client=str(cfg.shards_per_client), clients=str(cfg.clients),
                  local_test_fraction=repr(local_test_fraction(cfg)))
    if super_nodes > 1:
        params["super_nodes"] = str(super_nodes)
    # Recorded only when they differ from plain FedAvg, so chains without them keep the parameters they had.
    rule = parse_rule(cfg.aggregate).spec()
    if rule != "fedavg":
        params[AGGREGATE] = rule
    if cfg.max_update_norm is not None:
        params["max_update_norm"] = repr(cfg.max_update_norm)
    if cfg.share_size is not None:
        params["share_size"] = str(cfg.share_size)
    return params


def timestamp(cfg: Config, round: int) -> int:
    """A block's timestamp: logical (round x 1000 ms) with --reproducible, so equal runs give equal hashes."""
    return round * 1000 if cfg.reproducible else int(time.time() * 1000)


def attacker_shares(cfg: Config, share_count: int, first_share: int, count: int) -> list[int]:
    """The data shares whose edge nodes attack: none without --attack; in the simulator (--attackers F) a share F of
    all of them, drawn from the run's seed; an edge node process given --attack attacks with every share it hosts."""
    if cfg.attack is None:
        return []
    if cfg.attackers > 0:
        return choose_attackers(cfg.seed, share_count, cfg.attackers)
    return list(range(first_share, first_share + count))


def _honest(participant: InProcessParticipant) -> Trainer:
    """The participant's honest fit as an attack's Trainer (whose third argument is the label map, not fit's
    ``cancel``)."""
    def train(weights: Weights, ins: FitIns, label_map: np.ndarray | None) -> FitRes:
        return participant.fit(weights, ins, label_map=label_map)
    return train


def edge_cores(cfg: Config, keys: Sequence[NodeKey], first_share: int, share_count: int,
               device: str = "cpu") -> tuple[list[EdgeCore], Workbench, Dataset]:
    """Edge nodes for shares ``first_share`` .. ``+len(keys)-1`` of ``share_count``: the data and initial model the
    simulator gives those clients, all seeded by ``cfg.seed``. They share one dataset in memory and train in turn
    on one model (the returned Workbench)."""
    if first_share < 0 or first_share + len(keys) > share_count:
        raise ConfigError(f"data shares {first_share}..{first_share + len(keys) - 1} are outside 0..{share_count - 1}")
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    if share_count > len(dataset.train_y) and cfg.share_size is None:
        raise ConfigError(f"{share_count} clients but only {len(dataset.train_y)} training samples; "
                         "use fewer --clients, or --share-size N for overlapping shares")
    shares = client_shares(cfg, dataset, share_count)
    model = initial_model(cfg, dataset)
    shared = strategy_for(cfg).shared_keys(model)
    state = state_to_numpy(model)
    personal = {k: state[k] for k in state if k not in set(shared)} or None
    bench = Workbench(model, device)
    cores = [EdgeCore(InProcessParticipant(f"client-{first_share + i:03d}", dataset, *shares[first_share + i], bench,
                                           shared, personal), key, share=first_share + i)
             for i, key in enumerate(keys)]
    specs = {share: cfg.attack for share in attacker_shares(cfg, share_count, first_share, len(keys))
             if cfg.attack is not None}
    if cfg.scenario:   # a scenario's [[edges]] attack entries, by data share
        scenario = load_scenario(cfg.scenario)
        specs.update({i: e.attack for i, e in enumerate(scenario.edges) if e.attack is not None})
    coalition = Coalition(share_count, cfg.seed)   # this process's colluding attackers (ALIE pools their updates)
    for core in cores:
        spec = specs.get(core.share) if core.share is not None else None
        if spec is not None:
            assert core.share is not None
            core.attack = Attack(parse_attack(spec), coalition, share=core.share)
            coalition.join(_honest(core.participant), core.share)
    return cores, bench, dataset


class RunContext:
    """The proposer's view of the run: strategy, parameters, the genesis model and global evaluation. The dataset
    and an evaluation model are loaded on first use unless given (the simulator shares its own)."""

    def __init__(self, cfg: Config, *, dataset: Dataset | None = None, workbench: Workbench | None = None,
                 super_nodes: int = 1, personal_layers: Callable[[], Weights | None] | None = None):
        self.cfg = cfg
        self.strategy = strategy_for(cfg)
        self.super_nodes = super_nodes
        # The simulator can see every client's personal layers and evaluates FedPer's global model with their
        # mean; on the network they never leave the edge nodes, so FedPer has no global evaluation there.
        self.personal_layers = personal_layers
        self._lock = threading.Lock()
        self._dataset = dataset
        self._bench = workbench
        # A scenario's conditions and the virtual clock that plans its rounds (node.engine.clock); None without one.
        self.scenario: Scenario | None = load_scenario(cfg.scenario) if cfg.scenario else None
        if cfg.host_gflops is not None:
            self.pin_host_gflops(cfg.host_gflops)
        self._clock: VirtualClock | None = None

    @property
    def dataset(self) -> Dataset:
        with self._lock:
            if self._dataset is None:
                self._dataset = load_dataset(self.cfg.dataset, self.cfg.data_dir, self.cfg.download)
            return self._dataset

    @property
    def workbench(self) -> Workbench:
        dataset = self.dataset
        with self._lock:
            if self._bench is None:
                self._bench = Workbench(initial_model(self.cfg, dataset), "cpu")
            return self._bench

    def params(self) -> dict[str, str]:
        params = run_params(self.cfg, self.strategy, self.dataset.source, self.super_nodes)
        if self.scenario is not None:   # the conditions are part of what fixes a run
            params["scenario"] = self.scenario.digest
            if self.scenario.needs_host_rate:
                params[HOST_GFLOPS] = repr(self.host_gflops())
        return params

    def pin_host_gflops(self, value: float) -> None:
        """Use this machine rate (--host-gflops, or a resumed chain's from its genesis) for devices relative to it."""
        if self.scenario is not None:
            self.scenario = self.scenario.with_host_gflops(value)

    def host_gflops(self) -> float:
        """This machine's training rate for the run's model: pinned by the scenario or a resumed chain, else measured
        once (rounded to 0.01 GFLOP/s, the value recorded in the genesis block)."""
        assert self.scenario is not None
        if self.scenario.host_gflops is None:
            bench, data = self.workbench, self.dataset
            with bench.lock:
                rate = measure_gflops(bench.model, data.input_shape, data.num_classes, self.cfg.batch_size)
            self.scenario = self.scenario.with_host_gflops(round(rate, 2))
        assert self.scenario.host_gflops is not None
        return self.scenario.host_gflops

    def clock(self) -> VirtualClock | None:
        """The scenario's virtual clock (built on first use), None without a scenario."""
        if self.scenario is None:
            return None
        with self._lock:
            built = self._clock
        if built is None:
            if self.scenario.needs_host_rate:
                self.host_gflops()
            data = self.dataset
            flops = train_flops_per_sample(self.workbench.model, data.input_shape)
            built = VirtualClock(self.scenario, self.cfg.seed, flops, self.cfg.local_epochs, self.cfg.fraction)
            with self._lock:
                self._clock = built
        return built

    def plan(self) -> Plan:
        """The round instructions every super node follows: the strategy's, the aggregation rule, recording."""
        return Plan.of(self.strategy, parse_rule(self.cfg.aggregate).spec(), self.cfg.record_updates)

    def genesis_weights(self) -> Weights:
        """The shared keys of the seeded initial model (FedPer: base layers)."""
        model = initial_model(self.cfg, self.dataset)
        state = state_to_numpy(model)
        return {k: state[k] for k in self.strategy.shared_keys(model)}

    @property
    def personalised(self) -> bool:
        """Edge nodes keep personal layers (FedPer) or per-edge evaluation was asked for."""
        return self.strategy.name == "fedper" or self.cfg.eval_local

    def evaluate_global(self, shared: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Accuracy and loss on the global test set; {} when asked not to, or when the weights are not a whole
        model and no personal layers are visible (FedPer on the network)."""
        if not self.cfg.eval_global:
            return {}
        bench = self.workbench
        state = dict(shared)
        if set(state) != set(bench.keys):
            personal = self.personal_layers() if self.personal_layers is not None else None
            if personal is None:
                return {}
            state.update(personal)
        data = self.dataset
        with bench.lock:
            load_numpy(bench.model, state, strict_keys=True)
            m = evaluate_model(bench.model, data.test_x, data.test_y, device=bench.device)
        return {"accuracy": float(m["accuracy"]), "loss": float(m["loss"])}

    def timestamp(self, round: int) -> int:
        return timestamp(self.cfg, round)
