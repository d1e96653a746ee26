"""A fake llama-server for fault tests: answers like the real one, misbehaves on request.

Accepts llama-server's argv (unknown flags ignored) plus switches:
  --fake-ready-after S     /health answers 503 for S seconds first
  --fake-exit-at-once N    exit with code N before listening
  --fake-crash-after S     exit(3) S seconds after becoming ready
  --fake-ignore-sigterm    survive SIGTERM (only SIGKILL stops it)
  --fake-model NAME        report this model_path in /props (default: the --model value)
  --fake-chunk-delay S     pause S seconds between streamed chunks
  --fake-done-delay S      pause S seconds between a stream's [DONE] and its end
  --fake-crash-mid-stream K  exit(3) after streaming K chunks
  --fake-oom               log a CUDA allocation failure as llama.cpp does, exit 1 before listening
  --fake-oom-times N FILE  the same for the first N starts (FILE counts them), then start normally
  --fake-sigkill-at-load   SIGKILL itself before listening (as the kernel's OOM killer would)
Any POST path answers a chat completion that also names the `path`, the body's `fields` and the body (`echo`); `/props`
shows the environment's FAKE_ENV_* variables and the query string it was asked with.
An API key (--api-key or LLAMA_API_KEY, as llama-server) makes POSTs need `Authorization: Bearer KEY`.
`--version` and `--help` print what llamactl's probe expects.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLAGS = ["-m", "--model", "--host", "--port", "-c", "--ctx-size", "-ngl", "--n-gpu-layers", "-fa", "--flash-attn",
         "-np", "--parallel", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-b", "--batch-size", "-ub",
         "--ubatch-size", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "-fit", "--fit", "--metrics",
         "-ts", "--tensor-split", "--swa-full", "-nkvo", "--no-kv-offload", "-lm", "--load-mode", "-nr",
         "--no-repack", "-lv", "--verbosity", "--api-key", "--alias"]


def arg(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else default


def answer_probe(argv, name="fake") -> bool:
    """Answer llamactl's probe (`--version`, `--help`) like llama-server; True if it was one."""
    if "--version" in argv:
        print(f"version: 0.0.0-{name} (build 0, commit fake)\nbuilt with fake for Linux")
        return True
    if "--help" in argv:
        print("\n".join(f"{flag:<40}fake option" for flag in FLAGS))
        return True
    return False


def main() -> None:
    argv = sys.argv[1:]
    if answer_probe(argv):
        return
    if "--fake-exit-at-once" in argv:
        print("fake: failing at once", flush=True)
        sys.exit(int(arg(argv, "--fake-exit-at-once")))
    oom = "--fake-oom" in argv
    if "--fake-oom-times" in argv:
        i = argv.index("--fake-oom-times")
        times, counter = int(argv[i + 1]), argv[i + 2]
        seen = int(open(counter).read() or 0) if os.path.exists(counter) else 0
        with open(counter, "w") as fh:
            fh.write(str(seen + 1))
        oom = seen < times
    if "--fake-sigkill-at-load" in argv:
        print("fake: loading...", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if oom:
        print("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: cudaMalloc failed: "
              "out of memory\nllama_model_load: error loading model: unable to allocate CUDA0 buffer", flush=True)
        sys.exit(1)
    if "--fake-ignore-sigterm" in argv:
        signal.signal(signal.SIGTERM, lambda *_: print("fake: ignoring SIGTERM", flush=True))
    port = int(arg(argv, "--port", "8080"))
    model = arg(argv, "--fake-model") or arg(argv, "--model", "")
    ready_at = time.monotonic() + float(arg(argv, "--fake-ready-after", "0"))
    api_key = arg(argv, "--api-key") or os.environ.get("LLAMA_API_KEY")
    counters = {"prompt": 0, "predicted": 0, "busy": 0, "max_busy": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as llama-server

        def log_message(self, *args):
            pass

        def reply(self, code, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if time.monotonic() < ready_at:
                return self.reply(503, {"error": {"message": "Loading model", "code": 503}})
            path, _, query = self.path.partition("?")
            if path == "/health":
                return self.reply(200, {"status": "ok"})
            if path == "/props":
                env = {k: v for k, v in os.environ.items() if k.startswith("FAKE_ENV_")}
                return self.reply(200, {"model_path": model, "total_slots": 4, "env": env, "query": query})
            if path == "/slots":
                return self.reply(200, [{"id": i, "is_processing": i < counters["busy"]} for i in range(4)])
            if path == "/metrics":
                text = (f"llamacpp:prompt_tokens_total {counters['prompt']}\n"
                        f"llamacpp:tokens_predicted_total {counters['predicted']}\n"
                        "llamacpp:predicted_tokens_seconds 42.5\n"
                        f"fake:max_busy {counters['max_busy']}\n")  # the most streams it served at once
                return self.reply(200, text.encode(), "text/plain")
            return self.reply(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self.reply(401, {"error": {"message": "Invalid API Key", "code": 401}})
            n = int(body.get("n_predict", body.get("max_tokens", 4)))
            with lock:
                counters["prompt"] += 3
                counters["predicted"] += n
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
            if not body.get("stream"):
                return self.reply(200, {"path": self.path, "fields": sorted(body), "echo": body, "content": "fake " * n, "tokens_predicted": n, "model": model, "usage": usage,
                                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake " * n},
                                                     "finish_reason": "length"}], "object": "chat.completion",
                                        "id": "fake-1", "created": 0})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")  # as llama-server: a crash leaves it unterminated
            self.end_headers()

            def send(data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            delay = float(arg(argv, "--fake-chunk-delay", "0"))
            crash_at = arg(argv, "--fake-crash-mid-stream")
            with lock:
                counters["busy"] += 1
                counters["max_busy"] = max(counters["max_busy"], counters["busy"])
            try:
                for i in range(n):
                    if crash_at is not None and i == int(crash_at):
                        os._exit(3)
                    chunk = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                             "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}]}
                    send(f"data: {json.dumps(chunk)}\n\n".encode())
                    if delay:
                        time.sleep(delay)
                final = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": usage}
                send(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                time.sleep(float(arg(argv, "--fake-done-delay", "0")))
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    counters["busy"] -= 1

    server = ThreadingHTTPServer((arg(argv, "--host", "127.0.0.1"), port), Handler)
    print(f"fake: listening on {port} for {model}", flush=True)
    crash = arg(argv, "--fake-crash-after")
    if crash is not None:
        def crash_later():
            time.sleep(max(ready_at - time.monotonic(), 0) + float(crash))
            print("fake: crashing", flush=True)
            os._exit(3)

        threading.Thread(target=crash_later, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
