from pathlib import Path

import pytest
from multidict import CIMultiDict

from app.errors import InvalidRequest, TollgateError
from app.http.errors import http_error
from app.metering.attribution import KeysFileError, KeyStore, hash_key, resolve_identity


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"""
keys:
  - id: alice-laptop
    sha256: {hash_key("sk-alice")}
    user_id: alice
    team: growth
    features: [chat]
  - id: backend
    sha256: {hash_key("sk-backend")}
    user_id: svc-backend
    may_act_for: ["*"]
"""
    )
    return KeyStore.load(path)


def test_headers_win_over_body() -> None:
    identity = resolve_identity(
        {"X-Tollgate-User": "h-user", "X-Tollgate-Feature": "search"},
        {"user": "b-user", "session_id": "s1", "metadata": {"feature": "chat"}},
        None,
    )
    assert (identity.user_id, identity.session_id, identity.feature) == ("h-user", "s1", "search")


def test_body_fields_and_openai_user_field() -> None:
    assert resolve_identity({}, {"user_id": "u1"}, None).user_id == "u1"
    assert resolve_identity({}, {"user": "u2"}, None).user_id == "u2"
    assert resolve_identity({}, {}, None).user_id == "anonymous"


def test_openais_safety_identifier_names_the_user_when_nothing_else_does(keys: KeyStore) -> None:
    """A newcomer probe: the openai SDK documents ``user`` as "being replaced by
    ``safety_identifier``"; a client that followed it was charged as "anonymous". It is a
    hint, never a claim (a review: OpenAI advises a hash there, and the first version
    refused calls that sent one with a header, or with a key that may not act for it)."""
    assert resolve_identity({}, {"safety_identifier": " u3 "}, None).user_id == "u3"
    # the user named, and a hash of it as OpenAI advises: the user
    body = {"user": "alice", "safety_identifier": "9f86d081884c7d65"}
    assert resolve_identity({}, body, None).user_id == "alice"
    assert resolve_identity({"X-Tollgate-User": "h"}, body, None).user_id == "h"
    # read, it is checked as `user` is: `*` names the default policy user:* (probe 54)
    for value in ("*", "(none)", "x" * 300):
        with pytest.raises(InvalidRequest) as info:
            resolve_identity({}, {"safety_identifier": value}, None)
        assert info.value.field == "safety_identifier"
        with pytest.raises(InvalidRequest):  # with a key too: before the key is asked
            resolve_identity(
                {"Authorization": "Bearer sk-alice"}, {"safety_identifier": value}, keys
            )
    # not read when the user is named, as a body's `user` is not read under a header
    assert resolve_identity({}, {"user": "a", "safety_identifier": "*"}, None).user_id == "a"
    # a record reported to /v1/usage with a header naming its owner: the header's
    hashed = {"safety_identifier": "9f86d081884c7d65"}
    svc = resolve_identity({"X-Tollgate-User": "svc"}, hashed, None, refuse_conflicts=True)
    assert svc.user_id == "svc"
    # with keys: the key's user, unless the key may act for the identifier's user
    alice = resolve_identity({"Authorization": "Bearer sk-alice"}, hashed, keys)
    assert alice.user_id == "alice"
    backend = resolve_identity({"Authorization": "Bearer sk-backend"}, hashed, keys)
    assert backend.user_id == "9f86d081884c7d65"


def test_required_attribution_is_a_400_naming_the_field() -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity({}, {}, None, require="user")
    assert http_error(info.value).status == 400 and info.value.field == "user"
    with pytest.raises(TollgateError) as info:
        resolve_identity({}, {"user": "u"}, None, require="user_and_feature")
    assert info.value.field == "metadata.feature"


def test_key_user_is_authoritative_and_cannot_be_spoofed(keys: KeyStore) -> None:
    identity = resolve_identity({"Authorization": "Bearer sk-alice"}, {}, keys)
    assert (identity.user_id, identity.team, identity.api_key_id) == (
        "alice",
        "growth",
        "alice-laptop",
    )
    with pytest.raises(TollgateError) as info:
        resolve_identity({"Authorization": "Bearer sk-alice"}, {"user": "bob"}, keys)
    assert http_error(info.value).status == 403
    with pytest.raises(TollgateError) as info:
        resolve_identity({"Authorization": "Bearer sk-alice", "X-Tollgate-User": "bob"}, {}, keys)
    assert http_error(info.value).status == 403


def test_backend_key_may_narrow_to_end_users(keys: KeyStore) -> None:
    identity = resolve_identity({"Authorization": "Bearer sk-backend"}, {"user": "carol"}, keys)
    assert identity.user_id == "carol" and identity.api_key_id == "backend"


def test_feature_allow_list(keys: KeyStore) -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity(
            {"Authorization": "Bearer sk-alice", "X-Tollgate-Feature": "admin"}, {}, keys
        )
    assert http_error(info.value).status == 403


def test_missing_or_unknown_key_is_401(keys: KeyStore) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        with pytest.raises(TollgateError) as info:
            resolve_identity(headers, {}, keys)
        assert http_error(info.value).status == 401


def test_bad_types_are_400() -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity({}, {"user": 42}, None)
    assert http_error(info.value).status == 400 and info.value.field == "user"
    with pytest.raises(TollgateError):
        resolve_identity({}, {"metadata": "x"}, None)


def test_keys_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - id: k\n    sha256: nothex\n    user_id: u\n")
    with pytest.raises(KeysFileError, match=r"keys\[0\].sha256"):
        KeyStore.load(path)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("user_id: '*'", "user_id"),
        ("user_id: '(none)'", "user_id"),
        ("user_id: u, team: '*'", "team"),
        ("user_id: u, features: [chat, '*']", "features"),
        ("user_id: u, features: [7]", "features"),
        ('user_id: u, may_act_for: ["a\\tb"]', "may_act_for"),
        ("user_id: u, team: [t]", "team"),
    ],
)
def test_a_keys_file_id_is_checked_as_a_calls_id_is(entry: str, field: str, tmp_path: Path) -> None:
    """Probe 54 (L2's sweep): a key's user, team or feature ``*`` was loaded, and its calls
    then spent under ``user:*`` (the default policy's name), which a call naming ``*`` may
    not (a 400). A keys file is read by the rule a call's ids are, naming entry and field."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{id: k, sha256: {hash_key('sk-k')}, {entry}}}\n")
    with pytest.raises(KeysFileError, match=rf"keys\[0\]\.{field}"):
        KeyStore.load(path)


def test_a_keys_file_id_is_spelled_as_a_calls_id_is(tmp_path: Path) -> None:
    """Trimmed and NFC, as a header's or body's id is: `user_id: " ana "` was a user no
    budget scope `user:ana` capped, and a feature " chat " one no call could name."""
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {{id: ' k ', sha256: {hash_key('sk-k')}, user_id: ' ana ', team: ' t ',"
        " features: [' chat '], may_act_for: ['*', ' bo ']}\n"
    )
    key = KeyStore.load(path).lookup("sk-k")
    assert key is not None
    assert (key.id, key.user_id, key.team) == ("k", "ana", "t")
    assert key.features == frozenset({"chat"}) and key.may_act_for == frozenset({"*", "bo"})
    identity = resolve_identity(
        {"Authorization": "Bearer sk-k", "X-Tollgate-Feature": "chat"}, {}, KeyStore.load(path)
    )
    assert (identity.user_id, identity.feature, identity.team) == ("ana", "chat", "t")


def test_a_team_is_the_callers_word_without_keys_and_the_keys_with_them(keys: KeyStore) -> None:
    assert resolve_identity({"X-Tollgate-Team": "t1"}, {"team": "t2"}, None).team == "t1"
    assert resolve_identity({}, {"team": "t2"}, None).team == "t2"
    assert resolve_identity({}, {}, None).team is None
    alice = {"Authorization": "Bearer sk-alice"}
    assert resolve_identity(alice, {}, keys).team == "growth"
    assert resolve_identity({**alice, "X-Tollgate-Team": "growth"}, {}, keys).team == "growth"
    with pytest.raises(TollgateError) as refused:
        resolve_identity({**alice, "X-Tollgate-Team": "finance"}, {}, keys)
    assert http_error(refused.value).status == 403
    # a key of no team says so, not "belongs to team None" (a newcomer's probe)
    backend = {"Authorization": "Bearer sk-backend"}
    with pytest.raises(TollgateError) as refused:
        resolve_identity({**backend, "X-Tollgate-Team": "finance"}, {}, keys)
    assert http_error(refused.value).status == 403
    assert "None" not in str(refused.value) and "no team" in str(refused.value)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "al", "user": "bob"}, "user"),
        ({"feature": "search", "metadata": {"feature": "chat"}}, "feature"),
    ],
)
def test_two_body_fields_naming_different_owners_are_refused(
    body: dict[str, object], field: str
) -> None:
    """Found by session 13's probe: `{"user_id": "al", "user": "bob"}` was accepted and
    counted under `al` without a word. Two fields of one body that disagree are a mistake
    the caller must resolve; the same value twice is fine, and headers still win."""
    with pytest.raises(TollgateError) as refused:
        resolve_identity({}, body, None)
    assert http_error(refused.value).status == 400
    assert refused.value.field == field
    agreeing = {"user_id": "al", "user": "al", "feature": "x", "metadata": {"feature": "x"}}
    identity = resolve_identity({}, agreeing, None)
    assert (identity.user_id, identity.feature) == ("al", "x")
    headed = resolve_identity({"X-Tollgate-User": "h", "X-Tollgate-Feature": "f"}, body, None)
    assert (headed.user_id, headed.feature) == ("h", "f")


@pytest.mark.parametrize(
    "header", ["X-Tollgate-User", "X-Tollgate-Session", "X-Tollgate-Feature", "X-Tollgate-Team"]
)
def test_an_attribution_header_sent_twice_with_different_values_is_refused(header: str) -> None:
    """Session 14's probe: two X-Tollgate-User headers (a, b) got a 200 charged to "a". Like
    two body fields that disagree, the caller must say which; the same value twice is fine."""
    with pytest.raises(TollgateError) as refused:
        resolve_identity(CIMultiDict([(header, "a"), (header.lower(), "b")]), {}, None)
    assert http_error(refused.value).status == 400
    assert refused.value.field == header and "twice" in refused.value.message
    resolve_identity(CIMultiDict([(header, "a"), (header, "a")]), {}, None)


def test_a_key_cap_no_call_can_meet_is_said_so(keys: KeyStore) -> None:
    """Session 19's note: ``PUT /v1/budgets/key:x`` with no keys file was a silent no-op."""
    from app.metering.attribution import key_cap_warning

    no_keys = key_cap_warning("key:ci-runner", None)
    assert no_keys is not None and "TOLLGATE_KEYS_FILE" in no_keys
    unknown = key_cap_warning("key:ci-runner", keys)
    assert unknown is not None and "'ci-runner'" in unknown
    assert key_cap_warning("key:backend", keys) is None
    assert key_cap_warning("key:*", keys) is None
    assert key_cap_warning("user:ci-runner", None) is None


def test_a_key_limited_to_features_spends_only_under_them(tmp_path: Path) -> None:
    """Probe S: with `feature:chat` exhausted, a key allowed only `chat` got a 402 naming
    the feature, a 403 naming another, and a 200 naming none: the cap meant to govern the
    key did not."""
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n"
        f"  - {{id: one, sha256: {hash_key('sk-one')}, user_id: dave, features: [chat]}}\n"
        f"  - {{id: two, sha256: {hash_key('sk-two')}, user_id: erin, features: [chat, kb]}}\n"
    )
    keys = KeyStore.load(path)
    one, two = {"Authorization": "Bearer sk-one"}, {"Authorization": "Bearer sk-two"}
    assert resolve_identity(one, {}, keys, spending=True).feature == "chat"  # its one feature
    with pytest.raises(TollgateError) as info:
        resolve_identity(two, {}, keys, spending=True)
    error = http_error(info.value)
    assert error.status == 400 and info.value.field == "feature"
    assert "chat, kb" in str(info.value) and "X-Tollgate-Feature" in str(info.value)
    named = resolve_identity({**two, "X-Tollgate-Feature": "kb"}, {}, keys, spending=True)
    assert named.feature == "kb"
    # Reading a status or reporting an outcome spends nothing: no feature needed.
    assert resolve_identity(two, {}, keys).feature is None


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Bearer sk-alice"), ("authorization", "Bearer sk-backend")],
        [("Authorization", "Bearer sk-backend"), ("Authorization", "Bearer sk-alice")],
        [("Authorization", "Bearer sk-alice"), ("X-Api-Key", "sk-backend")],
        [("X-Api-Key", "sk-alice"), ("x-api-key", "sk-backend")],
    ],
)
def test_two_keys_in_one_request_are_refused(
    keys: KeyStore, headers: list[tuple[str, str]]
) -> None:
    """A newcomer's probe: with two `Authorization` headers the first was used without a word
    (alice's then backend's: a 403 as alice; the other order: served as backend), and an
    `X-Api-Key` beside an `Authorization` naming another key was ignored. The caller must
    say which key; the same key twice is fine."""
    with pytest.raises(TollgateError) as refused:
        resolve_identity(CIMultiDict(headers), {}, keys)
    assert http_error(refused.value).status == 400, refused.value
    assert "key" in refused.value.message and "one" in refused.value.message
    same = [("Authorization", "Bearer sk-alice"), ("X-Api-Key", "sk-alice")]
    assert resolve_identity(CIMultiDict(same * 2), {}, keys).user_id == "alice"
