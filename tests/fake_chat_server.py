"""A small OpenAI-compatible chat server for the eval tests (a real process on 127.0.0.1).

Answers ``POST /v1/chat/completions`` from a JSON table {question marker: response text}: the
first marker found in the last user message picks the response (default: "I am not sure.").
``GET /health`` answers 200. Failure modes for the tests:

  --die-after N    exit(1) on the request after N answered ones (a crash mid-eval)
  --slow MARKER    sleep --slow-s seconds before answering the question with that marker
  --reasoning      also send a reasoning_content field, as llama-server's deepseek format does

Prints ``PORT <n>`` on stdout once listening; logs each request to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", required=True, help="JSON file {marker: response}")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--slow", default=None)
    parser.add_argument("--slow-s", type=float, default=30.0)
    parser.add_argument("--reasoning", action="store_true")
    args = parser.parse_args()
    with open(args.answers, encoding="utf-8") as handle:
        answers: dict[str, str] = json.load(handle)
    lock = threading.Lock()
    state = {"answered": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *items: object) -> None:
            sys.stderr.write(fmt % items + "\n")

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            payload = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": "not found"})
                return
            with lock:
                if args.die_after is not None and state["answered"] >= args.die_after:
                    sys.stderr.write("fake server: dying as asked\n")
                    sys.stderr.flush()
                    os._exit(1)
            text = payload["messages"][-1]["content"]
            response = "I am not sure."
            for marker, answer in answers.items():
                if marker in text:
                    response = answer
                    if args.slow and marker == args.slow:
                        time.sleep(args.slow_s)
                    break
            message = {"role": "assistant", "content": response}
            if args.reasoning:
                message["reasoning_content"] = "thinking " * 3
            sys.stderr.write(
                "payload " + json.dumps({k: payload.get(k) for k in ("max_tokens", "temperature", "seed", "stop")}) + "\n"
            )
            self._send(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": payload.get("model", "fake"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                },
            )
            with lock:
                state["answered"] += 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
