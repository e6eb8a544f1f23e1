"""A stand-in for an OpenAI-compatible LLM endpoint on 127.0.0.1, for tests: a thread that answers like
``/v1/chat/completions`` and stops by itself (after ``lifetime_s``, and when the ``with`` block ends)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

MARK = " ="  # the token the stand-in "recognises"


class StandIn(BaseHTTPRequestHandler):
    """Answers an explainer prompt with an explanation naming " =", and a scorer prompt with labels that say 1
    exactly for the examples whose (marked, for fuzzing; last, for detection) token is " =".
    ``server.state["mode"]``: ``ok``, ``silent`` (never answers within ``silence_s``) or ``fail_after`` (HTTP 500
    after ``limit`` requests)."""

    server_version = "stand-in"

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        state = self.server.state
        state["requests"] += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if state["mode"] == "silent":
            time.sleep(state["silence_s"])
            return
        if state["mode"] == "fail_after" and state["requests"] > state["limit"]:
            self.send_error(500, "overloaded")
            return
        state["auth"] = self.headers.get("Authorization")
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if "[EXPLANATION]" in system:
            text = "The examples mark an equals sign.\n[EXPLANATION]: the token \" =\" in equations"
        elif "Text examples:" in user:
            examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
            fuzz = "<<" in user.split("Text examples:", 1)[1]
            text = str([int((f"<<{MARK}>>" in e) if fuzz else e.endswith(MARK)) for e in examples])
        else:
            text = "OK"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextlib.contextmanager
def standin(lifetime_s: float = 60.0) -> Iterator[tuple[ThreadingHTTPServer, str]]:
    """``(server, base_url)``; ``server.state`` holds the mode and counts the requests."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    httpd.daemon_threads = True
    httpd.state = {"mode": "ok", "requests": 0, "limit": 0, "silence_s": 5.0}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    timer = threading.Timer(lifetime_s, httpd.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        timer.cancel()
        httpd.shutdown()
        httpd.server_close()
