"""Test hooks for the trainer, installed through Trainer hooks (never by the production loop).

Run as a script (directly or under torchrun):
`python harness.py CONFIG [--fault N:KIND[:ARG]]... [--fault-rank R] [--dump-grads N:DIR] [nmoe-train args]`
— the same as `nmoe-train CONFIG ...` with the hooks installed on every rank (a fault on --fault-rank R only).
Fault kinds, each at step N:
  KILL            SIGKILL right after step N's checkpoint (no cleanup at all)
  TERM / INT      the signal arrives during step N (after its backward, before the ranks agree on the step)
  KILLSTEP        SIGKILL during step N (before the step is logged)
  KILLSAVE:POINT  SIGKILL inside step N's save: `file` (one file written into the temporary folder), `meta`
                  (every file and meta.json written, not yet renamed into place), `latest` (renamed into
                  place, `latest` not yet updated), `prune` (while deleting an older checkpoint)
  ENOSPC:POINT    the disk is full during step N's save: `file` (torch.save fails as it does on a full disk),
                  `meta` (writing meta.json), `latest` (writing the `latest` pointer), `registry` (recording
                  the checkpoint in the experiment registry); or `metrics`: from step N on, every write of
                  the metrics file fails
  POISON          step N's update makes the weights non-finite (its loss and gradients stay finite)
  WAIT:PATH       step N waits until PATH exists (the run holds its lock meanwhile)
--dump-grads: after step N's gradient reductions, each rank saves {name: grad} and its global expert
range to DIR/rank{R}.pt. Environment NMOE_TEST_CLOCK=yyyymmdd-HHMMSS: a new run's id carries this start time
(two starts within one second).

`python harness.py --serve` is a fork server for tests (see `Launcher`): it imports the trainer once and
forks one child per run, so a test can run, kill and rerun the real CLI many times without paying the
import each time.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
SAVE_POINTS = {
    "KILLSAVE": ("file", "meta", "latest", "prune"),
    "ENOSPC": ("file", "meta", "latest", "registry", "metrics"),
}


class Fault:
    """A Trainer hook that injects the fault `N:KIND[:ARG]` at step N (see the module docstring)."""

    def __init__(self, spec: str, rank: int | None = None):
        at, _, rest = spec.partition(":")
        kind, _, self.arg = rest.partition(":")
        self.step, self.kind, self.rank = int(at), kind.upper(), rank
        self.saving = False  # inside step N, until its after_save hook
        self.reached = False  # step N has begun
        if self.kind in SAVE_POINTS and self.arg not in SAVE_POINTS[self.kind]:
            raise SystemExit(f"harness: {self.kind} needs a point out of {SAVE_POINTS[self.kind]}, got {spec!r}")
        if self.kind in SAVE_POINTS:
            _patch_checkpoint_module(self)

    def _mine(self, step: int) -> bool:
        return step == self.step and (self.rank is None or self.rank == int(os.environ.get("RANK", "0")))

    def during_step(self, trainer, step: int) -> None:
        if not self._mine(step):
            return
        self.saving = self.reached = True
        if self.kind in ("TERM", "INT"):
            os.kill(os.getpid(), SIGNALS[self.kind])
        elif self.kind == "KILLSTEP":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.kind == "POISON":
            for group in trainer.optimizer.param_groups:
                group["lr"] = float("inf")
        elif self.kind == "WAIT":
            while not os.path.exists(self.arg):
                time.sleep(0.02)

    def after_save(self, trainer, step: int) -> None:
        self.saving = False
        if self.kind == "KILL" and self._mine(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def at(self, point: str) -> bool:
        """True when step N's save has reached `point` (the moment this fault strikes)."""
        return self.saving and self.arg == point


def _patch_checkpoint_module(fault: Fault) -> None:
    """Wrap the file steps of nmoe.train.checkpoint so `fault` can strike between them (this process only)."""
    import shutil

    import torch

    from nmoe.train import checkpoint as ckpt

    write_file, replace_dir, write_latest = ckpt._write_file, ckpt._replace_dir, ckpt._write_latest
    real_write_text = Path.write_text

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def disk_full(kind: str) -> bool:
        return fault.kind == "ENOSPC" and fault.at(kind)

    def save(obj, f, *args, **kwargs):
        if disk_full("file") and Path(f).name.endswith("optim.pt"):  # one file fits, the next one does not
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 60)  # torch's stream writer leaves a stub ...
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534")  # ... and says
        return torch.save(obj, f, *args, **kwargs)

    def disk_usage(path):
        return shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096) if disk_full("file") else shutil.disk_usage(path)

    def rmtree(path, *args, **kwargs):
        if fault.kind == "KILLSAVE" and fault.at("prune") and ".old-" in Path(path).name:
            files = sorted(Path(path).glob("*.pt"))
            if files:
                files[0].unlink()  # the delete has begun
            kill()
        return shutil.rmtree(path, *args, **kwargs)

    def faulty_write_file(path, obj):
        info = write_file(path, obj)
        if fault.kind == "KILLSAVE" and fault.at("file"):
            kill()
        return info

    def faulty_replace_dir(tmp, final):
        if fault.kind == "KILLSAVE" and fault.at("meta"):
            kill()
        return replace_dir(tmp, final)

    def faulty_write_latest(root, name):
        if fault.kind == "KILLSAVE" and fault.at("latest"):
            kill()
        if disk_full("latest"):
            stub = root / f".{ckpt.LATEST}.tmp-{os.getpid()}"
            stub.write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device", str(stub))
        return write_latest(root, name)

    def write_text(self, data, *args, **kwargs):
        if disk_full("meta") and self.name == ckpt.META:
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, data, *args, **kwargs)

    from nmoe.metrics import MetricsWriter, Registry

    append, checkpoint = MetricsWriter._append, Registry.checkpoint

    def faulty_append(self, batch):
        if fault.kind == "ENOSPC" and fault.arg == "metrics" and fault.reached:
            raise __import__("duckdb").IOException(
                f'TransactionContext Error: Failed to commit: Could not write file "{self.path}.wal": '
                "No space left on device"
            )
        return append(self, batch)

    def faulty_checkpoint(self, *args, **kwargs):
        if disk_full("registry"):
            raise sqlite3.OperationalError("database or disk is full")
        return checkpoint(self, *args, **kwargs)

    MetricsWriter._append, Registry.checkpoint = faulty_append, faulty_checkpoint
    ckpt._write_file, ckpt._replace_dir, ckpt._write_latest = faulty_write_file, faulty_replace_dir, faulty_write_latest
    ckpt.torch = _Proxy(torch, save=save)
    ckpt.shutil = _Proxy(shutil, rmtree=rmtree, disk_usage=disk_usage)
    Path.write_text = write_text


class _Proxy:
    """A module with some of its functions replaced."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


class GradDump:
    """A Trainer hook that saves this rank's reduced gradients at one step."""

    def __init__(self, spec: str):
        at, _, folder = spec.partition(":")
        self.step, self.folder = int(at), folder

    def during_step(self, trainer, step: int) -> None:
        if step != self.step:
            return
        import torch

        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        experts = sorted(n for n in grads if trainer.shard.is_expert(n))
        payload = {"grads": grads, "experts": trainer.shard.expert_range, "expert_names": experts}
        torch.save(payload, os.path.join(self.folder, f"rank{trainer.world.rank}.pt"))

    def after_save(self, trainer, step: int) -> None:
        pass


def main(argv: list[str]) -> int:
    from nmoe.train.cli import main as cli_main

    if os.environ.get("NMOE_TEST_CLOCK"):
        from nmoe.train import state

        state.time = _Proxy(time, strftime=lambda fmt, *args: os.environ["NMOE_TEST_CLOCK"])

    faults, dumps, rest, i = [], [], [], 0
    rank = None
    while i < len(argv):
        if argv[i] == "--fault":
            faults.append(argv[i + 1])
            i += 2
        elif argv[i] == "--fault-rank":
            rank, i = int(argv[i + 1]), i + 2
        elif argv[i] == "--dump-grads":
            dumps.append(GradDump(argv[i + 1]))
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return cli_main(rest, hooks=[*dumps, *(Fault(spec, rank) for spec in faults)])


# ---------------------------------------------------------------------------------------------- fork server
def serve() -> None:
    """Read JSON requests from stdin, one a line; answer each with one JSON line on stdout.

    {"op": "warm", "argv": [CONFIG]}   -> {"rc": ...}: train CONFIG here on one thread, so that the lazy
                                          imports and one-time initialisation are done before any fork
    {"op": "start", "argv": [...], "cwd": DIR, "out": FILE, "err": FILE, "env": {...}}  -> {"pid": PID}
    {"op": "poll", "pid": PID}         -> {"rc": None | exit status}
    The exit status is subprocess's: the code, or -SIGNAL. On EOF the server kills its children and exits.
    """
    import torch

    import nmoe.train.cli  # noqa: F401 - imported once, inherited by every child
    import nmoe.train.loop  # noqa: F401

    threads = torch.get_num_threads()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the server itself prints never reaches the protocol
    children: dict[int, int | None] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "warm":
            torch.set_num_threads(1)  # no OpenMP pool in the server: a forked child starts its own
            cwd = os.getcwd()
            os.chdir(Path(req["argv"][0]).parent)
            try:
                rc = main(req["argv"])
            finally:
                os.chdir(cwd)
            proto.write(json.dumps({"rc": rc}) + "\n")
        elif req["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                torch.set_num_threads(threads)
                _child(req)  # never returns
            children[pid] = None
            proto.write(json.dumps({"pid": pid}) + "\n")
        elif req["op"] == "poll":
            pid = req["pid"]
            if children.get(pid) is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children[pid] = os.waitstatus_to_exitcode(status)
            proto.write(json.dumps({"rc": children[pid]}) + "\n")
    for pid, rc in children.items():
        if rc is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _child(req: dict) -> None:
    import atexit
    import traceback

    rc = 1
    try:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.chdir(req["cwd"])
        os.environ.update(req.get("env", {}))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            rc = main(req["argv"])
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to a real process
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class Run:
    """One trainer process started by a Launcher."""

    def __init__(self, launcher: Launcher, pid: int, out: Path, err: Path):
        self.launcher, self.pid, self.out, self.err = launcher, pid, out, err
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            self.rc = self.launcher._ask({"op": "poll", "pid": self.pid})["rc"]
        return self.rc

    def wait(self, timeout: float = 300) -> Result:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(self.pid, signal.SIGKILL)
                self.wait(30)
                raise TimeoutError(f"run {self.pid} did not finish in {timeout}s:\n{self.err.read_text()[-3000:]}")
            time.sleep(0.02)
        return Result(self.rc, self.out.read_text(), self.err.read_text())


class Launcher:
    """Starts `harness.py CONFIG ...` runs as children of one fork server (a real process each, real signals)."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.server = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def _ask(self, req: dict) -> dict:
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], 120)
        if not ready:
            raise TimeoutError("the fork server did not answer")
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.server.wait()})")
        return json.loads(line)

    def start(self, cfg: Path, *args: str, env: dict[str, str] | None = None) -> Run:
        self.count += 1
        out, err = self.logs / f"{self.count:03d}.out", self.logs / f"{self.count:03d}.err"
        req = {"op": "start", "argv": [str(cfg), *args], "cwd": str(cfg.parent), "out": str(out), "err": str(err)}
        return Run(self, self._ask(dict(req, env=env or {}))["pid"], out, err)

    def run(self, cfg: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
        return self.start(cfg, *args, env=env).wait(timeout)

    def warm(self, cfg: Path) -> None:
        """Train `cfg` once inside the server (one thread), so that every later run starts warm."""
        rc = self._ask({"op": "warm", "argv": [str(cfg)]})["rc"]
        if rc != 0:
            raise RuntimeError(f"warming the fork server with {cfg} failed (exit {rc})")

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(60)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(sys.argv[1:]))
