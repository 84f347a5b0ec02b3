"""``mmbridge serve`` under concurrent clients: tokens/s and latency, batched vs one request at a time.

    python benchmarks/bench_serve.py                                   # a tiny random model, offline: ~2 min
    python benchmarks/bench_serve.py --results benchmarks/RESULTS.md   # + write the table there
    python benchmarks/bench_serve.py --model demo_out/run/final        # the model `make demo` trained
    python benchmarks/bench_serve.py --recipe configs/demo_miniworld.yaml   # its bundled backbones, untrained

One run starts two real server processes over the same saved model: a one-request-at-a-time baseline
(``--max-batch 1``) and the batching server (``--max-batch``, 16 by default). Against each in turn, 1, 4 and
16 concurrent clients (``--clients``) each send ``--rounds`` requests back to back: the same prompts
in the same order (a coloured shape as a data: URL and a question), greedy (temperature 0), the same
``max_tokens``. Reported per client count: completion tokens per second of wall time, p50/p95 request
latency, the mean batch the server decoded (from ``/health``), and the batched server's ratios to the
baseline. ``--results`` writes the table into ``benchmarks/RESULTS.md`` between the ``bench_serve`` markers,
with the command and the machine.

Without ``--model`` or ``--recipe`` a tiny random model (the test suite's) is saved in a temporary directory,
so the benchmark runs offline anywhere; its decoding is so cheap that HTTP and Python overheads weigh more than
on a real model. Clients and servers share the machine's cores; the server decodes on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_bridges import write_results  # noqa: E402

MARKS = ("<!-- bench_serve: begin -->", "<!-- bench_serve: end -->")
TITLE = "Serving: concurrent clients, batched vs one request at a time (bench_serve)"
MODEL_NAME = "bench"
QUESTIONS = ["What colour is the shape?", "Which shape is it?", "Describe the picture.", "Is the shape large?"]
COLOURS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square")
STARTUP_TIMEOUT_S = 300


# -- the model ------------------------------------------------------------------------------------
def save_tiny_model(directory: str) -> str:
    """The test suite's tiny random model (seeded), saved to ``directory``."""
    import torch

    from mmbridge.model.multimodal import MultimodalModel
    from mmbridge.testing import tiny_model_config, tiny_tokenizer

    tokenizer_dir = os.path.join(directory, "tokenizer")
    vocab = len(tiny_tokenizer(tokenizer_dir)) + 1  # + the <image> token
    torch.manual_seed(0)
    model_dir = os.path.join(directory, "model")
    MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab)).eval().save_pretrained(model_dir)
    return model_dir


def save_recipe_model(recipe: str, directory: str) -> str:
    """The recipe's model (pretrained backbones, bridge as initialised), saved to ``directory``."""
    import torch

    from mmbridge.config import load_run_config
    from mmbridge.model.multimodal import MultimodalModel

    run = load_run_config(recipe)
    torch.manual_seed(run.seed)
    model_dir = os.path.join(directory, "model")
    MultimodalModel.from_config(run.model, processor_settings=run.processor).eval().save_pretrained(model_dir)
    return model_dir


# -- the server -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python -m mmbridge serve`` on a free port, started with the context and stopped after it."""

    def __init__(self, model_dir: str, max_batch: int, args: argparse.Namespace, log_path: str) -> None:
        self.port, self.log_path, self.max_batch = free_port(), log_path, max_batch
        self.command = [sys.executable, "-m", "mmbridge", "serve", "--model", model_dir, "--port", str(self.port),
                        "--served-model-name", MODEL_NAME, "--max-batch", str(max_batch),
                        "--batch-wait-ms", str(args.batch_wait_ms), "--max-queued", "1024", "--device", args.device]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()[-4000:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


# -- the clients ----------------------------------------------------------------------------------
def prompt(index: int) -> list[dict]:
    """The ``index``-th request's content: a coloured shape (PNG data: URL) and a question."""
    from mmbridge.testing import shape_image

    image = shape_image(COLOURS[index % 4], SHAPES[index // 4 % 2], size=32, seed=index)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[index % 4]}]


@dataclass
class Level:
    """What ``clients`` concurrent clients measured against one server (over every repeat)."""

    clients: int
    latencies: list[float]
    tokens: int
    wall_s: float
    batches: int  # the server's batches while these requests ran

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def mean_batch(self) -> float:
        return len(self.latencies) / max(1, self.batches)

    def add(self, other: "Level") -> "Level":
        """This and ``other`` (a repeat) pooled: latencies joined, tokens, wall time and batches summed."""
        return Level(self.clients, self.latencies + other.latencies, self.tokens + other.tokens,
                     self.wall_s + other.wall_s, self.batches + other.batches)

    def latency(self, q: int) -> float:
        """The ``q``-th percentile of request latency, in seconds (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def one_request(client: httpx.AsyncClient, content: list[dict], max_tokens: int) -> tuple[float, int]:
    """Latency (s) and completion tokens of one greedy request."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()["usage"]["completion_tokens"]


async def drive(url: str, contents: list[list[dict]], clients: int, max_tokens: int) -> tuple[list, float]:
    """``clients`` closed-loop clients working through ``contents`` in order; results and wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for content in contents:
        queue.put_nowait(content)
    results: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait(), max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return results, time.perf_counter() - start


def measure(server: Server, clients: int, args: argparse.Namespace) -> Level:
    """``clients`` concurrent clients, ``args.rounds`` requests each, against ``server``."""
    contents = [prompt(index) for index in range(clients * args.rounds)]
    before = server.health()
    results, wall_s = asyncio.run(drive(server.url, contents, clients, args.max_tokens))
    batches = server.health()["batches"] - before["batches"]
    return Level(clients, [latency for latency, _ in results], sum(tokens for _, tokens in results), wall_s, batches)


def run_both(model_dir: str, args: argparse.Namespace, work: str) -> tuple[list[Level], list[Level]]:
    """Every client count against the one-at-a-time server and the batching one, interleaved (both run at
    once; the idle one costs nothing), so a change in the machine's load falls on both alike."""
    with Server(model_dir, 1, args, os.path.join(work, "one.log")) as one, \
            Server(model_dir, args.max_batch, args, os.path.join(work, "batched.log")) as batched:
        for server in (one, batched):  # warm-up
            asyncio.run(drive(server.url, [prompt(index) for index in range(2)], 1, args.max_tokens))
        results: tuple[list[Level], list[Level]] = ([], [])
        for clients in args.clients:
            for levels, server in zip(results, (one, batched)):
                level = measure(server, clients, args)
                for _ in range(args.repeats - 1):
                    level = level.add(measure(server, clients, args))
                levels.append(level)
                print(f"  max-batch {server.max_batch}, {clients} clients: {level.tokens_per_s:.1f} tok/s, "
                      f"p50 {level.latency(50):.3f} s", flush=True)
        return results


# -- the table ------------------------------------------------------------------------------------
def table(baseline: list[Level], batched: list[Level], max_batch: int) -> str:
    """The markdown table: each client count, both servers, the batched server's ratios to the baseline
    (tokens/request: one at a time / batched; they differ only where padding moves a greedy tie)."""
    lines = [f"| clients | requests | tokens/request | one at a time: tok/s | p50 s | p95 s | "
             f"batched (≤{max_batch}): tok/s | p50 s | p95 s | mean batch | tok/s × | p50 × | p95 × |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for one, many in zip(baseline, batched):
        per_request = f"{one.tokens / len(one.latencies):.1f} / {many.tokens / len(many.latencies):.1f}"
        lines.append(f"| {one.clients} | {len(one.latencies)} | {per_request} | {one.tokens_per_s:.1f} | "
                     f"{one.latency(50):.3f} | "
                     f"{one.latency(95):.3f} | {many.tokens_per_s:.1f} | {many.latency(50):.3f} | "
                     f"{many.latency(95):.3f} | {many.mean_batch:.1f} | "
                     f"{many.tokens_per_s / one.tokens_per_s:.2f} | {many.latency(50) / one.latency(50):.2f} | "
                     f"{many.latency(95) / one.latency(95):.2f} |")
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    import torch

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, server on "
            f"{threads} thread(s), load average {load} at the start, {datetime.now(timezone.utc):%Y-%m-%d}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def section(text: str, command: str, machine: str, model: str, args: argparse.Namespace) -> str:
    setup = (f"Model: {model}; every request: one image + a question, temperature 0, max_tokens {args.max_tokens}; "
             f"{args.rounds} requests per client, {args.repeats} repeat(s); batch wait {args.batch_wait_ms} ms")
    return "\n".join([MARKS[0], f"Command: `{command}`  ", f"Machine: {machine}  ", setup, "", text, MARKS[1]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a saved model directory (default: a tiny random model, offline)")
    source.add_argument("--recipe", help="save this recipe's model (its backbones, bridge untrained) and serve it")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends, back to back")
    parser.add_argument("--repeats", type=int, default=1, help="measure each client count this many times "
                        "(interleaved by server; latencies pooled)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="appended to the machine line (e.g. 'shared with other runs')")
    parser.add_argument("--results", default=None, help="write the table into this markdown file (RESULTS.md)")
    args = parser.parse_args(argv)

    command = "python benchmarks/bench_serve.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = machine_line(args.threads) + (f"; {args.note}" if args.note else "")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as work:
        model_dir = args.model or (save_recipe_model(args.recipe, work) if args.recipe else save_tiny_model(work))
        model = args.model or (f"{args.recipe}'s model, bridge untrained" if args.recipe else "tiny random (tests')")
        baseline, batched = run_both(model_dir, args, work)
    text = section(table(baseline, batched, args.max_batch), command.strip(), machine, model, args)
    print(text)
    if args.results:
        write_results(args.results, text, marks=MARKS, title=TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
