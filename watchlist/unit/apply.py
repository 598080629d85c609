"""The unit's watchlist: verify an offered bundle, apply it to the store, swap the matcher's index.

Bundles arrive from MQTT (watchlist.unit.subscriber) or as files (``edge watchlist apply``, USB or scp); both end
in `Watchlist.offer`. A rejected bundle is logged with its reason, recorded in the store's event
log and in `status()`, and changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matching.matcher import Matcher, TemplateIndex
from watchlist.format.bundle import Bundle
from watchlist.format.errors import BundleRejected
from watchlist.format.keys import KEYSET_MAGIC, KeySet, load_public_key, parse_keyset
from watchlist.format.verify import (
    MODEL_INDEPENDENT_THRESHOLD_RANGE,
    UnitTrust,
    Verified,
    read_bundle_file,
    verify_bundle,
    verify_keyset,
)
from watchlist.unit.config import WatchlistConfig
from watchlist.unit.store import StoreState, UnitStore
from wire.records import CANARY_PERSON_ID

log = logging.getLogger(__name__)


def index_for(verified: Verified, current: TemplateIndex) -> TemplateIndex:
    """The matcher index after applying `verified` on top of `current` (built aside; `current` is untouched)."""
    b = verified.bundle
    thresholds = {p.person_id: p.threshold for p in b.persons}
    if b.kind == "full":
        return TemplateIndex.build(
            b.template_person_ids(),
            b.embeddings,
            offset=b.embedding_offset,
            thresholds={k: v for k, v in thresholds.items() if v is not None},
            version=b.version,
            model_id=b.model_id,
            default_threshold=b.default_threshold,
        )
    return current.with_changes(
        remove=b.removed,
        add_person_ids=b.template_person_ids(),
        add_embeddings=b.embeddings,
        add_offset=b.embedding_offset,
        thresholds=thresholds,
        version=b.version,
        model_id=b.model_id,
        default_threshold=b.default_threshold,
    )


class Watchlist:
    """The unit side of the signed watchlist, bound to the matcher the pipeline uses.

    Example::

        matcher = Matcher()
        wl = Watchlist(cfg.watchlist, matcher, model_id=engine.model_id)
        wl.start()                                    # loads the applied list into the matcher
        wl.offer(Path("watchlist-v42-delta.cpwl").read_bytes(), source="usb")
        wl.tick()                                     # now and then: expiry policy, store changes
        print(wl.status())
    """

    def __init__(
        self,
        config: WatchlistConfig,
        matcher: Matcher,
        model_id: str,
        *,
        embedding_dim: int | None = None,
        threshold_range: tuple[float, float] = MODEL_INDEPENDENT_THRESHOLD_RANGE,
        clock: Callable[[], float] = time.time,
        require_canary: bool = False,
    ) -> None:
        """`embedding_dim`: the size of the embeddings the unit's engine makes (bundles of another size are
        refused; None where no engine is loaded, as in `edge watchlist apply`). `threshold_range`: the open range
        of thresholds calibrated for the model (engines.calibration); the default is model-independent.
        `require_canary`: the unit runs the canary (edge/canary.py), so a list that leaves no canary
        person is refused (`no_canary`)."""
        self.config = config
        self.require_canary = require_canary
        self.matcher = matcher
        self.model_id = model_id
        self.embedding_dim = embedding_dim
        self.threshold_range = threshold_range
        self.clock = clock
        self.root_key = load_public_key(config.root_key)
        self.store = UnitStore(config.store)
        self._lock = threading.RLock()
        self._current: TemplateIndex = matcher.index
        self._matching = True
        self._halt_reason: str | None = None
        self._expired_warned = False
        self._last_rejection: dict[str, Any] | None = None
        self._rejections = 0
        self._applied = 0
        self._canary_of: tuple[TemplateIndex, bool] | None = None
        self._state = self.store.state()
        self._keyset = self._held_keyset()

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the applied list from the store into the matcher and apply the expiry policy."""
        with self._lock:
            self._reload()
            self.tick()

    def _refresh(self) -> None:
        self._state = self.store.state()
        self._keyset = self._held_keyset()

    def _reload(self) -> None:
        self._refresh()
        st = self._state
        self._current = self.store.load_index()
        self._halt_reason = self._unusable(st)
        if self._halt_reason is not None:
            log.error("watchlist: %s", self._halt_reason)
        self._publish()
        log.info(
            "watchlist version %d loaded from %s: %d persons, %d templates",
            self._current.version,
            self.store.path,
            self._current.n_persons,
            self._current.n_templates,
        )

    def _unusable(self, st: StoreState) -> str | None:
        """Why the applied list cannot be matched with this unit's engine (another model, or another
        embedding size: every face would fail), or None. The list stays in the store, and a full
        bundle for the unit's model replaces it."""
        if not st.version:
            return None
        fix = "matching nothing until a full bundle for this unit's model is applied (HQ, or `edge watchlist apply`)"
        if st.model_id != self.model_id:
            return (
                f"the applied list (version {st.version}) holds embeddings of model {st.model_id!r}, this unit "
                f"runs {self.model_id!r}: {fix}"
            )
        if self.embedding_dim is not None and st.embedding_dim != self.embedding_dim:
            return (
                f"the applied list (version {st.version}) holds {st.embedding_dim}-d embeddings, this unit's "
                f"engine makes {self.embedding_dim}-d ones for model {self.model_id!r}: {fix}"
            )
        return None

    def tick(self) -> None:
        """Re-check what changes with time: expiry, and a list applied to the store by another
        process (``edge watchlist apply`` from a USB stick while the unit runs)."""
        with self._lock:
            self._refresh()
            if self._state.version != self._current.version:
                log.info("watchlist store changed outside this process: reloading")
                self._reload()
            self._publish()

    def _expired(self, now: float) -> bool:
        exp = self._state.expires_at
        return exp is not None and now >= exp

    def _publish(self) -> None:
        """Put the index the policy allows into the matcher."""
        now = self.clock()
        expired = self._current.version > 0 and self._expired(now)
        stop = self._halt_reason is not None or (expired and self.config.on_expired == "stop")
        if expired and not self._expired_warned:
            log.warning(
                "watchlist version %d expired at %s; %s until HQ sends a fresh bundle",
                self._current.version,
                self._state.expires_at,
                "matching stopped" if stop else "still matching (on_expired = warn)",
            )
            self._expired_warned = True
        if not expired:
            self._expired_warned = False
        if stop:
            if self._matching:
                # Empty, in the engine's size where known: the held list may be of another size.
                dim = self.embedding_dim or self._current.dim
                self.matcher.swap(
                    TemplateIndex.empty(dim, version=self._current.version, model_id=self._current.model_id)
                )
        elif self.matcher.index is not self._current:
            self.matcher.swap(self._current)
        self._matching = not stop

    # ---- offers -------------------------------------------------------------------------------

    def trust(self) -> UnitTrust:
        """What verification checks against now."""
        st = self._state
        return UnitTrust(
            root_key=self.root_key,
            expected_model_id=self.model_id,
            max_bundle_bytes=self.config.max_bundle_bytes,
            expected_dim=self.embedding_dim,
            threshold_range=self.threshold_range,
            applied_dim=st.embedding_dim,
            applied_version=st.version,
            applied_model_id=st.model_id,
            applied_offset=st.embedding_offset,
            keyset=self._keyset,
            require_canary=self.require_canary,
            applied_has_canary=self.has_canary,
        )

    @property
    def has_canary(self) -> bool:
        """Whether the applied list holds the canary person (looked up once per index: the heartbeat asks
        often, and a large list's ids take a while to decode)."""
        index = self._current
        if self._canary_of is None or self._canary_of[0] is not index:
            self._canary_of = (index, CANARY_PERSON_ID in index.persons())
        return self._canary_of[1]

    def _held_keyset(self) -> KeySet | None:
        env = self.store.keyset_envelope()
        if env is None:
            return None
        try:
            return parse_keyset(env, self.root_key)
        except BundleRejected as exc:
            # The store was altered or the root key replaced: trust only what bundles bring.
            log.error("watchlist: the stored key set no longer verifies (%s); ignoring it", exc.message)
            return None

    def offer(self, data: bytes | memoryview, source: str = "") -> int:
        """Verify and apply a bundle (or a stand-alone key set); return the version now applied.

        Raises BundleRejected (already logged and recorded) when it is refused.
        """
        with self._lock:
            if bytes(data[:8]) == KEYSET_MAGIC:
                self.offer_keyset(bytes(data), source)
                return self._current.version
            self._refresh()
            if self._state.version != self._current.version:
                # Not started yet, or another process applied a list: a delta must build on the stored one.
                self._reload()
            try:
                verified = verify_bundle(data, self.trust(), self.clock())
            except BundleRejected as exc:
                self.record_rejection(exc, source)
                raise
            t0 = time.perf_counter()
            new_index = index_for(verified, self._current)
            self.store.apply(verified, source=source, applied_at=self.clock())
            self._refresh()
            self._current = new_index
            self._halt_reason = None
            self._applied += 1
            self._publish()
            self._log_applied(verified.bundle, source, time.perf_counter() - t0)
            return new_index.version

    def offer_file(self, path: Path, source: str | None = None) -> int:
        """`offer` for a file, reading at most max_bundle_bytes + 1 of it (a FIFO or /dev/zero is refused
        as oversized, not read until memory runs out)."""
        src = source or f"file:{path}"
        with self._lock:
            try:
                data = read_bundle_file(Path(path), self.config.max_bundle_bytes)
            except BundleRejected as exc:
                self.record_rejection(exc, src)
                raise
            return self.offer(data, src)

    def offer_keyset(self, data: bytes, source: str = "") -> KeySet:
        """Accept a newer root-signed key set (rotation or revocation sent on its own)."""
        with self._lock:
            try:
                ks = verify_keyset(data, self.trust())
            except BundleRejected as exc:
                self.record_rejection(exc, source)
                raise
            self.store.save_keyset(ks.serial, ks.envelope)
            self._keyset = ks
            self.store.record_event("keyset", version=ks.serial, detail=f"revoked: {sorted(ks.revoked)}", source=source)
            log.info(
                "watchlist key set %d accepted from %s (%d signing keys, %d revoked)",
                ks.serial,
                source or "?",
                len(ks.signing_keys),
                len(ks.revoked),
            )
            return ks

    def record_rejection(self, exc: BundleRejected, source: str) -> None:
        """Log, count and store a rejection (also for refusals decided before `offer`, such as an
        oversized bundle announced over MQTT)."""
        with self._lock:
            self._rejections += 1
            self._last_rejection = {"at": self.clock(), "reason": exc.reason, "message": exc.message, "source": source}
            log.warning(
                "watchlist bundle from %s rejected (%s): %s; keeping version %d",
                source or "?",
                exc.reason,
                exc.message,
                self._current.version,
            )
            try:
                self.store.record_event(
                    "rejected", reason=exc.reason, detail=exc.message, source=source, at=self.clock()
                )
            except Exception as store_exc:  # the rejection itself must not be lost to a logging failure
                log.error("watchlist: could not record the rejection in %s: %s", self.store.path, store_exc)

    def _log_applied(self, b: Bundle, source: str, seconds: float) -> None:
        log.info(
            "watchlist %s bundle version %d applied from %s in %.2fs: %d persons in, %d removed; "
            "now %d persons, %d templates",
            b.kind,
            b.version,
            source or "?",
            seconds,
            len(b.persons),
            len(b.removed),
            self._current.n_persons,
            self._current.n_templates,
        )

    # ---- reporting ----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._current.version

    @property
    def current_index(self) -> TemplateIndex:
        """The index of the applied list (also while the policy keeps it out of the matcher)."""
        return self._current

    def status(self) -> dict[str, Any]:
        """Figures for the heartbeat and `edge watchlist status` (read from memory: never waits for an apply)."""
        st = self._state
        now = self.clock()
        ks = self._keyset
        return {
            "version": st.version,
            "kind": st.kind,
            "model_id": st.model_id,
            "persons": self._current.n_persons,
            "templates": self._current.n_templates,
            "created_at": st.created_at,
            "expires_at": st.expires_at,
            "expired": bool(st.version and self._expired(now)),
            "matching": self._matching,
            "halted": self._halt_reason,
            "signing_key_id": st.signing_key_id,
            "keyset_serial": ks.serial if ks else None,
            "applied_at": st.applied_at,
            "applied_since_start": self._applied,
            "rejections_since_start": self._rejections,
            "last_rejection": self._last_rejection,
            "canary": self.has_canary,
        }

    def close(self) -> None:
        self.store.close()
