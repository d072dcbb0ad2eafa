"""The `modelpress` command as people and CI run it: a subprocess against a real service, with and without a
terminal, and the exit codes that tell what went wrong."""

import errno
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
COMMAND = [sys.executable, "-m", "modelpress"]
BAR_CHARACTERS = ("━", "█", "\r", "\x1b[")


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    return subprocess.run([*COMMAND, *args], cwd=cwd, env={**clean, "MODELPRESS_HOME": str(cwd / "no-home"), **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_in_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """The command on a pseudo-terminal (120 x 40), as a person at a shell runs it: (exit code, what it showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    process = subprocess.Popen([*COMMAND, *args], cwd=cwd, stdin=terminal, stdout=terminal, stderr=terminal,
                               env={**clean, "TERM": "xterm-256color", **env}, close_fds=True)
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError as exc:  # EIO: the terminal closed with the process
            if exc.errno != errno.EIO:
                raise
            break
        if not data:
            break
        shown += data
    os.close(controller)
    return process.wait(timeout=timeout), shown.decode(errors="replace")


def test_compress_in_ci_prints_plain_lines_the_report_and_saves_the_artifacts(service, model_file, eval_file,
                                                                             tmp_path) -> None:
    result = run_cli(["compress", str(model_file), "--preset", "int8-cpu", "--eval", str(eval_file),
                      "--out", "out"], tmp_path, service.env())
    assert result.returncode == 0, result.stderr
    assert not any(c in result.stdout + result.stderr for c in BAR_CHARACTERS)
    log = result.stderr.splitlines()
    assert log[0].startswith("uploading mlp.pt2 (")
    assert any(line.endswith(": ready") for line in log) and any("dataset ds_" in line for line in log)
    job_id = next(line.split()[1].rstrip(":") for line in log if line.startswith("job ") and "submitted" in line)
    assert f"job {job_id}: succeeded" in log
    assert any(line.startswith("[") and "%]" in line for line in log)  # progress as lines

    table = result.stdout.splitlines()
    assert table[0].split() == ["before", "after", "change"]
    rows = {line.split("  ")[0]: line for line in table[1:]}
    for label in ("size", "params", "latency p50 (ms)", "accuracy"):
        assert label in rows, result.stdout
    assert any(line.startswith("fidelity: cosine_mean ") for line in table)
    saved = sorted(Path(line.removeprefix("saved ")).name for line in table if line.startswith("saved "))
    assert saved == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["mlp-compressed.onnx", "mlp-model-card.md", "mlp-report.html", "mlp-report.json"]
    report_file = next((tmp_path / "out").glob("*.json"))
    assert json.loads(report_file.read_text())["job_id"] == job_id

    listed = run_cli(["jobs", "list"], tmp_path, service.env())
    assert listed.returncode == 0
    assert any(line.split()[:2] == [job_id, "succeeded"] for line in listed.stdout.splitlines())
    report = run_cli(["report", job_id], tmp_path, service.env())
    assert report.returncode == 0 and report.stdout.splitlines()[1:3] == table[1:3]
    as_json = run_cli(["report", job_id, "--json"], tmp_path, service.env())
    assert json.loads(as_json.stdout)["compression_ratio"] == json.loads(report_file.read_text())["compression_ratio"]
    shown = run_cli(["jobs", "show", job_id], tmp_path, service.env())
    assert json.loads(shown.stdout)["status"] == "succeeded"
    watched = run_cli(["jobs", "watch", job_id], tmp_path, service.env())
    assert watched.returncode == 0 and f"job {job_id}: succeeded" in watched.stderr
    cancelled = run_cli(["jobs", "cancel", job_id], tmp_path, service.env())
    assert cancelled.returncode == 2 and "job_finished" in cancelled.stderr
    models = run_cli(["models", "list"], tmp_path, service.env())
    assert models.returncode == 0 and "mlp.pt2" in models.stdout
    datasets = run_cli(["datasets", "list", "--json"], tmp_path, service.env())
    assert any(d["name"] == "eval.npz" and d["has_labels"] for d in json.loads(datasets.stdout))


def test_compress_on_a_terminal_shows_bars_and_finished_stages(service, model_file, tmp_path) -> None:
    code, shown = run_in_terminal(["compress", str(model_file), "--out", "out"], tmp_path, service.env())
    assert code == 0, shown
    assert "━" in shown  # rich's bars: the upload's, the job's, the downloads'
    assert "✓" in shown and "succeeded" in shown  # a line per finished stage, then the outcome
    assert "uploading mlp.pt2" in shown and "latency p50 (ms)" in shown
    assert len(list((tmp_path / "out").iterdir())) == 4  # model, JSON and HTML report, model card


def test_a_recipe_the_service_refuses_exits_2_with_its_code_and_message(service, model_file, tmp_path) -> None:
    (tmp_path / "recipe.json").write_text(json.dumps({"steps": [{"op": "quantize", "dtype": "int3"}]}))
    result = run_cli(["compress", str(model_file), "--recipe", "recipe.json"], tmp_path, service.env())
    assert result.returncode == 2
    assert "error: invalid_request: recipe.steps.0" in result.stderr and "(HTTP 422)" in result.stderr


def test_a_failed_job_exits_1_with_its_code_and_message(service, model_file, tmp_path) -> None:
    # 95% of the weights pruned away cannot keep the outputs at cosine 0.999: the job fails, its files are kept
    (tmp_path / "job.json").write_text(json.dumps({
        "recipe": {"steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.95}]}, "min_fidelity": 0.999}))
    result = run_cli(["compress", str(model_file), "--recipe", "job.json", "--out", "out"], tmp_path, service.env())
    assert result.returncode == 1, result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: job job_") and " failed: fidelity_collapse: " in error
    assert "fidelity floor 0.999: NOT held" in result.stdout
    assert any((tmp_path / "out").iterdir())


def test_usage_and_connection_errors_have_their_own_exit_codes(service, tmp_path) -> None:
    missing = run_cli(["compress", "nothing.pt2"], tmp_path, service.env())
    assert missing.returncode == 2 and "nothing.pt2: no such file" in missing.stderr
    unreachable = run_cli(["models", "list", "--url", f"http://127.0.0.1:{free_port()}"], tmp_path, service.env())
    assert unreachable.returncode == 3 and "error: connection_failed: could not reach" in unreachable.stderr
    no_key = run_cli(["models", "list"], tmp_path, {"MODELPRESS_URL": service.url})
    assert no_key.returncode == 2 and "no API key" in no_key.stderr
    bad_key = run_cli(["models", "list", "--key", "mp_wrong"], tmp_path, service.env())
    assert bad_key.returncode == 2 and "error: unauthorized" in bad_key.stderr
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "api_key").write_text(service.key + "\n")
    from_home = run_cli(["jobs", "list"], tmp_path, {"MODELPRESS_URL": service.url,
                                                     "MODELPRESS_HOME": str(tmp_path / "home")})
    assert from_home.returncode == 0 and from_home.stdout.startswith("ID")


HIDE_SERVER_PACKAGES = ("import sys\nfor name in ('torch', 'onnx', 'onnxruntime', 'onnxscript', 'transformers', "
                        "'safetensors', 'numpy', 'fastapi', 'starlette', 'sqlalchemy', 'celery', 'pydantic', "
                        "'pydantic_settings', 'app', 'worker'):\n    sys.modules[name] = None\n")


def test_the_client_and_its_commands_need_none_of_the_servers_packages(tmp_path) -> None:
    code = HIDE_SERVER_PACKAGES + ("from modelpress import Client, ApiError\nfrom modelpress.cli import main\n"
                                   "sys.exit(main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("compress", "models", "jobs", "report", "serve", "worker", "keys"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_without_the_worker_extra_say_which_extra(command, tmp_path) -> None:
    code = ("import sys\nsys.modules['torch'] = None\nfrom modelpress.cli import main\n"
            f"sys.exit(main(['{command}']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "MODELPRESS_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"`modelpress {command}` runs a worker, which needs the worker extra (torch not installed)" in result.stderr
    assert "pip install 'modelpress[worker]'" in result.stderr
    assert not (tmp_path / "modelpress.db").exists()  # refused before it did anything
