"""The phase reporter: start lines, timed phases, bars that fit the stream (terminal or log), and
the summary of the whole command's wall time."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.app import phases as phases_module
from pipeline.app.phases import Phases, process_age_s
from pipeline.core.feedback import LineBar, TqdmBar, format_duration


class FakeStream(io.StringIO):
    """A stream that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_prints_its_start_line_and_its_done_line_with_the_time_it_took() -> None:
    stream, clock = FakeStream(tty=False), Clock()
    phases = Phases(stream, clock=clock, age_s=2.0)
    with phases.phase("broker", "starting the local Kafka broker...") as step:
        clock.now += 14.2
        step.done = "broker ready at localhost:9092"
    with phases.phase("target"):
        clock.now += 72.0
    assert stream.getvalue().splitlines() == [
        "starting the local Kafka broker...",
        "broker ready at localhost:9092 after 14 s",
        "target...",
    ]
    clock.now += 75.0  # the rest of the command, in no phase
    assert phases.summary() == "done in 2 min 43 s: broker 14 s, target 1 min 12 s"


def test_the_summary_counts_the_process_start_up_and_a_failed_phase() -> None:
    clock = Clock()
    phases = Phases(FakeStream(tty=False), clock=clock, age_s=5.0)
    try:
        with phases.phase("training"):
            clock.now += 3.0
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert phases.wall_s == 8.0
    assert phases.summary("stopped") == "stopped in 8.0 s: training 3.0 s"


def test_process_age_is_the_time_since_this_interpreter_started() -> None:
    assert 0.0 < process_age_s() < 24 * 3600


def test_off_a_terminal_a_bar_is_plain_periodic_lines_without_carriage_returns() -> None:
    stream, clock = FakeStream(tty=False), Clock()
    phases = Phases(stream, clock=clock, age_s=0.0, interval_s=30.0)
    bar = phases.bar("training", total=100, unit="step")
    assert isinstance(bar, LineBar)
    bar.update(1, loss="2.000")  # the first update prints at once
    for _ in range(9):
        clock.now += 1.0
        bar.update(1, loss="1.500")  # within the interval: silent
    clock.now += 21.0
    bar.update(1, loss="1.000")  # 30 s after the first line: one more
    bar.close()
    bar.close()  # idempotent
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("training: 1/100 steps (1%)") and "loss=2.000" in lines[0]
    assert lines[1].startswith("training: 11/100 steps (11%)") and "ETA " in lines[1] and "loss=1.000" in lines[1]
    assert len(lines) == 2  # close adds nothing: the last line already showed 11


def test_a_bar_without_a_total_counts_and_rates_without_an_eta() -> None:
    stream, clock = FakeStream(tty=False), Clock()
    bar = LineBar(stream, "training (to the end of the stream)", total=None, unit="step", clock=clock, interval_s=1.0)
    clock.now += 20.0  # waiting for the first data: not part of the rate
    bar.update(1)
    clock.now += 2.0
    bar.update(4)
    bar.close()
    assert stream.getvalue().splitlines() == [
        "training (to the end of the stream): 1 steps",
        "training (to the end of the stream): 5 steps, 2.00 steps/s",
    ]


def test_close_prints_the_final_count_when_the_last_line_is_older() -> None:
    stream, clock = FakeStream(tty=False), Clock()
    bar = LineBar(stream, "tiny target", total=200, unit="step", clock=clock, interval_s=30.0)
    for _ in range(200):
        clock.now += 0.1
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("tiny target: 200/200 steps (100%)") and "ETA" not in lines[-1]


def test_on_a_terminal_a_bar_is_tqdm_with_total_and_eta() -> None:
    stream = FakeStream(tty=True)
    bar = Phases(stream, age_s=0.0).bar("training", total=10, unit="step")
    assert isinstance(bar, TqdmBar)
    bar.update(3, loss="1.0")
    bar.close()
    out = stream.getvalue()
    assert "\r" in out and "3/10" in out and "training" in out


def test_durations_read_as_people_say_them() -> None:
    assert [format_duration(s) for s in (0.44, 14.2, 71.4, 161.0, 3 * 3600 + 125)] == [
        "0.4 s", "14 s", "1 min 11 s", "2 min 41 s", "3 h 02 min",
    ]  # fmt: skip


def test_a_watched_counter_feeds_a_bar_and_its_last_count_shows_when_the_block_ends() -> None:
    stream = FakeStream(tty=False)
    phases = Phases(stream, age_s=0.0)
    counts = {"gen-0": 0, "gen-1": 0}
    with phases.watch("generation", total=10, unit="sample", read=lambda: dict(counts), every_s=0.01):
        counts.update({"gen-0": 4, "gen-1": 3})
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("generation: 7/10 samples (70%)") and lines[-1].endswith("gen-0=4, gen-1=3"), lines


def test_jar_assembly_says_when_it_starts_and_what_it_assembled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:

    libs = tmp_path / "libs"

    def install(version: str, *, force: bool = False) -> Path:
        libs.mkdir()
        (libs / "kafka.jar").write_bytes(b"x" * 3_000_000)
        return libs

    monkeypatch.setattr(phases_module.kafka_jars, "libs_ready", lambda _libs, _version: True)  # an older install:
    monkeypatch.setattr(phases_module.kafka_jars, "tools_ready", lambda _libs, _version: False)  # no tools yet
    monkeypatch.setattr(phases_module.kafka_jars, "install", install)
    stream = FakeStream(tty=False)
    assert phases_module.assemble_jars(Phases(stream, age_s=0.0), "4.3.1", tools=False) != libs  # a broker starts as is
    assert not libs.exists() and stream.getvalue() == ""
    assert phases_module.assemble_jars(Phases(stream, age_s=0.0), "4.3.1") == libs  # `broker install` completes it
    start, done = stream.getvalue().splitlines()
    assert start == "assembling the Kafka 4.3.1 broker jars and tools from Maven Central (once)..."
    assert done.startswith(f"Kafka jars in {libs} (3 MB) after ")


def test_a_watch_closes_its_bar_when_the_work_is_finished_not_later() -> None:
    stream = FakeStream(tty=False)
    counts = {"gen-0": 0}
    with Phases(stream, age_s=0.0).watch(
        "generation", total=5, unit="sample", read=lambda: dict(counts), finished=lambda: counts["gen-0"] == 5
    ) as watch:
        counts["gen-0"] = 5
        watch.tick()  # the worker's last tick: the bar's final line is out before anything after it
        stream.write("the trainer's summary\n")
    assert stream.getvalue().splitlines()[-2:] == ["generation: 5/5 samples (100%), gen-0=5", "the trainer's summary"]
