"""The targets file: every error on one line naming target and key, a good file, and the sync decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scim2_models import ScimFilter

from connectors.base import DeprovisionAction
from orchestrator.mapping import HubUser, parse_user_filter
from orchestrator.targets import (
    Decision,
    DeprovisionPolicy,
    Rate,
    TargetConfig,
    TargetConfigError,
    connector_settings,
    decide,
    failing_scope_term,
    in_scope,
    load_targets,
    parse_duration,
    parse_targets,
)

CUSTOMER = "urn:idhub:schemas:extension:customer:2.0:User"
MARKETING = 'consents[purpose eq "marketing_email" and granted eq true]'

GOOD = """
targets:
  - name: app
    connector: scim
    url: http://127.0.0.1:18080/scim/v2
    token_env: IDHUB_TEST_APP_TOKEN
    options: {list_id: abc}
    mapping:
      userName: userName
      name.givenName: name.givenName
      emails: emails
    scope: 'active eq true'
    on_deactivate: deactivate
    on_delete: delete
    on_leave_scope: deactivate
    rate_limit: 50/s
    concurrency: 4
    batch_size: 100
    timeout: 10s
    retry: {max_attempts: 12, max_age: 3d, base: 1s, cap: 1h}
    quarantine: {threshold: 20, probe_base: 5s, probe_cap: 10m}
    groups: false
    priority_paths: [consents]
  - name: news
    connector: newsletter
    url: http://127.0.0.1:18081/3.0
    scope: 'consents[purpose eq "marketing_email" and granted eq true]'
    on_delete: erase
    on_leave_scope: deactivate
    rate_limit: 600/min
  - name: crm
    connector: crm
    url: http://127.0.0.1:18082
    on_deactivate: anonymize
    rate_limit: 100/10s
"""


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDHUB_TEST_APP_TOKEN", "test-token")


def one_target(**fields: Any) -> str:
    """A targets file with one newsletter target, with ``fields`` added or overriding."""
    base: dict[str, Any] = {"name": "news", "connector": "newsletter", "url": "http://127.0.0.1:1/3.0"}
    base.update(fields)
    lines = ["targets:", "  - " + "\n    ".join(f"{k}: {v}" for k, v in base.items())]
    return "\n".join(lines) + "\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(TargetConfigError) as caught:
        parse_targets(text)
    assert str(caught.value) == "\n".join(caught.value.lines)
    assert all("\n" not in line for line in caught.value.lines)
    return caught.value.lines


def test_good_file_loads_with_every_key(tmp_path: Path) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text(GOOD)
    app, news, crm = load_targets(path)
    assert (app.name, app.connector, app.queue) == ("app", "scim", "target.app")
    assert app.options == {"list_id": "abc"}
    assert app.mapping == {"userName": "userName", "name.givenName": "name.givenName", "emails": "emails"}
    assert app.rate_limit == Rate(50, 1, "50/s")
    assert app.rate_limit.per_second == 50
    assert app.timeout == 10
    assert app.concurrency == 4
    assert app.batch_size == 100
    assert app.retry.max_attempts == 12
    assert app.retry.max_age == 3 * 86400
    assert (app.retry.base, app.retry.cap) == (1, 3600)
    assert (app.quarantine.threshold, app.quarantine.probe_base, app.quarantine.probe_cap) == (20, 5, 600)
    assert app.priority_paths == ["consents"]
    assert app.groups is False
    assert news.on_delete is DeprovisionPolicy.ERASE
    assert news.mapping is None
    assert news.rate_limit is not None
    assert news.rate_limit.per_second == 10
    assert crm.rate_limit is not None
    assert crm.rate_limit.per_second == 10
    assert (crm.rate_limit.count, crm.rate_limit.period) == (100, 10)
    assert crm.on_deactivate is DeprovisionPolicy.ANONYMIZE
    assert crm.scope is None
    # defaults
    assert crm.retry.max_attempts == 12
    assert crm.quarantine.threshold == 20
    assert crm.timeout == 10


def test_connector_settings_reads_the_token_at_that_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    app = parse_targets(GOOD)[0]
    monkeypatch.setenv("IDHUB_TEST_APP_TOKEN", "rotated")
    settings = connector_settings(app)
    assert (settings.name, settings.url, settings.token) == (
        "app",
        "http://127.0.0.1:18080/scim/v2",
        "rotated",
    )
    assert settings.timeout == 10
    assert settings.max_connections == 4
    assert settings.options == {"list_id": "abc"}
    monkeypatch.delenv("IDHUB_TEST_APP_TOKEN")
    with pytest.raises(TargetConfigError, match=r"target 'app': token_env: .*IDHUB_TEST_APP_TOKEN"):
        connector_settings(app)


def test_the_secret_never_sits_in_the_config() -> None:
    app = parse_targets(GOOD)[0]
    assert "test-token" not in repr(app)
    assert "test-token" not in app.model_dump_json()


@pytest.mark.parametrize(
    ("fields", "key", "says"),
    [
        ({"on_delete": "deactivate"}, "on_delete", "must be one of delete, anonymize, erase"),
        ({"on_deactivate": "erase"}, "on_deactivate", "must be one of delete, deactivate, anonymize"),
        ({"on_leave_scope": "unsubscribe"}, "on_leave_scope", "must be one of delete, deactivate, anonymize"),
        ({"connector": "fax"}, "connector", "unknown connector; known: "),
        ({"token_env": "IDHUB_TEST_NOT_SET_ANYWHERE"}, "token_env", "IDHUB_TEST_NOT_SET_ANYWHERE is not set"),
        ({"token_env": "'sk-secret-value!'"}, "token_env", "must be the NAME of an environment variable"),
        ({"scope": "'nosuchattr eq 1'"}, "scope", "invalid filter: "),
        ({"scope": "'active eq'"}, "scope", "invalid filter: invalid syntax"),
        ({"scope": "'consents[purpos eq \"x\"]'"}, "scope", "invalid filter: "),
        ({"scope": "'active eq \"sometimes\"'"}, "scope", "is not valid for attribute"),
        ({"rate_limit": "fast"}, "rate_limit", "must be a rate such as 50/s"),
        ({"rate_limit": "0/s"}, "rate_limit", "must be a positive rate"),
        ({"timeout": "soon"}, "timeout", "must be a duration"),
        ({"retry": "{max_age: 3 days}"}, "retry.max_age", "must be a duration"),
        ({"retry": "{base: 1m, cap: 1s}"}, "retry.cap", "must not be below base"),
        ({"retry": "{max_attempts: 0}"}, "retry.max_attempts", "must be at least 1"),
        ({"retry": "{tries: 3}"}, "retry.tries", "unknown key"),
        ({"quarantine": "{probe_base: -5s}"}, "quarantine.probe_base", "must be a duration"),
        ({"concurrency": "many"}, "concurrency", "must be an integer"),
        ({"batch_size": 0}, "batch_size", "must be at least 1"),
        ({"groups": "maybe"}, "groups", "must be true or false"),
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"url": "not-a-url"}, "url", "must be a URL"),
        ({"mapping": "{email: nosuchattr}"}, "mapping", "email: unknown attribute 'nosuchattr'"),
        ({"mapping": "{email: 'emails[type eq'}"}, "mapping", "email: invalid path"),
    ],
)
def test_each_error_is_one_line_naming_target_and_key(fields: dict[str, Any], key: str, says: str) -> None:
    (line,) = errors_of(one_target(**fields))
    assert line.startswith(f"idhub: targets.yaml: target 'news': {key}: "), line
    assert says in line


def test_env_check_can_be_skipped_for_offline_validation() -> None:
    text = one_target(token_env="IDHUB_TEST_NOT_SET_ANYWHERE")
    (news,) = parse_targets(text, check_env=False)
    assert news.token_env == "IDHUB_TEST_NOT_SET_ANYWHERE"


def test_bad_and_duplicate_names_and_missing_keys() -> None:
    text = (
        one_target() + "  - {name: news, connector: crm, url: 'http://x'}\n  - {name: 'Big News', url: x}\n"
    )
    lines = errors_of(text)
    assert "idhub: targets.yaml: target 'news': name: duplicate (also target #1)" in lines
    assert "idhub: targets.yaml: target 'Big News': name: must match [a-z0-9_-]+" in lines
    assert "idhub: targets.yaml: target 'Big News': connector: required" in lines
    assert "idhub: targets.yaml: target 'Big News': url: must be a URL such as https://host/path" in lines


def test_all_errors_are_collected_at_once() -> None:
    text = one_target(on_delete="keep", rate_limit="lots") + "  - {name: crm, connector: crm}\n"
    assert errors_of(text) == [
        "idhub: targets.yaml: target 'news': on_delete: must be one of delete, anonymize, erase",
        "idhub: targets.yaml: target 'news': rate_limit: must be a rate such as 50/s, 600/min or 1000/h",
        "idhub: targets.yaml: target 'crm': url: required",
    ]


def test_file_level_errors(tmp_path: Path) -> None:
    assert errors_of("targets: [\n") == ["idhub: targets.yaml: line 2: not valid YAML"]
    assert errors_of("targets: {}\nextra: 1\n") == [
        "idhub: targets.yaml: extra: unknown key",
        "idhub: targets.yaml: targets: must be a list",
    ]
    assert errors_of("targets:\n  - just a string\n") == ["idhub: targets.yaml: target #1: must be a mapping"]
    assert parse_targets("") == []
    with pytest.raises(TargetConfigError, match=r"^idhub: missing.yaml: cannot read"):
        load_targets(tmp_path / "missing.yaml")


def test_durations_and_rates() -> None:
    assert [parse_duration(v) for v in ("250ms", "1s", "5m", "1h", "3d", 7)] == [
        0.25,
        1,
        300,
        3600,
        259200,
        7,
    ]
    assert Rate.parse("20/s").per_second == 20
    assert Rate.parse("600/min").per_second == 10
    assert Rate.parse("3600/h").per_second == 1
    assert (Rate.parse("1000/h").count, Rate.parse("1000/h").period) == (1000, 3600)
    for bad in ("1x", "-1s", "0s", True, None):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# -- decisions -----------------------------------------------------------------------------------------------


def user_doc(
    *, active: bool = True, marketing: bool | None = True, email: str | None = "a@example.org"
) -> dict:
    consents = [] if marketing is None else [{"purpose": "marketing_email", "granted": marketing}]
    doc = HubUser(
        user_name="customer-1",
        active=active,
        emails=[{"value": email, "primary": True}] if email else None,
    ).model_dump()
    doc[CUSTOMER] = {
        "consents": [*consents, {"purpose": "profiling", "granted": True}],
        "marketingPreferences": {"topics": ["shoes", "bags"]},
    }
    doc["schemas"] = [*doc["schemas"], CUSTOMER]
    doc["id"] = "2819c223-7f76-453a-919d-413861904646"
    doc["meta"] = {"resourceType": "User", "version": 'W/"3"'}
    return doc


@pytest.fixture
def targets() -> dict[str, TargetConfig]:
    text = """
targets:
  - {name: news, connector: newsletter, url: 'http://n', on_leave_scope: delete, on_delete: erase,
     scope: 'consents[purpose eq "marketing_email" and granted eq true]'}
  - {name: crm, connector: crm, url: 'http://c', on_deactivate: anonymize}
  - {name: app, connector: scim, url: 'http://a', scope: 'emails pr and consents[purpose eq "profiling"]
     and userName sw "customer"'}
"""
    return {t.name: t for t in parse_targets(text)}


def test_consent_withdrawal_leaves_the_newsletter_but_not_the_crm(targets: dict[str, TargetConfig]) -> None:
    news, crm = targets["news"], targets["crm"]
    granted, withdrawn = user_doc(), user_doc(marketing=False)
    assert in_scope(news, granted)
    assert not in_scope(news, withdrawn)
    assert in_scope(crm, withdrawn)
    assert decide(news, granted, deleted=False, previously_provisioned=True) == Decision("upsert", "in scope")
    left = decide(news, withdrawn, deleted=False, previously_provisioned=True)
    assert left == Decision("delete", f"left scope: {MARKETING}")
    assert left.deprovision is DeprovisionAction.DELETE
    assert decide(crm, withdrawn, deleted=False, previously_provisioned=True).action == "upsert"
    never = decide(news, withdrawn, deleted=False, previously_provisioned=False)
    assert never == Decision("none", "never provisioned, out of scope")
    assert never.deprovision is None


def test_no_consent_at_all_is_out_of_the_newsletter(targets: dict[str, TargetConfig]) -> None:
    assert not in_scope(targets["news"], user_doc(marketing=None))


def test_scope_filter_with_full_urn_behaves_the_same() -> None:
    (news,) = parse_targets(one_target(scope=f"'{CUSTOMER}:{MARKETING}'"))
    assert in_scope(news, user_doc())
    assert not in_scope(news, user_doc(marketing=False))


def test_deactivation_uses_on_deactivate_only_when_provisioned(targets: dict[str, TargetConfig]) -> None:
    crm = targets["crm"]
    off = user_doc(active=False)
    assert decide(crm, off, deleted=False, previously_provisioned=True) == Decision(
        "anonymize", "deactivated"
    )
    assert decide(crm, off, deleted=False, previously_provisioned=False).action == "none"


def test_deletion_uses_on_delete_even_without_a_document(targets: dict[str, TargetConfig]) -> None:
    for name, action in (("news", "erase"), ("crm", "delete")):
        decision = decide(targets[name], None, deleted=True, previously_provisioned=True)
        assert decision == Decision(action, "deleted")  # type: ignore[arg-type]
    assert decide(targets["news"], None, deleted=True, previously_provisioned=True).deprovision == "erase"


def test_reason_names_the_failing_and_term(targets: dict[str, TargetConfig]) -> None:
    app = targets["app"]
    assert failing_scope_term(app, user_doc()) is None
    assert failing_scope_term(app, user_doc(email=None)) == "emails pr"
    renamed = user_doc()
    renamed["userName"] = "staff-1"
    decision = decide(app, renamed, deleted=False, previously_provisioned=True)
    assert decision == Decision("deactivate", 'left scope: userName sw "customer"')


SCOPES = [
    "active eq true",
    "active eq false",
    'userName eq "CUSTOMER-1"',
    'userName sw "cust" and emails pr',
    'emails[primary eq true and value ew "@example.org"]',
    'emails co "EXAMPLE"',
    "title pr",
    'title ne "boss"',
    'not (userName eq "customer-1")',
    MARKETING,
    'consents[purpose eq "MARKETING_EMAIL"]',  # purpose is caseExact: no match
    'consents[purpose eq "profiling" and granted eq false] or active eq false',
    f"{CUSTOMER}:{MARKETING}",
    'consents.purpose eq "profiling"',
    'marketingPreferences.topics eq "SHOES"',
    'emails[type eq "work"] or phoneNumbers pr',
]


@pytest.mark.parametrize("scope", SCOPES)
def test_scope_evaluation_agrees_with_scim2_models(scope: str) -> None:
    """The fast dict evaluator gives what scim2-models' own ``ScimFilter.match`` gives on the model."""
    (target,) = parse_targets(one_target(scope=f"'{scope}'"))
    reference = ScimFilter[HubUser](parse_user_filter(scope))
    docs = [user_doc(), user_doc(active=False, marketing=False), user_doc(marketing=None, email=None)]
    for doc in docs:
        assert in_scope(target, doc) is reference.match(HubUser.model_validate(doc)), (scope, doc)


def test_groups_only_where_the_connector_supports_them() -> None:
    (line,) = errors_of(one_target(groups="true"))
    assert line == "idhub: targets.yaml: target 'news': groups: connector newsletter does not support groups"
    (app,) = parse_targets(one_target(name="app", connector="scim", groups="true"))
    assert app.groups is True


def test_no_scope_means_everyone(targets: dict[str, TargetConfig]) -> None:
    assert in_scope(targets["crm"], user_doc(active=False, marketing=None, email=None))


def test_a_user_without_active_counts_as_active_in_scopes() -> None:
    cfg = parse_targets(
        "targets:\n  - {name: app, connector: scim, url: 'http://127.0.0.1:1/v2', scope: 'active eq true'}\n",
        check_env=False,
    )[0]
    assert in_scope(cfg, {"userName": "x"})
    assert not in_scope(cfg, {"userName": "x", "active": False})
