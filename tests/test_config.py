"""Settings: defaults, precedence file < env < flags, the original project's key names, and clear refusals."""
from __future__ import annotations

import json

import pytest

from config import Config, ConfigError, load_config


def write(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_defaults_without_file_env_or_flags():
    assert load_config(env={}) == Config()


def test_default_values_are_the_documented_ones():
    cfg = load_config(env={})
    assert (cfg.dataset, cfg.algo, cfg.clients, cfg.rounds, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.port,
            cfg.ip, cfg.eval_global, cfg.eval_local) == ("mnist", "fedavg", 10, 10, 1, 32, 0.05, 8080,
                                                         "127.0.0.1", True, False)


def test_file_overrides_defaults(tmp_path):
    assert load_config(write(tmp_path, "c.toml", "clients = 4\n"), env={}).clients == 4


def test_env_overrides_file(tmp_path):
    path = write(tmp_path, "c.toml", "clients = 4\n")
    assert load_config(path, env={"FLEDGER_CLIENTS": "6"}).clients == 6


def test_flags_override_env(tmp_path):
    path = write(tmp_path, "c.toml", "clients = 4\n")
    assert load_config(path, env={"FLEDGER_CLIENTS": "6"}, flags={"clients": 8}).clients == 8


def test_flag_set_to_none_leaves_the_lower_layer(tmp_path):
    assert load_config(env={"FLEDGER_CLIENTS": "6"}, flags={"clients": None}).clients == 6


ORIGINAL_TOML = """\
local_epoch = 3
local_OpenEval = true
gobal_epoch = 7
openEval = false
dataset = "cifar"
learn_rate = 0.01
BATCH_SIZE = 64

[client]
amount = 20
"""
ORIGINAL_EXPECTED = {"local_epochs": 3, "eval_local": True, "rounds": 7, "eval_global": False, "dataset": "cifar",
                     "lr": 0.01, "batch_size": 64, "clients": 20}


def _picked(cfg: Config) -> dict:
    return {key: getattr(cfg, key) for key in ORIGINAL_EXPECTED}


def test_original_keys_in_toml_with_nested_client_amount(tmp_path):
    assert _picked(load_config(write(tmp_path, "c.toml", ORIGINAL_TOML), env={})) == ORIGINAL_EXPECTED


def test_original_keys_in_toml_with_flat_quoted_client_amount(tmp_path):
    body = ORIGINAL_TOML.replace("\n[client]\namount = 20\n", "")
    body = body.replace("local_epoch", '"client.amount" = 20\nlocal_epoch')
    assert _picked(load_config(write(tmp_path, "c.toml", body), env={})) == ORIGINAL_EXPECTED


def test_original_keys_in_json_with_nested_client_amount(tmp_path):
    data = {"client": {"amount": 20}, "local_epoch": 3, "local_OpenEval": True, "gobal_epoch": 7, "openEval": False,
            "dataset": "cifar", "learn_rate": 0.01, "BATCH_SIZE": 64}
    assert _picked(load_config(write(tmp_path, "c.json", json.dumps(data)), env={})) == ORIGINAL_EXPECTED


def test_original_keys_in_json_with_flat_client_amount(tmp_path):
    data = {"client.amount": 20, "local_epoch": 3, "local_OpenEval": True, "global_epoch": 7, "openEval": False,
            "dataset": "cifar", "learn_rate": 0.01, "BATCH_SIZE": 64}
    assert _picked(load_config(write(tmp_path, "c.json", json.dumps(data)), env={})) == ORIGINAL_EXPECTED


def test_global_epoch_spelled_correctly_is_also_accepted(tmp_path):
    assert load_config(write(tmp_path, "c.toml", "global_epoch = 5\n"), env={}).rounds == 5


def test_integer_is_accepted_for_a_float_setting(tmp_path):
    assert load_config(write(tmp_path, "c.toml", "learn_rate = 1\n"), env={}).lr == 1.0


@pytest.mark.parametrize("name,body", [("c.toml", "bogus_key = 1\n"), ("c.json", '{"client": {"count": 3}}')])
def test_unknown_key_in_file_is_rejected_naming_the_key(tmp_path, name, body):
    key = "bogus_key" if name.endswith("toml") else "client.count"
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, name, body), env={})


@pytest.mark.parametrize("body,key", [('local_epoch = "three"\n', "local_epoch"), ("openEval = 1\n", "openEval"),
                                      ("BATCH_SIZE = 3.5\n", "BATCH_SIZE"), ('dataset = 5\n', "dataset")])
def test_wrong_type_in_file_is_rejected_naming_the_key(tmp_path, body, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, "c.toml", body), env={})


@pytest.mark.parametrize("flags,key", [({"clients": "4"}, "clients"), ({"nonsense": 1}, "nonsense")])
def test_bad_flag_is_rejected_naming_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        load_config(env={}, flags=flags)


@pytest.mark.parametrize("env,var", [({"FLEDGER_CLIENTS": "many"}, "FLEDGER_CLIENTS"),
                                     ({"FLEDGER_EVAL_GLOBAL": "maybe"}, "FLEDGER_EVAL_GLOBAL"),
                                     ({"FLEDGER_NOT_A_SETTING": "1"}, "FLEDGER_NOT_A_SETTING")])
def test_bad_env_var_is_rejected_naming_the_variable(env, var):
    with pytest.raises(ConfigError, match=var):
        load_config(env=env)


def test_env_values_are_parsed_to_their_types():
    cfg = load_config(env={"FLEDGER_LR": "0.2", "FLEDGER_EVAL_LOCAL": "yes", "FLEDGER_DB": "", "FLEDGER_PORT": "9"})
    assert (cfg.lr, cfg.eval_local, cfg.db, cfg.port) == (0.2, True, None, 9)


def test_variables_without_the_prefix_are_ignored():
    assert load_config(env={"CLIENTS": "3", "HOME": "/root"}) == Config()


def test_test_harness_variables_are_not_taken_for_settings():
    env = {"FLEDGER_TEST_MYSQL_URL": "mysql+pymysql://root:@127.0.0.1:3306/x", "FLEDGER_REQUIRE_MYSQL": "1"}
    assert load_config(env=env) == Config()


@pytest.mark.parametrize("flags,key", [({"dataset": "imagenet"}, "dataset"), ({"clients": 0}, "clients"),
                                       ({"fraction": 1.5}, "fraction"), ({"port": 70000}, "port"),
                                       ({"algo": "sgd"}, "algo")])
def test_out_of_range_value_is_rejected_naming_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        load_config(env={}, flags=flags)


def test_invalid_toml_file_is_rejected_naming_the_file(tmp_path):
    path = write(tmp_path, "broken.toml", "clients = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(path, env={})


def test_missing_config_file_is_rejected_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(str(tmp_path / "missing.toml"), env={})


# ---------------------------------------------------------------- main.py flags for attacks and robust aggregation

def parsed_config(*argv: str, keys=None) -> Config:
    from node.cli.main import NODE_KEYS, RUN_KEYS, build_parser, config_from
    args = build_parser().parse_args(list(argv))
    return config_from(args, keys or (NODE_KEYS if argv[0] == "node" else RUN_KEYS))


def test_simulate_flags_for_attacks_and_robust_aggregation_reach_the_config(tmp_path):
    cfg = parsed_config("simulate", "--data-root", str(tmp_path), "--aggregate", "clip:norm=5+median",
                        "--max-update-norm", "7.5", "--record-updates", "--attack", "sign-flip:scale=3",
                        "--attackers", "0.25")
    assert (cfg.aggregate, cfg.max_update_norm, cfg.record_updates, cfg.attack, cfg.attackers) == \
        ("clip:norm=5+median", 7.5, True, "sign-flip:scale=3", 0.25)


def test_simulate_without_the_new_flags_keeps_fedavg_and_no_attack(tmp_path):
    cfg = parsed_config("simulate", "--data-root", str(tmp_path))
    assert (cfg.aggregate, cfg.max_update_norm, cfg.record_updates, cfg.attack, cfg.attackers) == \
        ("fedavg", None, False, None, 0.0)


def test_edge_node_flags_take_an_attack_and_an_aggregation_rule(tmp_path):
    cfg = parsed_config("node", "--data-root", str(tmp_path), "--nt", "EN", "--attack", "nan",
                        "--aggregate", "multi-krum:f=1", "--record-updates")
    assert (cfg.node_type, cfg.attack, cfg.aggregate, cfg.record_updates) == ("EN", "nan", "multi-krum:f=1", True)


def test_cluster_flags_take_an_attack_and_its_share(tmp_path):
    cfg = parsed_config("cluster", "--data-root", str(tmp_path), "--attack", "noise:sigma=0.5", "--attackers", "0.5",
                        "--aggregate", "median")
    assert (cfg.attack, cfg.attackers, cfg.aggregate) == ("noise:sigma=0.5", 0.5, "median")


@pytest.mark.parametrize("argv, key", [
    (["simulate", "--aggregate", "mediun"], "aggregate"),
    (["simulate", "--attack", "flip-everything"], "attack"),
    (["simulate", "--attackers", "0.5"], "attackers"),
    (["node", "--nt", "SN", "--attack", "nan"], "--attack"),
], ids=["misspelt-rule", "unknown-attack", "attackers-without-attack", "attack-on-a-super-node"])
def test_bad_attack_or_aggregation_flag_is_a_one_line_usage_error(argv, key, tmp_path, capsys):
    from node.cli.main import run
    code = run([*argv, "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert (code, len(err.strip().splitlines()), key in err) == (2, 1, True), err


def test_cluster_gives_attacking_shares_edge_processes_of_their_own():
    from node.cli.cluster import edge_groups
    assert edge_groups(7, 3, {1, 2, 5}) == [(0, 1), (1, 2), (3, 2), (5, 1), (6, 1)]
    assert edge_groups(5, 2, set()) == [(0, 2), (2, 2), (4, 1)]
