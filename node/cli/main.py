"""Command-line parsing for main.py: subcommands and the original node flags, each error one line, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chain.checkpoint import Checkpoint, CheckpointError
from chain.keys import NodeKey
from chain.verify import VerificationError, verify_chain

if TYPE_CHECKING:
    from node.engine.recompute import RecomputeReport
    from storage.store import LedgerStore


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


# Errors a user causes and can fix (bad flags, settings, data, files, an unreachable database): one line, exit 2.
# Each is looked up only if its module was imported, since only then can it have been raised.
USER_ERRORS = (("config", "ConfigError"), ("fl.data", "DataError"), ("fl.partition", "PartitionError"),
               ("chain.checkpoint", "CheckpointError"), ("chain.keys", "KeyFileError"),
               ("storage.engine", "StorageUnavailable"), ("node.sim.simulator", "ResumeMismatch"),
               ("node.engine.traces", "TraceError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    return (UsageError, *(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules))


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="walk a ledger and check every hash, link, signature and model")
    p.add_argument("--db", required=True, help="ledger URL (sqlite:///PATH or mysql+pymysql://...)")
    p.add_argument("--checkpoint", help="signed head checkpoint file written by the node")
    p.add_argument("--skip-models", action="store_true", help="skip the second pass that re-hashes stored weights")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--recompute", action="store_true",
                   help="then re-run every block's aggregation rule over its recorded updates (--record-updates) "
                        "and check the model comes out bit for bit")


def cmd_verify(args: argparse.Namespace) -> int:
    from node.ledger import KEY_FILE
    from storage.store import LedgerStore
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint = Checkpoint.read(args.checkpoint)
        except CheckpointError as exc:
            raise UsageError(str(exc)) from exc
    # The checkpoint's own node may sign it without being a proposer or co-signer: trust the key stored beside it.
    own_keys = []
    if args.checkpoint and (Path(args.checkpoint).parent / KEY_FILE).exists():
        own_keys.append(NodeKey.load_or_create(Path(args.checkpoint).parent / KEY_FILE).public_hex)
    if args.db.startswith("sqlite:///") and not Path(args.db[len("sqlite:///"):]).exists():
        raise UsageError(f"no ledger database at {args.db[len('sqlite:///'):]}; check --db")
    store = LedgerStore(args.db)
    recomputed: RecomputeReport | str | None = None
    try:
        report = verify_chain(store, check_models=not args.skip_models, checkpoint=checkpoint,
                              checkpoint_keys=own_keys)
        if args.recompute:
            recomputed = _recompute(store)
    except VerificationError as exc:
        if args.json:
            print(json.dumps({"ok": False, "height": exc.height, "check": exc.check, "detail": exc.detail}))
        else:
            print(f"FAIL at height {exc.height}: {exc.check} check failed: {exc.detail}")
        return 1
    finally:
        store.close()
    if args.json:
        result: dict[str, object] = {"ok": True, "head_height": report.head_height, "head_hash": report.head_hash,
                                     "blocks": report.blocks, "records": report.records,
                                     "models_checked": report.models_checked}
        if isinstance(recomputed, str):
            result.update(ok=False, check="recompute", detail=recomputed)
        elif recomputed is not None:
            result["recompute"] = {"blocks": recomputed.blocks, "skipped": recomputed.skipped,
                                   "seconds": round(recomputed.seconds, 3)}
        print(json.dumps(result))
    else:
        print(f"OK: {report.blocks} blocks, {report.records} update records, {report.models_checked} models "
              f"checked; head height {report.head_height} hash {report.head_hash}")
        if recomputed is not None and not isinstance(recomputed, str):
            print(f"recompute: {recomputed.blocks} blocks re-aggregated from their recorded updates bit for bit "
                  f"({recomputed.skipped} without recorded updates) in {recomputed.seconds:.1f} s")
    if isinstance(recomputed, str):
        print(f"recompute FAILED: {recomputed}", file=sys.stderr)
        return 1
    return 0


def _recompute(store: LedgerStore) -> RecomputeReport | str:
    """Every block re-aggregated from its recorded updates: the report, or the error naming the first height whose
    model does not reproduce."""
    from node.engine.recompute import RecomputeError, recompute_chain
    try:
        return recompute_chain(store)
    except RecomputeError as exc:
        return str(exc)


def _add_fl_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override config.py settings; None means "not given", so file and environment still apply."""
    p.add_argument("--config", help="TOML or JSON config file")
    p.add_argument("--data-root", dest="data_root", help="this run's own directory (key, default database, outputs)")
    p.add_argument("--db", help="ledger URL (default: SQLite file in --data-root)")
    p.add_argument("--dataset", help="mnist | cifar (mnist without --data-dir: offline 5,000-image sample)")
    p.add_argument("--data-dir", dest="data_dir", help="folder with the standard dataset files")
    p.add_argument("--download", action="store_true", default=None, help="download the dataset (needs internet)")
    p.add_argument("--model", help="auto | cnn | 2nn | cifar-cnn")
    p.add_argument("--algo", help="fedavg | fedper")
    p.add_argument("--clients", type=int, help="number of clients")
    p.add_argument("--rounds", type=int, help="total number of rounds (a resumed run continues up to it)")
    p.add_argument("--fraction", type=float, help="client fraction C per round")
    p.add_argument("--partition", help="iid | shards | dirichlet")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (> 0)")
    p.add_argument("--shards-per-client", dest="shards_per_client", type=int)
    p.add_argument("--local-test-fraction", dest="local_test_fraction", type=float,
                   help="share of each client's data held out for personalised evaluation")
    p.add_argument("--local-epochs", dest="local_epochs", type=int, help="local epochs E")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="local batch size B")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--momentum", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (0: all cores)")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--reproducible", action="store_true", default=None,
                   help="logical block timestamps, so the same seed gives the same block hashes")
    p.add_argument("--aggregate", metavar="RULE",
                   help="fedavg | median | trimmed-mean[:beta=B] | multi-krum[:f=F,m=M] | clip:norm=C, "
                        "clip combines: clip:norm=5+median (default fedavg)")
    p.add_argument("--max-update-norm", dest="max_update_norm", type=float, metavar="C",
                   help="refuse an update farther than C (L2) from the round's base model")
    p.add_argument("--record-updates", dest="record_updates", action="store_true", default=None,
                   help="store every update with its block, for verify --recompute")
    p.add_argument("--scenario", metavar="FILE",
                   help="scenario TOML: devices, links, availability, deadline and over-commitment of the edge "
                        "network (README, Scenarios); flags override its [network] sizes")
    p.add_argument("--host-gflops", dest="host_gflops", type=float, metavar="G",
                   help="this machine's training rate (GFLOP/s) for the scenario's devices given relative to it "
                        "({ speed = S }); measured when not given, and printed")


def _add_attack_flag(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument("--attack", metavar="NAME",
                   help="NAME[:key=value,...], one of label-flip, sign-flip[:scale=S], scale[:factor=K], "
                        f"noise[:sigma=S], nan, free-ride, stale, alie[:z=Z,n=N]; {who}")


def _add_attackers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attackers", type=float, metavar="FRACTION",
                   help="share of edge nodes that run --attack, drawn from --seed and printed (default 0)")


FL_KEYS = ("data_root", "db", "dataset", "data_dir", "download", "model", "algo", "clients", "rounds", "fraction",
           "partition", "alpha", "shards_per_client", "local_test_fraction", "local_epochs", "batch_size", "lr",
           "momentum", "seed",
           "threads", "device", "reproducible", "aggregate", "max_update_norm", "record_updates", "scenario",
           "host_gflops")
# simulate and cluster: also an attack, the share running it, and overlapping shares
RUN_KEYS = FL_KEYS + ("attack", "attackers", "share_size")


def config_from(args: argparse.Namespace, keys: Sequence[str] = FL_KEYS):
    from config import ConfigError, load_config
    try:
        return load_config(args.config, flags={k: getattr(args, k) for k in keys if hasattr(args, k)})
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _simulate_parser(sub) -> None:
    p = sub.add_parser("simulate", help="in-process federated run: N clients, every round a signed block")
    _add_fl_flags(p)
    p.add_argument("--out", help="folder for metrics.csv, metrics.json and plot.svg (default DATA_ROOT/out)")
    p.add_argument("--fresh", action="store_true", help="discard the ledger in --db and start a new chain")
    p.add_argument("--json", action="store_true", help="end with one JSON line summarising the run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sn", type=int,
                   help="super nodes simulated in this process (default 1, or the scenario's); edge node i belongs "
                        "to super node i mod K")
    p.add_argument("--share-size", dest="share_size", type=int, metavar="N",
                   help="each client draws N training images of its own, seeded; shares overlap (1,000 clients of "
                        "40 images from the 4,000 of the offline sample), instead of --partition's disjoint split")
    _add_attack_flag(p, "run by the --attackers share of the edge nodes")
    _add_attackers_flag(p)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fl.server import RoundFailed
    from node.engine.errors import NoMajorityError
    from node.sim.simulator import simulate
    from storage.writer import WriterFailed
    cfg = config_from(args, RUN_KEYS)
    cfg, args.sn = with_scenario_sizes(cfg, args.clients, args.sn, 1)
    if args.sn < 1:
        raise UsageError(f"--sn must be at least 1, got {args.sn}")
    if args.sn > cfg.clients:
        raise UsageError(f"--sn {args.sn} super nodes need at least as many clients; got --clients {cfg.clients}")
    out = args.out or str(Path(cfg.data_root) / "out")
    try:
        result = simulate(cfg, fresh=args.fresh, out_dir=out, progress=not args.no_progress, super_nodes=args.sn)
    except (RoundFailed, NoMajorityError, WriterFailed) as exc:
        print(f"simulation stopped: {exc}; the chain keeps every block before it (rerun to resume)", file=sys.stderr)
        return 1
    if "sim_time_s" in result:
        print(f"simulated time: {result['sim_time_s']:.1f} s over {result['rounds_run']} rounds; "
              f"{result['dropped']} edge node rounds dropped; timeline in {out}")
    print(f"done: {result['rounds_run']} rounds in {result['wall_s']:.1f} s; final accuracy "
          f"{_pct(result['final_accuracy'])}; head height {result['head_height']} hash {result['head_hash']}; "
          f"metrics and plot in {out}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def with_scenario_sizes(cfg, clients: int | None, supernodes: int | None, default_sn: int):
    """(config, super nodes) with a scenario's [network] sizes where the flags gave none; a scenario describing
    fewer edge nodes than the run has is refused."""
    from dataclasses import replace

    from config import ConfigError
    if cfg.scenario is None:
        return cfg, supernodes if supernodes is not None else default_sn
    from node.engine.scenario import load_scenario
    try:
        scenario = load_scenario(cfg.scenario)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    cfg = replace(cfg, clients=scenario.edge_nodes if clients is None else clients,
                  scenario=str(Path(cfg.scenario).resolve()))
    if cfg.clients > scenario.edge_nodes:
        raise UsageError(f"{cfg.clients} edge nodes, but the scenario {cfg.scenario} describes {scenario.edge_nodes}; "
                         "raise [network] edge_nodes there or pass fewer")
    return cfg, supernodes if supernodes is not None else scenario.super_nodes


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


NODE_KEYS = FL_KEYS + ("ip", "port", "advertise", "entry", "node_type", "is_entry", "partition_index",
                       "partition_count", "hosted_edges", "heartbeat_s", "dead_after_s", "max_edges_per_sn",
                       "round_timeout_s", "retry_for_s", "shape_links",
                       "secure", "insecure", "join", "join_port", "join_address", "attack")


def _node_parser(sub) -> None:
    p = sub.add_parser("node", help="run a super node (SN) or edge node (EN); also `main.py --port P --nt SN ...`")
    _add_node_flags(p)


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    _add_fl_flags(p)
    p.add_argument("--nt", dest="node_type", choices=("SN", "EN"), help="node type: SN (super) or EN (edge)")
    p.add_argument("--port", type=int, help="port to serve on (0: any free port)")
    p.add_argument("--ip", help="address to bind (default 127.0.0.1; 0.0.0.0 needs --advertise)")
    p.add_argument("--advertise", help="HOST:PORT peers use to reach this node")
    p.add_argument("--entry", help="HOST:PORT of the entry super node")
    p.add_argument("-z", "--zero", dest="is_entry", action="store_true", default=None,
                   help="this SN is the entry: it creates the genesis block and keeps the SN registry")
    p.add_argument("--partition-index", dest="partition_index", type=int, help="EN: which share i of n")
    p.add_argument("--partition-count", dest="partition_count", type=int, help="EN: into how many shares")
    p.add_argument("--hosted-edges", dest="hosted_edges", type=int,
                   help="EN: host this many edge nodes in one process (shares i..i+n-1, one port each, data in "
                        "DATA_ROOT/edge-<share>); they share the dataset and one model in memory")
    p.add_argument("--heartbeat", dest="heartbeat_s", type=float, help="seconds between heartbeats")
    p.add_argument("--dead-after", dest="dead_after_s", type=float, help="drop members silent this long")
    p.add_argument("--round-timeout", dest="round_timeout_s", type=float,
                   help="seconds a round may take before its calls are cut and another validator takes over "
                        "(default: derived from the model and the training settings)")
    p.add_argument("--retry-for", dest="retry_for_s", type=float,
                   help="seconds a failing round is retried before training stops (default 300; 0: never)")
    p.add_argument("--max-edges", dest="max_edges_per_sn", type=int, help="SN: edge nodes it accepts at most")
    p.add_argument("--secure", action="store_true", default=None,
                   help="secure mode: mutual TLS, admission by join token (default when binding a non-loopback "
                        "address, and once a node has a certificate)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow open mode on a non-loopback address (anyone who reaches it controls the network)")
    p.add_argument("--join", help="join token, or @FILE holding one (first start of a node in secure mode)")
    p.add_argument("--join-port", dest="join_port", type=int, help="entry: port serving joins (default: port + 1)")
    p.add_argument("--join-address", dest="join_address",
                   help="HOST:PORT of the entry's join port (default: the --entry port + 1)")
    p.add_argument("--no-link-shaping", dest="shape_links", action="store_false", default=None,
                   help="under --scenario, pace compute only and leave the links to the kernel (tc tbf)")
    _add_attack_flag(p, "an edge node given --attack runs it on every edge node it hosts")


def cmd_node(args: argparse.Namespace) -> int:
    from node.process.launch import run_node
    cfg = config_from(args, NODE_KEYS)
    if args.attack is not None and cfg.node_type != "EN":
        raise UsageError("--attack is for edge nodes: add --nt EN, or leave --attack out on a super node")
    return run_node(cfg)


def _cluster_parser(sub) -> None:
    p = sub.add_parser("cluster", help="start SNs and ENs as local processes, train, verify, shut down")
    _add_fl_flags(p)
    p.add_argument("--sn", type=int, help="number of super nodes (default 2, or the scenario's)")
    p.add_argument("--en", type=int, help="number of edge nodes (default 4, or the scenario's)")
    p.add_argument("--en-per-process", type=int, default=1,
                   help="host this many edge nodes in each EN process (default 1: one process each)")
    p.add_argument("--json", action="store_true", help="end with one JSON line summarising the run")
    p.add_argument("--insecure", action="store_true",
                   help="run the cluster in open mode (no TLS, no join tokens) instead of secure mode")
    _add_attack_flag(p, "run by the edge nodes of the --attackers share (attacking shares get processes of "
                        "their own)")
    _add_attackers_flag(p)


def cmd_cluster(args: argparse.Namespace) -> int:
    from node.cli.cluster import ClusterError, run_cluster
    cfg = config_from(args, RUN_KEYS)
    cfg, args.sn = with_scenario_sizes(cfg, args.en, args.sn, 2)
    if args.en is None:
        args.en = cfg.clients if cfg.scenario is not None else 4
    if args.sn < 1 or args.en < 1 or args.en_per_process < 1:
        raise UsageError("a cluster needs at least one super node (--sn) and one edge node (--en), "
                         "and --en-per-process of at least 1")
    if cfg.scenario is not None and cfg.host_gflops is None:
        from node.run import RunContext
        ctx = RunContext(cfg)
        if ctx.scenario is not None and ctx.scenario.needs_host_rate:   # every node times against one rate
            from dataclasses import replace
            cfg = replace(cfg, host_gflops=ctx.host_gflops())
            print(f"this machine trains the model at {cfg.host_gflops:.2f} GFLOP/s (pin it with --host-gflops)")
    try:
        result = run_cluster(cfg, args.sn, args.en, args.rounds or cfg.rounds,
                             edges_per_process=args.en_per_process, secure=not args.insecure)
    except ClusterError as exc:
        print(f"cluster failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def _traces_parser(sub) -> None:
    from node.cli.traces import register
    register(sub)


def cmd_traces(args: argparse.Namespace) -> int:
    from node.cli.traces import cmd_traces as run_traces
    return run_traces(args)


COMMANDS = {"verify": (_verify_parser, cmd_verify), "simulate": (_simulate_parser, cmd_simulate),
            "node": (_node_parser, cmd_node), "cluster": (_cluster_parser, cmd_cluster),
            "traces": (_traces_parser, cmd_traces)}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become one-line UsageErrors (exit 2) instead of usage dumps."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="main.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def run(argv: Sequence[str]) -> int:
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        parser = build_parser()
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            argv = ["node", *argv]    # the original project's form: main.py --port 8080 --nt SN --entry H:P -z
        args = parser.parse_args(list(argv))
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command][1](args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise   # a bug: its traceback is what a report needs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
