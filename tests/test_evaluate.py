"""jobs/evaluate.py without a trained model: its flags, the --official error without Java, the tables.
(Scoring trained checkpoints, the report split and the leak refusal: tests/test_train.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import job_module

from raycap.config import run_job
from raycap.evaluate import compare_table, metrics_table


def test_official_without_java_stops_with_one_error_line_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_job = job_module("evaluate")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    with pytest.raises(SystemExit) as info:
        run_job(lambda: evaluate_job.main(["--checkpoint", str(tmp_path / "missing"), "--official"]))
    assert info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --official needs java on PATH"), errors


def test_evaluate_defaults_come_from_the_checkpoint() -> None:
    cfg = job_module("evaluate").parse_args(["--checkpoint", "ck", "--max-decode-len", "20"])
    assert (cfg.features, cfg.split, cfg.max_decode_len) == (None, None, 20)
    assert (cfg.allow_train_overlap, cfg.official) == (False, False)
    flags = job_module("evaluate").parse_args(["--checkpoint", "ck", "--allow-train-overlap", "--official"])
    assert (flags.allow_train_overlap, flags.official) == (True, True)


def test_compare_table_puts_both_scorers_side_by_side() -> None:
    table = compare_table({"bleu4": 0.25, "cider_d": 0.8}, {"bleu4": 0.2468, "meteor": 0.21, "cider_d": 0.79})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "raycap", "official"]
    assert [line.split() for line in lines[1:]] == [
        ["bleu4", "0.250", "0.247"], ["meteor", "-", "0.210"], ["cider_d", "0.800", "0.790"]
    ]


def test_metrics_table_fits_long_split_labels() -> None:
    metrics = {"bleu1": 0.5, "bleu2": 0.4, "bleu3": 0.3, "bleu4": 0.2, "rouge_l": 0.45, "cider_d": 1.0}
    label = "val (selection split: optimistic)"
    header, row = metrics_table({label: metrics}, header="split").splitlines()
    assert row.startswith(label + "  ") and row.split()[-6:] == ["0.500", "0.400", "0.300", "0.200", "0.450", "1.000"]
    assert header.index("bleu1") == row.index("0.500") + len("0.500") - len("bleu1")
