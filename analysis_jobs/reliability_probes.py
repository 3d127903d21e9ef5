"""Hardening probes of the var-moe server: each measures one attack or overload and
returns its figures with `ok` against the goal. They need a server that accepts big requests
(`PROBE_SERVER_ARGS`: 64 prompts, a 40,000-token budget, a 128-job queue, a 900 s time limit).

- `probe_body_limit`      a 21 MB body (3 million token ids): time to the 413, the server's resident
                          memory before and at its peak, /healthz latency meanwhile
- `probe_fairness`        a 4-token request sent 1 s after a 64 x 500-token one: its latency, and
                          whether it finished first (goal: within 3 s on the reference model)
- `probe_healthz_echo`    /healthz latency while a 64 x 500-id `echo` + `logprobs` request is
                          tokenized, scored and answered (goal: every probe within 0.5 s)
- `probe_ppl_memory`      peak resident memory of a 64 x 456-token perplexity request, beside the
                          size of one full (B, S, V) float32 logits copy for an 8-row batch

Figures come from one run on a shared machine: they are noisy; the JSON keeps every sample.
Run them: `python -m analysis_jobs.reliability --checks body_limit,fairness,healthz_echo,ppl_memory`.
Test: `pytest tests/test_reliability_probes.py`.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import httpx

# a long time limit: the 64 x 500 request takes minutes on a loaded 2-core machine
PROBE_SERVER_ARGS = ["--max-request-prompts", "64", "--max-request-tokens", "40000", "--max-queue", "128",
                     "--request-timeout-s", "900"]
SMALL_GOAL_S = 3.0
HEALTHZ_GOAL_S = 0.5
TEXT = ("def parse_args(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n"
        "    parser.add_argument('--output', default='out.json', help='where to write')\n    return parser.parse_args(argv)\n")


class Sampler:
    """Samples the server's resident memory and /healthz latency in background threads."""

    def __init__(self, url: str, pid: int, every_s: float = 0.05):
        import psutil

        self.url, self.proc, self.every_s = url, psutil.Process(pid), every_s
        self.rss: list[int] = []
        self.healthz: list[float] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rss, daemon=True), threading.Thread(target=self._health, daemon=True)]

    def _rss(self) -> None:
        while not self._stop.is_set():
            self.rss.append(self.proc.memory_info().rss)
            self._stop.wait(self.every_s / 2)

    def _health(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    c.get(self.url + "/healthz")
                    self.healthz.append(time.monotonic() - t0)
                except httpx.HTTPError:
                    self.healthz.append(float("inf"))
                self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(35)

    def figures(self) -> dict:
        h = self.healthz or [float("nan")]
        return {"rss_peak_mb": max(self.rss, default=0) / 2**20, "healthz_max_s": max(h),
                "healthz_median_s": statistics.median(h), "healthz_samples": len(self.healthz)}


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def probe_body_limit(server, ids: int = 3_000_000) -> dict:
    """Send a 21 MB `/v1/completions` body on a raw socket and time the answer."""
    body = ("{\"prompt\": [" + ", ".join(["40950"] * ids) + "], \"max_tokens\": 1}").encode()
    host, port = server.url.removeprefix("http://").split(":")
    before = _rss_mb(server.pid)
    with Sampler(server.url, server.pid) as s:
        t0 = time.monotonic()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        data, sent = b"", 0
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            try:
                sock.sendall(head)
                for i in range(0, len(body), 1 << 16):  # stream it; the server may answer and close early
                    sent += sock.send(body[i:i + (1 << 16)])
            except OSError:
                pass
            try:
                while chunk := sock.recv(65536):
                    data += chunk
                    if b"\r\n\r\n" in data:
                        break
            except OSError:
                pass
        took = time.monotonic() - t0
        time.sleep(0.3)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
    out = {"body_mb": len(body) / 1e6, "status": status, "refusal_s": took, "sent_mb_before_answer": sent / 1e6,
           "rss_before_mb": before, **s.figures()}
    out["rss_growth_mb"] = out["rss_peak_mb"] - before
    problems = []
    if status != 413:
        problems.append(f"answered {status}, not 413")
    if out["rss_growth_mb"] > 100:
        problems.append(f"resident memory grew {out['rss_growth_mb']:.0f} MB")
    return _verdict(out, problems)


def probe_fairness(server, prompts: int = 64, new_tokens: int = 500, small_after_s: float = 1.0) -> dict:
    big_body = {"prompt": [[5 + i % 50, 6, 7] for i in range(prompts)], "max_tokens": new_tokens, "temperature": 0.0}
    big: dict = {}

    def send_big():
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json=big_body, timeout=600)
        big.update(status=r.status_code, latency_s=time.monotonic() - t0, done_at=time.monotonic())

    th = threading.Thread(target=send_big, daemon=True)
    th.start()
    time.sleep(small_after_s)
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [9, 8, 7], "max_tokens": 4, "temperature": 0.0},
                   timeout=600)
    small = {"status": r.status_code, "latency_s": time.monotonic() - t0, "done_at": time.monotonic()}
    th.join(600)
    out = {"big": {"prompts": prompts, "new_tokens": new_tokens, "status": big.get("status"),
                   "latency_s": big.get("latency_s")},
           "small": {"new_tokens": 4, "status": small["status"], "latency_s": small["latency_s"]},
           "small_finished_first": small["done_at"] < big.get("done_at", float("inf")), "goal_s": SMALL_GOAL_S}
    problems = []
    if big.get("status") != 200 or small["status"] != 200:
        problems.append(f"statuses big {big.get('status')}, small {small['status']}")
    if not out["small_finished_first"]:
        problems.append("the small request finished after the big one")
    if small["latency_s"] > SMALL_GOAL_S:
        problems.append(f"the small request took {small['latency_s']:.2f} s (goal {SMALL_GOAL_S} s)")
    return _verdict(out, problems)


def probe_healthz_echo(server, prompts: int = 64, ids: int = 500, logprobs: int = 5) -> dict:
    body = {"prompt": [[(7 * i + j) % 4000 + 5 for j in range(ids)] for i in range(prompts)], "max_tokens": 1,
            "echo": True, "logprobs": logprobs, "temperature": 0.0}
    with Sampler(server.url, server.pid) as s:
        time.sleep(0.3)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        took = time.monotonic() - t0
        time.sleep(0.3)
    out = {"prompts": prompts, "ids": ids, "logprobs": logprobs, "status": r.status_code, "request_s": took,
           "response_mb": len(r.content) / 1e6, **s.figures(), "goal_s": HEALTHZ_GOAL_S}
    problems = []
    if r.status_code != 200:
        problems.append(f"the echo request answered {r.status_code}")
    if out["healthz_max_s"] > HEALTHZ_GOAL_S:
        problems.append(f"/healthz took up to {out['healthz_max_s']:.2f} s (goal {HEALTHZ_GOAL_S} s)")
    return _verdict(out, problems)


def probe_ppl_memory(server, texts: int = 64, repeat: int = 8, vocab_size: int | None = None,
                     batch_rows: int = 8) -> dict:
    text = TEXT * repeat
    before = _rss_mb(server.pid)
    with Sampler(server.url, server.pid, every_s=0.02) as s:
        r = httpx.post(server.url + "/v1/perplexity", json={"text": [text] * texts}, timeout=600)
        time.sleep(0.3)
    tokens = r.json()["results"][0]["tokens"] + 1 if r.status_code == 200 else None
    out = {"texts": texts, "tokens_per_text": tokens, "status": r.status_code, "rss_before_mb": before, **s.figures()}
    out["rss_growth_mb"] = out["rss_peak_mb"] - before
    if tokens and vocab_size:
        # one float32 (B, S, V) copy for one engine batch (the default max_batch_size rows)
        out["full_logits_mb"] = min(texts, batch_rows) * tokens * vocab_size * 4 / 2**20
    problems = [] if r.status_code == 200 else [f"perplexity answered {r.status_code}"]
    return _verdict(out, problems)


def _verdict(out: dict, problems: list[str]) -> dict:
    out["ok"] = not problems
    if problems:
        out["why"] = "; ".join(problems)
    return out


def summary_lines(checks: dict) -> list[str]:
    """One line of figures per probe that ran (for the reliability runner's printout)."""
    lines = []
    if "body_limit" in checks and "refusal_s" in checks["body_limit"]:
        b = checks["body_limit"]
        lines.append(f"body limit: {b['body_mb']:.0f} MB body -> {b['status']} in {b['refusal_s']:.2f} s; resident "
                     f"memory {b['rss_before_mb']:.0f} -> peak {b['rss_peak_mb']:.0f} MB; /healthz max {b['healthz_max_s']:.3f} s")
    if "fairness" in checks and "small" in checks["fairness"]:
        f = checks["fairness"]
        lines.append(f"fairness: 4-token request beside {f['big']['prompts']} x {f['big']['new_tokens']}: "
                     f"{f['small']['latency_s']:.2f} s (big one {f['big']['latency_s'] or float('nan'):.1f} s; "
                     f"finished first: {f['small_finished_first']}; goal {f['goal_s']} s)")
    if "healthz_echo" in checks and "healthz_max_s" in checks["healthz_echo"]:
        h = checks["healthz_echo"]
        lines.append(f"/healthz during a {h['prompts']} x {h['ids']}-id echo+logprobs request ({h['request_s']:.1f} s): "
                     f"max {h['healthz_max_s']:.3f} s, median {h['healthz_median_s']:.3f} s over "
                     f"{h['healthz_samples']} probes (goal {h['goal_s']} s)")
    if "ppl_memory" in checks and "rss_peak_mb" in checks["ppl_memory"]:
        p = checks["ppl_memory"]
        full = (f"; one full (B, S, V) float32 copy per 8-row batch would be {p['full_logits_mb']:.0f} MB"
                if "full_logits_mb" in p else "")
        lines.append(f"perplexity {p['texts']} x {p['tokens_per_text']} tokens: resident memory {p['rss_before_mb']:.0f} "
                     f"-> peak {p['rss_peak_mb']:.0f} MB (+{p['rss_growth_mb']:.0f}){full}")
    return lines
