"""watch: IMDSv2 polling against a loopback server that serves the documented notice documents."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest

import spotforge_agent as agent

ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


class FakeImds:
    """IMDSv2 on 127.0.0.1: PUT a token first; GETs without a valid token get 401."""

    def __init__(self) -> None:
        self.documents: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.hang = False
        self.release = threading.Event()
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if imds.hang:
                    imds.release.wait(5)
                    return
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._reply(400)
                    return
                imds.token_requests += 1
                token = f"token-{imds.token_requests}"
                imds.tokens.add(token)
                self._reply(200, token)

            def do_GET(self) -> None:
                if imds.hang:
                    imds.release.wait(5)
                    return
                if self.headers.get("X-aws-ec2-metadata-token") not in imds.tokens:
                    self._reply(401)
                    return
                body = imds.documents.get(self.path)
                if body is None:
                    self._reply(404, "Not Found")
                else:
                    self._reply(200, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds_server():
    server = FakeImds()
    yield server
    server.close()


class RecordingEvents:
    """An EventBridge client that keeps every entry (optionally also sending it to moto)."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.entries: list[dict] = []

    def put_events(self, Entries):
        self.entries.extend(Entries)
        if self.inner is not None:
            return self.inner.put_events(Entries=Entries)
        return {"FailedEntryCount": 0, "Entries": [{"EventId": str(i)} for i, _ in enumerate(Entries)]}


class TagStore:
    """The two EC2 tag calls the agent makes, on a dict (moto EC2 costs ~1 s per test to start)."""

    def __init__(self) -> None:
        self.tags: dict[tuple[str, str], str] = {}

    def describe_tags(self, Filters):
        wanted = {f["Name"]: set(f["Values"]) for f in Filters}
        found = [
            {"ResourceId": rid, "Key": key, "Value": value, "ResourceType": "instance"}
            for (rid, key), value in self.tags.items()
            if rid in wanted.get("resource-id", {rid}) and key in wanted.get("key", {key})
        ]
        return {"Tags": found}

    def create_tags(self, Resources, Tags):
        for rid in Resources:
            for tag in Tags:
                self.tags[(rid, tag["Key"])] = tag["Value"]


def _make_ctx(tmp_path, s3, platform, h, imds_server, ec2, events) -> agent.Context:
    action = json.loads((h.FIXTURES / "imds-spot-instance-action.json").read_text())
    # start the virtual clock two minutes before the documented action time
    clock = h.FakeClock(agent.parse_time(action["time"]) - dt.timedelta(seconds=120))
    return agent.Context(
        settings=h.make_settings(tmp_path, imds_url=imds_server.url),
        s3=s3,
        platform=platform,
        clock=clock,
        ec2=ec2,
        events=events,
    )


@pytest.fixture
def watch_ctx(tmp_path, s3, platform, h, imds_server):
    return _make_ctx(tmp_path, s3, platform, h, imds_server, TagStore(), RecordingEvents())


def test_signal_calls_are_accepted_by_moto_ec2_and_eventbridge(tmp_path, s3, platform, h, imds_server):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    # moto does not check the AMI; listing its catalogue would cost seconds
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t4g.small")
    platform.instance_id = instance["Instances"][0]["InstanceId"]
    events = RecordingEvents(boto3.client("events", region_name="us-east-1"))
    ctx = _make_ctx(tmp_path, s3, platform, h, imds_server, ec2, events)
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    state = agent.watch(ctx, _imds(ctx), max_polls=2)
    assert state.signaled and state.last_error == ""
    # the warning came two minutes before the action time IMDS shows
    assert _tags(ctx)["spotforge:interruption"] == "2017-09-18T08:20:00Z"
    assert len(events.entries) == 1


def _imds(ctx, timeout_s: float = 2.0) -> agent.ImdsClient:
    return agent.ImdsClient(ctx.settings.imds_url, ctx.clock, timeout_s=timeout_s)


def _tags(ctx) -> dict[str, str]:
    instance_id = ctx.platform.instance_id
    found = ctx.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])["Tags"]
    return {t["Key"]: t["Value"] for t in found}


def test_the_fake_imds_refuses_requests_without_a_token(imds_server):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(imds_server.url + ACTION_PATH, timeout=2)
    assert info.value.code == 401


def test_quiet_node_polls_every_five_seconds_and_changes_nothing(watch_ctx, imds_server):
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=4)
    assert state.polls == 4 and state.interruption is None and state.imds_errors == 0
    assert watch_ctx.clock.sleeps == [5.0, 5.0, 5.0]
    assert watch_ctx.events.entries == []
    assert "spotforge:interruption" not in _tags(watch_ctx)
    assert imds_server.token_requests == 1  # one token reused for every poll


def test_instance_action_tags_the_instance_and_signals_once(watch_ctx, imds_server, h, data_tree):
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=3)
    assert state.signaled and not state.self_drained
    assert _tags(watch_ctx)["spotforge:interruption"] == "2017-09-18T08:20:00Z"
    assert len(watch_ctx.events.entries) == 1
    entry = watch_ctx.events.entries[0]
    assert entry["Source"] == "spotforge.node" and entry["DetailType"] == "Spot Interruption Signal"
    assert json.loads(entry["Detail"]) == {
        "instance-id": watch_ctx.platform.instance_id,
        "instance-action": "terminate",
        "time": "2017-09-18T08:22:00Z",
    }
    # a restarted watcher remembers it already signalled
    agent.watch(watch_ctx, _imds(watch_ctx), max_polls=1)
    assert len(watch_ctx.events.entries) == 1


def test_an_interruption_tag_written_first_by_the_controller_is_kept(watch_ctx, imds_server, h, data_tree):
    watch_ctx.ec2.create_tags(
        Resources=[watch_ctx.platform.instance_id],
        Tags=[{"Key": "spotforge:interruption", "Value": "2017-09-18T08:20:01Z"}],
    )
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    agent.watch(watch_ctx, _imds(watch_ctx), max_polls=1)
    assert _tags(watch_ctx)["spotforge:interruption"] == "2017-09-18T08:20:01Z"


def test_node_drains_itself_when_no_drain_came_25_seconds_before_the_action(
    watch_ctx, imds_server, h, data_tree
):
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    # 120 s before the action; the self-drain is due at 95 s, i.e. on the 20th poll
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=25)
    assert state.self_drained
    assert not watch_ctx.platform.mounted
    assert watch_ctx.platform.calls.count("stop_workloads") == 1
    assert watch_ctx.platform.phase_tags == ["drained"]
    assert agent.status(watch_ctx)["phase"] == "drained"
    elapsed = (watch_ctx.clock.now() - agent.parse_time("2017-09-18T08:20:00Z")).total_seconds()
    assert elapsed <= 120
    assert h.s3_keys(watch_ctx.s3, "backups/index/")


def test_no_self_drain_when_the_controller_already_drained_the_node(watch_ctx, imds_server, h, data_tree):
    agent.drain(watch_ctx, 25)
    calls = list(watch_ctx.platform.calls)
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=25)
    assert not state.self_drained
    assert watch_ctx.platform.calls == calls


def test_rebalance_recommendation_takes_one_backup_per_notice(watch_ctx, imds_server, h, data_tree):
    imds_server.documents[REBALANCE_PATH] = (h.FIXTURES / "imds-rebalance-recommendation.json").read_text()
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=3)
    assert state.rebalance_backups == 1
    assert len(h.s3_keys(watch_ctx.s3, "backups/index/")) == 1
    assert watch_ctx.events.entries == []


def test_imds_timeouts_are_logged_and_polling_goes_on(watch_ctx, imds_server, h, data_tree):
    imds_server.hang = True
    state = agent.watch(watch_ctx, _imds(watch_ctx, timeout_s=0.1), max_polls=2)
    assert state.imds_errors == 2 and "IMDS" in state.last_error
    imds_server.hang = False
    imds_server.documents[ACTION_PATH] = (h.FIXTURES / "imds-spot-instance-action.json").read_text()
    state = agent.watch(watch_ctx, _imds(watch_ctx), max_polls=1)
    assert state.signaled and state.imds_errors == 0


def test_a_revoked_token_is_replaced_once_and_the_poll_succeeds(watch_ctx, imds_server):
    client = _imds(watch_ctx)
    assert client.get("meta-data/spot/instance-action") is None
    imds_server.tokens.clear()
    assert client.get("meta-data/spot/instance-action") is None
    assert imds_server.token_requests == 2


def test_token_is_renewed_before_its_ttl_runs_out(watch_ctx, imds_server):
    client = _imds(watch_ctx)
    client.get("meta-data/spot/instance-action")
    watch_ctx.clock.advance(agent.ImdsClient.TOKEN_TTL_S)
    client.get("meta-data/spot/instance-action")
    assert imds_server.token_requests == 2


def test_imds_timeout_on_the_cli_is_one_line_and_non_zero(watch_ctx, imds_server, monkeypatch, capsys):
    imds_server.hang = True
    platform = agent.LinuxPlatform(agent.ImdsClient(imds_server.url, watch_ctx.clock, timeout_s=0.1))
    ctx = agent.Context(
        settings=watch_ctx.settings, s3=watch_ctx.s3, platform=platform, clock=watch_ctx.clock
    )
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    code = agent.main(["set-phase", "standby"], env={})
    err = capsys.readouterr().err.strip().splitlines()
    assert code == agent.ImdsError.exit_code
    assert len(err) == 1 and err[0].startswith("spotforge-agent: set-phase: IMDS PUT")


def test_warning_time_is_two_minutes_before_the_action_but_never_after_it_was_seen():
    seen = dt.datetime(2026, 11, 20, 8, 21, 0, tzinfo=dt.UTC)
    assert agent.warning_time("2026-11-20T08:22:00Z", seen) == dt.datetime(2026, 11, 20, 8, 20, tzinfo=dt.UTC)
    early = dt.datetime(2026, 11, 20, 8, 19, 0, tzinfo=dt.UTC)
    assert agent.warning_time("2026-11-20T08:22:00Z", early) == early
    assert agent.warning_time("", seen) == seen
