"""`python -m flows.demo [--ui] [--workdir DIR]`: the whole pipeline on the CPU, from nothing.

Builds the tiny assets (`bunny.tiny`), then runs every stage of `bunny_pipeline` — preflight,
pretrain, both recipes in parallel, both merges, the average, the evaluation of every model on
the held-out questions — through real deepspeed launches under Prefect's temporary local server
(no set-up). It prints one line per stage as it ends and, at the end, a stage table, the
evaluation table and where the averaged model, the logs and the artifacts are.
Run it again with the same workdir and every stage is skipped; `--fresh` starts over.

`--ui` starts a local Prefect server with its UI instead (left running afterwards, so the run
can be browsed) and prints its address.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from flows.launcher import SUPERVISOR, kill_group, kill_orphaned_group

DEFAULT_WORKDIR = Path("bunny-demo")
UI_START_TIMEOUT = 120.0
SERVER_START_TIMEOUT = 300.0  # a busy machine can take minutes
SERVER_START_ATTEMPTS = 3
DEMO_ANSWER_TOKENS = 16  # greedy answers are cut here: generation is most of the evaluation's time


def _start_ui(port: int, workdir: Path) -> str:
    """Start `prefect server start` in the background (or reuse one on `port`); its API URL."""
    url = f"http://127.0.0.1:{port}"
    if not server_healthy(url):
        with open(workdir / "prefect-server.log", "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + UI_START_TIMEOUT
        while not server_healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {workdir / 'prefect-server.log'}")
            time.sleep(0.5)
        print(f"Prefect UI: {url}  (server pid {server.pid}; stop it with: kill {server.pid})", flush=True)
    else:
        print(f"Prefect UI: {url}  (a server was already running there)", flush=True)
    return f"{url}/api"


def server_healthy(url: str) -> bool:
    """Whether the Prefect server at `url` (no `/api`) answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class TemporaryServer:
    """A Prefect server for this demo run only: on a free port, its output in a log file, and
    stopped (its whole process group) when the demo exits.

    Used instead of Prefect's own temporary server, whose start gives up after 20 s on a busy
    machine (printing a traceback while the server process lives on), can race other processes
    for its port, and is left running if the interpreter exits abruptly. This one runs under
    the stages' supervisor (`flows.supervisor`), so it goes down with the demo however the
    demo ends (SIGTERM, SIGKILL, Ctrl-C).
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url = ""

    def start(self) -> None:
        """Launch the server (returns at once; `wait_healthy` waits for it)."""
        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        server = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        supervised = [sys.executable, str(SUPERVISOR), "--grace", "5", "--parent-pid", str(os.getpid()), "--", *server]
        with open(self.log_path, "ab") as log:
            # stdin: a pipe only this process writes to; its end tells the supervisor we are gone
            self.process = subprocess.Popen(supervised, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.PIPE, env=env, start_new_session=True)
        atexit.register(self.stop)

    def wait_healthy(self) -> None:
        """Block until the API answers; restart on another port if this one was taken."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        for _ in range(SERVER_START_ATTEMPTS):
            assert self.process is not None
            while not server_healthy(self.api_url.removesuffix("/api")):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            else:
                return
            self.stop()
            if time.monotonic() > deadline:
                break
            self.start()  # most likely its port was taken meanwhile
        raise SystemExit(f"the temporary Prefect server did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # the supervisor stops the server's whole process group
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_group(self.process.pid)
                self.process.wait()
        if self.process is not None:
            kill_orphaned_group(self.process)  # else the server outlives its killed supervisor
        self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StageEvents(logging.Filter):
    """Console filter: the stages' one-line reports and warnings, not the full run log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "bunny_event", False)


def _quiet_console() -> None:
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # now, so that the filter goes on the handler the flow run will use
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.addFilter(StageEvents())


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("stage", "status", "attempts", "time", "loss", "output")
    table = [header] + [
        (
            r["stage"],
            r["status"],
            str(r["attempts"]) if r.get("attempts") is not None else "-",
            f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-",
            f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-",
            r["output"],
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def _print_kind_accuracy(evaluation: list[dict[str, Any]], output: Path) -> None:
    """Greedy accuracy per kind of held-out image question, next to a uniform guess's."""
    from bunny.tiny.scoring import kind_table, stage_records

    for eval_set in dict.fromkeys(row["eval set"] for row in evaluation):
        models = stage_records(output / eval_set, [row["model"] for row in evaluation if row["eval set"] == eval_set])
        table = kind_table(models)
        if table:
            print(f"\nAccuracy per question kind on {eval_set} (first questions; chance = a uniform guess):")
            print("  " + table.rstrip().replace("\n", "\n  "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default ./{DEFAULT_WORKDIR}")
    parser.add_argument("--ui", action="store_true", help="start the local Prefect server and UI")
    parser.add_argument("--port", type=int, default=4200, help="Prefect UI port with --ui")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per training stage (default: the demo config's, which learn)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    parser.add_argument("--random-assets", action="store_true",
                        help="untrained tiny LLM (builds in a second instead of about a minute; it learns "
                             "nothing visible): for checks of the machinery, with --steps")
    args = parser.parse_args(argv)

    started = time.monotonic()
    workdir = args.workdir.absolute()
    output_root = workdir / "pipeline"
    if args.fresh:
        shutil.rmtree(output_root, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server: TemporaryServer | None = None
    if args.ui:
        os.environ["PREFECT_API_URL"] = _start_ui(args.port, workdir)
    elif not os.environ.get("PREFECT_API_URL"):
        server = TemporaryServer(workdir / "prefect-server.log")
        server.start()  # it starts while the assets are built
        os.environ["PREFECT_API_URL"] = server.api_url
    try:
        return _run(args, workdir, output_root, started, server)
    finally:
        if server is not None:
            _send_queued_logs_and_events()  # while the server is up
            server.stop()


def _send_queued_logs_and_events() -> None:
    """Prefect sends logs and events in the background; what is still queued at exit would be
    sent to a server already stopped ("Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=60)
    EventsWorker.drain_all(timeout=60)


def _run(args: argparse.Namespace, workdir: Path, output_root: Path, started: float,
         server: TemporaryServer | None) -> int:
    _quiet_console()

    from bunny.tiny import make_tiny_assets
    from flows.config import DEMO_PRETRAINED_ASSETS, EvalSet, PipelineConfig
    from flows.evaluation import RESULTS_TABLE, read_results, results_table
    from flows.pipeline import bunny_pipeline

    print(f"Building tiny assets in {workdir / 'assets'} ...", flush=True)
    assets = make_tiny_assets(workdir / "assets", pretrained=DEMO_PRETRAINED_ASSETS and not args.random_assets)
    config = PipelineConfig.demo(assets, output_root, steps=args.steps)
    if not config.eval_sets:  # judge every model on the tiny held-out questions (one- or two-word answers)
        heldout = EvalSet(name="heldout", data_path=assets.heldout_data, image_folder=assets.finetune_images)
        evaluate = config.evaluate.model_copy(update={"sets": [heldout], "max_new_tokens": DEMO_ANSWER_TOKENS})
        config = config.model_copy(update={"evaluate": evaluate})
    if server is not None:
        server.wait_healthy()  # a flow run must not find the server half started
    print(f"Running the pipeline into {output_root} (logs: <stage>/logs/) ...", flush=True)
    try:
        rows = bunny_pipeline(config)
    except Exception as exc:
        print(f"\nThe pipeline failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        print(f"Logs: {output_root}/<stage>/logs/; run again to resume.", file=sys.stderr)
        return 1

    print(f"\nDone in {time.monotonic() - started:.0f} s (Prefect's start included):")
    _print_table(rows)
    evaluation = read_results(output_root / "evaluate" / "output")
    if evaluation:
        print(f"\nEvaluation ({output_root / 'evaluate' / 'output' / RESULTS_TABLE}):")
        print("  " + results_table(evaluation).rstrip().replace("\n", "\n  "))
        _print_kind_accuracy(evaluation, output_root / "evaluate" / "output")
    print(f"\nAveraged model: {output_root / 'average' / 'output'}")
    print(f"Logs:           {output_root}/<stage>/logs/attempt-N.log")
    where = "in the UI above" if args.ui else "run `prefect server start`, then http://127.0.0.1:4200"
    print(f"Artifacts:      <stage>-output, -summary, -progress, -loss, -loss-table, preflight-report, "
          f"evaluate-results, evaluate-report, pipeline-summary ({where}; or `prefect artifact ls`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
