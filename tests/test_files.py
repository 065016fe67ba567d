"""Admin.Save writes only model files under DATA_ROOT/models/, and every private file a node creates is 0600 in a
0700 folder whatever the umask: the path rules, symbolic links, and the modes of a real ledger, key and save."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from chain.checkpoint import Checkpoint
from chain.keys import NodeKey
from chain.private import private_dir, write_private
from config import Config
from node.engine.edge import save_personal
from node.engine.errors import BadRequestError
from node.ledger import Ledger
from node.process.files import MAX_COMPONENT, MAX_PATH, model_path, write_model
from node.process.supernode import SuperNode
from node.rpc.clients import AdminClient

DEFAULT = "model-round0003.pt"
WEIGHTS = {"w": np.arange(6, dtype=np.float32)}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def save(root: Path, requested: str | None, body: bytes = b"model") -> Path:
    target = model_path(root, requested, DEFAULT)
    write_model(root, target, lambda handle: handle.write(body))
    return target


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Umask 0: any mode narrower than 0777/0666 below was asked for, not left by the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- the path rules (text only)

def test_no_path_saves_the_default_name_in_models(tmp_path: Path) -> None:
    assert model_path(tmp_path, None, DEFAULT) == tmp_path / "models" / DEFAULT
    assert model_path(tmp_path, "", DEFAULT) == tmp_path / "models" / DEFAULT


def test_a_relative_path_is_taken_inside_models(tmp_path: Path) -> None:
    assert model_path(tmp_path, "runs/./best.pt", DEFAULT) == tmp_path / "models" / "runs" / "best.pt"


def test_an_absolute_path_inside_models_is_allowed(tmp_path: Path) -> None:
    inside = tmp_path / "models" / "best.pt"

    assert model_path(tmp_path, str(inside), DEFAULT) == inside


@pytest.mark.parametrize("requested, problem", [
    ("../node.key.pt", "'..'"),
    ("runs/../../checkpoint.pt", "'..'"),
    ("/etc/passwd.pt", "must lie in"),
    ("m\0.pt", "NUL"),
    ("node.key", "must end in .pt"),
    ("checkpoint.json", "must end in .pt"),
    ("model.pt/", None),          # a trailing slash names the same file: allowed
    (".pt", "must end in .pt"),
    ("a" * (MAX_COMPONENT + 1) + ".pt", "component is longer"),
    ("/".join(["d" * 200] * 6) + "/m.pt", f"longer than {MAX_PATH}"),
])
def test_a_path_breaking_a_rule_is_refused_with_one_line(tmp_path: Path, requested: str, problem: str | None) -> None:
    if problem is None:
        assert model_path(tmp_path, requested, DEFAULT) == tmp_path / "models" / "model.pt"
        return
    with pytest.raises(BadRequestError, match=problem) as refused:
        model_path(tmp_path, requested, DEFAULT)
    assert "\n" not in str(refused.value)


def test_an_absolute_path_into_the_data_root_beside_models_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="must lie in"):
        model_path(tmp_path, str(tmp_path / "node.key.pt"), DEFAULT)


# ---------------------------------------------------------------- writing: links, other files, overwrites

def test_a_symlinked_models_folder_is_refused_and_nothing_is_written_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "models").symlink_to(outside)

    with pytest.raises(BadRequestError, match="symbolic link"):
        save(root, "m.pt")
    assert list(outside.iterdir()) == []


def test_a_symlinked_folder_below_models_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root" / "models").mkdir(parents=True)
    (tmp_path / "root" / "models" / "runs").symlink_to(outside)

    with pytest.raises(BadRequestError, match="symbolic link"):
        save(tmp_path / "root", "runs/m.pt")
    assert list(outside.iterdir()) == []


def test_a_symlinked_model_file_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.pt").symlink_to(key)

    with pytest.raises(BadRequestError, match="not a regular file"):
        save(tmp_path, "m.pt")
    assert key.read_bytes() == b"-----BEGIN PRIVATE KEY-----"
    assert (tmp_path / "models" / "m.pt").is_symlink()


def test_an_existing_thing_that_is_not_a_saved_model_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "models" / "keep.pt").mkdir(parents=True)

    with pytest.raises(BadRequestError, match="not a regular file"):
        save(tmp_path, "keep.pt")
    assert (tmp_path / "models" / "keep.pt").is_dir()


def test_a_regular_file_named_models_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models").write_bytes(b"not a folder")

    with pytest.raises(BadRequestError, match="not a folder"):
        save(tmp_path, "m.pt")
    assert (tmp_path / "models").read_bytes() == b"not a folder"


def test_a_previous_save_is_replaced_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    save(tmp_path, "m.pt", b"first")
    target = save(tmp_path, "m.pt", b"second")

    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m.pt"]


def test_a_failed_write_leaves_the_previous_save_and_no_temporary_file(tmp_path: Path) -> None:
    save(tmp_path, "m.pt", b"first")

    def broken(handle: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_model(tmp_path, model_path(tmp_path, "m.pt", DEFAULT), broken)
    assert (tmp_path / "models" / "m.pt").read_bytes() == b"first"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m.pt"]


# ---------------------------------------------------------------- modes of what a real node creates

def test_a_ledger_key_checkpoint_and_database_are_private(tmp_path: Path, no_umask: None) -> None:
    root = tmp_path / "sn"
    ledger = Ledger.open(root)   # creates the data root, node.key and ledger.db
    try:
        verified = ledger.build(round=0, algorithm="fedavg", params={}, weights=WEIGHTS, records=[], metrics={},
                                timestamp_ms=0)
        ledger.accept(verified).result()   # writes the block (WAL) and the checkpoint
        ledger.flush()
        files = {p.name: mode(p) for p in root.iterdir()}
    finally:
        ledger.close()

    assert mode(root) == 0o700
    assert {"node.key", "checkpoint.json", "ledger.db"} <= set(files)
    assert files == {name: 0o600 for name in files}, files   # -wal / -shm too, when present


def test_an_existing_loose_data_root_is_tightened_on_open(tmp_path: Path) -> None:
    root = tmp_path / "sn"
    Ledger.open(root).close()
    for path in (root, root / "ledger.db", root / "node.key"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    Checkpoint.create(0, "00" * 32, NodeKey.generate()).write(root / "checkpoint.json")
    (root / "checkpoint.json").chmod(0o644)

    Ledger.open(root).close()

    assert [mode(root / n) for n in ("", "ledger.db", "node.key", "checkpoint.json")] == [0o700] + [0o600] * 3


def test_a_fresh_key_is_0600_in_a_0700_folder(tmp_path: Path, no_umask: None) -> None:
    NodeKey.load_or_create(tmp_path / "edge-3" / "node.key")

    assert (mode(tmp_path / "edge-3"), mode(tmp_path / "edge-3" / "node.key")) == (0o700, 0o600)


def test_personal_layers_are_written_0600(tmp_path: Path, no_umask: None) -> None:
    class Personal:
        def personal_state(self) -> dict[str, np.ndarray]:
            return {"head.w": np.ones(3, dtype=np.float32)}

    save_personal(Personal(), tmp_path / "personal.weights")  # type: ignore[arg-type]

    assert mode(tmp_path / "personal.weights") == 0o600


def test_private_files_keep_their_mode_when_replaced(tmp_path: Path, no_umask: None) -> None:
    folder = private_dir(tmp_path / "a" / "b")
    write_private(folder / "f", b"1")
    write_private(folder / "f", b"2")

    assert (mode(folder), mode(folder / "f"), (folder / "f").read_bytes()) == (0o700, 0o600, b"2")


# ---------------------------------------------------------------- Admin.Save on a real super node

@pytest.fixture
def sn(tmp_path: Path) -> Iterator[SuperNode]:
    ledger = Ledger.open(tmp_path / "sn", key=NodeKey.from_seed(b"sn"))
    node = SuperNode(ledger, "127.0.0.1:0", Config(data_root=str(tmp_path / "sn")), genesis=False)
    verified = ledger.build(round=0, algorithm="fedavg", params={}, weights=WEIGHTS, records=[], metrics={},
                            timestamp_ms=0)
    ledger.accept(verified).result()
    node.start()
    yield node
    node.stop(None)


def test_save_writes_a_private_loadable_model_in_models(sn: SuperNode, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with AdminClient(sn.address) as admin:
            path, digest = admin.save("")
            again, _ = admin.save("")
    finally:
        os.umask(old)

    models = tmp_path / "sn" / "models"
    assert Path(path) == Path(again) == models / "model-round0000.pt"
    assert (mode(models), mode(models / "model-round0000.pt")) == (0o700, 0o600)
    assert torch.load(path, weights_only=True)["w"].tolist() == WEIGHTS["w"].tolist()


@pytest.mark.parametrize("requested", ["node.key", "../node.key", "{root}/node.key", "{root}/checkpoint.json",
                                       "{root}/ledger.db", "../../elsewhere.pt"])
def test_save_over_the_nodes_own_files_is_refused_and_they_are_kept(sn: SuperNode, tmp_path: Path,
                                                                    requested: str) -> None:
    root = tmp_path / "sn"
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and not p.name.startswith("ledger")}

    with AdminClient(sn.address) as admin, pytest.raises(BadRequestError) as refused:
        admin.save(requested.format(root=root))

    assert refused.value.status == "INVALID_ARGUMENT"
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.name in before} == before
    assert not (tmp_path / "elsewhere.pt").exists() and not (root / "models").exists()
