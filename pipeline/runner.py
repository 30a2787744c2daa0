"""The stage runner: DVC-style staleness, atomic outputs, a lock file and a run cache.

A stage is stale when it has no lock entry, or when its code, a dep (an upstream stage's
artifacts or an external file), a declared param or one of its outputs differs from what
`stages.lock` recorded, or when an upstream stage is stale. Outputs are written to a fresh
temporary folder and moved into place; the lock entry is written last, and Ctrl-C waits for that
swap and lock write to finish (a SIGKILL in between is rolled back by the next runner, see `recover`).
Every param section is checked (each stage module's `check_params`) before anything runs.

Scale out: a stage with a `merge` function runs as shards (`run_shard`, under a shared project
lock, so shards run side by side but never beside a run or gc) into
artifacts/.shards/<stage>/<key>/<i>-of-<n>/, and `merge` joins a complete set made with the
current key into the stage's normal artifact and lock entry. Under
torchrun (WORLD_SIZE > 1) rank 0 is the runner and tells the other ranks which stages to compute;
they compute into a scratch dir they delete and never touch the lock, cache or artifacts.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from tca.errors import TcaError

from .context import StageContext
from .graph import Graph, Stage, load_graph
from .hashing import HashCache, atomic_write_text
from .params import apply_file, apply_overrides, flatten, select
from .runcache import RunCache, entry_problem


@dataclass
class Fingerprint:
    """Everything a stage's outputs are a function of."""

    code: dict[str, str]
    deps: dict[str, str]
    params: dict

    @property
    def key(self) -> str:
        doc = json.dumps({"code": self.code, "deps": self.deps, "params": self.params}, sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:24]


def covered(key: str, names) -> bool:
    """Whether param `key` is one of `names` or inside a section among them (`lora.r` in `lora`)."""
    return any(key == name or key.startswith(name + ".") for name in names)


SHARD_RECORD = "shard.json"  # in each shard folder: the key and range it was computed with


def launched_world():
    """This process's rank under torchrun / accelerate launch (a `tca.llm.ddp.World`), or None for a
    plain process (then torch is not imported: `tca status` stays fast)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from tca.llm.ddp import World

    world = World.from_env()
    return world if world.size > 1 else None


def find_root(start: Path) -> Path:
    """The nearest folder holding stages.yaml, from `start` upwards."""
    for folder in [start, *start.parents]:
        if (folder / "stages.yaml").exists():
            return folder
    raise TcaError(f"no stages.yaml in {start} or any parent folder; run tca from the project folder")


def module_source(name: str, where: str) -> Path:
    """The source file of module `name`, found on sys.path without importing anything (an import
    runs code; `tca status` only hashes it)."""
    parts = name.split(".")
    for folder in sys.path:
        base = Path(folder or ".").joinpath(*parts)
        for path in (base.parent / f"{parts[-1]}.py", base / "__init__.py"):
            if path.is_file():
                return path.resolve()
    raise TcaError(f"{where}: no module {name!r} on the Python path (the project folder comes first); "
                   f"put {name.replace('.', '/')}.py in the project folder or install it")


@contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) inside the block takes effect when it ends: the block finishes first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
    return path.lstat().st_size


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


class Project:
    def __init__(self, root: Path, overrides: list[str] | tuple[str, ...] = (), device: str = "auto",
                 params_file: Path | None = None):
        self.root = root.resolve()
        self.graph: Graph = load_graph(self.root / "stages.yaml")
        base = apply_file(self.graph.defaults, params_file) if params_file else self.graph.defaults
        self.overrides = list(overrides)
        self.params = apply_overrides(base, self.overrides)  # --set wins over --params FILE
        self.flat = flatten(self.params)
        self.device = device
        self.artifacts = self.root / "artifacts"
        self.lock_path = self.root / "stages.lock"
        self.hashes = HashCache(self.artifacts / ".cache" / "hashes.json")
        self.cache = RunCache(self.artifacts / ".cache" / "runs")
        self._tree_memo: dict[Path, str] = {}
        self.restored: list[str] = []  # stages the last `run` restored from the run cache
        self.lock_damage: dict[str, str] = {}  # stage (or "*": the whole file) -> what is wrong with its lock entry
        self._params_checked = False
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))

    # ---------- inputs of staleness ----------

    def lock(self) -> dict:
        """stages.lock's intact entries. A damaged file or entry is no error: its stages are stale,
        with the damage as the reason (`lock_damage`), and the next run rewrites it."""
        self.lock_damage = {}
        try:
            doc = yaml.safe_load(self.lock_path.read_text()) if self.lock_path.exists() else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.lock_damage["*"] = f"stages.lock is unreadable ({first}); the next run rewrites it"
            return {}
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            self.lock_damage["*"] = f"stages.lock is damaged (a {type(doc).__name__}, not a mapping of stages); the next run rewrites it"
            return {}
        good = {}
        for name, entry in doc.items():
            problem = entry_problem(entry)
            if problem is None:
                good[name] = entry
            else:
                self.lock_damage[str(name)] = f"its stages.lock entry is damaged ({problem}); the next run rewrites it"
        return good

    def check_params(self) -> None:
        """Every stage module's `check_params(params)` (which builds its typed configs), so that a bad
        value in any section stops `run`, `--dry` and `status` before anything runs. The configs
        live beside torch code (seconds to import), so a params + code combination that passed is
        remembered in artifacts/.cache/checked_params.json and not checked again."""
        if self._params_checked:
            return
        try:
            code = {self.label(p): self.hashes.file(p) for stage in self.graph.stages.values() for p in self.code_files(stage)}
        except TcaError:
            code = None  # a missing code file: check without remembering (and let status name it)
        key = hashlib.sha256(json.dumps([self.flat, code], sort_keys=True, default=str).encode()).hexdigest()
        memo = self.artifacts / ".cache" / "checked_params.json"
        try:
            seen = json.loads(memo.read_text())
        except (OSError, ValueError):
            seen = []
        seen = seen if isinstance(seen, list) else []
        if code is not None and key in seen:
            self._params_checked = True
            return
        for stage in self.graph.stages.values():
            check = getattr(self.module(stage), "check_params", None)
            if check is not None:
                check(self.params)
        self._params_checked = True
        if code is not None:
            atomic_write_text(memo, json.dumps([*seen[-99:], key]))

    def module(self, stage: Stage) -> ModuleType:
        try:
            return importlib.import_module(stage.entry)
        except ImportError as err:
            raise TcaError(f"{self.graph.path}: stage `{stage.name}` entry `{stage.entry}` cannot be imported: {err}") from err

    def _tree(self, path: Path) -> str:
        if path not in self._tree_memo:
            self._tree_memo[path] = self.hashes.tree(path)
        return self._tree_memo[path]

    def code_files(self, stage: Stage) -> list[Path]:
        """The stage module, its `code:` files and the source file of each plugin its `plugins:`
        params name (`cf.model=module:Class`)."""
        files = [self.root / stage.module_path]
        for entry in stage.code:
            path = self.root / entry
            if path.is_dir():
                files.extend(sorted(path.rglob("*.py")))
            elif path.is_file():
                files.append(path)
            else:
                raise TcaError(f"{self.graph.path}: stage `{stage.name}` lists code `{entry}`, which does not exist")
        for key in stage.plugins:
            module, sep, _ = str(self.flat[key]).partition(":")
            if sep:
                files.append(module_source(module, f"{key}={self.flat[key]}"))
        return files

    def label(self, path: Path) -> str:
        """A code file as the lock names it: relative to the project folder when inside it."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def fingerprint(self, stage: Stage) -> Fingerprint:
        code = {self.label(p): self.hashes.file(p) for p in self.code_files(stage)}
        deps = {}
        module = self.module(stage)
        reads = getattr(module, "reads", None)
        partial = reads(self.params) if reads else {}
        for dep in stage.deps:
            path = self.artifacts / dep
            if not path.exists():
                raise TcaError(f"stage `{stage.name}` needs the outputs of `{dep}` ({path}), which do not exist; run `tca run-stage {dep}` or pass --upstream")
            if dep not in partial:
                deps[f"stage:{dep}"] = self._tree(path)
            for name in partial.get(dep, ()):
                if not (path / name).exists():
                    raise TcaError(f"stage `{stage.name}` reads {path / name}, which `{dep}` did not write; run `tca run-stage {dep} --force`")
                deps[f"stage:{dep}/{name}"] = self._tree(path / name)
        external = getattr(module, "external_deps", None)
        for path in external(self.params) if external else []:
            path = Path(path)
            if not path.exists():
                raise TcaError(f"stage `{stage.name}` reads {path}, which does not exist; check its params")
            deps[f"file:{path}"] = self._tree(path)
        return Fingerprint(code=code, deps=deps, params=self.key_params(stage))

    def key_params(self, stage: Stage) -> dict:
        """The declared param values in the stage's lock entry and run-cache key: all but its inert ones."""
        inert = self.inert(stage)
        return {key: value for key, value in select(self.flat, list(stage.params)).items() if not covered(key, inert)}

    def inert(self, stage: Stage) -> dict[str, str]:
        """The stage's declared params that these params make irrelevant to its outputs, with why."""
        hook = getattr(self.module(stage), "inert", None)
        return hook(self.params) if hook else {}

    def idle_overrides(self) -> list[str]:
        """A line for each `--set` whose param no stage's outputs depend on under these params (every
        stage declaring it reports it inert): setting it reruns nothing, which the user should hear."""
        lines = []
        for key in dict.fromkeys(assignment.partition("=")[0].strip() for assignment in self.overrides):
            readers = [stage for stage in self.graph.stages.values() if covered(key, stage.params)]
            why = [next((reason for name, reason in self.inert(stage).items() if covered(key, [name])), None) for stage in readers]
            if readers and all(why):
                lines.append(f"--set {key} changes nothing: {'; '.join(sorted(set(why)))}")
        return lines

    def outputs(self, stage: Stage) -> dict[str, str | None]:
        folder = self.artifacts / stage.name
        return {out: self._tree(folder / out) if (folder / out).exists() else None for out in stage.outs}

    # ---------- staleness ----------

    def own_reasons(self, stage: Stage, entry: dict | None) -> list[str]:
        """Why this stage, by itself, is stale (empty: up to date as far as it can tell)."""
        if not entry:
            damage = self.lock_damage.get(stage.name, self.lock_damage.get("*"))
            return [damage or "never run (no entry in stages.lock)"]
        try:
            fp = self.fingerprint(stage)
        except TcaError as err:
            return [str(err)]
        reasons = []
        old_code = entry.get("code", {})
        for path in sorted(set(old_code) | set(fp.code)):
            if old_code.get(path) != fp.code.get(path):
                what = "added" if path not in old_code else "removed" if path not in fp.code else "changed"
                reasons.append(f"code {what}: {path}")
        old_deps = entry.get("deps", {})
        for dep in sorted(set(old_deps) | set(fp.deps)):
            if old_deps.get(dep) != fp.deps.get(dep):
                kind, _, name = dep.partition(":")
                label = f"outputs of `{name}`" if kind == "stage" else name
                reasons.append(f"dep changed: {label}")
        old_params = entry.get("params", {})
        for key in sorted(set(old_params) | set(fp.params)):
            if key not in old_params or key not in fp.params or old_params[key] != fp.params[key]:
                reasons.append(f"param {key}: {old_params.get(key, '(unset)')!r} -> {fp.params.get(key, '(unset)')!r}")
        old_outs = entry.get("outs", {})
        for out, digest in self.outputs(stage).items():
            if digest is None:
                reasons.append(f"output missing: artifacts/{stage.name}/{out}")
            elif digest != old_outs.get(out):
                reasons.append(f"output modified: artifacts/{stage.name}/{out}")
        return reasons

    def reasons(self, stage: Stage, lock: dict, pending) -> list[str]:
        """Why `stage` is stale: its own reasons, and each dep among `pending` (upstream stages that
        are stale, or would run). `status`, `run --dry` and `run` all decide by this."""
        return self.own_reasons(stage, lock.get(stage.name)) + [f"upstream `{dep}` is stale" for dep in stage.deps if dep in pending]

    def status(self) -> dict[str, list[str]]:
        """Stale stages in topological order, each with its reasons (upstream staleness included)."""
        self.check_params()
        lock = self.lock()
        stale: dict[str, list[str]] = {}
        for name, stage in self.graph.stages.items():
            reasons = self.reasons(stage, lock, stale)
            if reasons:
                stale[name] = reasons
        self.hashes.save()
        return stale

    def running(self) -> str | None:
        """Who holds the project lock now (a run, gc, merge or shards), or None."""
        path = self.artifacts / ".runner.lock"
        if not path.exists():
            return None
        with open(path) as handle:
            try:  # shared: a run starting meanwhile is not refused because of this probe
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "a tca process"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def leftovers(self) -> list[tuple[Path, int]]:
        """What killed runs left behind (temp folders, half-saved cache entries, temp files), with
        sizes; the next `tca run` or `tca gc` removes them. Only meaningful while nothing runs."""
        found = sorted(self.artifacts.joinpath(".tmp").glob("*")) + self.cache.broken()
        found += [p for p in (self.lock_path.parent.glob(".stages.lock.*.tmp")) if p.is_file()]
        found += sorted(self.hashes.path.parent.glob(f".{self.hashes.path.name}.*.tmp"))
        return [(p, _size(p)) for p in found]

    # ---------- running ----------

    @contextmanager
    def exclusive(self, shared: bool = False, log=print):
        """The project lock: `run`, `merge` and `gc` hold it alone, shard runs share it (side by side,
        never beside a run or gc). A second holder fails at once, naming the one that holds it.
        An exclusive holder first cleans up after killed runs (`recover`)."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with open(self.artifacts / ".runner.lock", "a+") as handle:
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another tca process"
                raise TcaError(f"{holder} is running in {self.root}; wait for it to finish, then retry") from None
            if shared:
                yield
                return
            handle.truncate(0)
            handle.write(f"tca process {os.getpid()} (`{' '.join(['tca', *sys.argv[1:]])}`)")
            handle.flush()
            try:
                for what in self.recover():
                    log(what)
                yield
            finally:
                handle.truncate(0)

    def recover(self) -> list[str]:
        """Under the exclusive lock: finish or undo a commit a SIGKILL cut (outputs swapped, lock
        entry not yet written: the old outputs go back, the new ones are in the run cache), then
        delete every temp folder and file killed runs left (`leftovers`)."""
        lock = self.lock()
        done = []
        for old in sorted(self.artifacts.joinpath(".tmp").glob("*.old")):
            name = old.name.rsplit("-", 1)[0]
            final = self.artifacts / name
            entry = lock.get(name)
            if name in self.graph.stages and entry is not None and not self._matches(final, entry) and self._matches(old, entry):
                with deferred_interrupts():
                    if final.exists():
                        os.replace(final, old.with_name(old.name + ".new"))
                    os.replace(old, final)
                done.append(f"restored artifacts/{name}/: a run was killed between swapping it in and writing stages.lock")
        for path, size in self.leftovers():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            kind = "a damaged or half-written run-cache entry" if path.is_relative_to(self.cache.root) else "a killed run's leftover"
            done.append(f"removed {kind}: {self.label(path)} ({human(size)})")
        self._tree_memo = {}
        return done

    def _matches(self, folder: Path, entry: dict) -> bool:
        """Whether `folder` holds exactly the outputs a lock entry recorded."""
        return folder.is_dir() and all((folder / out).exists() and self.hashes.tree(folder / out) == digest
                                       for out, digest in entry["outs"].items())

    def plan(self, targets: list[str] | None, force: bool = False, upstream: bool = False, downstream: bool = False) -> list[str]:
        """The stages a run would consider, in order; refuses a stale upstream unless asked."""
        self.check_params()
        if targets is None:
            return self._writable(list(self.graph.stages))
        chosen: set[str] = set()
        for name in targets:
            self.graph.check_name(name)
            chosen.add(name)
            if downstream:
                chosen.update(self.graph.downstream(name))
            if upstream:
                chosen.update(self.graph.upstream(name))
        if not upstream:
            stale = self.status()
            for name in sorted(chosen):
                for up in self.graph.upstream(name):
                    if up in stale and up not in chosen:
                        raise TcaError(
                            f"cannot run `{name}`: upstream stage `{up}` is stale ({stale[up][0]}); "
                            f"run `tca run-stage {up}` first, or pass --upstream to run it now"
                        )
        return self._writable([s for s in self.graph.stages if s in chosen])

    def _writable(self, order: list[str]) -> list[str]:
        """Refuse a symlinked stage folder: the atomic swap would replace the link, not write through it."""
        for name in order:
            path = self.artifacts / name
            if path.is_symlink():
                raise TcaError(f"{path} is a symbolic link (to {os.readlink(path)}); a run replaces a stage's folder "
                               f"as a whole, which would drop the link. Link artifacts/ itself instead, or remove the link")
        return order

    def changed_params(self, stage: Stage) -> dict:
        """The stage's declared params whose value is not stages.yaml's default: what --params / --set change."""
        defaults = flatten(self.graph.defaults)
        return {k: v for k, v in select(self.flat, list(stage.params)).items() if v != defaults[k]}

    def log_changed_params(self, stage: Stage, log) -> None:
        """`tca run --dry`: under each stage, the values it would run with that differ from the defaults."""
        for key, value in self.changed_params(stage).items():
            log(f"    {key} = {value!r}")

    def run(self, targets: list[str] | None = None, force: bool = False, upstream: bool = False,
            downstream: bool = False, dry: bool = False, log=print) -> list[str]:
        """Run what is stale among the planned stages (all of them with `force`); returns what ran.
        Under torchrun, see `run_ranks`."""
        world = launched_world()
        if world is not None:
            return self.run_ranks(world, targets, force, upstream, downstream, dry, log)
        return self._run(targets, force, upstream, downstream, dry, log)

    def _run(self, targets, force, upstream, downstream, dry, log, tell=lambda message: None) -> list[str]:
        """`tell`: rank 0 hands the other ranks the plan, then for each stage whether it computes.
        `dry` only reads, so it takes no lock (it works while a run is going)."""
        with nullcontext() if dry else self.exclusive(log=log):
            try:
                order = self.plan(targets, force, upstream, downstream)
            except TcaError as err:
                tell(str(err))
                raise
            for line in self.idle_overrides():
                log(f"note: {line}")
            tell(order)
            forced = set(order) if force and targets is None else set(targets or []) if force else set()
            ran: list[str] = []
            self.restored = []
            lock = self.lock()
            for name in order:
                stage = self.graph.stages[name]
                # a real run has brought each upstream stage up to date before this one (its changed
                # outputs show in the deps); a dry one counts the stages it would run as stale
                reasons = ["--force"] if name in forced else self.reasons(stage, lock, set(ran) if dry else ())
                if not reasons:
                    tell(False)
                    log(f"{name}: up to date")
                    if dry:
                        self.log_changed_params(stage, log)
                    continue
                if dry:
                    log(f"{name}: would run ({'; '.join(reasons)})")
                    self.log_changed_params(stage, log)
                    ran.append(name)
                    continue
                log(f"{name}: running ({'; '.join(reasons)})")

                def compute(ctx, module=self.module(stage)):
                    tell(True)
                    module.run(ctx)

                if self.execute(stage, use_cache=name not in forced, log=log, compute=compute):
                    tell(False)
                    self.restored.append(name)
                lock = self.lock()
                ran.append(name)
            self.hashes.save()
            return ran

    def run_ranks(self, world, targets, force, upstream, downstream, dry, log) -> list[str]:
        """One rank of a data-parallel launch: rank 0 runs the stages as `run` does (lock, staleness,
        run cache, atomic outputs, stages.lock) and broadcasts each decision; the others follow."""
        from tca.llm import ddp

        if targets is None or upstream or downstream or dry:
            raise TcaError("under torchrun / accelerate launch, use `tca run-stage NAME` without --upstream, --downstream "
                           "or --dry (run the other stages in one plain process first)")
        for name in targets:
            self.graph.check_name(name)
            if not getattr(self.module(self.graph.stages[name]), "DISTRIBUTED", False):
                able = [n for n, s in self.graph.stages.items() if getattr(self.module(s), "DISTRIBUTED", False)]
                raise TcaError(f"stage `{name}` does not run on several processes; run it with a plain `tca run-stage {name}` "
                               f"(stages that do: {', '.join(able) or 'none'})")
        ddp.init(world, StageContext(name="", params=self.params, out=self.root, artifacts=self.artifacts, device_request=self.device).device)
        try:
            if world.main:
                return self._run(targets, force, False, False, False, log, tell=lambda message: ddp.broadcast(message, world))
            return self._follow(world)
        finally:
            ddp.close(world)

    def _follow(self, world) -> list[str]:
        """A rank other than 0: compute the stages rank 0 computes, into a scratch dir that is then deleted."""
        from tca.llm import ddp

        order = ddp.broadcast(None, world)
        if isinstance(order, str):  # rank 0 refused to run
            raise TcaError(order)
        ran = []
        scratch = Path(tempfile.mkdtemp(prefix=f"tca-rank{world.rank}-"))
        try:
            for name in order:
                if ddp.broadcast(None, world):
                    (scratch / name).mkdir()
                    ctx = StageContext(name=name, params=self.params, out=scratch / name, artifacts=self.artifacts, device_request=self.device)
                    self.module(self.graph.stages[name]).run(ctx)
                    ran.append(name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return ran

    # ---------- shards ----------

    def shardable(self, name: str) -> Stage:
        self.graph.check_name(name)
        stage = self.graph.stages[name]
        if not hasattr(self.module(stage), "merge"):
            able = [n for n, s in self.graph.stages.items() if hasattr(self.module(s), "merge")]
            raise TcaError(f"stage `{name}` cannot be sharded; stages that can: {', '.join(able) or 'none'}")
        return stage

    def shard_folder(self, name: str, key: str) -> Path:
        return self.artifacts / ".shards" / name / key

    def run_shard(self, name: str, index: int, count: int, force: bool = False, log=print) -> Path:
        """Compute shard `index` of `count` of a stage into artifacts/.shards/<stage>/<key>/<index>-of-<count>/
        (atomically). Takes no project lock: the shards of a stage run side by side, here or on other
        machines with the same upstream artifacts (copy their folders back before `merge`)."""
        stage = self.shardable(name)
        if not 0 <= index < count:
            raise TcaError(f"--shard {index}/{count}: the shard index must be in 0..{count - 1}")
        with self.exclusive(shared=True):
            self.plan([name])  # refuses a stale upstream stage
            fp = self.fingerprint(stage)
            dest = self.shard_folder(name, fp.key) / f"{index}-of-{count}"
            if dest.exists() and not force:
                log(f"{name} shard {index}/{count}: already computed in {dest}")
                return dest
            tmp = self.artifacts / ".tmp" / "shards" / f"{name}-{index}-of-{count}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            start = time.perf_counter()
            try:
                log(f"{name} shard {index}/{count}: running")
                ctx = StageContext(name=name, params=self.params, out=tmp, artifacts=self.artifacts, device_request=self.device, shard=(index, count))
                self.module(stage).run(ctx)
                record = {"key": fp.key, "shard": [index, count], "seconds": round(time.perf_counter() - start, 1), "params": fp.params}
                atomic_write_text(tmp / SHARD_RECORD, json.dumps(record, indent=2, default=str))
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.hashes.save()
        log(f"{name} shard {index}/{count}: done in {record['seconds']:.1f} s; wrote {dest}")
        return dest

    def complete_shards(self, name: str, key: str) -> list[Path]:
        """The folders of a complete set of shards made with `key`, in order; or an error saying what is missing."""
        folder = self.shard_folder(name, key)
        sets: dict[int, dict[int, Path]] = {}
        for path in folder.glob("*-of-*") if folder.is_dir() else []:
            index, _, count = path.name.partition("-of-")
            record = json.loads((path / SHARD_RECORD).read_text()) if (path / SHARD_RECORD).exists() else {}
            if record.get("key") != key or record.get("shard") != [int(index), int(count)]:
                raise TcaError(f"{path} is not a shard of `{name}` made with the current code, params and inputs; delete it")
            sets.setdefault(int(count), {})[int(index)] = path
        if not sets:
            others = [p.name for p in folder.parent.iterdir() if p != folder] if folder.parent.is_dir() else []
            raise TcaError(f"no shards of `{name}` for its current code, params and inputs (in {folder})"
                           + (f"; {folder.parent} holds shards made with other ones ({', '.join(others)}), which cannot be merged" if others else "")
                           + f"; run `tca run-stage {name} --shard i/n` for every i in 0..n-1 first")
        if len(sets) > 1:
            raise TcaError(f"{folder} holds shards of {' and '.join(str(n) for n in sorted(sets))}-way splits; delete the set you do not want")
        (count, got), = sets.items()
        missing = [i for i in range(count) if i not in got]
        if missing:
            raise TcaError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} of `{name}` are missing from {folder}; "
                           f"run `tca run-stage {name} --shard {missing[0]}/{count}` (or copy its folder there from the machine that ran it)")
        return [got[i] for i in range(count)]

    def merge(self, name: str, log=print) -> None:
        """Join a complete set of shards into the stage's artifact and lock entry, as one run would write them."""
        stage = self.shardable(name)
        with self.exclusive(log=log):
            self.plan([name])
            key = self.fingerprint(stage).key
            shards = self.complete_shards(name, key)
            log(f"{name}: merging {len(shards)} shards from {shards[0].parent}")
            module = self.module(stage)
            self.execute(stage, use_cache=False, log=log, compute=lambda ctx: module.merge(ctx, shards))
            shutil.rmtree(shards[0].parent)
            self.hashes.save()

    def execute(self, stage: Stage, use_cache: bool = True, log=print, compute: Callable[[StageContext], None] | None = None) -> bool:
        """Compute the stage (or restore it from the run cache: returns True) and lock it.
        `compute` replaces the stage module's `run` (the merge of shards, a rank announcing its work).
        The temp folder goes whatever happens; a SIGKILL's is removed by the next runner."""
        fp = self.fingerprint(stage)
        key = fp.key
        tmp = self.artifacts / ".tmp" / f"{stage.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            start = time.perf_counter()
            cached = self.cache.entry(stage.name, key) if use_cache else None
            if cached is not None and not self._cache_intact(stage, key, cached):
                self.cache.remove(stage.name, key)  # its files were edited in place through a hard link
                cached = None
            if cached is not None:
                self.cache.restore(stage.name, key, tmp)
            else:
                ctx = StageContext(name=stage.name, params=self.params, out=tmp, artifacts=self.artifacts, device_request=self.device)
                (compute or self.module(stage).run)(ctx)
            took = time.perf_counter() - start
            missing = [out for out in stage.outs if not (tmp / out).exists()]
            if missing:
                raise TcaError(f"stage `{stage.name}` did not write {', '.join(missing)} (declared in stages.yaml `outs`)")
            staging = self.cache.link(stage.name, key, tmp) if cached is None else None  # hashed after: a link moves ctime
            seconds = cached.get("seconds") if cached is not None else round(took, 1)  # what computing it took
            outs = {out: self.hashes.tree(tmp / out) for out in stage.outs}
            entry = {"key": key, "code": fp.code, "deps": fp.deps, "params": fp.params, "outs": outs, "seconds": seconds}
            if staging is not None:
                self.cache.commit(stage.name, key, staging, entry)
            final = self._commit(stage, tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        how = "restored from the run cache" if cached is not None else f"done in {took:.1f} s"
        log(f"{stage.name}: {how}; wrote artifacts/{stage.name}/: " + ", ".join(self._describe(final / out) for out in stage.outs))
        return cached is not None

    def _commit(self, stage: Stage, tmp: Path, entry: dict) -> Path:
        """Swap the new outputs in and write their lock entry; Ctrl-C waits for both."""
        final = self.artifacts / stage.name
        old = tmp.with_name(tmp.name + ".old")
        with deferred_interrupts():
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            self._write_lock_entry(stage.name, entry)
        shutil.rmtree(old, ignore_errors=True)
        self._tree_memo = {p: h for p, h in self._tree_memo.items() if not p.is_relative_to(final)}
        return final

    def _cache_intact(self, stage: Stage, key: str, entry: dict) -> bool:
        kept = self.cache.output_dir(stage.name, key)
        return all((kept / out).exists() and self.hashes.tree(kept / out) == entry["outs"].get(out) for out in stage.outs)

    def _describe(self, path: Path) -> str:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return f"{path.name} ({human(size)})"

    def _write_lock_entry(self, name: str, entry: dict) -> None:
        lock = self.lock()
        lock[name] = entry
        ordered = {n: lock[n] for n in self.graph.stages if n in lock}
        atomic_write_text(self.lock_path, yaml.safe_dump(ordered, sort_keys=False, width=200))

    # ---------- maintenance ----------

    def gc(self, log=print) -> tuple[int, int]:
        """Remove run-cache entries the lock does not reference (and damaged ones), under the
        project lock (never beside a run); returns (removed, kept)."""
        with self.exclusive(log=log):
            lock = self.lock()
            removed = kept = 0
            for stage, key, _entry in self.cache.runs():
                if lock.get(stage, {}).get("key") == key:
                    kept += 1
                else:
                    self.cache.remove(stage, key)
                    removed += 1
            for folder in self.cache.broken():
                shutil.rmtree(folder)
                removed += 1
            self.hashes.entries.clear()
            self.hashes.dirty = True
            self.hashes.save()
            return removed, kept

    def artifact(self, name: str) -> Path:
        self.graph.check_name(name)
        path = self.artifacts / name
        if not path.exists():
            raise TcaError(f"{path} does not exist; run `tca run-stage {name}` (or `tca run`) first")
        return path

