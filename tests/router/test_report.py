"""router.report: the routed rows of the report matrix, on the report's own windows."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from experts.checkpoint import save_lm
from experts.config import ModelConfig
from experts.model import Transformer
from router.domains import DOMAINS


def test_routed_rows_match_a_single_expert_when_all_experts_are_equal(trained_router_dir, tokenizer, tmp_path):
    report = pytest.importorskip("training.report")
    from router.report import report_rows

    run_dir = tmp_path / "run"
    shutil.copytree(trained_router_dir[0], run_dir / "router")
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for d in DOMAINS:
        save_lm(run_dir / "experts" / d, model, cfg)
    g = torch.Generator().manual_seed(0)
    windows = {d: [torch.randint(10, tokenizer.vocab_size, (3, 17), generator=g)] for d in DOMAINS}
    ctx = SimpleNamespace(run_dir=run_dir, corpus=None, tokenizer=tokenizer, domains=DOMAINS, windows=windows,
                          device=torch.device("cpu"))
    rows = report_rows(ctx)
    assert set(rows) == {"router-top1", "router-mixture"}
    for d in DOMAINS:
        ref = report.eval_cell(model, windows[d], 1, torch.device("cpu"))
        for name in rows:
            assert rows[name][d].tokens == ref.tokens == 3 * 16
            assert rows[name][d].nats == pytest.approx(ref.nats, rel=1e-4)


def test_no_router_checkpoint_means_no_rows(tmp_path, tokenizer):
    from router.report import report_rows

    ctx = SimpleNamespace(run_dir=tmp_path, corpus=None, tokenizer=tokenizer, domains=DOMAINS, windows={},
                          device=torch.device("cpu"))
    assert report_rows(ctx) == {}
