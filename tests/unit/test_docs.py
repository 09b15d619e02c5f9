"""The docs stay true to the code: the generated references (configuration table, gRPC and HTTP API) equal what
`make docs` makes now, the settings can come from a file, and every link in the README and docs/ leads somewhere."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from tuneforge_catalog.main import CatalogSettings
from tuneforge_common.config import CONFIG_FILE_ENV

REPO = Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "tools" / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


gen = load_generator()


# --- generated references -----------------------------------------------------------------------------------


def test_the_committed_generated_docs_are_what_make_docs_produces_now():
    assert gen.stale() == [], "run `make docs` and commit docs/"


def test_a_new_setting_makes_the_committed_configuration_table_stale(monkeypatch):
    class WithNewSetting(CatalogSettings):
        catalog_new_knob: int = Field(3, description="A setting added without regenerating the docs.")

    classes = [(r, WithNewSetting if r == "catalog" else c) for r, c in gen.settings_classes()]
    monkeypatch.setattr(gen, "settings_classes", lambda: classes)
    assert "configuration.md" in gen.stale()
    row = next(line for line in gen.configuration_md().splitlines() if "TUNEFORGE_CATALOG_NEW_KNOB" in line)
    assert row == (
        "| `TUNEFORGE_CATALOG_NEW_KNOB` | int | `3` | catalog | A setting added without regenerating the docs. |"
    )


def test_every_settings_field_is_one_row_with_its_readers_and_a_description():
    table = gen.configuration_md()
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `TUNEFORGE_")}
    for reader, cls in gen.settings_classes():
        for name, info in cls.model_fields.items():
            row = rows[f"TUNEFORGE_{name.upper()}"]
            assert info.description, f"{cls.__name__}.{name} has no description"
            readers = row.split(" | ")[3]
            assert readers == "all" or reader in readers.split(", "), (name, reader, readers)
    assert rows["TUNEFORGE_JOBS_DATABASE_URL"].split(" | ")[3] == "jobs"
    assert rows["TUNEFORGE_NATS_URL"].split(" | ")[3] == "all"


def test_variables_read_outside_the_settings_classes_are_still_read_where_the_table_says():
    for env, _, _, _, source in gen.OTHER_VARIABLES:
        assert env in (REPO / source).read_text(), f"{env} is no longer read in {source}: update gen_docs.py"


def test_the_grpc_reference_names_every_service_rpc_and_message_of_the_generated_code():
    from tuneforge.agent.v1 import agent_pb2
    from tuneforge.auth.v1 import auth_pb2
    from tuneforge.catalog.v1 import catalog_pb2
    from tuneforge.jobs.v1 import jobs_pb2, lifecycle_pb2

    text = (REPO / "docs" / "api" / "grpc.md").read_text()
    for module in (agent_pb2, auth_pb2, catalog_pb2, jobs_pb2, lifecycle_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert f"### service {service.name}" in text
            for method in service.methods:
                assert f"| `{method.name}` |" in text, method.full_name
        for message in module.DESCRIPTOR.message_types_by_name.values():
            assert f"### message {message.name}\n" in text, message.full_name
    # Comments come from the protos' source info, e.g. the one above JobService.SubmitJob.
    assert "Validates against the method's schema and the dataset's status" in text


def test_the_rest_reference_lists_every_route_of_the_openapi_document():
    doc = json.loads((REPO / "docs" / "api" / "openapi.json").read_text())
    text = (REPO / "docs" / "api" / "rest.md").read_text()
    for path, operations in doc["paths"].items():
        for verb in operations:
            assert f"| {verb.upper()} | `{path}` |" in text
    assert "/api/v1/jobs" in doc["paths"] and "/v1/chat/completions" in doc["paths"]


# --- settings from a file -----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NATS_URL", "CATALOG_GRPC_PORT", "CATALOG_MAX_LINE_CHARS"):
        monkeypatch.delenv(f"TUNEFORGE_{name}", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("s.toml", 'nats_url = "nats://from-file:4222"\ncatalog_grpc_port = 6001\nagent_slots = 4\n'),
        ("s.json", '{"nats_url": "nats://from-file:4222", "catalog_grpc_port": 6001, "agent_slots": 4}'),
        (
            "s.env",
            "TUNEFORGE_NATS_URL=nats://from-file:4222\nTUNEFORGE_CATALOG_GRPC_PORT=6001\nTUNEFORGE_AGENT_SLOTS=4\n",
        ),
    ],
)
def test_settings_come_from_the_file_tuneforge_config_file_names(clean_env, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    clean_env.setenv(CONFIG_FILE_ENV, str(tmp_path / name))
    settings = CatalogSettings()  # agent_slots is the trainer's: ignored here, so one file serves every service
    assert (settings.nats_url, settings.catalog_grpc_port) == ("nats://from-file:4222", 6001)
    assert settings.catalog_max_line_chars == 4000  # not in the file: the default


def test_an_environment_variable_wins_over_the_file(clean_env, tmp_path):
    (tmp_path / "s.toml").write_text('nats_url = "nats://from-file:4222"\ncatalog_grpc_port = 6001\n')
    clean_env.setenv(CONFIG_FILE_ENV, str(tmp_path / "s.toml"))
    clean_env.setenv("TUNEFORGE_CATALOG_GRPC_PORT", "7001")
    settings = CatalogSettings()
    assert (settings.nats_url, settings.catalog_grpc_port) == ("nats://from-file:4222", 7001)


def test_a_missing_or_unknown_config_file_stops_the_start_naming_the_variable(clean_env, tmp_path):
    clean_env.setenv(CONFIG_FILE_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match=r"TUNEFORGE_CONFIG_FILE=.*nope\.toml: no such file"):
        CatalogSettings()
    (tmp_path / "s.ini").write_text("[x]\n")
    clean_env.setenv(CONFIG_FILE_ENV, str(tmp_path / "s.ini"))
    with pytest.raises(ValueError, match=r"must end in one of \.toml, \.json, \.env"):
        CatalogSettings()


def test_a_wrong_type_in_the_file_names_the_setting(clean_env, tmp_path):
    (tmp_path / "s.toml").write_text('catalog_grpc_port = "many"\n')
    clean_env.setenv(CONFIG_FILE_ENV, str(tmp_path / "s.toml"))
    with pytest.raises(ValidationError, match="catalog_grpc_port"):
        CatalogSettings()


# --- links ----------------------------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_links_every_doc_and_every_relative_link_resolves():
    readme = (REPO / "README.md").read_text()
    docs = sorted(p for p in (REPO / "docs").rglob("*.md"))
    for doc in docs:
        assert f"]({doc.relative_to(REPO)})" in readme, f"README.md does not link {doc.relative_to(REPO)}"
    for page in [REPO / "README.md", *docs]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}, which is missing"
