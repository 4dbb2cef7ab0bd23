"""One process group per job, from ``torchrun``'s environment, and the collectives langfield needs.

``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per device; :func:`init` joins them
into a ``torch.distributed`` group (gloo on the CPU, NCCL on CUDA). Without ``WORLD_SIZE`` (or
with ``WORLD_SIZE=1``) nothing is initialised and every helper is the identity: a
single-process run does exactly what it did before.

Failures never hang: the group is created with a timeout on every collective
(``LANGFIELD_DIST_TIMEOUT`` seconds, default 600). Every collective goes through
:meth:`Dist.collective`, which leaves a heartbeat in the job's key-value store (the one
``torchrun`` or rank 0 hosts); when a collective fails (a peer died, a peer timed out) the
error names the rank: the one that reported its own error into the store (:meth:`Dist.report`),
else the one whose heartbeat is behind. :class:`DistError` is that one-line error.

Liveness does not depend on collectives: every rank runs a heartbeat thread
(:meth:`Dist.start_heartbeat`) that writes into the store every few seconds while the process
is alive and its interpreter runs. Long local work on one rank (rank 0 fitting the codec or
writing a checkpoint, uneven feature extraction) is waited for with :meth:`Dist.wait_all`,
which has no limit on the wait but stops, naming the rank, when a rank's heartbeat has been
silent for the timeout (killed, stopped, stuck holding the interpreter) or it failed and exited.

Consistency checks: :meth:`Dist.check_same` refuses a job whose ranks see a different
configuration or dataset (one message listing what differs); :meth:`Dist.check_params`
compares an exact integer hash of the parameters across ranks (data-parallel training keeps
them bit-identical) and names the first tensor that diverged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Dist", "DistError", "init", "get", "shutdown", "is_main", "rank", "world_size", "barrier",
           "env_world_size", "params_hash", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0
_PREFIX = "langfield/"


class DistError(RuntimeError):
    """A distributed job cannot go on (a rank died or timed out, ranks disagree); one line."""


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or empty)."""
    v = os.environ.get("WORLD_SIZE", "").strip()
    if not v:
        return 1
    try:
        n = int(v)
    except ValueError:
        raise DistError(f"WORLD_SIZE={v!r} is not a whole number (set by torchrun; unset it for one process)") from None
    if n < 1:
        raise DistError(f"WORLD_SIZE={n} must be >= 1")
    return n


def _env_int(name: str, default: Optional[int] = None) -> int:
    v = os.environ.get(name, "").strip()
    if not v:
        if default is None:
            raise DistError(f"{name} is not set; start distributed jobs with torchrun (it sets RANK, WORLD_SIZE, "
                            f"LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(v)
    except ValueError:
        raise DistError(f"{name}={v!r} is not a whole number") from None


class Dist:
    """The job as this process sees it. ``world == 1``: no group, every helper a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, store=None):
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.store = store
        self.n_collectives = 0
        self.n_waits = 0
        self.step = -1  # what the trainer reports through set_step (named in errors)
        self.host = socket.gethostname()
        self.bytes_sent = 0  # payload bytes handed to collectives by this rank (benchmarks)
        self.comm_s = 0.0  # wall seconds spent in collectives (waiting for peers included)
        self._beat_stop: Optional[threading.Event] = None
        self._beat_thread: Optional[threading.Thread] = None

    # ---- who am I --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: Optional[torch.device] = None) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` under NCCL, else ``requested`` or the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device(requested) if requested is not None else torch.device("cpu")

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        lo = self.rank * n // self.world
        hi = (self.rank + 1) * n // self.world
        return range(lo, hi)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    # ---- failure reporting -------------------------------------------------------------------
    def _store_set(self, key: str, value: str) -> None:
        if self.store is None:
            return
        try:
            self.store.set(_PREFIX + key, value)
        except Exception:  # the store's host is gone: nothing to leave a note in
            pass

    def _store_get(self, key: str) -> Optional[str]:
        if self.store is None:
            return None
        try:
            if not self.store.check([_PREFIX + key]):
                return None
            return self.store.get(_PREFIX + key).decode("utf-8", "replace")
        except Exception:
            return None

    def report(self, message: str) -> None:
        """Leave this rank's error in the store, so the other ranks' errors can name it."""
        line = " ".join(str(message).split())[:400]
        # with the collective count: a rank that caught the error and went on (its heartbeat
        # moves past the count) is not reported as failed later
        self._store_set(f"failed/{self.rank}", f"{self.n_collectives}|{self.host} pid {os.getpid()}: {line}")

    def _failure(self, r: int) -> Optional[str]:
        """Rank ``r``'s failure note, unless it went on with the job after writing it."""
        f = self._store_get(f"failed/{r}")
        if f is None:
            return None
        n, _, msg = f.partition("|")
        b = self._store_get(f"beat/{r}")
        try:
            if b is not None and int(b.split("|")[0]) > int(n):
                return None
        except ValueError:
            pass
        return msg

    def _culprit(self) -> str:
        """Who stopped the job, as well as the store can tell (one clause)."""
        if self.store is None:
            return "another rank stopped"
        try:
            self.store.set(_PREFIX + "probe", "1")
        except Exception:
            return "the job's key-value store (hosted by rank 0 or torchrun) is gone: rank 0 stopped"
        failed = []
        beats: Dict[int, int] = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            f = self._failure(r)
            if f is not None:
                failed.append(f"rank {r} failed ({f})")
            b = self._store_get(f"beat/{r}")
            if b is not None:
                try:
                    beats[r] = int(b.split("|")[0])
                except ValueError:
                    pass
        if failed:
            return "; ".join(failed)
        if beats or self.world > 1:
            behind = [r for r in range(self.world) if r != self.rank and beats.get(r, -1) < self.n_collectives]
            if behind:
                desc = ", ".join(f"rank {r} ({_beat_words(self._store_get(f'beat/{r}'))})" for r in behind)
                return f"{desc} stopped responding (died, was killed or hangs)"
        return "another rank stopped"

    def collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one collective ``fn`` with a heartbeat before it; a failure becomes a
        :class:`DistError` naming the rank that stopped the job."""
        if not self.active:
            return fn()
        self.n_collectives += 1
        t0 = time.perf_counter()  # the heartbeat counts as communication too
        self._store_set(f"beat/{self.rank}", f"{self.n_collectives}|{what}|{self.step}|{self.host}|{os.getpid()}")
        try:
            return fn()
        except DistError:
            raise
        except Exception as e:  # gloo/NCCL errors: connection closed, timeout, ...
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise DistError(f"rank {self.rank}/{self.world}: {what} failed at step {self.step}: {self._culprit()} "
                            f"[{type(e).__name__}: {first}]") from None
        finally:
            self.comm_s += time.perf_counter() - t0

    def heartbeat(self, what: str) -> None:
        """Say what this rank is working on (long local work between collectives: extraction
        of images); liveness itself comes from the heartbeat thread (:meth:`start_heartbeat`)."""
        if self.active:
            self._store_set(f"work/{self.rank}", f"{time.time():.3f}|{what}")

    @property
    def beat_period_s(self) -> float:
        """Seconds between the heartbeat thread's beats: a tenth of the timeout, 0.2 .. 5 s."""
        return min(5.0, max(0.2, self.timeout_s / 10.0))

    def start_heartbeat(self) -> None:
        """Start this rank's heartbeat: a daemon thread that writes ``alive/<rank>`` (a counter,
        the time and where the main thread is) into the job's store every :attr:`beat_period_s`
        seconds, independently of collectives. A rank busy with long local work (rank 0 fitting
        the codec, evaluating, writing a big checkpoint) keeps beating, so :meth:`wait_all` on
        the other ranks waits for it however long it takes; a rank that was killed, stopped
        (SIGSTOP) or whose interpreter is stuck (a deadlock holding the GIL) stops beating and
        is named after ``timeout_s`` seconds of silence. Started by :func:`init`."""
        if not self.active or self.store is None or self._beat_thread is not None:
            return
        stop = threading.Event()
        main_ident = threading.main_thread().ident
        period = self.beat_period_s

        def beat() -> None:
            n = 0
            while True:
                n += 1
                self._store_set(f"alive/{self.rank}", f"{n}|{time.time():.3f}|{_where(main_ident)}")
                if stop.wait(period):
                    return

        t = threading.Thread(target=beat, name=f"langfield-heartbeat-rank{self.rank}", daemon=True)
        self._beat_stop, self._beat_thread = stop, t
        t.start()

    def stop_heartbeat(self, exiting: bool = True) -> None:
        """Stop the heartbeat thread; ``exiting``: say so in the store (a rank that reported
        an error and exits is then named at once by the ranks waiting for it)."""
        if self._beat_stop is not None:
            self._beat_stop.set()
        if self._beat_thread is not None and self._beat_thread is not threading.current_thread():
            # wait for it to leave its store call: a thread still inside the store when the
            # process group (and its store) is destroyed at exit aborts the process (seen under
            # load, where the thread may take seconds to get the GIL back); it returns at once
            # once it runs, as the stop event is set
            self._beat_thread.join(timeout=max(30.0, 2 * self.beat_period_s))
        if exiting and self._beat_thread is not None:
            self._store_set(f"alive/{self.rank}", f"exited|{time.time():.3f}|exited")
        self._beat_stop = self._beat_thread = None

    def wait_all(self, what: str, poll_s: float = 0.2) -> None:
        """A barrier for long, uneven work (feature extraction, rank 0 fitting the codec): no
        limit on the total wait, but a rank silent for longer than the timeout (neither its
        heartbeat thread, :meth:`start_heartbeat`, nor a :meth:`heartbeat` moved), or one that
        reported an error, stops every waiting rank with a :class:`DistError` naming it."""
        if not self.active:
            return
        if self.store is None:  # pragma: no cover - no store to poll: a plain barrier
            return self.barrier(what)
        self.n_collectives += 1
        self.n_waits += 1
        tag = f"wait/{self.n_waits}"  # every rank makes the same sequence of waits
        self._store_set(f"{tag}/{self.rank}", "1")
        self._store_set(f"beat/{self.rank}", f"{self.n_collectives}|{what}|{self.step}|{self.host}|{os.getpid()}")
        last: Dict[int, Any] = {}
        seen: Dict[int, float] = {}
        failed_since: Dict[int, float] = {}
        t_log = time.monotonic()
        while True:
            try:
                pending = [r for r in range(self.world) if not self.store.check([f"{_PREFIX}{tag}/{r}"])]
            except Exception:
                raise DistError(f"rank {self.rank}/{self.world}: waiting for the other ranks ({what}): the job's "
                                f"key-value store is gone: rank 0 stopped") from None
            if not pending:
                return
            now_ = time.monotonic()
            for r in pending:
                f = self._failure(r)
                w = (self._store_get(f"work/{r}"), self._store_get(f"alive/{r}"))
                if f is not None:
                    # a rank that reported an error stops the wait once it has exited, or when it
                    # neither exits nor arrives within the timeout (it may also have caught the
                    # error and be on its way here: then it arrives and the note is stale)
                    failed_since.setdefault(r, now_)
                    if (w[1] or "").startswith("exited") or now_ - failed_since[r] > self.timeout_s:
                        raise DistError(f"rank {self.rank}/{self.world}: waiting for the other ranks ({what}): "
                                        f"rank {r} failed ({f})")
                if r not in seen or w != last.get(r):
                    last[r], seen[r] = w, now_
                elif now_ - seen[r] > self.timeout_s:
                    where = (w[1] or "").split("|", 2)[-1] if w[1] else ""
                    raise DistError(f"rank {self.rank}/{self.world}: waiting for the other ranks ({what}): rank {r} "
                                    f"stopped responding (no heartbeat for {self.timeout_s:.0f} s: killed, stopped or "
                                    f"stuck; last work: {(w[0] or 'nothing').split('|')[-1]}"
                                    + (f"; last seen at {where}" if where else "") + ")")
            if now_ - t_log > 60.0 and pending:  # a long wait says what it waits for
                t_log = now_
                log(f"still waiting for rank(s) {', '.join(map(str, pending))} ({what}); alive at "
                    + "; ".join(f"{(last.get(r, (None, None))[1] or '?').split('|', 2)[-1]}" for r in pending))
            time.sleep(poll_s)

    # ---- collectives -------------------------------------------------------------------------
    def barrier(self, what: str = "barrier") -> None:
        if not self.active:
            return
        import torch.distributed as dist

        t = torch.zeros(1, device=self.device())
        # an all_reduce rather than dist.barrier(): it honours the group's timeout on gloo and NCCL alike
        self.collective(what, lambda: dist.all_reduce(t))

    def all_reduce(self, t: Tensor, op: str = "sum", what: str = "all_reduce") -> Tensor:
        """In place; ``op`` sum, max or min."""
        if not self.active:
            return t
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        self.bytes_sent += t.numel() * t.element_size()
        self.collective(what, lambda: dist.all_reduce(t, op=ops[op]))
        return t

    def all_gather(self, t: Tensor, what: str = "all_gather") -> List[Tensor]:
        """Same-shaped tensors of every rank, in rank order."""
        if not self.active:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        self.bytes_sent += t.numel() * t.element_size()
        self.collective(what, lambda: dist.all_gather(out, t.contiguous()))
        return out

    def all_gather_var(self, t: Tensor, what: str = "all_gather") -> List[Tensor]:
        """Every rank's ``t`` (same dtype and trailing shape, any number of rows), in rank order."""
        if not self.active:
            return [t]
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        lens = [int(x) for x in self.all_gather(n, what=f"{what} (sizes)")]
        buf = t.new_zeros((max(max(lens), 1), *t.shape[1:]))
        buf[:t.shape[0]] = t
        return [p[:k] for p, k in zip(self.all_gather(buf, what=what), lens)]

    def broadcast(self, t: Tensor, src: int = 0, what: str = "broadcast") -> Tensor:
        if not self.active:
            return t
        import torch.distributed as dist

        if self.rank == src:
            self.bytes_sent += t.numel() * t.element_size()
        self.collective(what, lambda: dist.broadcast(t, src=src))
        return t

    def gather_bytes(self, data: bytes, what: str = "gather") -> List[bytes]:
        """Every rank's ``data`` (any length), in rank order: JSON between our own ranks, no pickle."""
        if not self.active:
            return [data]
        dev = self.device()
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        lens = [int(x) for x in self.all_gather(n, what=f"{what} (sizes)")]
        buf = torch.zeros(max(lens), dtype=torch.uint8, device=dev)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
        parts = self.all_gather(buf, what=what)
        return [bytes(p[:k].cpu().numpy().tobytes()) for p, k in zip(parts, lens)]

    def broadcast_json(self, obj: Any = None, src: int = 0, what: str = "broadcast") -> Any:
        """``obj`` of rank ``src`` (JSON-serialisable) on every rank."""
        if not self.active:
            return obj
        data = json.dumps(obj, sort_keys=True).encode("utf-8") if self.rank == src else b""
        return json.loads(self.gather_bytes(data, what=what)[src].decode("utf-8"))

    def on_main(self, fn: Callable[[], Any], errors: tuple = (Exception,), what: str = "rank 0's step") -> Any:
        """Run ``fn`` on rank 0 only; when it raises one of ``errors``, every rank raises the same
        exception type with rank 0's message (no rank is left waiting). Returns rank 0's result
        (JSON-serialisable) on every rank. The other ranks wait with :meth:`wait_all`: ``fn``
        may take longer than the collectives' timeout as long as rank 0's heartbeat goes on."""
        if not self.active:
            return fn()
        res: Dict[str, Any] = {}
        exc = None
        if self.is_main:
            try:
                res = {"ok": True, "value": fn()}
            except errors as e:
                exc = e
                res = {"ok": False, "type": type(e).__name__, "message": str(e)}
        # rank 0's work may outlast the collectives' timeout: the others wait on its heartbeat
        self.wait_all(what)
        res = self.broadcast_json(res, what=what)
        if res["ok"]:
            return res.get("value")
        if exc is not None:
            raise exc
        err_type = next((t for t in errors if t.__name__ == res["type"]), None)
        try:
            raise (err_type or DistError)(res["message"])
        except TypeError:  # an exception type whose constructor takes more than a message
            raise DistError(res["message"]) from None

    # ---- consistency -------------------------------------------------------------------------
    def check_same(self, name: str, obj: Mapping[str, Any]) -> None:
        """Refuse (:class:`DistError`, on every rank) when ``obj`` (a JSON-like mapping: the
        configuration, a fingerprint of the data) differs between ranks; the message lists the
        keys that differ and on which ranks."""
        if not self.active:
            return
        doc = json.loads(json.dumps(obj, sort_keys=True, default=str))
        data = json.dumps(doc, sort_keys=True).encode("utf-8")
        digest = hashlib.sha256(data).digest()
        digests = self.gather_bytes(digest, what=f"compare {name}")
        if all(d == digests[0] for d in digests):
            return
        docs = [_flat(json.loads(b.decode("utf-8"))) for b in self.gather_bytes(data, what=f"gather {name}")]
        diffs = []
        for r, d in enumerate(docs[1:], start=1):
            if d == docs[0]:
                continue
            keys = sorted(k for k in set(docs[0]) | set(d) if docs[0].get(k) != d.get(k))
            shown = ", ".join(f"{k} (rank 0: {_short(docs[0].get(k))}, rank {r}: {_short(d.get(k))})" for k in keys[:4])
            diffs.append(shown + (f", and {len(keys) - 4} more" if len(keys) > 4 else ""))
        raise DistError(f"the ranks disagree on the {name}: {'; '.join(diffs)}; every rank must run the same "
                        f"command on the same data (same paths, same files) and the same langfield version")

    def check_params(self, params: Mapping[str, Tensor], step: int) -> None:
        """:class:`DistError` on every rank when the parameters differ between ranks (exact
        integer hash of their bits and shapes, see :func:`params_hash`)."""
        if not self.active:
            return
        names = list(params.keys())
        h = params_hash(params).to(self.device())
        hs = self.all_gather(h, what="parameter hash check")
        bad = []
        for r in range(1, self.world):
            if not torch.equal(hs[r], hs[0]):
                diff = (hs[r] != hs[0]).view(len(names), -1).any(dim=1).nonzero().flatten().tolist()
                bad.append(f"rank {r} differs from rank 0 in {', '.join(repr(names[i]) for i in diff)}")
        if bad:
            n = [int(x) for x in hs[0].view(len(names), -1)[:, 0]]
            raise DistError(f"the Gaussians diverged across ranks at step {step} ({'; '.join(bad)}; rank 0 has "
                            f"{n[0]} rows): data-parallel ranks must take identical steps (same seed, same "
                            f"backend and device type on every rank, deterministic kernels)")


def _beat_words(beat: Optional[str]) -> str:
    if not beat:
        return "never reached a collective"
    parts = beat.split("|")
    if len(parts) != 5:
        return beat
    n, what, step, host, pid = parts
    return f"last seen at {what} #{n}, step {step}, on {host} pid {pid}"


def _where(ident: Optional[int]) -> str:
    """Where the thread ``ident`` is (``file.py:line function``), for heartbeats."""
    try:
        f = sys._current_frames().get(ident)
        if f is None:
            return "finished"
        return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"
    except Exception:  # pragma: no cover - never let the heartbeat thread die of a report
        return "?"


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested mappings as dotted keys (``config.seed``), so a difference names the leaf."""
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def params_hash(params: Mapping[str, Tensor]) -> Tensor:
    """``int64 [len(params), 3]``: per tensor, its row count, the sum of its 32-bit words and
    their position-weighted sum, computed on the tensor's device (integer sums: exact and
    independent of the reduction order, so equal tensors always hash equal)."""
    rows = []
    for t in params.values():
        x = t.detach().contiguous()
        if x.element_size() == 8:
            w = x.view(torch.int64).flatten()
        elif x.element_size() == 4:
            w = x.view(torch.int32).flatten().to(torch.int64)
        else:
            w = x.to(torch.float32).contiguous().view(torch.int32).flatten().to(torch.int64)
        pos = torch.arange(w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
        rows.append(torch.stack([torch.tensor(x.shape[0] if x.dim() else 1, device=w.device, dtype=torch.int64),
                                 w.sum(), (w * pos).sum()]))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.int64)
    return torch.stack(rows)


# ---- the process-wide job ----------------------------------------------------------------------

_STATE: Optional[Dist] = None


def init(device: Optional[str] = None, timeout_s: Optional[float] = None) -> Dist:
    """Join the job described by the environment (once per process; later calls return it).

    No ``WORLD_SIZE`` (or 1): a single-process :class:`Dist`, no group. Else
    ``init_process_group`` with NCCL when ``device`` is ``cuda`` (or ``auto`` with CUDA
    available), gloo otherwise, and a timeout on every collective (``timeout_s``, else
    ``LANGFIELD_DIST_TIMEOUT``, else 600 s)."""
    global _STATE
    if _STATE is not None:
        return _STATE
    world = env_world_size()
    if world == 1:
        _STATE = Dist()
        return _STATE
    import torch.distributed as dist

    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise DistError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(k):
            raise DistError(f"{k} is not set; start distributed jobs with torchrun")
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get("LANGFIELD_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        except ValueError:
            raise DistError(f"LANGFIELD_DIST_TIMEOUT={os.environ['LANGFIELD_DIST_TIMEOUT']!r} is not a number "
                            f"of seconds") from None
    dev = (device or "auto").lower()
    use_cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DistError(f"rank {rank}: --device {device} but CUDA is not available on {socket.gethostname()}")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistError(f"rank {rank}: LOCAL_RANK={local_rank} but {socket.gethostname()} has "
                            f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= that")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            kw = {"device_id": torch.device("cuda", local_rank)} if use_cuda else {}
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s), **kw)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise DistError(f"rank {rank}/{world}: cannot join the job at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')} with {backend} within {timeout_s:.0f} s "
                            f"({type(e).__name__}: {first})") from None
    store = None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # pragma: no cover - older/newer torch: errors name ranks less precisely
        store = None
    _STATE = Dist(rank, world, local_rank, backend, timeout_s, store)
    _STATE.start_heartbeat()  # liveness independent of collectives (long local work on one rank)
    import atexit

    atexit.register(shutdown)  # leave the group cleanly at the end of the command
    return _STATE


def get() -> Dist:
    """The job of this process (:func:`init` on first use)."""
    return _STATE if _STATE is not None else init()


def shutdown() -> None:
    """Leave the group (end of a command); the next :func:`init` starts afresh."""
    global _STATE
    if _STATE is not None and _STATE.active:
        import torch.distributed as dist

        _STATE.stop_heartbeat()

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    _STATE = None


@contextlib.contextmanager
def alone():
    """Inside, :func:`get` returns a single-process job (rank 0 of 1, no collectives): for work
    that one rank does by itself while the others wait in :meth:`Dist.on_main` (e.g. a stage
    that is not data-parallel), so that its code does not split work over ranks that are not
    there. The job's heartbeat goes on meanwhile."""
    global _STATE
    saved = get()
    _STATE = Dist(timeout_s=saved.timeout_s)
    try:
        yield _STATE
    finally:
        _STATE = saved


def is_main() -> bool:
    return get().is_main


def rank() -> int:
    return get().rank


def world_size() -> int:
    return get().world


def barrier(what: str = "barrier") -> None:
    get().barrier(what)


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if get().is_main:
        print(*args, **kwargs)


def flat_grads(params: Iterable[Tensor]) -> List[Tensor]:
    """The gradients of ``params`` (zeros where a parameter got none), for one fused reduction."""
    out = []
    for p in params:
        out.append(p.grad if p.grad is not None else torch.zeros_like(p))
    return out


def all_reduce_grads(params: Sequence[Tensor], extra: Optional[Tensor] = None, dist_: Optional[Dist] = None,
                     average: bool = False) -> Optional[Tensor]:
    """Sum (or ``average``) the gradients of ``params`` over the ranks in one flat all-reduce;
    ``extra`` (a small float tensor, e.g. the loss) rides along and is returned reduced."""
    d = dist_ or get()
    if not d.active:
        return extra
    params = [p for p in params]
    grads = flat_grads(params)
    dtype = grads[0].dtype if grads else torch.float32
    parts = [g.reshape(-1).to(dtype) for g in grads]
    if extra is not None:
        parts.append(extra.reshape(-1).to(device=parts[0].device if parts else extra.device, dtype=dtype))
    flat = torch.cat(parts) if parts else torch.zeros(0)
    d.all_reduce(flat, "sum", what="all_reduce of the gradients")
    if average:
        flat /= d.world
    o = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[o:o + n].view_as(g).to(g.dtype)
        o += n
    return flat[o:].to(extra.dtype) if extra is not None else None


def broadcast_params(params: Mapping[str, Tensor], src: int = 0, dist_: Optional[Dist] = None) -> None:
    """Copy rank ``src``'s parameters into every rank's (in place, same shapes)."""
    d = dist_ or get()
    if not d.active:
        return
    with torch.no_grad():
        for k, p in params.items():
            d.broadcast(p.data, src=src, what=f"broadcast of {k!r}")


def fail_line(e: BaseException) -> str:
    """One line for an exception (the first line of its message)."""
    s = str(e)
    return s.splitlines()[0] if s else type(e).__name__


def guard_main(fn: Callable[[], int]) -> int:
    """Run a command body; on an exception in a distributed job, report it into the store
    (so the other ranks name this one) and re-raise."""
    try:
        return fn()
    except BaseException as e:
        if _STATE is not None and _STATE.active:
            _STATE.report(f"{type(e).__name__}: {fail_line(e)}")
        raise


def log(msg: str) -> None:
    """stderr, prefixed with the rank in a distributed job."""
    d = _STATE
    prefix = f"[rank {d.rank}] " if d is not None and d.active else ""
    print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def now() -> float:
    return time.perf_counter()
