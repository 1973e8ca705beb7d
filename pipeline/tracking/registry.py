"""The model registry as people use it: which version is the champion, how versions compare, promotion.

Aliases are read from the registered model (`get_registered_model(...).aliases`), never from
`search_model_versions`, which returns empty aliases on SQL stores. Every change of champion is
appended to the registered model's `champion_history` tag, which is what `rollback` walks back.
Promotions and rollbacks of a model take its promotion lock: two jobs finishing together cannot
both beat the same old champion, and the history loses no entry.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import PROMOTE_POLICIES
from pipeline.errors import InputError
from pipeline.redaction import redact, scrub
from pipeline.tracking.run_logger import login_refused

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_TAG = "promotion_lock"  # on the registered model while a promotion runs: "<token> <unix time>"
LOCK_REQUEST_TIMEOUT_S = 1  # each of the lock's reads and writes: no client retries, an answer within this
LOCK_SETTLE_S = 2.0  # after writing the lock tag: longer than a lock write may take (LOCK_REQUEST_TIMEOUT_S)
LOCK_STALE_S = 120.0  # a lock held longer was left by a job that died while promoting
HELD_REQUEST_TIMEOUT_S = 5  # each request of the promotion itself (a handful): far inside LOCK_STALE_S
LOCK_TIMEOUT_S = 600.0
HISTORY_TAG = "champion_history"  # on the registered model: JSON list of versions that were champion, oldest first
METRIC = "val_top1_error"  # what promotion compares, on the same dataset only


class RegistryError(InputError):
    """An unknown model, version or alias, or a change the registry refuses; the message says which."""


@dataclass
class Version:
    name: str
    version: str
    run_id: str
    created: float  # seconds since the epoch
    description: str
    tags: dict[str, str]
    aliases: list[str] = field(default_factory=list)

    def metric(self, key: str) -> float | None:
        value = self.tags.get(key)
        return float(value) if value not in (None, "") else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": self.aliases,
            "val_top1_error": self.metric("val_top1_error"),
            "val_top5_error": self.metric("val_top5_error"),
            "dataset_hash": self.tags.get("dataset_hash"),
            "dataset": self.tags.get("dataset_root"),
            "epochs": self.tags.get("epochs"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.created)),
            "run_id": self.run_id,
            "description": self.description,
            "tags": self.tags,
        }


@dataclass
class Decision:
    alias: str  # champion or challenger
    reason: str
    previous: str | None  # the champion before, if any


class Registry:
    def __init__(self, tracking_uri: str, settle_s: float = LOCK_SETTLE_S) -> None:
        self.uri = tracking_uri
        self.shown = redact(tracking_uri)  # what messages say
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.settle_s = settle_s  # see promotion_lock

    # ---- reading ----------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return sorted(m.name for m in self._search_models())

    def aliases(self, name: str) -> dict[str, str]:
        """alias → version, from the registered model itself."""
        return {alias: str(version) for alias, version in self._model(name).aliases.items()}  # int on SQL stores

    def version(self, name: str, version: str) -> Version:
        aliases = self.aliases(name)
        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise RegistryError(f"model {name!r} has no version {version!r} (versions: {known})") from exc
        return _version(mv, aliases)

    def by_alias(self, name: str, alias: str) -> Version:
        aliases = self.aliases(name)
        if alias not in aliases:
            have = ", ".join(f"@{a} → v{v}" for a, v in sorted(aliases.items())) or "no aliases"
            raise RegistryError(f"model {name!r} has no alias @{alias} ({have})")
        return self.version(name, aliases[alias])

    def resolve(self, name: str, ref: str) -> Version:
        """A version given as `3`, `v3` or `@champion`."""
        if ref.startswith("@"):
            return self.by_alias(name, ref[1:])
        return self.version(name, ref.removeprefix("v"))

    def versions(self, name: str) -> list[Version]:
        """All versions of `name`, newest first, with their aliases."""
        aliases = self.aliases(name)
        found, token = [], None
        while True:
            page = self.client.search_model_versions(
                f"name = '{_quote(name)}'", max_results=200, order_by=["version_number DESC"], page_token=token
            )
            found += [_version(mv, aliases) for mv in page]
            token = page.token
            if not token:
                return found

    def champion(self, name: str) -> Version | None:
        aliases = self.aliases(name)
        return self.version(name, aliases[CHAMPION]) if CHAMPION in aliases else None

    def history(self, name: str) -> list[str]:
        return json.loads(self._model(name).tags.get(HISTORY_TAG, "[]"))

    # ---- changing ---------------------------------------------------------------------------
    def decide(self, name: str, version: str, policy: str) -> Decision:
        """Champion or challenger for a newly registered version, under `--promote policy`."""
        if policy not in PROMOTE_POLICIES:
            raise RegistryError(f"--promote must be one of {PROMOTE_POLICIES}, got {policy!r}")
        new, current = self.version(name, version), self.champion(name)
        previous = current.version if current else None
        chance = _chance(new)
        if chance is not None:  # whatever the policy: a model that learned nothing never serves
            return Decision(CHALLENGER, chance, previous)
        if policy == "always":
            return Decision(CHAMPION, "--promote always", previous)
        if policy == "never":
            return Decision(CHALLENGER, "--promote never", previous)
        if current is None:
            return Decision(CHAMPION, "no champion yet", None)
        if current.tags.get("dataset_hash") != new.tags.get("dataset_hash"):
            return Decision(CHALLENGER, f"champion v{current.version} was trained on another dataset", previous)
        ours, theirs = new.metric(METRIC), current.metric(METRIC)
        if ours is None:
            return Decision(CHALLENGER, f"v{new.version} has no {METRIC} tag to compare", previous)
        if theirs is None or ours < theirs:
            theirs_text = "none" if theirs is None else f"{theirs:.4f}"
            return Decision(
                CHAMPION, f"{METRIC} {ours:.4f} beats champion v{current.version}'s {theirs_text}", previous
            )
        return Decision(
            CHALLENGER, f"{METRIC} {ours:.4f} does not beat champion v{current.version}'s {theirs:.4f}", previous
        )

    def settle(self, name: str, version: str, policy: str) -> Decision:
        """A new version's place under `--promote policy`, decided and applied under the promotion lock:
        two jobs finishing together compare against each other's outcome, not the same old champion."""
        with self.promotion_lock(name):
            decision = self.decide(name, version, policy)
            self._promote(name, version, decision.alias, decision.reason)
        return decision

    def promote(
        self,
        name: str,
        version: str,
        alias: str = CHAMPION,
        reason: str = "promoted by hand",
        lock_timeout: float = LOCK_TIMEOUT_S,
        force: bool = False,
    ) -> Version:
        """Point `alias` at `version`; a new champion is recorded in the history and drops @challenger.

        A version no better than chance becomes champion only with `force` (someone who knows why)."""
        target = self.version(name, version)  # fails for an unknown name or version, before the lock
        chance = _chance(target) if alias == CHAMPION and not force else None
        if chance:
            raise RegistryError(f"v{target.version}: {chance.removesuffix(': not promoted')}; pass --force to "
                                "make it the champion anyway")  # fmt: skip
        with self.promotion_lock(name, lock_timeout):
            return self._promote(name, version, alias, reason)

    @contextmanager
    def promotion_lock(self, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Promotions of `name` one at a time, across jobs and machines (Fischer's algorithm on a tag).

        MLflow has no compare-and-set. A job waits until the registered model's `promotion_lock`
        tag is free (empty, or older than LOCK_STALE_S: its holder died), writes its own token,
        waits `settle_s` (longer than any lock request may take: each has LOCK_REQUEST_TIMEOUT_S
        and no client retries, so a job that saw the tag free at the same moment has written by
        then), and holds the lock if the tag still has its token; else it tries again.

        Nothing waits forever: past `timeout` (whatever failed: a holder that keeps it, writes
        that keep failing, a server that does not answer) RegistryError says what and how to
        clear a stale lock; a refused login (401/403) is final at once.
        """
        token = f"{uuid.uuid4().hex} {time.time():.3f}"
        deadline = time.monotonic() + timeout
        held, failure = "", None
        while True:
            with _quick_requests():
                try:
                    held = self._model(name).tags.get(LOCK_TAG, "")
                    if _lock_free(held):
                        self.client.set_registered_model_tag(name, LOCK_TAG, token)
                        time.sleep(self.settle_s)
                        if self._model(name).tags.get(LOCK_TAG) == token:
                            break
                except MlflowException as exc:  # a race on a SQL store's key, a 5xx, a timeout: try again
                    self._refused(exc, name)
                    failure = _first_line(scrub(str(getattr(exc, "message", exc))))
                except OSError as exc:  # no answer at all
                    failure = f"{type(exc).__name__}: {_first_line(scrub(str(exc)))}"
            if time.monotonic() > deadline:
                raise RegistryError(self._stuck(name, timeout, held, failure))
            time.sleep(random.uniform(0.1, 0.5) * max(self.settle_s, 0.2))
        try:
            # What the holder does (decide, move aliases, tag) stays well inside LOCK_STALE_S, after
            # which another job would take the lock over: one retry and HELD_REQUEST_TIMEOUT_S a request.
            with _quick_requests(retries=1, timeout=HELD_REQUEST_TIMEOUT_S):
                yield
        finally:
            with _quick_requests():
                try:
                    if self._model(name).tags.get(LOCK_TAG) == token:
                        self.client.delete_registered_model_tag(name, LOCK_TAG)
                except (MlflowException, OSError):
                    pass  # left behind, it goes stale after LOCK_STALE_S; whatever failed above is what is raised

    def unlock(self, name: str) -> str | None:
        """Clear `name`'s promotion lock (left by a job that is gone); returns what it held, if anything."""
        held = self._model(name).tags.get(LOCK_TAG)
        if held:
            self.client.delete_registered_model_tag(name, LOCK_TAG)
        return held or None

    def _refused(self, exc: MlflowException, name: str) -> None:
        """A login the server refuses (401, 403) will not change by waiting: RegistryError at once."""
        code = login_refused(exc) or {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(exc.error_code)
        if code:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            who = f"user {user!r}" if user else "this client (no MLFLOW_TRACKING_USERNAME)"
            raise RegistryError(
                f"the registry at {self.shown} refuses {who} a change to model {name!r} (HTTP {code}): promoting "
                "needs a login that may edit the model (MLflow's EDIT or MANAGE permission on it)"
            ) from exc

    def _stuck(self, name: str, timeout: float, held: str, failure: str | None) -> str:
        clear = f"`python jobs/registry.py unlock {name}` clears it"
        if failure:
            return (
                f"model {name!r}: could not take the promotion lock in {timeout:.0f}s, the registry at {self.shown} "
                f"failing the lock's requests (last: {failure}); check the server, then retry. If a lock was left "
                f"behind ({LOCK_TAG} = {held!r}), {clear} once no promotion runs"
            )
        return (
            f"model {name!r}: another promotion has held the lock for over {timeout:.0f}s ({LOCK_TAG} = {held!r}); "
            f"retry later, or if its job is gone, {clear} (a lock older than {LOCK_STALE_S:.0f}s is taken over)"
        )

    def _promote(self, name: str, version: str, alias: str, reason: str) -> Version:
        target = self.version(name, version)
        self.client.set_registered_model_alias(name, alias, target.version)
        self.client.set_model_version_tag(name, target.version, f"{alias}_since", _now())
        if alias == CHAMPION:
            history = self.history(name)
            if not history or history[-1] != target.version:
                self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, target.version]))
            if self.aliases(name).get(CHALLENGER) == target.version:
                self.client.delete_registered_model_alias(name, CHALLENGER)
            self.client.set_model_version_tag(name, target.version, "promotion", f"{reason} ({_user()}, {_now()})")
        return self.version(name, target.version)

    def rollback(self, name: str, lock_timeout: float = LOCK_TIMEOUT_S) -> tuple[str, str]:
        """Champion back to the previous champion that still exists; returns (from, to)."""
        with self.promotion_lock(name, lock_timeout):
            return self._rollback(name)

    def _rollback(self, name: str) -> tuple[str, str]:
        current = self.champion(name)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        history = self.history(name)
        while history and history[-1] == current.version:
            history.pop()
        existing = {v.version for v in self.versions(name)}
        while history and history[-1] not in existing:
            history.pop()
        if not history:
            raise RegistryError(f"model {name!r}: v{current.version} is the first champion; nothing to roll back to")
        previous = history[-1]
        self.client.set_registered_model_alias(name, CHAMPION, previous)
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        self.client.set_model_version_tag(name, current.version, "rolled_back", f"{_user()}, {_now()}")
        return current.version, previous

    # ---- helpers ----------------------------------------------------------------------------
    def _model(self, name: str):
        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            known = ", ".join(self.model_names()) or "none"
            raise RegistryError(f"no registered model named {name!r} at {self.shown} (models: {known})") from exc

    def _search_models(self):
        found, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=200, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found


def _version(mv, aliases: dict[str, str]) -> Version:
    return Version(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        created=mv.creation_timestamp / 1000,
        description=mv.description or "",
        tags=dict(mv.tags),
        aliases=sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
    )


def _chance(version: Version) -> str | None:
    """Why `version` is no better than chance (its top-1 error at least 1 - 1/classes), or None."""
    error, classes = version.metric(METRIC), version.metric("num_classes")
    if error is None or not classes or classes < 2:
        return None
    chance = 1 - 1 / classes
    if not math.isfinite(error) or error >= chance - 1e-9:
        return f"{METRIC} {error:.4f} is no better than chance ({chance:.4f} for {classes:.0f} classes): not promoted"
    return None


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _lock_free(held: str) -> bool:
    """An empty lock tag, or one whose holder took it over LOCK_STALE_S ago (a job that died holding it)."""
    if not held:
        return True
    try:
        taken = float(held.rsplit(" ", 1)[-1])
    except ValueError:
        return True  # not a token promotion_lock wrote
    return time.time() - taken > LOCK_STALE_S


@contextmanager
def _quick_requests(retries: int = 0, timeout: int = LOCK_REQUEST_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP requests in this block: `retries` retries, `timeout` seconds each (MLflow reads both
    variables per request; by default it retries 7 times with back-off, minutes in all).

    The variables are the process's: blocks in several threads (two promotions at once) share them,
    and they are put back as they were when the last block ends, never left behind."""
    with _QUICK["lock"]:
        if _QUICK["depth"] == 0:
            _QUICK["saved"] = {name: os.environ.get(name) for name in _QUICK_ENV}
        _QUICK["depth"] += 1
        os.environ.update(zip(_QUICK_ENV, (str(retries), str(timeout)), strict=True))
    try:
        yield
    finally:
        with _QUICK["lock"]:
            _QUICK["depth"] -= 1
            if _QUICK["depth"] == 0:
                for name, value in _QUICK["saved"].items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


_QUICK_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_QUICK: dict[str, Any] = {"lock": threading.Lock(), "depth": 0, "saved": {}}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no message"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
