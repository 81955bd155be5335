"""A small OpenAI-compatible chat server for the eval tests (a real process on 127.0.0.1).

Answers ``POST /v1/chat/completions`` from a JSON table {question marker: response text}: the
first marker found in the last user message picks the response (default: "I am not sure.").
``GET /health`` answers 200. Failure modes for the tests:

  --die-after N    exit(1) on the request after N answered ones (a crash mid-eval)
  --slow MARKER    sleep --slow-s seconds before answering the question with that marker
  --reasoning      also send a reasoning_content field, as llama-server's deepseek format does
  --truncate MARKER  answer that question with finish_reason "length" (cut off at max_tokens)

Identity, as llama-server gives it on ``GET /props`` (``model_alias``, ``model_path``): answered
when ``--alias``/``--model`` are given; ``--props-alias`` reports another alias than ``--alias``
(an impostor). ``--port`` binds that port (default: one the kernel picks).

Prints ``PORT <n>`` and llama-server's ``listening on http://127.0.0.1:<n>`` on stdout once
listening (``--announce-port`` announces another port than the one bound: a lying log); logs each
request to stderr. Unknown options (llama-server's) are ignored, so LlamaServer can start it.
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
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--answers", default=None, help="JSON file {marker: response}")
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--slow", default=None)
    parser.add_argument("--slow-s", type=float, default=30.0)
    parser.add_argument("--reasoning", action="store_true")
    parser.add_argument("--truncate", default=None)
    parser.add_argument("--alias", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--props-alias", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--announce-port", type=int, default=None)
    args, _ = parser.parse_known_args()
    answers: dict[str, str] = {}
    if args.answers:
        with open(args.answers, encoding="utf-8") as handle:
            answers = json.load(handle)
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
            elif self.path == "/props" and args.alias is not None:
                self._send(200, {"model_alias": args.props_alias or args.alias, "model_path": args.model,
                                 "model_ftype": "fake", "build_info": "fake-build", "total_slots": 1,
                                 "default_generation_settings": {"n_ctx": 512}})
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
            finish_reason = "length" if args.truncate and args.truncate in text else "stop"
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
                    "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                },
            )
            with lock:
                state["answered"] += 1

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    print(f"PORT {port}", flush=True)
    print(f"srv  listening on http://127.0.0.1:{args.announce_port or port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
