"""Property-based fuzzing of the pure validators that stand between a request and the database (issue 11).

Parameter resolution (tests/unit/test_params_fuzz.py) and the REST API as a whole (tests/rpc/test_openapi_fuzz.py)
are fuzzed elsewhere; these are the rest: dataset rows and files, custom method definitions, page tokens, upload
Content-Range headers, SSE cursors, catalog names and tags. Each takes any input and either accepts it or refuses
it with the error its callers turn into a 4xx naming the field (or the line): never another exception, which
would be a 500. Full scale (`make reliability`) draws many more examples.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import scale
from tuneforge_catalog import datasets as rules
from tuneforge_catalog.service import MAX_NAME, _check_license, _check_name, _check_tags
from tuneforge_common import methods
from tuneforge_common.errors import InvalidArgument
from tuneforge_common.paging import decode_token, encode_token
from tuneforge_gateway.errors import ApiError
from tuneforge_gateway.uploads import parse_content_range
from tuneforge_gateway.watch_hub import Position

EXAMPLES = scale(150, 3000)
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not scale(False, True), suppress_health_check=list(HealthCheck)
)

# Strings as attackers write them: metacharacters, traversal, NUL, lone surrogates, long runs, any code point.
NASTY = st.sampled_from(
    [
        "'; DROP TABLE jobs; --",
        "$(reboot)",
        "`reboot`",
        ";|&",
        "../../etc/passwd",
        "file:///etc/passwd",
        "%2e%2e%2f",
        "/etc/passwd",
        "a\0b",
        "\ud800",
        "\u202e",
        "x" * 5000,
        "",
        " ",
    ]
)
TEXT = st.text() | NASTY
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
ROW_KEYS = st.sampled_from(
    ["messages", "prompt", "completion", "chosen", "rejected", "instruction", "input", "output", "text", "question"]
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "bot"]) | TEXT, "content": JSON}
)
ROW = st.dictionaries(ROW_KEYS | TEXT, JSON | st.lists(MESSAGE, max_size=4), max_size=5)


# -- dataset rows and files --------------------------------------------------------------------------------------


@FUZZ
@given(row=ROW, fmt=st.sampled_from([*rules.FORMATS, ""]), columns=st.tuples(TEXT, TEXT))
def test_any_row_in_any_format_is_checked_into_problems_naming_fields_never_an_exception(row, fmt, columns):
    fmt = fmt or rules.detect_format(row, *columns)
    if fmt not in rules.FORMATS:  # no format detected: validate_jsonl reports the row as such
        assert fmt == ""
        return
    problems = rules.check_row(row, fmt, *columns)
    for field, message in problems:
        assert isinstance(field, str) and isinstance(message, str) and message


def jsonl_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["row", "json", "bytes", "nested", "blank"]))
    if kind == "row":
        return json.dumps(draw(ROW)).encode("utf-8", "surrogatepass")
    if kind == "json":
        return json.dumps(draw(JSON)).encode("utf-8", "surrogatepass")
    if kind == "nested":
        depth = draw(st.integers(1, 5000))
        return b"[" * depth + b"]" * draw(st.integers(0, depth))
    if kind == "blank":
        return draw(st.sampled_from([b"", b"  ", b"\r"]))
    return draw(st.binary(max_size=200)).replace(b"\n", b" ")


@st.composite
def jsonl_file(draw: st.DrawFn) -> bytes:
    lines = [jsonl_line(draw) for _ in range(draw(st.integers(0, 8)))]
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"]))
    return prefix + b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))


@FUZZ
@given(content=jsonl_file(), fmt=st.sampled_from([*rules.FORMATS, ""]), limit=st.integers(1, 4000))
def test_any_file_validates_to_a_report_whose_problems_name_real_lines(content, fmt, limit):
    lines = content.split(b"\n")
    report = rules.validate_jsonl(
        rules.read_lines(io.BytesIO(content), rules.max_line_bytes(limit)), fmt, max_line_chars=limit
    )
    body = report.to_json()
    json.dumps(body)  # what the catalog stores: plain JSON, whatever the file held
    for problem in body["problems"]:
        assert 0 <= problem["line"] <= max(len(lines), 1), problem
        assert problem["message"]
    if report.valid:
        assert report.row_count >= 1


# -- custom methods ------------------------------------------------------------------------------------------------

DEFINITION = st.fixed_dictionaries(
    {},
    optional={
        "name": TEXT,
        "display_name": JSON,
        "description": JSON,
        "training_type": st.sampled_from(methods.TRAINING_TYPES) | TEXT,
        "lifecycle": st.sampled_from(methods.LIFECYCLES) | TEXT,
        "deployment_environment": JSON,
        "stages": st.dictionaries(
            st.sampled_from([*methods.STAGES, "inference-complete", "x"]) | TEXT,
            st.fixed_dictionaries({}, optional={"file": TEXT | JSON, "env": TEXT | JSON}) | JSON,
            max_size=4,
        )
        | JSON,
        "parameters": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": TEXT,
                    "type": st.sampled_from(["int", "float", "bool", "string"]) | TEXT,
                    "default": JSON,
                    "min": JSON,
                    "max": JSON,
                    "choices": JSON,
                    "aliases": JSON,
                },
            )
            | JSON,
            max_size=3,
        )
        | JSON,
    },
)


@FUZZ
@given(definition=DEFINITION | JSON)
def test_any_method_definition_validates_to_violations_under_definition_never_an_exception(definition):
    violations = methods.validate_custom_method(definition)
    for violation in violations:
        assert violation.field == "definition" or violation.field.startswith("definition."), violation
        assert violation.description
    if not violations:
        # What a valid definition guarantees, and what registering it goes on to use.
        assert isinstance(definition["name"], str) and methods.METHOD_NAME_RE.fullmatch(definition["name"])
        file = definition["stages"]["training"]["file"]
        assert not file.startswith("/") and ".." not in PurePosixPath(file).parts
        methods.custom_method_specs(definition)


@FUZZ
@given(path=st.lists(st.sampled_from(["..", ".", "a", "b.py", "/", "~", "C:", "\\", "%2e%2e", "\0"]), min_size=1))
def test_a_stage_file_that_could_leave_the_methods_directory_is_always_refused(path):
    file = "/".join(path)
    definition = {
        "name": "fuzzed",
        "training_type": "chat",
        "lifecycle": "customized",
        "stages": {"training": {"file": file, "env": "base"}},
    }
    fields = {v.field for v in methods.validate_custom_method(definition)}
    escapes = file.startswith(("/", "~")) or "\\" in file or ".." in PurePosixPath(file).parts or "\0" in file
    if escapes:
        assert "definition.stages.training.file" in fields


# -- page tokens, Content-Range, SSE cursors -----------------------------------------------------------------------


@FUZZ
@given(token=TEXT | st.binary().map(lambda b: b.decode("latin-1")))
def test_any_page_token_decodes_to_a_position_or_is_invalid_argument_on_page_token(token):
    try:
        position = decode_token(token)
    except InvalidArgument as err:
        assert [v.field for v in err.violations] == ["page_token"]
    else:
        assert position >= 0


@FUZZ
@given(position=st.integers(0, 2**80))
def test_a_page_token_decodes_to_the_position_it_encodes(position):
    assert decode_token(encode_token(position)) == position


CONTENT_RANGE = st.one_of(
    st.none(),
    TEXT,
    st.builds(
        "bytes {}-{}/{}".format,
        st.integers(-5, 2**70),
        st.integers(-5, 2**70),
        st.integers(-5, 2**70).map(str) | st.just("*"),
    ),
)


@FUZZ
@given(header=CONTENT_RANGE)
def test_any_content_range_parses_to_an_ordered_range_or_is_a_400_naming_it(header):
    try:
        start, end, total = parse_content_range(header)
    except ApiError as err:
        assert (err.status, err.field) == (400, "Content-Range")
    else:
        assert 0 <= start <= end and (total is None or end < total)


@FUZZ
@given(cursor=TEXT | st.builds("e{}.m{}.l{}".format, st.integers(-3, 2**70), st.integers(0, 9), st.text(max_size=3)))
def test_any_last_event_id_parses_to_a_position_or_is_a_value_error(cursor):
    try:
        position = Position.parse(cursor)
    except ValueError:
        return
    assert min(position.event, position.metric, position.log) >= 0
    assert Position.parse(position.cursor) == position


# -- catalog names, licenses and tags ------------------------------------------------------------------------------


@FUZZ
@given(name=TEXT)
def test_any_name_is_kept_stripped_or_refused_naming_name(name):
    try:
        kept = _check_name(name)
    except InvalidArgument as err:
        assert [v.field for v in err.violations] == ["name"]
        assert not name.strip() or len(name.strip()) > MAX_NAME
    else:
        assert kept == name.strip() and 0 < len(kept) <= MAX_NAME  # metacharacters and all: stored verbatim


@FUZZ
@given(license=TEXT)
def test_any_license_is_kept_or_refused_naming_license(license):
    try:
        assert _check_license(license) == license.strip()
    except InvalidArgument as err:
        assert [v.field for v in err.violations] == ["license"]


@FUZZ
@given(tags=st.lists(TEXT, max_size=6))
def test_any_tags_are_kept_deduplicated_or_refused_naming_the_tag(tags):
    try:
        kept = _check_tags(tags)
    except InvalidArgument as err:
        (field,) = [v.field for v in err.violations]
        index = int(field.removeprefix("tags[").removesuffix("]"))
        assert not 1 <= len(tags[index].strip()) <= 64
    else:
        assert len(kept) == len(set(kept)) and set(kept) == {t.strip() for t in tags}


@pytest.mark.parametrize("value", ["'; DROP TABLE models; --", "$(reboot)", "`reboot`", "a;b|c&d"])
def test_metacharacters_in_free_text_are_valid_text_not_refused(value: Any):
    # The point of these validators is shape, not content: free text may say anything and is stored as given.
    assert _check_name(value) == value
    assert _check_license(value) == value
