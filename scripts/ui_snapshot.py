"""Screenshots of what the Prefect UI shows for one flow run: its page, its Artifacts tab, and
each of its artifacts (the newest version per key), taken with headless Chromium.

Starts nothing: it reads a running Prefect server's API and points Chromium at its UI.

    python scripts/ui_snapshot.py --api-url http://127.0.0.1:4200/api FLOW_RUN_ID --out shots/

writes `shots/run.png`, `shots/run-artifacts.png`, `shots/artifact-<key>.png` and
`shots/index.json` (what each picture shows, and its URL). Chromium is the Debian package
`chromium` (`apt-get install -y chromium`) or any binary given with `--chromium`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bunny.cli import UserError, add_debug_flag, run_cli  # noqa: E402

PROG = "ui_snapshot"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1",
)


def api_call(api_url: str, path: str, body: dict | None = None) -> object:
    """GET (or POST `body` to) `<api_url>/<path>`, JSON back; unreachable or refused -> UserError."""
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/{path.lstrip('/')}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise UserError(f"{request.full_url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise UserError(f"cannot reach the Prefect API at {api_url} (--api-url): {error}") from error


def latest_artifacts(api_url: str, flow_run_id: str) -> list[dict]:
    """The newest version of every keyed artifact of the run, ordered by key."""
    found = api_call(api_url, "artifacts/latest/filter",
                     {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "KEY_ASC", "limit": 200})
    return [a for a in found if a.get("key")]


def check_ui_reaches_its_api(ui_url: str) -> None:
    """The UI fetches its data from the API its server advertises (`PREFECT_UI_API_URL`, by
    default port 4200): when that does not answer, every screenshot would show an error page."""
    settings = api_call(ui_url, "ui-settings")
    ui_api = str(settings.get("api_url", "")).rstrip("/") if isinstance(settings, dict) else ""
    try:
        api_call(ui_api, "health")
    except UserError:
        raise UserError(f"the UI at {ui_url} reads its data from {ui_api or '(no api_url)'}, which does not answer; "
                        "start the server with PREFECT_UI_API_URL set to its API URL (or give --ui-url)") from None


def find_chromium(given: str | None) -> str:
    for name in ([given] if given else CHROMIUM_NAMES):
        path = shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    wanted = given or " / ".join(CHROMIUM_NAMES)
    raise UserError(f"no Chromium found ({wanted}); install the Debian package: apt-get install -y chromium, "
                    "or give its path with --chromium")


def screenshot(chromium: str, url: str, target: Path, size: tuple[int, int], wait_ms: int, profile: Path) -> None:
    """One page, rendered for `wait_ms` of virtual time (the UI loads its data after startup)."""
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={target}", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120 + wait_ms / 1000)
    if result.returncode != 0 or not target.exists():
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"chromium could not screenshot {url} (exit {result.returncode}):\n{tail}")


def snapshot(api_url: str, ui_url: str, flow_run_id: str, out: Path, chromium: str,
             size: tuple[int, int], wait_ms: int) -> list[dict]:
    run = api_call(api_url, f"flow_runs/{flow_run_id}")
    check_ui_reaches_its_api(ui_url)
    artifacts = latest_artifacts(api_url, flow_run_id)
    pages = [
        {"file": "run.png", "shows": f"flow run {run.get('name')} ({run.get('state_name')})",
         "url": f"{ui_url}/runs/flow-run/{flow_run_id}"},
        {"file": "run-artifacts.png", "shows": "the run's Artifacts tab",
         "url": f"{ui_url}/runs/flow-run/{flow_run_id}?tab=Artifacts"},
    ]
    pages += [{"file": f"artifact-{a['key']}.png", "shows": f"artifact {a['key']} ({a.get('type')})",
               "url": f"{ui_url}/artifacts/artifact/{a['latest_id']}"} for a in artifacts]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-snapshot-profile-") as profile:
        for page in pages:
            screenshot(chromium, page["url"], out / page["file"], size, wait_ms, Path(profile))
            print(f"{out / page['file']}: {page['shows']}", flush=True)
    (out / "index.json").write_text(json.dumps(pages, indent=1) + "\n")
    return pages


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1400x1600") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("flow_run_id", help="the flow run to show (its id, as in the UI's URL)")
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"),
                        help="the Prefect API, e.g. http://127.0.0.1:4200/api (default: $PREFECT_API_URL)")
    parser.add_argument("--ui-url", help="the UI's address (default: the API URL without its /api)")
    parser.add_argument("--out", type=Path, default=Path("ui-snapshots"), help="folder for the pictures")
    parser.add_argument("--chromium", help="Chromium binary (default: the first of %s on PATH)" % ", ".join(CHROMIUM_NAMES))
    parser.add_argument("--size", type=parse_size, default=(1400, 1600), help="window WIDTHxHEIGHT (default 1400x1600)")
    parser.add_argument("--wait-ms", type=int, default=8000, help="virtual time each page gets to load (default 8000)")
    add_debug_flag(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    if not args.api_url:
        raise UserError("no Prefect API: give --api-url (e.g. http://127.0.0.1:4200/api) or set PREFECT_API_URL")
    try:
        flow_run_id = str(UUID(args.flow_run_id))
    except ValueError:
        raise UserError(f"{args.flow_run_id!r} is not a flow run id (a UUID)") from None
    api_url = args.api_url.rstrip("/")
    ui_url = (args.ui_url or api_url.removesuffix("/api")).rstrip("/")
    chromium = find_chromium(args.chromium)
    snapshot(api_url, ui_url, flow_run_id, args.out, chromium, args.size, args.wait_ms)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _main(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
