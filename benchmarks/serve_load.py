"""Load test of ``taiyi serve`` on loopback: batching on vs off, in one run, with loss and memory checks.

For each mode (``--max-batch B``, then ``--max-batch 1``) it starts a server process on 127.0.0.1 (a free port),
warms it up, then sends ``--requests`` text-to-image requests from ``--clients`` concurrent clients and checks
every answer:

- status 200, ``X-Request-ID`` echoed, exactly one image, the seed asked for returned;
- the PNG decodes and its ``parameters`` chunk names that prompt and seed (nothing swapped between requests);
- no request lost (each one answered once) and no image duplicated (all pixel hashes distinct).

It reports p50/p95 latency, throughput, the batched/unbatched throughput ratio (target ≥ 1.5×), the mean rows
per pipeline call, and the server's RSS after warm-up vs after the load (target: within 10 %). It stops by
itself (``--max-seconds``), talks only to 127.0.0.1, and exits 1 when a check or a target fails.

Without ``--model`` it builds the tiny random checkpoint (``python -m taiyi.testing``): the numbers then measure
the server (queueing, batching, HTTP, encoding) more than the model. Usage::

    python benchmarks/serve_load.py                       # 32 clients, 320 requests per mode, 10 steps
    python benchmarks/serve_load.py --clients 8 --requests 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from PIL import Image

HOST = "127.0.0.1"  # loopback only, by design
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/")


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """``python -m taiyi.serve`` in a child process, on a free loopback port."""

    def __init__(self, model: str, max_batch: int, queue_size: int, log_path: Path, steps_cap: int = 150):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        cmd = [
            sys.executable,
            "-m",
            "taiyi.serve",
            "--model",
            model,
            "--host",
            HOST,
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--queue-size",
            str(queue_size),
            "--max-steps",
            str(steps_cap),
            "--timeout",
            "300",
            "--shutdown-grace",
            "5",
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = self._wait_listening(timeout=180)

    def _wait_listening(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-2000:]}")
            match = _LISTENING.search(self.log_path.read_text())
            if match:
                url = f"http://{HOST}:{match[1]}"
                try:
                    if httpx2.get(url + "/healthz", timeout=5).status_code == 200:
                        return url
                except httpx2.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def check_answer(
    index: int, prompt: str, seed: int, request_id: str, response: httpx2.Response
) -> tuple[str | None, str]:
    """(error or None, pixel hash) for one answer."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}", ""
    if response.headers.get("x-request-id") != request_id:
        return f"request id {response.headers.get('x-request-id')!r} != {request_id!r}", ""
    data = response.json()["data"]
    if len(data) != 1:
        return f"{len(data)} images instead of 1", ""
    if data[0]["seed"] != seed:
        return f"seed {data[0]['seed']} != {seed}", ""
    image = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"])))
    text = image.text.get("parameters", "")
    if text.split("\n")[0] != prompt or f"Seed: {seed}," not in text:
        return f"parameters chunk does not describe request {index}: {text[:120]!r}", ""
    return None, hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


async def run_load(url: str, *, tag: str, count: int, clients: int, steps: int, seed0: int) -> dict:
    """``count`` requests from ``clients`` concurrent clients; returns the checks and timings."""
    todo = list(range(count))
    latencies: list[float] = []
    errors: list[str] = []
    answers: dict[int, tuple[int, str]] = {}  # request index -> (seed, pixel hash)
    answered: dict[int, int] = {}

    async def client(http: httpx2.AsyncClient) -> None:
        while todo:
            i = todo.pop(0)
            prompt, seed, request_id = f"小桥流水人家 {tag} {i}", seed0 + i, f"{tag}-{i}"
            body = {"prompt": prompt, "n": 1, "seed": seed, "steps": steps, "size": "64x64"}
            started = time.perf_counter()
            try:
                response = await http.post(
                    "/v1/images/generations", json=body, headers={"X-Request-ID": request_id}, timeout=300
                )
            except httpx2.HTTPError as exc:
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            answered[i] = answered.get(i, 0) + 1
            error, digest = check_answer(i, prompt, seed, request_id, response)
            if error:
                errors.append(f"request {i}: {error}")
            else:
                answers[i] = (seed, digest)

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    lost = [i for i in range(count) if i not in answers]
    repeated = [i for i, k in answered.items() if k > 1]
    digests = [d for _, d in answers.values()]
    seeds = [s for s, _ in answers.values()]
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": count,
        "clients": clients,
        "errors": len(errors),
        "error_samples": errors[:5],
        "lost": len(lost),
        "duplicated_images": len(digests) - len(set(digests)),
        "duplicated_seeds": len(seeds) - len(set(seeds)),
        "answered_twice": len(repeated),
        "wall_s": wall,
        "throughput_rps": count / wall,
        "p50_s": quantiles[49],
        "p95_s": quantiles[94],
    }


def scrape_batch_rows(url: str) -> float:
    """Mean image rows per pipeline call, from /metrics."""
    text = httpx2.get(url + "/metrics", timeout=10).text
    total = re.search(r'^taiyi_batch_rows_sum\{kind="generate"\} (\S+)$', text, re.M)
    calls = re.search(r'^taiyi_batch_rows_count\{kind="generate"\} (\S+)$', text, re.M)
    return float(total[1]) / float(calls[1]) if total and calls and float(calls[1]) else float("nan")


def run_mode(model: str, max_batch: int, args: argparse.Namespace, workdir: Path, seed0: int) -> dict:
    tag = f"batch{max_batch}"
    server = Server(model, max_batch, args.queue_size, workdir / f"server-{tag}.log")
    try:
        warm = asyncio.run(
            run_load(
                server.url,
                tag=f"warm{max_batch}",
                count=args.warmup,
                clients=args.clients,
                steps=args.steps,
                seed0=10**9,
            )
        )
        rss_warm = rss_mib(server.proc.pid)
        result = asyncio.run(
            run_load(server.url, tag=tag, count=args.requests, clients=args.clients, steps=args.steps, seed0=seed0)
        )
        rss_after = rss_mib(server.proc.pid)
        result.update(
            max_batch=max_batch,
            warmup_errors=warm["errors"],
            rss_warm_mib=rss_warm,
            rss_after_mib=rss_after,
            rss_growth=(rss_after - rss_warm) / rss_warm,
            mean_batch_rows=scrape_batch_rows(server.url),
        )
    finally:
        result_code = server.stop()
    result["exit_code"] = result_code
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder/id; default: a tiny random checkpoint built on the fly")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320, help="requests per mode")
    parser.add_argument("--warmup", type=int, default=64, help="warm-up requests per mode (before the RSS baseline)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--min-ratio", type=float, default=1.5, help="batched/unbatched throughput target")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="RSS after load vs after warm-up")
    parser.add_argument("--max-seconds", type=float, default=1500, help="hard stop for the whole run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.clients > args.queue_size:
        parser.error("--clients must not exceed --queue-size (the test checks for 0 errors, 429s included)")

    def alarm(signum, frame):  # noqa: ARG001
        raise TimeoutError(f"load test exceeded --max-seconds {args.max_seconds:g}")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(args.max_seconds))
    with tempfile.TemporaryDirectory(prefix="taiyi-load-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            model = str(workdir / "tiny-zh")
            subprocess.run([sys.executable, "-m", "taiyi.testing", model], check=True, capture_output=True)
        modes = {}
        try:
            modes["batched"] = run_mode(model, args.max_batch, args, workdir, seed0=1)
            modes["unbatched"] = run_mode(model, 1, args, workdir, seed0=1)
        finally:
            signal.alarm(0)
    ratio = modes["batched"]["throughput_rps"] / modes["unbatched"]["throughput_rps"]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"}
        | {"json": str(args.json) if args.json else None},
        "cpu_count": os.cpu_count(),
        "modes": modes,
        "throughput_ratio": ratio,
    }
    failures = []
    for name, mode in modes.items():
        for key in ("errors", "lost", "duplicated_images", "duplicated_seeds", "answered_twice", "warmup_errors"):
            if mode[key]:
                failures.append(f"{name}: {key} = {mode[key]} {mode['error_samples'] if key == 'errors' else ''}")
        # uvicorn re-raises the signal once its graceful shutdown is done, so "killed by SIGTERM" is a clean exit.
        if mode["exit_code"] not in (0, -signal.SIGTERM):
            failures.append(f"{name}: server exit status {mode['exit_code']} after SIGTERM")
        if mode["rss_growth"] > args.max_rss_growth:
            failures.append(f"{name}: RSS grew {mode['rss_growth']:.1%} (> {args.max_rss_growth:.0%})")
    if ratio < args.min_ratio:
        failures.append(f"throughput ratio {ratio:.2f} < {args.min_ratio}")
    report["failures"] = failures

    print(
        f"{'mode':<10} {'max_batch':>9} {'req':>5} {'err':>4} {'lost':>4} {'dup':>4} {'p50 s':>7} {'p95 s':>7} "
        f"{'req/s':>7} {'rows/call':>9} {'RSS warm':>9} {'RSS after':>9} {'growth':>7}"
    )
    for name, m in modes.items():
        print(
            f"{name:<10} {m['max_batch']:>9} {m['requests']:>5} {m['errors']:>4} {m['lost']:>4} "
            f"{m['duplicated_images']:>4} {m['p50_s']:>7.3f} {m['p95_s']:>7.3f} {m['throughput_rps']:>7.2f} "
            f"{m['mean_batch_rows']:>9.2f} {m['rss_warm_mib']:>8.0f}M {m['rss_after_mib']:>8.0f}M "
            f"{m['rss_growth']:>7.1%}"
        )
    print(f"throughput ratio batched/unbatched: {ratio:.2f}x (target >= {args.min_ratio}x)")
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
