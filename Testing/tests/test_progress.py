"""Progress of long steps: a tqdm bar on a terminal, plain lines in logs, nothing with -q."""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import termios

from CLEARLib.cli import main
from CLEARLib.progress import ProgressBar, scaled


def test_plain_lines_in_logs_with_time_left_from_what_this_run_did():
    stream = io.StringIO()
    bar = ProgressBar("pretrain", total=100, unit="step", stream=stream, every_s=0.0)
    bar(0.50, "epoch 5 loss 1.2")  # a resumed run starts half done
    bar(0.75, "epoch 8 loss 0.9")
    bar(1.0, "epoch 10 loss 0.7")
    bar(1.0, "again")  # after the end: nothing
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("pretrain: 75/100 step, ") and "s left" in lines[1] and lines[1].endswith("loss 0.9")
    assert lines[2].startswith("pretrain: 100/100 step") and "left" not in lines[2]


def test_quiet_prints_nothing_and_parts_map_into_the_whole():
    stream = io.StringIO()
    seen = []
    bar = ProgressBar("extract", stream=stream, quiet=True)
    part = scaled(lambda f, m: (seen.append((f, m)), bar(f, m)), 0.5, 1.0, "case 2/2: ")
    part(0.5, "instance 10/20")
    assert seen == [(0.75, "case 2/2: instance 10/20")] and stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_with_rate_and_time_left():
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    with os.fdopen(slave, "w") as terminal:
        bar = ProgressBar("mil", total=4, unit="fold", stream=terminal)
        for k in range(1, 5):
            bar(k / 4, f"fold {k}")
        terminal.flush()
    chunks = []
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    drawn = b"".join(chunks).decode()
    assert "mil: 100%" in drawn and "4/4" in drawn and "fold/s" in drawn and "fold 4" in drawn


def test_predict_reports_progress_unless_quiet(tmp_path, tiny_case_bundle, capsys):
    ct = tmp_path / "ct.nrrd"
    assert main(["phantom", str(ct), "--shape", "8", "32", "32"]) == 0
    capsys.readouterr()
    assert main(["predict", str(ct), "--model", str(tiny_case_bundle), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "predict: 100%" in printed.err
    assert list(json.loads(printed.out)["timings_s"])[:2] == ["read", "preprocess"]
    assert main(["-q", "predict", str(ct), "--model", str(tiny_case_bundle), "--device", "cpu"]) == 0
    assert "predict:" not in capsys.readouterr().err
