"""Terminal output: one line per epoch when the output is not a terminal (a bar when it is), and Ctrl-C ends with
the leaderboard of the finished jobs and the exact command that resumes the sweep."""
import json
import os
import pty
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import KDBENCH

ONE = ["method=vanilla", "seed=1", "teacher=mlp_32", "trainer.epochs=3"]


def _env(tmp_path, **extra):
    return {**os.environ, "KDBENCH_RESULTS": str(tmp_path), "PYTHONWARNINGS": "ignore", **extra}


def test_piped_output_gets_one_line_per_epoch_and_no_progress_frames(tmp_path):
    out = subprocess.run([*KDBENCH, *ONE], capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if ": epoch " in line]
    assert [re.search(r"epoch (\d+)/3", line).group(1) for line in lines] == ["1", "2", "3"]
    assert all(re.fullmatch(r"vanilla mlp_32 s1: epoch \d/3 loss [\d.e+-]+ top1 [\d.]+ lr [\d.e+-]+ \([\d.]+ s\)", line)
               for line in lines)
    assert "\r" not in out.stderr and "it/s" not in out.stderr
    every = subprocess.run([*KDBENCH, *ONE, "trainer.epochs=4"], capture_output=True, text=True,
                           env=_env(tmp_path, KDBENCH_PROGRESS_EVERY="2"), cwd=tmp_path, timeout=300)
    assert re.findall(r"epoch (\d)/4", every.stderr) == ["2", "4"]


def test_a_terminal_still_gets_the_progress_bar(tmp_path):
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([*KDBENCH, *ONE], stdout=subprocess.DEVNULL, stderr=follower, env=_env(tmp_path),
                            cwd=tmp_path)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "\r" in text and "3/3" in text and ": epoch 1/3" not in text


@pytest.mark.slow
def test_ctrl_c_prints_the_finished_jobs_leaderboard_and_the_command_that_resumes(tmp_path):
    args = ["method=vanilla", "seed=1", "teacher=mlp_32", "trainer.epochs=1,400", "trainer.progress=false"]
    proc = subprocess.Popen([*KDBENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path), cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("multirun/*/1/checkpoint.pt")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert f"## finished jobs — {sweep.resolve()}" in stdout
    assert "| digits |  | mlp_32 | vanilla | trainer.epochs=1 | 1 |" in stdout  # the job that finished
    resume = stderr.strip().splitlines()[-1].strip()
    assert resume == (f"kdbench method=vanilla seed=1 teacher=mlp_32 trainer.epochs=1,400 trainer.progress=false "
                      f"hydra.sweep.dir={sweep.resolve()}")
    rec = json.loads((sweep / "1" / "metrics.json").read_text())
    assert rec["status"] == "interrupted"
