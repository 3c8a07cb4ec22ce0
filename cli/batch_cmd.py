"""`freeference batch …`: submit a JSONL file, follow it with a progress bar, cancel, download.

Talks to the HTTP API like any client (base URL and key from options or FREEFERENCE_BASE_URL /
FREEFERENCE_API_KEY), so it works against any deployment, not only a local one.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from workers.protocol import BATCH_TERMINAL as TERMINAL

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
CHAT_COMPLETIONS = "/v1/chat/completions"


class ApiError(Exception):
    """The gateway answered with an error body."""


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `batch submit|status|cancel|download|list`."""
    batch = subparsers.add_parser("batch", help="run OpenAI-style batches through the gateway")
    batch.add_argument("--base-url", default=os.environ.get("FREEFERENCE_BASE_URL", DEFAULT_BASE_URL),
                       help="gateway URL including /v1 (env FREEFERENCE_BASE_URL)")
    batch.add_argument("--api-key", default=os.environ.get("FREEFERENCE_API_KEY"),
                       help="a Freeference key (env FREEFERENCE_API_KEY)")
    actions = batch.add_subparsers(dest="batch_action", required=True)
    submit = actions.add_parser("submit", help="upload FILE.jsonl and create a batch")
    submit.add_argument("file", type=Path)
    submit.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    submit.add_argument("--output", type=Path, help="with --wait: write results here (errors to *.errors.jsonl)")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.set_defaults(func=_submit)
    status = actions.add_parser("status", help="show a batch")
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    status.set_defaults(func=_status)
    cancel = actions.add_parser("cancel", help="cancel a batch")
    cancel.add_argument("batch_id")
    cancel.set_defaults(func=_cancel)
    download = actions.add_parser("download", help="write a finished batch's output (and errors)")
    download.add_argument("batch_id")
    download.add_argument("--output", type=Path, help="default: BATCH_ID.jsonl; errors go to *.errors.jsonl")
    download.set_defaults(func=_download)
    listing = actions.add_parser("list", help="list your batches")
    listing.set_defaults(func=_list)


def _client(args: argparse.Namespace) -> httpx.Client:
    if not args.api_key:
        raise ApiError("no API key: pass --api-key or set FREEFERENCE_API_KEY (with `make serve` running: "
                       "export FREEFERENCE_API_KEY=$(.venv/bin/freeference keys demo))")
    return httpx.Client(base_url=args.base_url.rstrip("/"), headers={"Authorization": f"Bearer {args.api_key}"},
                        timeout=httpx.Timeout(30.0, read=600.0))


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ApiError(f"HTTP {response.status_code}: {message}")
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else None


def _summary(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    line = (f"{batch['id']}  {batch['status']}  completed {counts['completed']} / failed {counts['failed']}"
            f" / total {counts['total']}")
    for error in (batch.get("errors") or {}).get("data", [])[:20]:
        where = f"line {error['line']}: " if error.get("line") else ""
        line += f"\n  {where}{error['code']}: {error['message']}"
    return line


def _follow(client: httpx.Client, batch_id: str, poll_s: float = 1.0) -> dict[str, Any]:
    """Poll until the batch ends, with a live completed / failed / total bar (rate and ETA from tqdm)."""
    batch: dict[str, Any] = _check(client.get(f"/batches/{batch_id}"))
    with tqdm(total=batch["request_counts"]["total"] or None, unit="req", dynamic_ncols=True,
              desc=batch_id[:18]) as bar:
        while True:
            counts = batch["request_counts"]
            if counts["total"] and bar.total != counts["total"]:
                bar.total = counts["total"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(status=batch["status"], completed=counts["completed"], failed=counts["failed"])
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(poll_s)
            batch = _check(client.get(f"/batches/{batch_id}"))


def _save(client: httpx.Client, batch: dict[str, Any], output: Path) -> None:
    for key, path in (("output_file_id", output), ("error_file_id", output.with_suffix(".errors.jsonl"))):
        if batch.get(key):
            response = client.get(f"/files/{batch[key]}/content")
            _check(response)
            path.write_bytes(response.content)
            print(f"wrote {path}")


def _finish(client: httpx.Client, batch: dict[str, Any], wait: bool, output: Path | None) -> int:
    if wait and batch["status"] not in TERMINAL:
        batch = _follow(client, batch["id"])
    print(_summary(batch))
    if output is not None and batch["status"] in TERMINAL:
        _save(client, batch, output)
    return 0 if batch["status"] in ("completed", "validating", "in_progress", "finalizing") else 1


def _run(args: argparse.Namespace, action: Any) -> int:
    try:
        with _client(args) as client:
            result: int = action(client)
            return result
    except (ApiError, httpx.HTTPError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _endpoint_of(path: Path) -> str:
    """The batch's endpoint: the `url` of the file's first line (validation checks every other
    line names the same); chat completions when it has none."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                return url if isinstance(url, str) and url else CHAT_COMPLETIONS
    return CHAT_COMPLETIONS


def _submit(args: argparse.Namespace) -> int:
    metadata = dict(item.split("=", 1) for item in args.metadata if "=" in item) or None

    def go(client: httpx.Client) -> int:
        with args.file.open("rb") as handle:
            uploaded = _check(client.post("/files", data={"purpose": "batch"},
                                          files={"file": (args.file.name, handle, "application/jsonl")}))
        batch = _check(client.post("/batches", json={
            "input_file_id": uploaded["id"], "endpoint": _endpoint_of(args.file), "completion_window": "24h",
            "metadata": metadata}))
        print(f"submitted {batch['id']} (input {uploaded['id']})")
        return _finish(client, batch, args.wait, args.output if args.wait else None)

    return _run(args, go)


def _status(args: argparse.Namespace) -> int:
    return _run(args, lambda client: _finish(client, _check(client.get(f"/batches/{args.batch_id}")),
                                             args.wait, None))


def _cancel(args: argparse.Namespace) -> int:
    def go(client: httpx.Client) -> int:
        print(_summary(_check(client.post(f"/batches/{args.batch_id}/cancel"))))
        return 0

    return _run(args, go)


def _download(args: argparse.Namespace) -> int:
    def go(client: httpx.Client) -> int:
        batch = _check(client.get(f"/batches/{args.batch_id}"))
        if batch["status"] not in TERMINAL:
            raise ApiError(f"batch {args.batch_id} is still {batch['status']}; try again when it has ended")
        _save(client, batch, args.output or Path(f"{args.batch_id}.jsonl"))
        return 0

    return _run(args, go)


def _list(args: argparse.Namespace) -> int:
    def go(client: httpx.Client) -> int:
        for batch in _check(client.get("/batches", params={"limit": 100}))["data"]:
            print(_summary(batch).splitlines()[0])
        return 0

    return _run(args, go)
