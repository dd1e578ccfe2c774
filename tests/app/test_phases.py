"""The phase reporter: start lines, timed phases, bars that fit the stream (terminal or log), and
the summary of the whole command's wall time."""

from __future__ import annotations

import io

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
    bar = LineBar(stream, "training (to the end of the stream)", total=None, unit="step", clock=clock)
    clock.now += 2.0
    bar.update(4)
    bar.close()
    (line,) = stream.getvalue().splitlines()
    assert line == "training (to the end of the stream): 4 steps, 2.00 steps/s"


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
