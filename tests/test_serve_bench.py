"""benchmarks/serve_bench.py (python -m benchmarks.serve_bench) against a real Triton server: a short run's report (JSON, Markdown,
progress), the server it starts stopped at the end and on Ctrl-C, and bad command lines."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from benchmarks import serve_bench
from conftest import ROOT
from serving import launcher
from triton_fixture import MODEL, NO_SERVE_EXTRA, processes_on, repo, require_server, server  # noqa: F401

HEADER = ("| CRF | clients | req/s | p50 ms | p90 ms | p99 ms | server queue ms | server compute ms "
          "| avg batch |")


def test_a_short_run_reports_every_window(server, tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = serve_bench.main(["--url", server.http_url, "--size", "97x97", "--concurrency", "1,2", "--duration",
                             "1.5", "--warmup", "0.5", "--crf", "off,on", "--json", str(out_json),
                             "--markdown", str(out_md)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out_json.read_text())
    assert report["settings"]["size"] == "97x97" and report["settings"]["started_here"] is False
    assert report["environment"]["logical_cores"] == os.cpu_count() and "load_average" in report["environment"]
    assert report["server"]["max_batch_size"] == 8 and report["server"]["version"]
    windows = report["windows"]
    assert [(w["crf"], w["clients"]) for w in windows] == [("off", 1), ("off", 2), ("on", 1), ("on", 2)]
    for w in windows:
        assert w["errors"] == 0 and w["warmup_errors"] == 0, w["error_messages"] + w["warmup_error_messages"]
        assert w["requests"] > 0 and w["wall_s"] >= 1.5
        assert w["throughput_rps"] == pytest.approx(w["requests"] / w["wall_s"])
        lat = w["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        srv = w["server"]
        # Statistics read with nothing in flight: the server counted exactly the measured requests.
        assert srv["requests"] == w["requests"] and srv["other_requests"] == 0 and srv["failed"] == 0
        batches = {int(size): n for size, n in srv["executions_by_batch_size"].items()}
        assert sum(batches.values()) == srv["executions"] and sum(s * n for s, n in batches.items()) == w["requests"]
        assert srv["avg_batch"] == pytest.approx(w["requests"] / srv["executions"]) and 1 <= srv["avg_batch"] <= 8
        assert srv["queue_ms"] >= 0 and srv["compute_ms"] > 0
        assert srv["compute_ms"] == pytest.approx(srv["compute_input_ms"] + srv["compute_infer_ms"]
                                                  + srv["compute_output_ms"])
        # The server's compute for one request cannot exceed what the client waited for it on average.
        assert srv["compute_ms"] < lat["mean"]
        assert w["load_average_before"] is None or len(w["load_average_before"]) == 3
    # One client sends a request only when its last is answered: nothing to batch.
    assert windows[0]["server"]["avg_batch"] == windows[2]["server"]["avg_batch"] == 1.0
    # The CRF setting reached the server: with it, a 97 x 97 request computes several times longer.
    assert windows[2]["server"]["compute_ms"] > 2 * windows[0]["server"]["compute_ms"]

    lines = out_md.read_text().splitlines()
    assert lines[0] == HEADER and lines[1] == "|---|" + "---|" * 8
    assert [line.split(" | ")[:2] for line in lines[2:6]] == [["| off", "1"], ["| off", "2"], ["| on", "1"],
                                                               ["| on", "2"]]
    assert lines[6] == "" and "generated scene 97x97" in lines[7] and "max batch 8" in lines[7]
    assert lines[-1].startswith("Errors: none (")
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and sum("load average" in line for line in progress) == 4
    assert sum("req/s" in line and "errors 0" in line for line in progress) == 4
    assert "server compute ms" in captured.out and "errors" in captured.out


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_the_server_it_starts_stops_at_the_end_and_on_ctrl_c(tmp_path):
    require_server()
    repo_dir, out_json = tmp_path / "repo", tmp_path / "r.json"
    common = [sys.executable, "-m", "benchmarks.serve_bench", "--repo", str(repo_dir), "--size", "33x33", "--concurrency", "1",
              "--crf", "off", "--warmup", "0", "--protocol", "grpc"]
    done = subprocess.run(common + ["--model", str(MODEL), "--duration", "0.3", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(out_json.read_text())
    assert report["settings"]["started_here"] and report["server"]["restarts"] == 0
    assert report["windows"][0]["errors"] == 0 and report["windows"][0]["requests"] > 0
    assert (repo_dir / "deeplab" / "config.pbtxt").is_file() and not processes_on(repo_dir)

    # The repository already there, served again; Ctrl-C in the middle of the window.
    proc = subprocess.Popen(common + ["--duration", "60", "--json", str(tmp_path / "never.json")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 90, []
        while not any("load average" in line for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)
            seen.append(line)
        time.sleep(1.0)  # into the measured part
        assert processes_on(repo_dir), "no server ran on the repository"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    assert not processes_on(repo_dir), "the server outlived the benchmark"
    assert not (tmp_path / "never.json").exists()


@pytest.mark.parametrize("args, words", [
    (["--concurrency", "0"], "a client count is 1..256, got 0"),
    (["--concurrency", "1,x"], "expected client counts such as 1,2,4,8"),
    (["--concurrency", "2,2"], "2 given twice"),
    (["--duration", "0"], "must be > 0 seconds"),
    (["--warmup", "-1"], "must be >= 0 seconds"),
    (["--size", "97"], "expected HxW"),
    (["--size", "0x97"], "height and width must be >= 1"),
    (["--crf", "on,maybe"], "expected on or off, got 'maybe'"),
    (["--protocol", "tcp"], "invalid choice: 'tcp'"),
    (["--instances", "0"], "must be >= 1, got 0"),
])
def test_bad_values_exit_2_with_a_message(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        serve_bench.main(["--model", str(MODEL)] + args)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_bad_combinations_and_files_exit_2(tmp_path, capsys):
    cases = [
        ([], "give --model"),
        (["--url", "127.0.0.1:1", "--model", str(MODEL)], "--url benchmarks the model that server serves: --model"),
        (["--repo", str(tmp_path), "--instances", "2"], "--instances is written into a new repository"),
        (["--model", str(tmp_path / "none.onnx")], "none.onnx: no such file"),
        (["--model", str(MODEL), "--json", str(tmp_path)], "is a folder"),
        (["--model", str(MODEL), "--image", str(tmp_path / "none.png")], "--image:"),
        (["--model", str(MODEL), "--image", "a.png", "--size", "9x9"], "not allowed with argument --image"),
    ]
    for args, words in cases:
        with pytest.raises(SystemExit) as e:
            serve_bench.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err, (args, err)


def test_no_server_at_the_url_exits_1(capsys):
    pytest.importorskip("tritonclient.http", reason=NO_SERVE_EXTRA)
    port = launcher.free_port()  # nothing listens there once it returns
    assert serve_bench.main(["--url", f"127.0.0.1:{port}", "--duration", "1"]) == 1
    assert f"cannot use model 'deeplab' at 127.0.0.1:{port} over http" in capsys.readouterr().err


def test_failed_requests_are_counted_and_reported(server, tmp_path, capsys):
    """Images above the served model's max_pixels: every request fails, and the reports say so."""
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = serve_bench.main(["--url", server.http_url, "--size", "500x500", "--concurrency", "1", "--crf", "off",
                             "--duration", "0.5", "--warmup", "0", "--json", str(out_json), "--markdown", str(out_md)])
    err = capsys.readouterr().err
    assert code == 1 and "request(s) failed (see the reports)" in err
    (window,) = json.loads(out_json.read_text())["windows"]
    assert window["errors"] > 0 and window["requests"] == 0 and window["latency_ms"] is None
    # Triton counts the model's error responses as successes: its count is the requests sent.
    assert window["throughput_rps"] == 0 and window["server"]["requests"] == window["errors"]
    assert window["server"]["other_requests"] == 0
    assert len(window["error_messages"]) == 1 and "max_pixels" in window["error_messages"][0]
    md = out_md.read_text()
    assert "| off | 1 | 0.00 | - | - | - |" in md
    assert f"CRF off, 1 client: {window['errors']} failed request(s): " in md and "Errors: none" not in md
