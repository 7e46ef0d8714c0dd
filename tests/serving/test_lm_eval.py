"""lm-evaluation-harness's `local-completions` model scores the running service (a real client).

The task is local (a jsonl file under tests/assets), so nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.serving.conftest import API_KEY

import lm_eval  # noqa: F401 - the harness the test drives (a dev dependency)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "lm_eval"


GENERATE_TASK = f"""
task: hmoe_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ASSETS / 'hmoe_arith.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _task_dir(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hmoe_arith_gen.yaml").write_text(GENERATE_TASK)
    (tmp_path / "hmoe_arith.yaml").write_text(f"""
task: hmoe_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ASSETS / 'hmoe_arith.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return tmp_path


@pytest.mark.parametrize("model", ["auto", "math"])
def test_local_completions_scores_the_service(server, tiny_run, tmp_path, monkeypatch, model):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from experts.export import write_hf_tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    write_hf_tokenizer(Path(tiny_run) / "experts" / "math" / "tokenizer.json", tok_dir)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": model, "base_url": f"{server}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(tok_dir), "num_concurrent": 2, "max_retries": 1},
        tasks=["hmoe_arith"], task_manager=TaskManager(include_path=str(_task_dir(tmp_path / "tasks"))),
        limit=None, log_samples=True)
    res = results["results"]["hmoe_arith"]
    assert 0.0 <= res["acc,none"] <= 1.0
    samples = results["samples"]["hmoe_arith"]
    assert len(samples) == 4
    for s in samples:  # every choice got a finite log-likelihood from the service's echo logprobs
        lls = [r[0] for r in s["filtered_resps"]]
        assert len(lls) == len(s["doc"]["choices"])
        assert all(math.isfinite(ll) and ll < 0 for ll in lls), lls


def test_remote_tokenizer_needs_no_export_step(server, tmp_path, monkeypatch):
    """`tokenizer_backend=remote` reads /tokenizer_info, /tokenize and /detokenize: a loglikelihood task
    and a generate_until task run against `model=auto` with nothing exported."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": "auto", "base_url": f"{server}/v1/completions", "tokenizer_backend": "remote",
                    "tokenized_requests": False, "auth_token": API_KEY, "num_concurrent": 2, "max_retries": 1},
        tasks=["hmoe_arith", "hmoe_arith_gen"], task_manager=TaskManager(include_path=str(_task_dir(tmp_path))),
        limit=None, log_samples=True)
    assert 0.0 <= results["results"]["hmoe_arith"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["hmoe_arith_gen"]["exact_match,none"] <= 1.0
    for s in results["samples"]["hmoe_arith"]:
        lls = [r[0] for r in s["filtered_resps"]]
        assert len(lls) == len(s["doc"]["choices"]) and all(math.isfinite(ll) and ll < 0 for ll in lls), lls
    assert len(results["samples"]["hmoe_arith_gen"]) == 4
