"""The typed events and their one codec (guardian/events.py): round trips, the wire spelling, the schema."""

from __future__ import annotations

import json
import math
from importlib import resources

import msgspec
import pytest

from guardian import events as ev


def test_the_committed_schema_is_the_one_generated_from_the_types() -> None:
    committed = json.loads(resources.files("guardian").joinpath("schema/wire-v1.schema.json").read_text())
    assert committed == ev.wire_schema(), "regenerate: python -m guardian.events > guardian/schema/wire-v1.schema.json"


EVENTS = [
    ev.StartEvent(step=0, rules=["nan_loss"], source="rules.yaml", clipped=True, pre_update=True),
    ev.MetricsEvent(step=3, phase="train", epoch=0.5, values={"loss": math.nan, "grad_norm": math.inf,
                                                             "learning_rate": 2e-4, "x": -math.inf}),
    ev.MetricsEvent(step=4, phase="eval", values={"eval_loss": 1.25}),
    ev.SystemEvent(step=3, rank=1, gpus=[ev.GpuFacts(gpu=0, memory_used_bytes=1e9)]),
    ev.DecisionEvent(step=3, rule="nan_loss", severity=ev.Severity.CRITICAL,
                     actions=[ev.ActionRequest(kind=ev.ActionKind.SKIP_UPDATE)], metric="loss", value=math.nan,
                     threshold=None, onset_step=3, message="loss is NaN", evidence={"window": [1.0, "nan"]},
                     incident=1, source="local"),
    ev.ActionOutcome(skipped_update=True, lr_restored=None).event(3, ["nan_loss"], "local"),
    ev.ActionOutcome(lr_restored=ev.LrChange(from_=1e-3, to=2e-4), lr_factor=0.5, lr=1e-4, lr_scale=0.5)
    .event(5, ["manual:reduce_lr"], "command", command_ids=[7]),
    ev.CheckpointEvent(step=10, protected="/out/guardian/good/checkpoint-10"),
    ev.EndEvent(step=12, skipped_updates=1, decisions=2, verdicts={"daemon": 3}, incidents=[{"id": 1}]),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_comes_back_as_it_went_out(event: ev.AnyEvent) -> None:
    numbered = ev.numbered(event, 17, 1764000000.125)
    line = ev.encode(numbered)
    json.loads(line)  # strict JSON: no NaN literals
    back = ev.decode(line)
    assert type(back) is type(event) and back.seq == 17 and back.time == 1764000000.125
    assert line == ev.encode(back)
    assert ev.from_builtins(json.loads(line)) == back or _has_nan(back)


def _has_nan(event: ev.AnyEvent) -> bool:
    return "nan" in ev.encode(event).decode()


def test_non_finite_floats_keep_their_wire_spelling() -> None:
    line = ev.encode(EVENTS[1])
    assert json.loads(line)["values"] == {"loss": "nan", "grad_norm": "inf", "learning_rate": 2e-4, "x": "-inf"}
    back = ev.decode(line)
    assert isinstance(back, ev.MetricsEvent) and math.isnan(back.values["loss"]) and back.values["x"] == -math.inf


def test_an_outcome_with_a_null_lr_restore_keeps_the_null() -> None:
    """`lr_restored: null` means there was no schedule to go back to; it must not vanish as a default."""
    event = ev.decode(ev.encode(EVENTS[5]))
    assert isinstance(event, ev.ActionEvent) and event.lr_restored is None
    assert event.outcome == ev.ActionOutcome(skipped_update=True, lr_restored=None)
    assert "lr_restored" not in json.loads(ev.encode(ev.ActionOutcome(skipped_update=True).event(1, [])))


def test_the_action_event_carries_every_outcome_field_with_the_same_type() -> None:
    outcome = ev.ActionOutcome.__annotations__
    action = ev.ActionEvent.__annotations__
    assert {name: action.get(name) for name in outcome} == outcome


def test_an_outcome_says_what_was_done() -> None:
    assert not ev.ActionOutcome()
    assert ev.ActionOutcome().describe() == "recorded"
    assert ev.ActionOutcome(rollback="snapshot", rollback_to_step=40, rollback_seconds=0.0123,
                            skipped_update=True).describe() == \
        "rolled back to step 40 from snapshot in 12.3 ms; skipped this update"
    assert ev.ActionOutcome(stopped=True, restored="the weights of step 9").describe() == \
        "stopping training, left the weights of step 9 in place"


def test_the_kind_is_a_closed_set_told_by_type() -> None:
    assert [e.kind for e in EVENTS[:2]] == [ev.Kind.START, ev.Kind.METRICS]
    assert set(ev.KINDS) == {t.__struct_config__.tag for t in ev.EVENT_TYPES}


@pytest.mark.parametrize("line, where", [
    (b'{"kind": "metrics", "seq": 1, "step": 1, "phase": "train", "values": {"loss": "abc"}}', "$.values"),
    (b'{"kind": "metrics", "seq": 1, "step": -1, "phase": "train", "values": {}}', "$.step"),
    (b'{"kind": "metrics", "seq": 1, "step": 1, "phase": "test", "values": {}}', "$.phase"),
    (b'{"kind": "metrics", "seq": 9007199254740992, "step": 1, "phase": "train", "values": {}}', "$.seq"),
    (b'{"kind": "metrics", "seq": 1, "step": 1, "phase": "train"}', "values"),
    (b'{"kind": "nope", "seq": 1}', "$.kind"),
    (b'{"kind": "decision", "seq": 1, "step": 1}', "rule"),
    (b'{"kind": "system", "seq": 1, "gpus": [{"gpu": ""}]}', "$.gpus[0].gpu"),
])
def test_a_bad_event_is_refused_with_the_field_named(line: bytes, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"{where}".replace("$", r"\$").replace("[", r"\[")):
        ev.decode(line)


def test_lines_written_by_the_previous_version_still_read() -> None:
    """Event files from before the typed model (dicts written field by field) decode unchanged."""
    old = [
        '{"seq":1,"kind":"start","time":1764000000.1,"step":0,"rules":["nan_loss"],"source":"default.yaml",'
        '"trainable_bytes":1024,"max_steps":100,"clipped":true,"pre_update":true,"grad_norm_from":"clip"}',
        '{"seq":2,"kind":"metrics","time":1764000000.2,"step":1,"phase":"train","epoch":0.01,"lr_scale":1.0,'
        '"values":{"loss":"nan","grad_norm":1.5}}',
        '{"seq":3,"kind":"decision","time":1764000000.3,"step":1,"rule":"nan_loss","severity":"critical",'
        '"actions":[{"kind":"skip_update","params":{}}],"level":0,"metric":"loss","value":"nan","threshold":null,'
        '"onset_step":1,"message":"loss is NaN","evidence":{},"diagnosis":"","fix":"","note":"","incident":1,'
        '"source":"local"}',
        '{"seq":4,"kind":"action","time":1764000000.4,"step":1,"rules":["nan_loss"],"source":"local",'
        '"skipped_update":true}',
        '{"seq":5,"kind":"end","time":1764000000.5,"step":100,"skipped_updates":1,"rollbacks":0,"lr_cuts":0,'
        '"lr_restores":0,"stops":0,"decisions":1,"incidents":[],"lr_scale":1.0,"guardian_errors":0,'
        '"verdicts":{"daemon":0,"local_fallback":0}}',
    ]
    kinds = [type(ev.decode(line)) for line in old]
    assert kinds == [ev.StartEvent, ev.MetricsEvent, ev.DecisionEvent, ev.ActionEvent, ev.EndEvent]


def test_an_object_json_cannot_hold_is_refused_by_name_and_the_cli_can_spell_it() -> None:
    from pathlib import Path

    event = ev.CheckpointEvent(step=1, path="x")
    bad = ev.DecisionEvent(step=1, rule="r", severity=ev.Severity.INFO, actions=[], metric="loss", value=1.0,
                           threshold=None, onset_step=1, message="m", evidence={"where": Path("/tmp")}, incident=None)
    with pytest.raises(TypeError, match="cannot encode a PosixPath in an event"):
        ev.encode(bad)
    assert ev.to_builtins({"file": Path("/tmp/x"), "events": [event], "loss": math.nan}, other=str) == \
        {"file": "/tmp/x", "events": [{"kind": "checkpoint", "step": 1, "path": "x"}], "loss": "nan"}
