"""Attribution: who a request is for (user, session, feature, team, key).

Owns identity resolution only. Order of authority:

1. API keys, when a keys file is configured: the key's user is authoritative; a
   client-supplied user may only narrow attribution if the key lists it in
   ``may_act_for`` (e.g. a backend key acting for its end users). Features are
   checked against the key's ``features`` when it has that list.
2. Headers ``X-Tollgate-User``, ``X-Tollgate-Session``, ``X-Tollgate-Feature``.
3. The body: ``user_id`` or OpenAI's ``user`` (else its ``safety_identifier``),
   ``session_id``, ``metadata.feature``.

Keys file (``TOLLGATE_KEYS_FILE``), secrets stored only as SHA-256 hex::

    keys:
      - id: backend-prod
        sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        user_id: svc-backend
        team: platform
        features: [chat, search]        # optional allow-list: a call spends under one of
                                        # them (the only one, if it names none; else 400)
        may_act_for: ["*"]              # optional: end users this key may attribute to
        admin: false
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.errors import InvalidRequest, NotAuthenticated, NotPermitted
from app.ids import ANONYMOUS_USER as ANONYMOUS_USER  # re-exported: attribution owns its use
from app.ids import MAX_ID_LENGTH as MAX_ID_LENGTH  # re-exported for older imports
from app.ids import normal_id, scope_id_problem


class KeysFileError(ValueError):
    """The keys file is unreadable or malformed; the message says which entry and field."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    user_id: str
    team: str | None = None
    features: frozenset[str] | None = None
    may_act_for: frozenset[str] = frozenset()
    admin: bool = False

    def may_attribute_to(self, user_id: str) -> bool:
        return user_id == self.user_id or "*" in self.may_act_for or user_id in self.may_act_for


@dataclass(frozen=True)
class Identity:
    user_id: str
    session_id: str | None = None
    feature: str | None = None
    team: str | None = None
    api_key_id: str | None = None
    is_admin: bool = False


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_problem(value: Any, *, any_ok: bool = False) -> str | None:
    """Why ``value`` cannot be an id of a keys-file entry, by the rule a call's ids follow
    (``_clean``; trimmed and NFC first): printable, at most 256 characters, not blank, and
    not ``*`` (a key's user, team or feature ``*`` spent under the default policy ``user:*``,
    which a call may not name: probe 54), save where ``*`` means any (``may_act_for``)."""
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    value = normal_id(value)
    problem = "is blank" if not value else scope_id_problem(value)
    if problem is None and value == "*" and not any_ok:
        problem = "may not be '*': it names a default budget policy (user:*, team:*, feature:*)"
    return problem


def _key_id(value: Any, where: str, *, any_ok: bool = False) -> str:
    problem = key_id_problem(value, any_ok=any_ok)
    if problem is not None:
        raise KeysFileError(f"{where} {problem}")
    return normal_id(value)


def key_entry_ids(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ids a keys-file entry names (``id``, ``user_id``, ``team``, ``features``,
    ``may_act_for``), each read as a call's ids are; raises KeysFileError naming the field."""
    ids: dict[str, Any] = {
        name: _key_id(entry.get(name), f"{where}.{name}") for name in ("id", "user_id")
    }
    if entry.get("team") is not None:
        ids["team"] = _key_id(entry["team"], f"{where}.team")
    for name in ("features", "may_act_for"):
        values = entry.get(name)
        if values is None:
            continue
        if not isinstance(values, list):
            raise KeysFileError(f"{where}.{name} must be a list of ids, got {values!r}")
        ids[name] = [
            _key_id(v, f"{where}.{name}[{i}]", any_ok=name == "may_act_for")
            for i, v in enumerate(values)
        ]
    return ids


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_hash = {key.sha256: key for key in keys}

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(key.id for key in self._by_hash.values())

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KeysFileError(f"cannot read keys file {path}: {exc}") from exc
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise KeysFileError(f"{path}: expected a top-level 'keys:' list")
        keys = []
        for index, entry in enumerate(entries):
            where = f"{path}: keys[{index}]"
            if not isinstance(entry, dict):
                raise KeysFileError(f"{where} must be a mapping")
            for field in ("id", "sha256", "user_id"):
                if not isinstance(entry.get(field), str) or not entry[field]:
                    raise KeysFileError(f"{where}.{field} is missing (a non-empty string)")
            digest = entry["sha256"].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise KeysFileError(
                    f"{where}.sha256 must be 64 hex chars (sha256 of the key; "
                    "`python -c 'import hashlib,sys;print(hashlib.sha256(sys.argv[1].encode())"
                    ".hexdigest())' KEY`)"
                )
            fields = key_entry_ids(entry, where)
            keys.append(
                ApiKey(
                    id=fields["id"],
                    sha256=digest,
                    user_id=fields["user_id"],
                    team=fields.get("team"),
                    features=frozenset(fields["features"]) if "features" in fields else None,
                    may_act_for=frozenset(fields.get("may_act_for") or ()),
                    admin=bool(entry.get("admin", False)),
                )
            )
        return cls(keys)

    def lookup(self, secret: str) -> ApiKey | None:
        try:
            return self._by_hash.get(hash_key(secret))
        except UnicodeEncodeError:  # a header byte that is not UTF-8: no key can match it
            return None


def _clean(value: Any, name: str, *, scope: bool = False) -> str | None:
    """``value`` as an attribution id (None if absent). With ``scope``, the id names a budget
    scope (a user, feature or team), where ``*`` means every one of them (``user:*``)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", field=name)
    # One id, one spelling, wherever it comes from: a header's value arrives trimmed (HTTP
    # drops the spaces around it) and a body's did not (" pj-ws " and "pj-ws" were two
    # users, "   " a user of its own); "Zoë" typed two Unicode ways was two users shown
    # alike (probe J). Trimmed, blank is absent, and NFC is the one form.
    value = normal_id(value)
    if not value:
        return None
    problem = scope_id_problem(value)
    if problem is None and scope and value == "*":
        kind = next((k for k in ("feature", "team") if k in name.lower()), "user")
        problem = f"may not be '*': it names the default budget policy of every {kind} ({kind}:*)"
    if problem is not None:
        raise InvalidRequest(f"'{name}' {problem}", field=name)
    return value


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """One attribution header's value; sent twice with different values, a 400 (the first
    was taken without a word: session 14's probe)."""
    getall = getattr(headers, "getall", None)
    values = set(getall(name, ())) if getall is not None else set()
    if len(values) > 1:
        raise InvalidRequest(
            f"'{name}' was sent twice with different values ({', '.join(sorted(map(repr, values)))});"
            " send it once",
            field=name,
        )
    return headers.get(name)


def _agreed(name: str, value: Any, other: str, other_value: Any, *, field: str) -> str | None:
    """One scope id said by two fields of a body (``user_id`` and OpenAI's ``user``;
    ``metadata.feature`` and ``feature``): either, or both when they agree. Two that differ
    are refused rather than one picked without a word (session 13's probe)."""
    first = _clean(value, name, scope=True)
    second = _clean(other_value, other, scope=True)
    if first and second and first != second:
        raise InvalidRequest(
            f"'{name}' ({first!r}) and '{other}' ({second!r}) name different owners of one "
            "call; send one of them (or the same value in both)",
            field=field,
        )
    return first or second


def _body_user(body: Mapping[str, Any]) -> tuple[str | None, str]:
    """The user a body names, and the field that named it: ``user_id`` or OpenAI's
    ``user`` (refused when they differ)."""
    named = _agreed("user_id", body.get("user_id"), "user", body.get("user"), field="user")
    return named, "user_id" if _clean(body.get("user_id"), "user_id", scope=True) else "user"


def _safety_user(body: Mapping[str, Any], key: ApiKey | None) -> str | None:
    """OpenAI's ``safety_identifier`` as the user, when nothing else names one: the SDK's
    own documentation names it as ``user``'s replacement, and a newcomer who followed it saw
    every call charged to "anonymous" (a probe). A hint, never a claim: it is OpenAI's
    advice to send a hash there, so with keys it names the user only if the key may act for
    it (else the key's user, as before), and it never conflicts with a header or a body
    that names the user (a review: both were refused). Read, it is checked as ``user`` is:
    ``*`` (the default policy ``user:*``) or a value no user id may be is a 400 naming it;
    it was ignored, so the call was served and charged to "anonymous" (probe 54)."""
    value = _clean(body.get("safety_identifier"), "safety_identifier", scope=True)
    if value is None:
        return None
    if key is not None and not key.may_attribute_to(value):
        return None
    return value


def _header_or_body(
    headers: Mapping[str, str],
    header: str,
    body: Callable[[], tuple[str | None, str]],
    refuse_conflicts: bool,
) -> str | None:
    """One attribution id said by a header or the body: the header's, else the body's.
    With ``refuse_conflicts`` (a reported record, which names its own owner), a header
    and a record that differ are refused: the header used to win without a word, so a
    batch of /v1/usage records sent with a default ``X-Tollgate-User`` charged every
    record's spend to the header's user (probe J)."""
    scope = not header.endswith("Session")
    header_value = _clean(_header(headers, header), header, scope=scope)
    if header_value and not refuse_conflicts:
        return header_value  # the body is not read: the documented order
    body_value, body_field = body()
    if header_value and body_value and header_value != body_value:
        raise InvalidRequest(
            f"'{body_field}' ({body_value!r}) and header '{header}' ({header_value!r}) say "
            "different things of one record; send one of them (or the same value in both)",
            field=body_field,
        )
    return header_value or body_value


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries: ``Authorization: Bearer <key>``, else ``X-Api-Key``.
    Two different keys in one request (two such headers, or both naming different keys) are
    a 400: the first was used without a word (a newcomer's probe)."""
    getall = getattr(headers, "getall", None)
    auths = list(getall("Authorization", ())) if getall is not None else []
    api_keys = list(getall("X-Api-Key", ())) if getall is not None else []
    auths = auths or [headers.get("Authorization", "")]
    api_keys = api_keys or [headers.get("X-Api-Key", "")]
    found = {auth[7:].strip() for auth in auths if auth.lower().startswith("bearer ")}
    found |= {key for key in api_keys if key}
    found.discard("")
    if len(found) > 1:
        raise InvalidRequest(
            "The request carries more than one API key ('Authorization' and 'X-Api-Key' "
            "headers naming different keys); send one key",
            field="Authorization",
        )
    return next(iter(found), None)


def resolve_identity(
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    keys: KeyStore | None,
    require: str = "none",
    *,
    refuse_conflicts: bool = False,
    spending: bool = False,
) -> Identity:
    """Who the request is for; raises InvalidRequest, NotAuthenticated or NotPermitted when
    it cannot be attributed. A header wins over the body (the documented order); with
    ``refuse_conflicts`` (records reported to /v1/usage and /v1/outcomes) a header and a
    record that name different owners are a 400 instead. ``spending``: a call or usage that
    spends, which a key limited to features must attribute to one of them."""
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be an object of string values", field="metadata")
    metadata = metadata or {}
    claimed_user = _header_or_body(
        headers,
        "X-Tollgate-User",
        lambda: _body_user(body),
        refuse_conflicts,
    )
    session = _header_or_body(
        headers,
        "X-Tollgate-Session",
        lambda: (_clean(body.get("session_id"), "session_id"), "session_id"),
        refuse_conflicts,
    )
    feature = _header_or_body(
        headers,
        "X-Tollgate-Feature",
        lambda: (
            _agreed(
                "metadata.feature",
                metadata.get("feature"),
                "feature",
                body.get("feature"),
                field="feature",
            ),
            "metadata.feature" if _clean(metadata.get("feature"), "feature") else "feature",
        ),
        refuse_conflicts,
    )
    claimed_team = _header_or_body(
        headers,
        "X-Tollgate-Team",
        lambda: (_clean(body.get("team"), "team", scope=True), "team"),
        refuse_conflicts,
    )
    team: str | None = None
    key_id: str | None = None
    is_admin = False
    if keys is not None:
        secret = bearer_token(headers)
        if not secret:
            raise NotAuthenticated(
                "This gateway requires an API key: send 'Authorization: Bearer <key>'"
            )
        key = keys.lookup(secret)
        if key is None:
            raise NotAuthenticated("The API key is not known to this gateway")
        if claimed_user and not key.may_attribute_to(claimed_user):
            raise NotPermitted(
                f"API key '{key.id}' may not attribute requests to user {claimed_user!r}; "
                "omit the user or add it to the key's may_act_for",
                field="user",
            )
        if feature and key.features is not None and feature not in key.features:
            raise NotPermitted(
                f"API key '{key.id}' is not allowed feature {feature!r} "
                f"(allowed: {', '.join(sorted(key.features))})",
                field="metadata.feature",
            )
        if not feature and key.features is not None and spending:
            # A key limited to features spends only under them, so their caps hold: a call
            # naming no feature escaped a feature's exhausted cap (session 20's probe S).
            if len(key.features) != 1:
                raise InvalidRequest(
                    f"API key '{key.id}' may spend only under its features "
                    f"({', '.join(sorted(key.features)) or 'none'}): name one with header "
                    "'X-Tollgate-Feature' or 'metadata.feature'",
                    field="feature",
                )
            [feature] = key.features
        if claimed_team and claimed_team != key.team:
            raise NotPermitted(
                (
                    f"API key '{key.id}' belongs to team {key.team!r}, not {claimed_team!r}; "
                    "with keys the key's team is the team (omit it)"
                    if key.team
                    else f"API key '{key.id}' belongs to no team, so it cannot claim team "
                    f"{claimed_team!r}; with keys the key's team is the team (omit it)"
                ),
                field="team",
            )
        user = claimed_user or _safety_user(body, key) or key.user_id
        team, key_id, is_admin = key.team, key.id, key.admin
    else:
        user = claimed_user or _safety_user(body, None) or ""
        team = claimed_team  # without keys, as the user and the feature: the caller says
    if not user:
        if require != "none":
            raise InvalidRequest(
                "This gateway requires a user: send header 'X-Tollgate-User', "
                "or 'user' / 'user_id' in the body",
                field="user",
            )
        user = ANONYMOUS_USER
    if require == "user_and_feature" and not feature:
        raise InvalidRequest(
            "This gateway requires a feature: send header 'X-Tollgate-Feature' "
            "or 'metadata.feature' in the body",
            field="metadata.feature",
        )
    return Identity(user, session, feature, team, key_id, is_admin)


def key_cap_warning(scope: str, keys: KeyStore | None) -> str | None:
    """What an admin capping ``key:<id>`` should know when no call can carry that key (a
    cap is still stored: keys are read at start-up, so it may be set before its key)."""
    if not scope.startswith("key:"):
        return None
    if keys is None:
        return (
            f"no API keys are configured (TOLLGATE_KEYS_FILE is unset): calls carry no key, "
            f"so {scope} caps no call until keys are (`tollgate keys add`) and the "
            "dispatcher is restarted with them"
        )
    key_id = scope.removeprefix("key:")
    if key_id != "*" and key_id not in keys.ids:
        return (
            f"the keys file has no key with id {key_id!r}, so {scope} caps no call until one "
            "is added to it and the dispatcher restarted"
        )
    return None
