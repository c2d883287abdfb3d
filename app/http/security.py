"""Who may reach what: the internal token, and the refusal to serve open admin routes by accident.

Owns three small rules (the threat model is in SECURITY.md):

- **Internal listeners need a secret.** The sink's reports server answers only requests that
  carry ``Authorization: Bearer <internal token>`` (what the dispatcher's report proxy sends)
  or an admin API key. The token is ``TOLLGATE_INTERNAL_TOKEN``, else the contents of
  ``TOLLGATE_INTERNAL_TOKEN_FILE``, else ``<state_dir>/internal-token``, created with mode
  0600 by the first process that needs it, so the processes of one machine's stack (`make up`)
  share it without configuration.
- **No open admin routes on a network by accident.** Without a keys file, anyone who reaches
  the dispatcher may change budgets and read everyone's spend. That is the convenient default on
  127.0.0.1; on any other bind address the dispatcher refuses to start unless
  ``TOLLGATE_ALLOW_OPEN_ADMIN=true`` says it is meant.

It does not own API keys or attribution (``app.metering.attribution``).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from app.metering.attribution import KeyStore, bearer_token
from app.settings import Settings

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class ExposureError(RuntimeError):
    """The dispatcher would serve open admin routes beyond this machine; the message says why."""


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(settings: Settings) -> None:
    """Raise ExposureError if budgets and reports would be open to a network."""
    host = settings.dispatcher_host
    if settings.keys_file is not None or settings.allow_open_admin or is_loopback(host):
        return
    raise ExposureError(
        f"refusing to serve on {host}:{settings.dispatcher_port} without API keys: anyone who "
        "can reach it could change or delete every budget and read everyone's spend. Set "
        "TOLLGATE_KEYS_FILE (with an admin key; `tollgate keys add --admin`), or bind to "
        "127.0.0.1, or set TOLLGATE_ALLOW_OPEN_ADMIN=true if this network is trusted."
    )


def token_path(settings: Settings) -> Path:
    return settings.internal_token_file or settings.state_dir / "internal-token"


def internal_token(settings: Settings) -> str:
    """The shared internal token (see the module docstring for where it comes from)."""
    if settings.internal_token is not None:
        return settings.internal_token.get_secret_value()
    path = token_path(settings)
    if not path.exists() and settings.internal_token_file is None:
        _create_token_file(path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ExposureError(
            f"cannot read the internal token from {path}: {exc.strerror}. Set "
            "TOLLGATE_INTERNAL_TOKEN or TOLLGATE_INTERNAL_TOKEN_FILE."
        ) from None
    if len(token) < 16:
        raise ExposureError(f"the internal token in {path} is shorter than 16 characters")
    return token


def _create_token_file(path: Path) -> None:
    """Write a new random token atomically; if another process won the race, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):  # another process won: keep theirs
            os.link(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def internal_caller(headers: Mapping[str, str], token: str, keys: KeyStore | None) -> str | None:
    """Who an internal request comes from: "internal", "admin:<key id>", or None (refuse)."""
    secret = bearer_token(headers)
    if not secret:
        return None
    if hmac.compare_digest(secret.encode("utf-8", "replace"), token.encode()):
        return "internal"
    key = keys.lookup(secret) if keys is not None else None
    if key is not None and key.admin:
        return f"admin:{key.id}"
    return None


def add_api_key(
    path: Path,
    *,
    key_id: str,
    user_id: str,
    team: str | None = None,
    admin: bool = False,
    may_act_for: list[str] | None = None,
    features: list[str] | None = None,
) -> str:
    """Append a new key to a keys file (created with mode 0600); return the key, never stored."""
    import yaml

    from app.metering.attribution import KeysFileError, hash_key, key_id_problem

    # Each id as the file will be read (a call's rule: `--user '*'` was written, and the
    # key's calls spent under the default policy user:*; probe 54).
    for option, values in (
        ("--id", [key_id]),
        ("--user", [user_id]),
        ("--team", [team] if team else []),
        ("--feature", features or []),
        ("--may-act-for", may_act_for or []),
    ):
        for value in values:
            problem = key_id_problem(value, any_ok=option == "--may-act-for")
            if problem is not None:
                raise ValueError(f"{option} {problem}")
    document: dict[str, object] = {"keys": []}
    if path.exists():
        KeyStore.load(path)  # refuse to append to a file that does not load
        document = yaml.safe_load(path.read_text()) or {"keys": []}
    entries = document.setdefault("keys", [])
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a top-level 'keys:' list")
    if any(isinstance(e, dict) and e.get("id") == key_id for e in entries):
        raise ValueError(f"{path} already has a key with id {key_id!r}")
    secret = "tg-" + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"id": key_id, "sha256": hash_key(secret), "user_id": user_id}
    if team:
        entry["team"] = team
    if features:
        entry["features"] = list(features)
    if may_act_for:
        entry["may_act_for"] = list(may_act_for)
    if admin:
        entry["admin"] = True
    entries.append(entry)
    text = yaml.safe_dump(document, sort_keys=False)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    path.write_text(text)
    try:
        KeyStore.load(path)
    except KeysFileError as exc:  # pragma: no cover - the entry is built valid above
        raise ValueError(str(exc)) from exc
    return secret


def init_secrets(directory: Path) -> list[str]:
    """A deployment's secrets in ``directory``: keys.yaml with an admin key, admin-key (the key
    itself, for the operator), internal-token. Existing files are kept; returns what it created."""
    directory.mkdir(parents=True, exist_ok=True)
    created = []
    keys_path, admin_path = directory / "keys.yaml", directory / "admin-key"
    if not keys_path.exists():
        secret = add_api_key(keys_path, key_id="admin", user_id="admin", admin=True)
        _write_private(admin_path, secret + "\n")
        created += ["keys.yaml", "admin-key"]
    token_file = directory / "internal-token"
    if not token_file.exists():
        _create_token_file(token_file)
        created.append("internal-token")
    return created


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
