"""`python -m vl.eval`: stdout brief, --out file, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vl.metrics.cli import main

REPO = Path(__file__).resolve().parents[1]


def gt_row(qid):
    return {"qid": qid, "duration": 10, "relevant_windows": [[0, 4]],
            "relevant_clip_ids": [0, 1], "saliency_scores": [[4, 4, 4], [1, 1, 1]]}


def sub_row(qid):
    return {"qid": qid, "query": "q", "vid": "v", "pred_relevant_windows": [[0, 4, 0.9]],
            "pred_saliency_scores": [0.9, 0.1, 0.0, 0.0, 0.0]}


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    gt = write(tmp_path / "gt.jsonl", [gt_row(1), gt_row(2)])
    return tmp_path, gt


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_success_prints_brief_and_writes_full(files, capsys):
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [sub_row(2), sub_row(1)])
    out_path = tmp / "deep" / "metrics.json"
    code, out, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                              "--out", out_path)
    assert code == 0 and err == ""
    brief = json.loads(out)
    assert brief["MR-full-mAP"] == 100.0 and brief["HL-min-VeryGood-Hit1"] == 100.0
    full = json.loads(out_path.read_text())
    assert full["brief"] == brief and "short" in full and "HL-min-Good" in full


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([sub_row(1), '{"qid": 2, "pred_relevant_windows": [[0, 4, 0.9]'],
         r"sub\.jsonl:2: malformed JSON"),
        ([sub_row(1), {"qid": 2, "pred_saliency_scores": [1.0]}],
         r"sub\.jsonl:2: qid 2: missing field 'pred_relevant_windows'"),
        ([sub_row(1)], r"1 qid\(s\) of .*gt\.jsonl missing from .*sub\.jsonl \(first: 2\)"),
        ([sub_row(1), sub_row(2), sub_row(3)], r"1 extra qid\(s\) .*\(first: 3\)"),
        ([sub_row(1), {**sub_row(2), "pred_relevant_windows": [[0, "NaN", 1]]}],
         r"qid 2: field 'pred_relevant_windows': entry 0 has a non-number 'NaN'"),
        ([sub_row(1), '{"qid": 2, "pred_relevant_windows": [[0, NaN, 1]], '
                      '"pred_saliency_scores": [1]}'],
         r"sub\.jsonl:2: qid 2: field 'pred_relevant_windows': entry 0 has a non-finite"),
        ([sub_row(1), {**sub_row(2), "pred_relevant_windows": [[6, 4, 1]]}],
         r"sub\.jsonl:2: qid 2: .*window 0 has negative length"),
        ([sub_row(1), {**sub_row(2), "pred_saliency_scores": []}],
         r"sub\.jsonl:2: qid 2: field 'pred_saliency_scores': is empty"),
        (["[1, 2]"], r"sub\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, capsys, rows, message):
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", rows)
    out_path = tmp / "out" / "metrics.json"
    code, out, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                              "--strict", "--out", out_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vl.eval: error: ")
    assert __import__("re").search(message, err), err
    assert_wrote_nothing(tmp, out_path)


def assert_wrote_nothing(tmp: Path, out_path: Path) -> None:
    """Bad input leaves no metrics file, partial or temporary, and no --out folder: a pipeline
    that checks for the file must not pick up a half-written or empty result."""
    assert not out_path.exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["gt.jsonl", "sub.jsonl"]


def test_reversed_window_scores_iou_0_with_a_warning_unless_strict(files, capsys):
    """The official evaluation scores a window with start > end (IoU 0); so does vl.eval, with
    a warning naming the qid; --strict refuses it."""
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [sub_row(1), {**sub_row(2), "pred_relevant_windows":
                                                 [[4, 0, 0.9]]}])  # fmt: skip
    out_path = tmp / "m.json"
    code, out, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                              "--out", out_path)
    assert code == 0 and json.loads(out)["MR-full-R1@0.5"] == 50.0
    assert err.startswith("vl.eval: warning: ") and err.count("\n") == 1
    assert "sub.jsonl:2 qid 2" in err and "IoU 0" in err
    code, out, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                              "--strict")
    assert code == 2 and "qid 2" in err and "negative length" in err


@pytest.mark.parametrize(("line", "message"), [
    ("[" * 100_000 + "]" * 100_000, r"sub\.jsonl:1: JSON nested too deeply"),
    ('{"qid": ' + "9" * 5000 + "}", r"sub\.jsonl:1: unreadable JSON value"),
])
def test_hostile_json_is_one_line_and_exit_2(files, capsys, line, message):
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [line])
    out_path = tmp / "out" / "metrics.json"
    code, out, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                              "--out", out_path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert_wrote_nothing(tmp, out_path)


def test_metrics_json_holds_no_nan(files, capsys):
    """A metric that is NaN (no GT window in a length bucket) is written as null: JSON."""
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [sub_row(2), sub_row(1)])
    out_path = tmp / "m.json"
    assert run_main(capsys, "qvhighlights", "--submission", sub, "--gt", gt,
                    "--out", out_path)[0] == 0
    text = out_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_missing_file_and_gt_errors(files, capsys):
    tmp, gt = files
    code, _, err = run_main(capsys, "charades", "--submission", tmp / "nope.jsonl", "--gt", gt)
    assert code == 2 and "nope.jsonl: no such file" in err
    bad_gt = write(tmp / "bad_gt.jsonl", [gt_row(1), {**gt_row(2), "relevant_clip_ids": [0, 9]}])
    sub = write(tmp / "sub.jsonl", [sub_row(1), sub_row(2)])
    code, _, err = run_main(capsys, "qvhighlights", "--submission", sub, "--gt", bad_gt)
    assert code == 2 and "bad_gt.jsonl:2: qid 2: field 'relevant_clip_ids': clip id 9" in err


def test_intersect_flag(files, capsys):
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [sub_row(1)])
    code, out, _ = run_main(capsys, "charades", "--submission", sub, "--gt", gt, "--intersect")
    assert code == 0 and json.loads(out)["MR-full-R1@0.7"] == 100.0


def test_tvsum_command(tmp_path, capsys):
    gt = write(tmp_path / "gt.jsonl", [{"qid": "v", "domain": "BK",
                                        "label": [[1], [2], [3], [4], [5], [6]]}])
    sub = write(tmp_path / "sub.jsonl", [{"qid": "v", "pred_saliency_scores": [6, 5, 4, 3, 2, 1]}])
    code, out, _ = run_main(capsys, "tvsum", "--submission", sub, "--gt", gt)
    assert code == 0 and json.loads(out) == {"mAP": 0.225, "BK": 0.225}


def test_module_entry_point_no_traceback(files):
    tmp, gt = files
    sub = write(tmp / "sub.jsonl", [sub_row(1), "{oops"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vl.eval", "qvhighlights", "--submission", str(sub),
           "--gt", str(gt)]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "sub.jsonl:2: malformed JSON" in bad.stderr
    write(sub, [sub_row(1), sub_row(2)])
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["MR-full-R1@0.5"] == 100.0
