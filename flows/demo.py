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
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = Path("bunny-demo")
UI_START_TIMEOUT = 120.0
DEMO_ANSWER_TOKENS = 16  # greedy answers are cut here: generation is most of the evaluation's time


def _start_ui(port: int, workdir: Path) -> str:
    """Start `prefect server start` in the background (or reuse one on `port`); its API URL."""
    url = f"http://127.0.0.1:{port}"
    if not _healthy(url):
        with open(workdir / "prefect-server.log", "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + UI_START_TIMEOUT
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {workdir / 'prefect-server.log'}")
            time.sleep(0.5)
        print(f"Prefect UI: {url}  (server pid {server.pid}; stop it with: kill {server.pid})", flush=True)
    else:
        print(f"Prefect UI: {url}  (a server was already running there)", flush=True)
    return f"{url}/api"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _warm_up_temporary_server() -> threading.Thread:
    """Start Prefect's temporary server while the assets are built (it takes ~15 s); join the
    thread before the flow runs."""
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-server", daemon=True)
    thread.start()
    return thread


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
    header = ("stage", "status", "time", "loss", "output")
    table = [header] + [
        (
            r["stage"],
            r["status"],
            f"{r['seconds']:.0f} s" if r.get("seconds") is not None else "-",
            f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-",
            r["output"],
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default ./{DEFAULT_WORKDIR}")
    parser.add_argument("--ui", action="store_true", help="start the local Prefect server and UI")
    parser.add_argument("--port", type=int, default=4200, help="Prefect UI port with --ui")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per training stage")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs first")
    args = parser.parse_args(argv)

    started = time.monotonic()
    workdir = args.workdir.absolute()
    output_root = workdir / "pipeline"
    if args.fresh:
        shutil.rmtree(output_root, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server_start: threading.Thread | None = None
    if args.ui:
        os.environ["PREFECT_API_URL"] = _start_ui(args.port, workdir)
    elif not os.environ.get("PREFECT_API_URL"):
        server_start = _warm_up_temporary_server()
    _quiet_console()

    from bunny.tiny import make_tiny_assets
    from flows.config import EvalSet, PipelineConfig
    from flows.evaluation import RESULTS_TABLE, read_results, results_table
    from flows.pipeline import bunny_pipeline

    print(f"Building tiny assets in {workdir / 'assets'} ...", flush=True)
    assets = make_tiny_assets(workdir / "assets")
    config = PipelineConfig.demo(assets, output_root, steps=args.steps)
    if not config.eval_sets:  # judge every model on the tiny held-out questions (one- or two-word answers)
        heldout = EvalSet(name="heldout", data_path=assets.heldout_data, image_folder=assets.finetune_images)
        evaluate = config.evaluate.model_copy(update={"sets": [heldout], "max_new_tokens": DEMO_ANSWER_TOKENS})
        config = config.model_copy(update={"evaluate": evaluate})
    if server_start is not None:
        server_start.join()  # a flow run must not find the server half started
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
    print(f"\nAveraged model: {output_root / 'average' / 'output'}")
    print(f"Logs:           {output_root}/<stage>/logs/attempt-N.log")
    where = "in the UI above" if args.ui else "run `prefect server start`, then http://127.0.0.1:4200"
    print(f"Artifacts:      <stage>-output, -summary, -progress, -loss, preflight-report, evaluate-results, "
          f"evaluate-report, pipeline-summary ({where}; or `prefect artifact ls`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
