"""``gptserve-run-batch -i requests.jsonl -o results.jsonl [gptserve flags]``: a file of requests, answered offline.

The input is OpenAI's Batch API file (vLLM's ``run-batch`` reads the same): one JSON object a line,
``{"custom_id", "method": "POST", "url", "body"}``. Each body goes to the same app ``gptserve`` serves, in this
process and without a listener, so it is checked and answered exactly as over HTTP; up to ``--max-num-seqs``
requests are in flight at once, and the engine batches them. The output has one line per request, in the input's
order: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``; a request the
server refused keeps its status and error body, as in OpenAI's output files. The whole file is checked before any
model loads: a malformed line stops the run with exit status 2 and its line number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.cli import start_and_run
from server.config import ServerConfig

if TYPE_CHECKING:
    import httpx
    from fastapi import FastAPI

log = logging.getLogger("gptserve.batch")

# OpenAI's batch endpoints, and vLLM's scoring and this server's perplexity: every one that answers in one body.
BatchURL = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/score",
                   "/v1/rerank", "/v1/perplexity"]
BUSY_RETRY_S = 0.05  # a 429 (queue full) is retried: the batch itself fills the queue, not a client to push back


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: BatchURL
    body: dict[str, Any]


class BatchFileError(ValueError):
    """The input file cannot be run; the message names the line."""


def read_requests(lines: list[str]) -> list[BatchRequest]:
    requests, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = BatchRequest.model_validate_json(line)
        except ValidationError as e:
            problem = e.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise BatchFileError(f"line {number}: {where + ': ' if where else ''}{problem['msg']}") from None
        if request.custom_id in seen:
            raise BatchFileError(f"line {number}: custom_id {request.custom_id!r} is used twice; each must be unique")
        seen.add(request.custom_id)
        requests.append(request)
    if not requests:
        raise BatchFileError("the input has no requests")
    return requests


def refusal(request: BatchRequest) -> str | None:
    """Bodies that would not end in one answer: a stream, or a response left to run in the background."""
    if request.body.get("stream"):
        return "stream: a batch answers each request in one body; leave stream out"
    if request.body.get("background"):
        return "background: a batch waits for each response; leave background out"
    return None


async def answer(client: httpx.AsyncClient, request: BatchRequest) -> dict[str, Any]:
    line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id,
                            "response": None, "error": None}
    reason = refusal(request)
    if reason is not None:
        param = reason.split(":", 1)[0]
        body = {"error": {"message": reason, "type": "invalid_request_error", "param": param, "code": None}}
        line["response"] = {"status_code": 400, "request_id": None, "body": body}
        return line
    while (reply := await client.post(request.url, json=request.body)).status_code == 429:
        await asyncio.sleep(BUSY_RETRY_S)
    is_json = reply.headers.get("content-type", "").startswith("application/json")
    line["response"] = {"status_code": reply.status_code, "request_id": reply.headers.get("x-request-id"),
                        "body": reply.json() if is_json else reply.text}
    return line


async def run_batch(app: FastAPI, config: ServerConfig, requests: list[BatchRequest], output: Path | None) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: the app's access log has them
    headers = {"authorization": f"Bearer {config.http.api_keys[0]}"} if config.http.api_keys else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a route's crash is its line's 500
        async with httpx.AsyncClient(transport=transport, base_url="http://gptserve", headers=headers,
                                     timeout=None) as client:
            lines: list[dict[str, Any]] = [{} for _ in requests]
            queue = iter(enumerate(requests))

            async def worker() -> None:  # one of --max-num-seqs, each taking the next request when it is done
                for index, request in queue:
                    lines[index] = await answer(client, request)

            await asyncio.gather(*(worker() for _ in range(config.engine.max_num_seqs)))
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
    failed = sum(line["response"]["status_code"] != 200 for line in lines)
    log.info("batch done", extra={"requests": len(lines), "failed": failed})
    return app.state.exit_status  # 1 when an engine core failed (its requests' lines hold 503s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gptserve-run-batch",
        description="Answer a file of requests in OpenAI's batch format (one JSON object a line: custom_id, "
        "method POST, url, body) with the models gptserve would serve, and write one result a line.",
        epilog="Every other flag (and GPTSERVE_* variable) is gptserve's own: see gptserve --help.")
    parser.add_argument("-i", "--input-file", required=True, help="the requests, JSONL; - reads standard input")
    parser.add_argument("-o", "--output-file", required=True, help="the results, JSONL; - writes standard output")
    batch, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        text = sys.stdin.read() if batch.input_file == "-" else Path(batch.input_file).read_text()
        requests = read_requests(text.splitlines())
    except (OSError, UnicodeDecodeError, BatchFileError) as e:
        print(f"gptserve-run-batch: error: {batch.input_file}: {e}", file=sys.stderr)
        return 2
    output = None if batch.output_file == "-" else Path(batch.output_file)
    if output is not None and not os.access(output.parent, os.W_OK):  # found out now, not after the whole batch
        print(f"gptserve-run-batch: error: {batch.output_file}: its folder is missing or not writable", file=sys.stderr)
        return 2
    return start_and_run(rest, lambda app, config: asyncio.run(run_batch(app, config, requests, output)))


if __name__ == "__main__":
    sys.exit(main())
