"""Database URLs for the other nodes of a run: beside the given one, on the same server or in the same folder."""
from __future__ import annotations

import pytest

from storage.engine import StorageUnavailable, sibling_url


@pytest.mark.parametrize("url, expected", [
    ("sqlite:////tmp/run/ledger.db", "sqlite:////tmp/run/ledger_sn1.db"),
    ("sqlite:////tmp/run.v2/ledger", "sqlite:////tmp/run.v2/ledger_sn1"),
    ("sqlite:///rel.db", "sqlite:///rel_sn1.db"),
    ("mysql+pymysql://root:pw@127.0.0.1:3306/fl?charset=utf8mb4", "mysql+pymysql://root:pw@127.0.0.1:3306/fl_sn1?charset=utf8mb4"),
    ("mysql+pymysql://root:@127.0.0.1:3306", "mysql+pymysql://root:@127.0.0.1:3306/fledger_sn1"),
])
def test_a_sibling_database_carries_the_suffix(url: str, expected: str) -> None:
    assert sibling_url(url, "sn1") == expected


def test_a_malformed_url_is_refused_with_the_forms_to_use() -> None:
    with pytest.raises(StorageUnavailable, match="sqlite:///PATH"):
        sibling_url("not a url", "sn1")
