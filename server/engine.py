"""The builtin engine: one thread owns the model; requests wait in a bounded queue and share running batches.

The HTTP side calls `submit(jobs)` (one call's jobs are one request; queue, request budget, draining
stop and job bookkeeping: engine_thread.py). The engine thread forms a batch from the oldest jobs,
waiting up to `max_wait_ms` for the clients of the batch that just finished (a lone client never
waits), and decodes it with `BatchDecoder` (decode.py). Waiting rows join the running batch between
decode steps, fairest request first (`_pick`), and a row's result is posted as soon as it finishes;
the policy is in docs/SERVER.md (Engine).

Every batch runs in one mode: a pinned request's (`var: true|false`), else the one `VarRuntime`
(var_runtime.py) gives when the batch forms. Rows join only while the oldest waiting job has the
batch's mode and no control action waits; otherwise the batch drains, so a toggle lands once it has.
Control actions (capture) run on this thread between batches (`call()`), because they attach hooks to
the model. A row stops at its deadline, when cancelled, or at a stop string (jobs.py).
Test: `pytest tests/test_server_engine.py`.
"""

from __future__ import annotations

import collections
import time

import torch

from .decode import BatchDecoder
from .engine_thread import EngineThread
from .host import BatchHost
from .jobs import Job


class Engine(EngineThread):
    host: BatchHost

    def __init__(self, *args, **kwargs):  # EngineThread's arguments
        super().__init__(*args, **kwargs)
        tok = self.host.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos_id = tok.eos_token_id
        self._returning = 0  # rows of the batch that just finished: clients likely to send again soon
        self._last_batch_end = 0.0

    def _retry_estimate(self) -> float:
        return round(len(self._pending) / max(1, self.max_batch_size) * 0.5, 1)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while self._wait_for_work():
            batch, mode = self._take_batch()
            if batch:
                self._run_batch(batch, mode)

    def _mode_of(self, job: Job) -> str:
        return self.var.mode_for(job.pinned_mode)

    def _take_batch(self) -> tuple[list[Job], str]:
        with self._cond:
            self._drop_cancelled()
            if not self._pending:
                return [], ""
            mode = self._mode_of(self._pending[0])
            # Wait for the clients of the batch that just finished (their next requests trickle in over
            # some milliseconds): without this a batch splits into cohorts that never merge again.
            wait_until = max(self._pending[0].enqueued_at, self._last_batch_end) + self.max_wait_s
            # jobs that were already waiting when the last batch ended, plus that batch's clients
            earlier = sum(1 for j in self._pending if self._mode_of(j) == mode and j.enqueued_at < self._last_batch_end)
            target = min(self.max_batch_size, earlier + self._returning)
            self._returning = 0
            while not self._stopping and not self._controls:
                ready = sum(1 for j in self._pending if self._mode_of(j) == mode)
                remaining = wait_until - time.monotonic()
                if ready >= target or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._pick(mode, [])
        return batch, mode

    def _pick(self, mode: str, running: list[Job]) -> list[Job]:
        """Take waiting jobs of `mode` for a batch now running `running` (none: a new batch), fairest first
        (lock held): the request with the fewest rows running goes first (ties: the older request), so
        rows alternate between requests. Up to `max_batch_size` rows in all; beyond that, when joining a
        running batch, only a row of a request with nothing running, up to twice `max_batch_size`."""
        cap = 2 * self.max_batch_size if running else self.max_batch_size
        per_request = collections.Counter(j.request for j in running if not j.posted)
        live = sum(per_request.values())
        waiting: dict[int, collections.deque[Job]] = {}
        for job in self._pending:
            if self._mode_of(job) == mode and not job.cancelled:
                waiting.setdefault(job.request, collections.deque()).append(job)
        picked: list[Job] = []
        while waiting:
            req = min(waiting, key=lambda r: (per_request[r], r))
            if live >= self.max_batch_size and (per_request[req] > 0 or live >= cap):
                break
            picked.append(waiting[req].popleft())
            if not waiting[req]:
                del waiting[req]
            per_request[req] += 1
            live += 1
        for job in picked:
            job.mode = mode
        if picked:
            chosen = set(map(id, picked))
            self._pending = collections.deque(j for j in self._pending if id(j) not in chosen)
            self.metrics.queue_depth.set(len(self._pending))
        return picked

    def _take_joining(self, mode: str, running: list[Job]) -> list[Job]:
        """Waiting jobs that may join the running batch now (none while a control or a job of the
        other mode waits: the batch then drains so that they get their turn)."""
        with self._cond:
            self._drop_cancelled()
            if self._controls or not self._pending or self._mode_of(self._pending[0]) != mode:
                return []
            return self._pick(mode, running)

    def _run_batch(self, jobs: list[Job], mode: str) -> None:
        everyone = list(jobs)  # every job that entered this batch: each gets an answer, whatever fails
        try:
            self.host.apply_mode(mode == "var")
            self.batches_run += 1
            self._batch_mode, self._first_segment = mode, True
            dec = self._start_rows(jobs)
            self._observe_size(len(jobs))
            while True:
                self._check_jobs(jobs, dec)
                if any(st.finished and not j.posted for j, st in zip(jobs, dec.state)):
                    self._close_segment(jobs, dec)
                    self._post_finished(jobs, dec)
                joining = self._take_joining(mode, jobs) if dec.can_admit else []
                if joining:
                    everyone += joining
                    self._close_segment(jobs, dec)
                    jobs = [jobs[i] for i in dec.drop_finished()]
                    sub = self._start_rows(joining)
                    self._close_segment(joining, sub)  # the new rows' prefill was a batch of its own
                    dec.admit_prefilled(sub)
                    jobs = jobs + joining
                    self._observe_size(len(jobs))
                    continue  # a new row may already be finished (max_new_tokens 1, eos)
                if dec.done:
                    break
                self._forward(jobs, dec, prefill=False)
            self._close_segment(jobs, dec)
        except Exception as exc:
            self._fail(everyone, "batch failed", exc)
            return
        self._returning, self._last_batch_end = len(jobs), time.monotonic()
        self._post_finished(jobs, dec)

    def _start_rows(self, jobs: list[Job]) -> BatchDecoder:
        """Prefill `jobs` as a batch of their own (a new batch, or rows about to join one)."""
        self._started(jobs, time.monotonic())
        self.host.begin_batch()
        dec = BatchDecoder(self.host.model, [j.spec for j in jobs], self.pad_id, self.eos_id)
        self._forward(jobs, dec, prefill=True)
        return dec

    def _forward(self, jobs: list[Job], dec: BatchDecoder, prefill: bool) -> None:
        """Run the prefill or one decode step and hand out the new tokens (a stream gets each as an event)."""
        recording = any(j.routed and not j.posted for j in jobs)
        self.host.record_routing(recording)
        emitted = dec.prefill() if prefill else dec.step()
        extra = self._routing(jobs, emitted, prefill) if recording else [None] * len(jobs)
        now = time.monotonic()
        for job, tok, st, routed in zip(jobs, emitted, dec.state, extra):
            if tok is not None:
                self._token(job, tok, st.new_logprobs[-1], routed, now)
        self.metrics.generated_tokens.labels(mode=self._batch_mode).inc(sum(tok is not None for tok in emitted))

    def _routing(self, jobs: list[Job], emitted: list[int | None], prefill: bool) -> list[dict | None]:
        """File each asking row's experts of the forward just run (return_routed_experts; in VAR mode also
        whether a table served them) on its job, and return them as its token event's extra fields: a
        prefill's prompt positions (left-padded: the last n), or the token a decode step fed back (rows
        already finished sent padding and get nothing)."""
        last, fast = self.host.last_routing()
        if last is None:
            return [None] * len(jobs)
        b = len(jobs)
        e_BSLK = last.reshape(last.shape[0], b, -1, last.shape[-1]).permute(1, 2, 0, 3)
        f_BSL = None if fast is None else fast.reshape(fast.shape[0], b, -1).permute(1, 2, 0)
        out: list[dict | None] = []
        for i, (job, tok) in enumerate(zip(jobs, emitted)):  # a loop over batch rows, not tokens
            if not job.routed or (tok is None and not prefill):
                out.append(None)
                continue
            first = e_BSLK.shape[1] - (len(job.spec.prompt_ids) if prefill else 1)
            experts = e_BSLK[i, first:].tolist()
            served = None
            if f_BSL is not None and (prefill or job.prompt_tiers is not None):
                served = f_BSL[i, first:].tolist()
            out.append(job.add_routing(experts, served, prompt=prefill))
        return out

    def _close_segment(self, jobs: list[Job], dec: BatchDecoder) -> None:
        """Read the tier counts of the forwards since the last segment (per row and in all), then start
        a new one; called whenever the batch's rows change, because the VAR wrapper counts per batch row."""
        valid_B = [st.forwarded_tokens - j.segment_tokens for j, st in zip(jobs, dec.state)]
        rows = self.host.row_tier_counts(valid_B)
        self.var.record_batch(self._batch_mode, sum(valid_B), new_batch=self._first_segment)
        self._first_segment = False
        for job, st, row in zip(jobs, dec.state, rows):
            for tier, n in row.items():
                job.tier_counts[tier] = job.tier_counts.get(tier, 0) + int(n)
            job.segment_tokens = st.forwarded_tokens
        self.host.begin_batch()

    def _post_finished(self, jobs: list[Job], dec: BatchDecoder) -> None:
        now = time.monotonic()
        for job, st in zip(jobs, dec.state):
            if st.finished and not job.posted:
                job.finish(job.result(st, now, job.tier_counts))

    def _check_jobs(self, jobs: list[Job], dec: BatchDecoder) -> None:
        now = time.monotonic()
        tok = self.host.tokenizer
        for i, (job, st) in enumerate(zip(jobs, dec.state)):
            if st.finished:
                continue
            reason = job.stop_reason(now)
            if reason:
                dec.finish(i, reason)
            elif job.stop and st.new_ids:
                # Decode only the tail that can hold a stop string: O(1) per step, not O(length).
                tail = tok.decode(st.new_ids[-(max(map(len, job.stop)) + 8):], skip_special_tokens=True)
                if any(s in tail for s in job.stop):
                    dec.finish(i, "stop")
