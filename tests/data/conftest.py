"""A tiny corpus built once per test session (a few seconds)."""

from __future__ import annotations

import pytest

from training.data import CorpusSet, build_corpora


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> CorpusSet:
    return build_corpora("tiny", tmp_path_factory.mktemp("data"), progress=False)
