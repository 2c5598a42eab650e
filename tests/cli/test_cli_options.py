"""`potluck` option parsing: every server option from flags, POTLUCK_* env vars or a config file; defaults in --help."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from potluck.cli.commands import sampling_kwargs
from potluck.cli.errors import UsageError
from potluck.cli.main import _log_level_everywhere, build_parser, main
from potluck.cli.serve_options import FLAG_FOR_FIELD, server_config_from_args
from potluck.cli.status import plural, render_models, render_status, snapshot_report
from potluck.server.config import ServerConfig
from potluck.swarm.node_options import NodeOptions
from potluck.swarm.records import ModelRecord, ServerState, parse_model_record
from swarm_records import rec, snap

PEER = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWQ5Zz5r1mQ1FhJzW3r9JvS9X3b8Y7Uu3k6Nq3T4ZGd9nE"
PEER2 = "/ip4/10.0.0.2/tcp/31337/p2p/12D3KooWQ5Zz5r1mQ1FhJzW3r9JvS9X3b8Y7Uu3k6Nq3T4ZGd9nE"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    _log_level_everywhere(parser)
    return parser.parse_args(argv)


def _serve_config(argv: list[str]) -> ServerConfig:
    return server_config_from_args(_parse(["serve", "m", *argv]), model="m", device="cpu")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def test_every_server_config_field_has_a_serve_option() -> None:
    dests = {a.dest for a in _subparsers(build_parser())["serve"]._actions}
    for cls in (ServerConfig, NodeOptions):
        for f in dataclasses.fields(cls):
            flag = FLAG_FOR_FIELD.get(f.name, f.name)
            if flag is not None:
                assert flag in dests, f"ServerConfig/NodeOptions.{f.name} has no `potluck serve` option"


def test_serve_options_map_one_to_one_onto_server_config() -> None:
    cfg = _serve_config(
        ["--initial-peers", PEER, PEER2, "--blocks", "2:5", "--cache-tokens", "123", "--no-direct",
         "--port", "4000", "--identity", "id.key", "--update-period", "7", "--drain-timeout", "2.5",
         "--compression", "int8", "--public-name", "box", "--adapters", "a", "b"]
    )  # fmt: skip
    assert cfg.blocks == (2, 5) and cfg.cache_tokens == 123 and cfg.direct_port is None
    assert (
        cfg.node.initial_peers == (PEER, PEER2)
        and cfg.node.port == 4000
        and cfg.node.identity_path == "id.key"
    )
    assert cfg.update_period == 7 and cfg.expiration == 14  # default expiration: 2 x update period
    assert cfg.drain_timeout == 2.5 and cfg.compression == "int8" and cfg.public_name == "box"
    assert cfg.adapters == ("a", "b")
    default = _serve_config(["--initial-peers", PEER])
    for f in dataclasses.fields(ServerConfig):  # untouched options keep ServerConfig's own defaults
        if f.name not in ("model", "node", "device", "expiration") and f.default is not dataclasses.MISSING:
            assert getattr(default, f.name) == f.default, f.name


def test_serve_options_from_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POTLUCK_CACHE_TOKENS", "777")
    monkeypatch.setenv("POTLUCK_INITIAL_PEERS", f"[{PEER}, {PEER2}]")
    monkeypatch.setenv("POTLUCK_NO_DIRECT", "true")
    monkeypatch.setenv("POTLUCK_BLOCKS", "0:3")
    monkeypatch.setenv("POTLUCK_PUBLIC_NAME", "from-env")
    cfg = _serve_config(["--public-name", "from-flag"])  # the command line wins over the environment
    assert cfg.cache_tokens == 777 and cfg.node.initial_peers == (PEER, PEER2)
    assert cfg.direct_port is None and cfg.blocks == (0, 3) and cfg.public_name == "from-flag"


def test_serve_options_from_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "server.conf"
    conf.write_text(
        f"initial-peers = [{PEER}]\ncache-tokens = 4096\nnum-blocks = 3\nbalance-quality = 0.5\n"
        "max-inference-length = 1024\npublic-name = from-file\n"
    )
    monkeypatch.setenv("POTLUCK_PUBLIC_NAME", "from-env")  # environment > config file
    cfg = _serve_config(["--config", str(conf), "--cache-tokens", "8"])  # command line > config file
    assert cfg.node.initial_peers == (PEER,) and cfg.num_blocks == 3 and cfg.balance_quality == 0.5
    assert cfg.max_inference_length == 1024 and cfg.cache_tokens == 8 and cfg.public_name == "from-env"


def test_conflicting_serve_flags_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not both"):
        _serve_config(["--initial-peers", PEER, "--blocks", "0:2", "--num-blocks", "2"])
    with pytest.raises(UsageError, match="--new-swarm"):
        _serve_config([])
    with pytest.raises(UsageError, match="drop --initial-peers"):
        _serve_config(["--new-swarm", "--initial-peers", PEER])
    assert _serve_config(["--new-swarm"]).node.initial_peers == ()


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # undo line wrapping


def test_help_describes_every_option_and_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        if name == "simulate":
            continue  # its own parser (`potluck simulate --help`)
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help.strip(), (
                    f"`potluck {name} {action.option_strings[0]}` has no help"
                )
    text = _help(capsys, "serve")
    assert "(default: 16384)" in text and "[env var: POTLUCK_CACHE_TOKENS]" in text
    assert "(default: 0.75)" in text and "(default: 0.0.0.0)" in text
    assert "(default: 32)" in _help(capsys, "generate")


def _generate_args(*argv: str) -> argparse.Namespace:
    return _parse(["generate", "m", "--initial-peers", PEER, "--prompt", "hi", *argv])


def test_sampling_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # --do-sample alone passes no top_p/top_k/temperature: generate keeps the HF defaults (it used to crash)
    assert sampling_kwargs(_generate_args("--do-sample")) == {"do_sample": True}
    assert sampling_kwargs(_generate_args("--do-sample", "--top-p", "0.9", "--temperature", "0.7")) == {
        "do_sample": True, "top_p": 0.9, "temperature": 0.7,
    }  # fmt: skip
    assert capsys.readouterr().err == ""
    assert sampling_kwargs(_generate_args("--temperature", "0.5")) == {"do_sample": False}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "potluck: warning: --temperature has no effect without --do-sample (decoding is greedy); "
        "add --do-sample to sample"
    ]
    with pytest.raises(UsageError, match="--top-p must be in"):
        sampling_kwargs(_generate_args("--do-sample", "--top-p", "1.5"))


# --- status (pure) ------------------------------------------------------------------------------------


def test_plural() -> None:
    assert [plural(n, "server") for n in (0, 1, 2)] == ["0 servers", "1 server", "2 servers"]


def test_status_counts_only_online_servers_that_answer() -> None:
    long_a, long_b, long_c = "A" * 52, "B" * 52, "C" * 52
    snapshot = snap(
        4,
        **{
            long_a: rec(0, 4, adapters=("ad1",), maddrs=("/ip4/1.2.3.4/tcp/1/p2p/x",), version="9.9"),
            long_b: rec(0, 2, state=ServerState.offline),
            long_c: rec(2, 4),
        },
    )
    report = snapshot_report(snapshot, {long_a: True, long_b: True, long_c: False})
    by_peer = {s["peer_id"]: s for s in report["servers"]}
    assert set(by_peer) == {long_a, long_b, long_c}  # full peer ids
    assert by_peer[long_a]["status"] == "online" and by_peer[long_b]["status"] == "offline"
    assert by_peer[long_c]["status"] == "dead" and by_peer[long_c]["state"] == "online"
    assert by_peer[long_a]["adapters"] == ["ad1"] and by_peer[long_a]["version"] == "9.9"
    assert by_peer[long_a]["maddrs"] == ["/ip4/1.2.3.4/tcp/1/p2p/x"]
    assert report["serving"] == 1 and report["missing_blocks"] == []
    text = render_status(report)
    assert text.splitlines()[0] == "model m: 4 blocks, 1 server online (1 offline, 1 dead)"
    json.dumps(report)  # JSON-able
    # without A, only the dead and the offline server are left: nothing is served
    report = snapshot_report(snapshot.without([long_a]), {long_b: True, long_c: False})
    assert report["serving"] == 0 and report["missing_blocks"] == [0, 1, 2, 3]
    assert render_status(report).splitlines()[-1] == "missing blocks: 0-3"
    two = snapshot_report(snap(2, a=rec(0, 2), b=rec(0, 1)), None)
    assert render_status(two).splitlines()[0] == "model m: 2 blocks, 2 servers online"


def test_models_listing_and_model_records() -> None:
    text = render_models(
        {"models": [
            {"model": "a", "name": "org/a", "num_blocks": 1, "servers": 1, "serving": 1, "missing_blocks": []},
            {"model": "b", "name": None, "num_blocks": 8, "servers": 3, "serving": 2, "missing_blocks": [6, 7]},
        ]}
    )  # fmt: skip
    assert text.splitlines()[:3] == [
        "this swarm serves 2 models:",
        "  a (org/a): 1 block, 1 server online, all blocks covered",
        "  b: 8 blocks, 2 servers online, missing blocks 6-7",
    ]
    assert render_models({"models": []}).startswith("this swarm serves no models")
    assert parse_model_record({"prefix": "x", "num_blocks": 8, "name": "org/x"}) == ModelRecord(
        prefix="x", num_blocks=8, name="org/x"
    )
    for bad in ({"prefix": "x", "num_blocks": 0}, {"prefix": "x", "num_blocks": "8"}, {"name": "x"}, "junk", None,
                {"prefix": "x", "num_blocks": 10**9}, {"prefix": "a.b", "num_blocks": 8}, {"num_blocks": 8}):  # fmt: skip
        assert parse_model_record(bad) is None


def test_what_counts_as_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from potluck.cli.checks import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("/abs/x", "./x", "../x", "~/x", "a/b/c", "models/llama"):
        assert looks_like_local_path(path), path
    for hub_id in ("gpt2", "meta-llama/Llama-3.1-8B", "nothere/llama"):
        assert not looks_like_local_path(hub_id), hub_id
