"""Two pools of three hosts each, served in-process once per module (plain HTTP, or TLS with a
certificate per host); every test starts with every host up and host 0 the master."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from multihosttest import Pools, served


@pytest.fixture(scope="module")
def served_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with served(tmp_path_factory.mktemp("multihost"), tls=False) as pools:
        yield pools


@pytest.fixture(scope="module")
def served_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    with served(tmp_path_factory.mktemp("multihost-tls"), tls=True) as pools:
        yield pools


@pytest.fixture
def pools(served_plain: Pools) -> Iterator[Pools]:
    yield served_plain
    served_plain.reset()


@pytest.fixture
def tls_pools(served_tls: Pools) -> Iterator[Pools]:
    yield served_tls
    served_tls.reset()
