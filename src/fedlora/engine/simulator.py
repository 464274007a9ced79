"""The in-process engine: every client simulated in turn on one shared base model.

Per round: ``Server.plan`` → for each job, ``run_client`` on the shared model
(the same function Flower's ClientApp calls) → ``Server.finish``. A client
that raises here is a bug, not a flaky device, so the error propagates
(Flower's engine drops failed clients instead; see fedlora.flower).
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..core import ServerState
from .client import held_out_stats, run_client, score_received
from .server import BYTES_PER_NUMBER, ClientJob, ClientResult, Server
from .train import planned_steps

__all__ = ["Simulator", "BYTES_PER_NUMBER"]


class Simulator(Server):
    def run(self, state: ServerState | None = None) -> ServerState:
        """Rounds from ``state`` (default: the checkpoint, or round 0) up to ``fed.rounds``."""
        cfg = self.cfg
        state = self.resume_or_init() if state is None else state
        bar = tqdm(total=cfg.fed.rounds, initial=state.round, desc="rounds", disable=not cfg.progress, leave=True)
        while state.round < cfg.fed.rounds:
            jobs = self.plan(state)
            steps = sum(planned_steps(len(j.client.indices), cfg.train) for j in jobs)
            inner = tqdm(total=steps, desc=f"round {state.round + 1} local steps", disable=not cfg.progress, leave=False)
            t0, c0 = time.perf_counter(), time.process_time()
            results = [self.train(job, inner) for job in jobs]
            train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
            inner.close()
            state = self.finish(state, jobs, results, train_s, train_cpu_s)
            bar.update(1)
            primary = self.rounds[-1].get("eval_" + self.exp.task.primary_metric)
            if primary is not None:
                bar.set_postfix({self.exp.task.primary_metric: f"{primary:.4f}"})
        bar.close()
        if cfg.fed.received_eval:  # the final model, as the next round's clients would receive it
            jobs = self.plan(state)
            self.finish_received(jobs, [self.score(job) for job in jobs])
        return state

    def train(self, job: ClientJob, progress=None) -> ClientResult:
        exp = self.exp
        update, stats = run_client(
            exp.fm,
            job.start,
            job.client,
            exp.train,
            self.cfg.train,
            job.seed,
            pad_token_id=exp.pad_token_id,
            send_label_counts=job.send_label_counts,
            progress=progress,
            privacy=exp.local_dp,
            local=self.local_state.setdefault(job.client.client_id, {}),
            task=exp.task,
            eval_batch_size=self.cfg.train.eval_batch_size,
            transport=self.transport,
            score_received=self.cfg.fed.received_eval,
        )
        return ClientResult(update=update, stats=stats.as_dict())

    def score(self, job: ClientJob) -> ClientResult:
        """``job``'s client scores the model it would start from on its held-out examples, untrained."""
        exp = self.exp
        scores = score_received(
            exp.fm,
            job.start,
            job.client,
            exp.train,
            exp.task,
            eval_batch_size=self.cfg.train.eval_batch_size,
            pad_token_id=exp.pad_token_id,
            local=self.local_state.get(job.client.client_id),
        )
        return ClientResult(stats=held_out_stats(scores, job.client))
