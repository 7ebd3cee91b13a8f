"""Configuration: every keyword and OTEL_PYTHON_EBPF_FLOWS_* variable, defaults, precedence, errors."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_ebpf_flows import Config, ConfigurationError
from otel_ebpf_flows import _config as config_module
from otel_ebpf_flows._config import load_config

# keyword -> (variable, default, a valid non-default value, its text, bad values, words the error must say)
SETTINGS = {
    "max_peers": ("OTEL_PYTHON_EBPF_FLOWS_MAX_PEERS", 200, 5, "5", [0, -1, 100_001], "1 to 100000"),
    "max_connections": (
        "OTEL_PYTHON_EBPF_FLOWS_MAX_CONNECTIONS",
        65536,
        1024,
        "1024",
        [15, 4_194_305],
        "16 to 4194304",
    ),
    "max_flows": ("OTEL_PYTHON_EBPF_FLOWS_MAX_FLOWS", 4096, 16, "16", [0, 1_048_577], "16 to 1048576"),
    "ring_buffer_bytes": (
        "OTEL_PYTHON_EBPF_FLOWS_RING_BUFFER_BYTES",
        262144,
        4096,
        "4096",
        [2048, 5000, 1 << 31],
        "power of two",
    ),
    "poll_interval": (
        "OTEL_PYTHON_EBPF_FLOWS_POLL_INTERVAL",
        0.1,
        0.5,
        "0.5",
        [0.0, 0.001, 6.0],
        "0.01 to 5",
    ),
    "sample_interval": (
        "OTEL_PYTHON_EBPF_FLOWS_SAMPLE_INTERVAL",
        5.0,
        10.0,
        "10",
        [0.05, 10.5, -1.0],
        "0.1 to 10",
    ),
    "span_enrichment": ("OTEL_PYTHON_EBPF_FLOWS_SPAN_ENRICHMENT", True, False, "false", ["maybe", "2"], "true or false"),
    "max_span_events": ("OTEL_PYTHON_EBPF_FLOWS_MAX_SPAN_EVENTS", 16, 0, "0", [-1, 1025], "0 to 1024"),
    "degraded_handshake_threshold": (
        "OTEL_PYTHON_EBPF_FLOWS_DEGRADED_HANDSHAKE_THRESHOLD",
        0.5,
        1.5,
        "1.5",
        [0.0, -1.0, 4000.0],
        "1e-06 to 3600",
    ),
    "degraded_rtt_threshold": (
        "OTEL_PYTHON_EBPF_FLOWS_DEGRADED_RTT_THRESHOLD",
        0.25,
        0.05,
        "0.05",
        [0.0, 3601.0],
        "1e-06 to 3600",
    ),
    "mode": (
        "OTEL_PYTHON_EBPF_FLOWS_MODE",
        "auto",
        "sock_diag",
        "sock_diag",
        ["bogus", "sockdiag", "ebpf,agent"],
        "one of auto, ebpf, agent, sock_diag, off",
    ),
    "sock_diag_interval": (
        "OTEL_PYTHON_EBPF_FLOWS_SOCK_DIAG_INTERVAL",
        1.0,
        0.5,
        "0.5",
        [0.0, 0.01, 61.0],
        "0.05 to 60",
    ),
    "agent_socket": (
        "OTEL_PYTHON_EBPF_FLOWS_AGENT_SOCKET",
        "/run/otel-ebpf-flows/agent.sock",
        "/tmp/agent.sock",
        "/tmp/agent.sock",
        ["agent.sock", "/" + "x" * 107, "/a\0b"],
        "an absolute path",
    ),
}
INT_SETTINGS = ["max_peers", "max_connections", "max_flows", "ring_buffer_bytes", "max_span_events"]
BOOL_SETTINGS = ["span_enrichment"]
STR_SETTINGS = ["mode", "agent_socket"]
ENV_NAMES = [var for var, *_ in SETTINGS.values()]


def test_the_settings_are_exactly_these():
    assert [f.name for f in attrs.fields(Config)] == list(SETTINGS)
    assert {getattr(config_module, c) for c in dir(config_module) if c.startswith("ENV_")} == set(ENV_NAMES)


def test_defaults():
    config = load_config({}, environ={})
    assert config == Config()
    for name, (_var, default, *_rest) in SETTINGS.items():
        assert getattr(config, name) == default, name
        assert type(getattr(config, name)) is type(default), name


def test_load_config_reads_os_environ_by_default(monkeypatch):
    for var in ENV_NAMES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTEL_PYTHON_EBPF_FLOWS_MAX_PEERS", "7")
    assert load_config({}).max_peers == 7


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_keyword_sets_its_value(name):
    _var, _default, value, _text, _bad, _accepted = SETTINGS[name]
    config = load_config({name: value}, environ={})
    assert getattr(config, name) == value
    assert attrs.evolve(config, **{name: Config().__getattribute__(name)}) == Config()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_variable_sets_its_value(name):
    var, _default, value, text, _bad, _accepted = SETTINGS[name]
    config = load_config({}, environ={var: f"  {text}\n"})
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is (
        int if name in INT_SETTINGS else bool if name in BOOL_SETTINGS else str if name in STR_SETTINGS else float)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_an_empty_variable_means_the_default(name):
    var, default, *_rest = SETTINGS[name]
    assert getattr(load_config({}, environ={var: "   "}), name) == default


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_keyword_beats_the_variable(name):
    var, default, value, text, _bad, _accepted = SETTINGS[name]
    assert getattr(load_config({name: default}, environ={var: text}), name) == default
    # even an invalid variable is not looked at when the keyword is given
    assert getattr(load_config({name: value}, environ={var: "garbage"}), name) == value


@pytest.mark.parametrize(("name", "bad"), [(n, b) for n, s in SETTINGS.items() for b in s[4]])
def test_an_invalid_keyword_value_names_keyword_value_and_what_is_accepted(name, bad):
    accepted = SETTINGS[name][5]
    with pytest.raises(ConfigurationError) as info:
        load_config({name: bad}, environ={})
    message = str(info.value)
    assert f"{name}={bad!r}" in message
    assert accepted in message
    assert "OTEL_PYTHON" not in message


@pytest.mark.parametrize(("name", "bad"), [(n, b) for n, s in SETTINGS.items() for b in s[4]])
def test_an_invalid_variable_value_names_variable_value_and_what_is_accepted(name, bad):
    var, *_rest, accepted = SETTINGS[name]
    with pytest.raises(ConfigurationError) as info:
        load_config({}, environ={var: str(bad)})
    message = str(info.value)
    assert f"{var}={bad!r}" in message
    assert accepted in message


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("text", ["abc", "1,5", "0x10", "ten", "--1"])
def test_unparsable_variable_names_variable_text_and_the_kind(name, text):
    var = SETTINGS[name][0]
    with pytest.raises(ConfigurationError) as info:
        load_config({}, environ={var: text})
    message = str(info.value)
    assert f"{var}={text!r}" in message
    kind = ("a whole number" if name in INT_SETTINGS else "true or false" if name in BOOL_SETTINGS
            else SETTINGS[name][5] if name in STR_SETTINGS else "a number")
    assert kind in message


@pytest.mark.parametrize("name", INT_SETTINGS)
@pytest.mark.parametrize("text", ["1.5", "64.0", "1e3"])
def test_whole_number_variables_reject_fractions(name, text):
    with pytest.raises(ConfigurationError, match="whole number"):
        load_config({}, environ={SETTINGS[name][0]: text})


@pytest.mark.parametrize("name", INT_SETTINGS)
@pytest.mark.parametrize("bad", [True, 4096.0, 4096.5, "4096", None])
def test_whole_number_keywords_reject_other_types(name, bad):
    with pytest.raises(ConfigurationError) as info:
        load_config({name: bad}, environ={})
    assert f"{name}={bad!r}" in str(info.value)
    assert ("a power of two" if name == "ring_buffer_bytes" else "a whole number") in str(info.value)
    assert SETTINGS[name][5] in str(info.value)


@pytest.mark.parametrize("name", ["poll_interval", "sample_interval"])
@pytest.mark.parametrize("bad", [True, "1", None, float("nan"), float("inf")])
def test_interval_keywords_reject_non_numbers(name, bad):
    with pytest.raises(ConfigurationError) as info:
        load_config({name: bad}, environ={})
    assert f"{name}={bad!r}" in str(info.value)


@pytest.mark.parametrize("name", ["poll_interval", "sample_interval"])
def test_intervals_accept_whole_numbers(name):
    assert getattr(load_config({name: 1}, environ={}), name) == 1


def test_unknown_keywords_are_rejected_listing_the_accepted_ones():
    with pytest.raises(ConfigurationError) as info:
        load_config({"max_peer": 3, "colour": "red"}, environ={})
    message = str(info.value)
    assert "colour" in message and "max_peer" in message
    for name in SETTINGS:
        assert name in message


def test_configuration_error_is_a_value_error():
    assert issubclass(ConfigurationError, ValueError)
    with pytest.raises(ValueError):
        Config(max_peers=0)


def test_config_is_frozen():
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Config().max_peers = 3  # type: ignore[misc]


# -- properties ---------------------------------------------------------------------------------

env_text = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.eE+-_ \t", max_size=12),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1_000", "٣", "0" * 5000, "1" * 5000, "1e400", "4096\x00"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), env_text))
def test_arbitrary_variables_give_a_valid_config_or_a_configuration_error(environ):
    try:
        config = load_config({}, environ=environ)
    except ConfigurationError as exc:
        assert any(var in str(exc) for var in environ)
        return
    assert attrs.evolve(config) == config  # passes every validator again
    for name in INT_SETTINGS:
        assert type(getattr(config, name)) is int
    for name in ("poll_interval", "sample_interval"):
        assert type(getattr(config, name)) is float


keyword_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(SETTINGS)), keyword_values))
def test_arbitrary_keywords_give_a_valid_config_or_a_configuration_error(kwargs):
    try:
        config = load_config(kwargs, environ={})
    except ConfigurationError as exc:
        assert any(name in str(exc) for name in kwargs)
        return
    assert attrs.evolve(config) == config
    for name, value in kwargs.items():
        assert getattr(config, name) == value
        if name in INT_SETTINGS:
            assert type(value) is int


# -- mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["auto", "EBPF", " Agent ", "sock_diag", "off"])
def test_mode_variable_takes_every_mode_in_any_case(text):
    assert load_config({}, environ={"OTEL_PYTHON_EBPF_FLOWS_MODE": text}).mode == text.strip().lower()


@pytest.mark.parametrize("bad", ["EBPF", 1, None, True, ["auto"]])
def test_mode_keyword_takes_only_the_exact_names(bad):
    with pytest.raises(ConfigurationError) as info:
        load_config({"mode": bad}, environ={})
    assert str(info.value) == f"mode={bad!r} is invalid: expected one of auto, ebpf, agent, sock_diag, off"


def test_the_modes_are_exactly_these():
    assert config_module.MODES == ("auto", "ebpf", "agent", "sock_diag", "off")
