"""Phase 1 through the server: `varmoe capture-server --server URL` pushes the corpus through a running
server with routing capture on and downloads the statistics (same Parquet schema as `varmoe capture`).

The sequences are exactly those of the offline capture job: the corpus split is tokenized and cut
with `var_moe.corpus` (`tokenize_documents` + `chunk_sequences`, the same code as `iter_batches`)
using the tokenizer of `model`, which must be the model the server serves. They are sent as token
ids to `/v1/completions` (`max_tokens: 0`, `var: false`), so the server forwards those very tokens
through the learned routers (a text endpoint would re-tokenize, and decode/encode of a cut chunk is
not always the identity). Admin calls (`/admin/capture/start|stop`, `GET /admin/capture/stats`)
need the server's admin token. The capture records *all* traffic in its window: run it on a server
that nothing else is using when the statistics must equal an offline capture.

HTTP only (httpx); reads the corpus and the tokenizer through the library. The subcommand is a
plug-in of the `varmoe` CLI (entry point `capture-server`), so var_moe itself has no web code.
Test: `pytest tests/test_remote_capture.py`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import httpx

from var_moe.errors import InvalidInputError, VarMoeError

MAX_PROMPTS_PER_REQUEST = 64  # the server's limit of prompts per completion request


class RemoteCaptureError(VarMoeError, RuntimeError):
    """The server refused or failed a step; the message names the step and the server's answer."""


def _check(r: httpx.Response, step: str) -> httpx.Response:
    if r.status_code != 200:
        try:
            detail = r.json().get("error", {}).get("message", r.text[:300])
        except ValueError:
            detail = r.text[:300]
        hint = " (pass the server's admin token: VARMOE_ADMIN_TOKEN)" if r.status_code in (401, 403) else ""
        raise RemoteCaptureError(f"{step}: the server answered {r.status_code}: {detail}{hint}")
    return r


def corpus_sequences(tokenizer: Any, dataset: str, split: str, max_length: int, num_samples: int | None):
    """The token sequences the offline capture job forwards, in the same order."""
    from var_moe.corpus import chunk_sequences, iter_documents, tokenize_documents

    seqs = chunk_sequences(tokenize_documents(tokenizer, iter_documents(dataset, split)), max_length)
    return itertools.islice(seqs, num_samples) if num_samples is not None else seqs


def capture_via_server(url: str, admin_token: str | None, tokenizer: Any, output: str | Path,
                       dataset: str = "stdlib", split: str = "train", num_samples: int | None = None,
                       max_length: int = 256, batch_size: int = 8, timeout_s: float = 600.0,
                       log: Callable[[str], None] = print) -> Path:
    """Capture routing statistics of `dataset`/`split` through the server at `url`; write `output`."""
    from var_moe.capture.schema import pairs_path, read_pairs, read_stats, write_pairs, write_stats

    if not admin_token:
        raise InvalidInputError("--server: the admin token is missing (set VARMOE_ADMIN_TOKEN to the server's token)")
    if not 1 <= batch_size <= MAX_PROMPTS_PER_REQUEST:
        raise InvalidInputError(f"--batch-size must be in 1..{MAX_PROMPTS_PER_REQUEST} for --server")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {admin_token}"}
    sent_seqs = sent_tokens = 0
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers) as client:
        try:
            ready = client.get("/readyz")
        except httpx.TransportError as exc:
            raise RemoteCaptureError(f"--server {url}: cannot reach the server ({type(exc).__name__}: {exc})") from exc
        _check(ready, "GET /readyz")
        _check(client.post("/admin/capture/start"), "POST /admin/capture/start")
        try:
            batch: list[list[int]] = []
            for seq in itertools.chain(corpus_sequences(tokenizer, dataset, split, max_length, num_samples), [None]):
                if seq is not None:
                    batch.append(seq)
                if batch and (seq is None or len(batch) == batch_size):
                    _check(client.post("/v1/completions", json={"prompt": batch, "max_tokens": 0, "var": False,
                                                                "temperature": 0.0}), "POST /v1/completions")
                    sent_seqs += len(batch)
                    sent_tokens += sum(map(len, batch))
                    batch = []
        finally:
            stop = client.post("/admin/capture/stop")  # always stop, even when a push failed
        _check(stop, "POST /admin/capture/stop")
        if sent_seqs == 0:
            raise InvalidInputError(f"--dataset {dataset!r} split {split!r} gave no sequences to capture")
        stats = _check(client.get("/admin/capture/stats", params={"part": "stats"}), "GET /admin/capture/stats")
        pairs = client.get("/admin/capture/stats", params={"part": "pairs"})
    # Re-label the files: they describe the corpus pushed, not anonymous live traffic.
    download = output.with_name(output.name + ".download")
    try:
        download.write_bytes(stats.content)
        df, meta = read_stats(download)
        meta.update({"dataset": dataset, "split": split, "source": f"varmoe capture-server --server {url}",
                     "sequences_sent": sent_seqs, "tokens_sent": sent_tokens, "max_length": max_length})
        write_stats(df, output, meta)
        if pairs.status_code == 200:
            download.write_bytes(pairs.content)
            pdf, pmeta = read_pairs(download)
            pmeta.update({"dataset": dataset, "split": split})
            write_pairs(pdf, pairs_path(output), pmeta)
    finally:
        download.unlink(missing_ok=True)
    log(f"wrote {output} ({sent_seqs} sequences, {sent_tokens} tokens pushed through {url})")
    return output


def register(subparsers) -> None:
    from var_moe.commands._common import add_dataset_flags

    p = subparsers.add_parser("capture-server", help="Phase 1 through a running var-moe server (admin token from "
                              "VARMOE_ADMIN_TOKEN); the same statistics file as `varmoe capture`")
    p.add_argument("--server", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="tokenizer of the served model (default: the model /v1/models names)")
    add_dataset_flags(p, default_split="test")
    p.add_argument("--output", "-o", required=True, help="statistics Parquet file to write")
    p.set_defaults(func=run_from_args)


def run_from_args(args: Any) -> int:
    """`varmoe capture-server --server URL ...`: the capture command's dataset flags, token from VARMOE_ADMIN_TOKEN."""
    import os

    from transformers import AutoTokenizer

    model = args.model or _served_model(args.server)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    capture_via_server(args.server, os.environ.get("VARMOE_ADMIN_TOKEN"), tokenizer, args.output,
                       dataset=args.dataset, split=args.split, num_samples=args.num_samples,
                       max_length=args.max_length, batch_size=min(args.batch_size, MAX_PROMPTS_PER_REQUEST))
    return 0


def _served_model(url: str) -> str:
    try:
        r = _check(httpx.get(url.rstrip("/") + "/v1/models", timeout=30), "GET /v1/models")
    except httpx.TransportError as exc:
        raise RemoteCaptureError(f"--server {url}: cannot reach the server ({type(exc).__name__}: {exc})") from exc
    name = r.json()["data"][0]["id"]
    # The server reports a name, not its file path: the repository's models/<name> when it has one.
    local = Path(__file__).resolve().parent.parent / "models" / name
    if local.is_dir():
        return str(local)
    if Path(name).is_dir() or name.count("/") == 1:  # a local folder, or a hub id such as org/model
        return name
    raise RemoteCaptureError(f"--server {url} serves {name!r}: pass --model with that model's folder or hub id "
                             "(its tokenizer is needed)")
