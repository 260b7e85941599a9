"""A simulated month: rollup rows fed straight into the store, the evaluator driven by a FakeClock.

Traffic is 100 requests a minute against 99.9 % (budget: 1 bad request in 1000)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.control.domain.sloreport import budget_report
from gateway.control.jobs.evaluator import Evaluator
from gateway.control.store import Store
from tests.fakes import FakeClock
from tests.test_control_slo_support import DAY, DAY0, HOUR, MIN, add_slo, feed, make_slo
from tests.test_control_support import database_of

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("control_backend")]


class Sim:
    def __init__(self, tmp_path, start: float, **slo_kw) -> None:
        self.store = Store(database_of(tmp_path, "c.db"))
        self.clock = FakeClock(wall=start)
        self.slo = make_slo(**slo_kw)
        add_slo(self.store, self.slo)
        self.ev = Evaluator(self.store)
        self.events: list[tuple[float, str, dict]] = []

    def run(self, until: float, step: float) -> None:
        """Evaluate every `step` seconds up to and including `until`."""
        while self.clock.time() + step <= until + 1e-6:
            self.clock.advance(step)
            for e in self.ev.evaluate(self.clock.time()):
                if e.alert.get("source") != "incident":      # alert events only
                    self.events.append((self.clock.time(), e.kind, e.alert))

    def alerts(self, tier: str | None = None) -> list[dict]:
        return [a for a in reversed(self.store.alerts.slo_alerts(limit=1000))
                if tier is None or a["severity"] == tier]

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def sims(tmp_path):
    made: list[Sim] = []

    def make(start: float, **kw) -> Sim:
        sim = Sim(tmp_path / str(len(made)), start, **kw)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()


def test_full_outage_pages_within_minutes_and_opens_a_sev1(sims):
    t0 = DAY0 + 2 * DAY
    sim = sims(t0)
    feed(sim.store, t0 - 2 * DAY, 2 * 24 * 60, 100, 0)       # two healthy days
    feed(sim.store, t0, 60, 100, 100)                         # then everything fails
    sim.run(t0 + 10 * MIN, MIN)
    pages = sim.alerts("page")
    assert len(pages) == 1
    page = pages[0]
    assert page["started_at"] <= t0 + 2 * MIN                 # at the first evaluations
    assert "1h/5m" in page["details"]["fired_rules"]
    assert sim.alerts("ticket") == []                         # the page covers it
    inc = sim.store.incidents.incident(page["incident_id"])
    assert inc["affected_service"] == "svc" and inc["cause"] == "slo-availability"
    # the 5-minute error rate went past 50 % as the outage went on: SEV-1
    assert inc["severity"] == "SEV-1"
    kinds = [e["kind"] for e in sim.store.incidents.timeline(inc["id"])]
    assert kinds[:2] == ["status", "alert"] and "severity" in kinds


def test_one_percent_fires_the_6x_page_not_the_14x(sims):
    t0 = DAY0 + 2 * DAY
    sim = sims(t0)
    feed(sim.store, t0 - 2 * DAY, 2 * 24 * 60, 100, 0)
    feed(sim.store, t0, 3 * 24 * 60, 100, 1.0)                 # 1 %: burn 10
    sim.run(t0 + 2 * DAY, 5 * MIN)
    (page,) = sim.alerts("page")
    assert page["details"]["fired_rules"] == ["6h/30m"]          # never 1h/5m (10 < 14.4)
    assert page["status"] == "firing"                            # still burning: still open
    assert page["details"]["burn_rates"]["1h"] < 14.4
    # the 6h burn passes 6 once 60 % of the 6h window is at 1 %: 3 h 36 min in
    assert t0 + 3.6 * HOUR < page["started_at"] <= t0 + 3.6 * HOUR + 5 * MIN
    assert sim.alerts("ticket") == []                            # inhibited by the open page
    inc = sim.store.incidents.incident(page["incident_id"])
    assert inc["severity"] == "SEV-4"                            # 1 % errors: SEV-4
    assert len(sim.store.incidents.query(limit=100)) == 1


def test_slow_burn_raises_a_ticket_after_long_enough_and_never_a_page(sims):
    t0 = DAY0 + 10 * DAY
    sim = sims(t0)
    feed(sim.store, t0 - 10 * DAY, 10 * 24 * 60, 100, 0)        # 10 healthy days
    feed(sim.store, t0, 4 * 24 * 60, 100, 0.2)                  # then 0.2 %: burn 2
    feed(sim.store, t0 + 4 * DAY, 2 * 24 * 60, 100, 0)          # then healthy again
    sim.run(t0 + DAY, 15 * MIN)
    assert sim.alerts() == []                                    # a day in: nothing yet
    sim.run(t0 + 4 * DAY, 15 * MIN)
    assert sim.alerts("page") == []                              # burn 2 never pages
    (ticket,) = sim.alerts("ticket")
    assert ticket["details"]["fired_rules"] == ["3d/6h"]          # 2 < 3: never 1d/2h
    # the 3d burn passes 1 once half of the 3 days burned at 2x: ~1.5 days in
    assert t0 + 1.4 * DAY <= ticket["started_at"] <= t0 + 1.6 * DAY
    assert ticket["status"] == "firing"
    sim.run(t0 + 6 * DAY, 15 * MIN)
    (ticket,) = sim.alerts("ticket")                             # resolved once 6h clears
    assert ticket["status"] == "resolved"
    assert t0 + 4 * DAY + 2.5 * HOUR <= ticket["resolved_at"] <= t0 + 4 * DAY + 3.5 * HOUR
    assert sim.store.incidents.query(limit=10) == []                   # tickets open no incident


def test_a_spike_under_min_events_raises_nothing(sims):
    t0 = DAY0 + DAY
    quiet = sims(t0, min_events=100)
    feed(quiet.store, t0 + 10 * MIN, 1, 40, 40)                  # 40 requests, all failing
    quiet.run(t0 + 2 * HOUR, MIN)
    assert quiet.alerts() == [] and quiet.store.incidents.query() == []
    eager = sims(t0, min_events=10)                              # the guard is what held it
    feed(eager.store, t0 + 10 * MIN, 1, 40, 40)
    eager.run(t0 + 2 * HOUR, MIN)
    assert [a["severity"] for a in eager.alerts()][:1] == ["page"]


def test_alerts_dedup_resolve_themselves_and_respect_the_cooldown(sims):
    t0 = DAY0 + DAY
    sim = sims(t0, cooldown_s=3600)
    feed(sim.store, t0 - DAY, 24 * 60 + 6 * 60, 100, 0)
    feed(sim.store, t0, 20, 100, 100)                            # 20-minute outage (in place)
    sim.run(t0 + 20 * MIN, MIN)
    for _ in range(3):                                           # re-evaluating changes nothing
        sim.ev.evaluate(sim.clock.time())
    assert [(k, a["severity"]) for _t, k, a in sim.events] == [("firing", "page")]
    (page,) = sim.alerts("page")
    sim.run(t0 + 2 * HOUR, MIN)
    (page,) = sim.alerts("page")
    assert page["status"] == "resolved"
    # resolved once every short window (5m and 30m) is back under its threshold
    assert t0 + 20 * MIN < page["resolved_at"] <= t0 + 55 * MIN
    assert [(k, a["severity"]) for _t, k, a in sim.events][:2] == [("firing", "page"),
                                                                   ("resolved", "page")]
    # (the budget spent stays over the ticket rule's 1d/2h threshold for a while after the page
    # clears, so a ticket follows: pages and tickets are separate alerts, as in the workbook)
    assert {a["severity"] for _t, _k, a in sim.events} == {"page", "ticket"}
    # a second outage inside the cooldown (1 h after the resolution) raises nothing ...
    t1 = page["resolved_at"] + 20 * MIN
    from gateway.control.domain import rollup
    with sim.store.transaction():                                # turn those minutes into errors
        sim.store.rollups.add_buckets([(w, rollup.bucket_start(t1 + i * MIN, w), "svc", "*", 0, 0, 100,
                                0, 0, 0, 0.0, 0.0, 0, 0)
                               for i in range(5) for w in rollup.WINDOWS.values()])
    sim.run(t0 + 2 * HOUR + 30 * MIN, MIN)
    assert len(sim.alerts("page")) == 1
    # ... but once the cooldown has passed, a new outage pages again (a new alert)
    t2 = sim.clock.time() + 5 * MIN
    assert t2 - page["resolved_at"] > HOUR
    feed(sim.store, t2, 30, 0, 100)
    sim.run(t2 + 10 * MIN, MIN)
    pages = sim.alerts("page")
    assert len(pages) == 2 and pages[1]["status"] == "firing"
    # the same incident? The first one is still open (nobody resolved it): it is joined
    assert pages[1]["incident_id"] == pages[0]["incident_id"]


def test_calendar_month_budget_resets_at_midnight_in_its_time_zone(tmp_path):
    store = Store(database_of(tmp_path, "c.db"))
    berlin = make_slo(name="berlin", window="month", timezone="Europe/Berlin")
    utc = make_slo(name="utc", window="month")
    for s in (berlin, utc):
        add_slo(store, s)
    jan = datetime(2024, 1, 1, tzinfo=UTC).timestamp() - HOUR   # Jan 1 00:00 Berlin (CET)
    feed(store, jan, 31 * 24 * 60 + 2 * 60, 100, 0)
    # Jan 31, 23:30-23:40 Berlin = 22:30-22:40 UTC: 1000 bad requests
    bad_at = datetime(2024, 1, 31, 22, 30, tzinfo=UTC).timestamp()
    feed(store, bad_at, 10, 0, 100)
    before = datetime(2024, 1, 31, 22, 50, tzinfo=UTC).timestamp()   # 23:50 Berlin
    after = datetime(2024, 1, 31, 23, 10, tzinfo=UTC).timestamp()    # Feb 1, 00:10 Berlin
    b = budget_report(store, berlin, before)
    month_events = (31 * 24 * 60 - 70) * 100          # Dec 31 23:00 UTC to Jan 31 22:50 UTC
    assert b["events"] == {"total": month_events, "bad": 1000, "good": month_events - 1000}
    assert b["remaining_fraction"] == pytest.approx(1 - 1000 / (month_events * 0.001))
    assert b["window"]["since"] == jan
    b = budget_report(store, berlin, after)                          # a new month in Berlin
    assert b["events"] == {"total": 10 * 100, "bad": 0, "good": 1000}
    assert b["remaining_fraction"] == 1.0
    assert b["window"]["since"] == datetime(2024, 1, 31, 23, tzinfo=UTC).timestamp()
    assert b["window"]["seconds"] == 29 * DAY                        # February 2024 (leap)
    u = budget_report(store, utc, after)                             # still January in UTC
    assert u["events"]["bad"] == 1000 and u["remaining_fraction"] < 0.97
    store.close()


@pytest.mark.timeout(180)      # ~10 s on SQLite, ~30 s on PostgreSQL (a round trip a statement)
def test_a_simulated_month(tmp_path):
    """30 days, evaluated every 10 minutes: a quiet week, a 15-minute outage (page, incident,
    auto-resolve), a slow 0.2 % leak for three days (ticket), recovery; the 30-day budget at
    the end is what the errors cost, computed by hand."""
    start = DAY0
    sim = Sim(tmp_path, start, window="30d", cooldown_s=1800)
    feed(sim.store, start - 30 * DAY, 30 * 24 * 60, 100, 0)     # a healthy month before
    outage = start + 7 * DAY + 3 * HOUR
    leak = start + 14 * DAY
    feed(sim.store, start, 7 * 24 * 60 + 3 * 60, 100, 0)
    feed(sim.store, outage, 15, 100, 100)
    feed(sim.store, outage + 15 * MIN, (leak - outage) // MIN - 15, 100, 0)
    feed(sim.store, leak, 3 * 24 * 60, 100, 0.2)
    feed(sim.store, leak + 3 * DAY, 13 * 24 * 60, 100, 0)
    sim.run(start + 30 * DAY, 10 * MIN)
    got = [(a["severity"], a["status"]) for a in sim.alerts()]
    # the outage pages; once the page clears, the budget it spent (35 % of the month's) keeps
    # the 1d/2h ticket rule over 3 for a while: one ticket; the leak: a second ticket
    assert got == [("page", "resolved"), ("ticket", "resolved"), ("ticket", "resolved")]
    page, after_page, ticket = sim.alerts()
    assert "1d/2h" in after_page["details"]["fired_rules"]
    assert ticket["details"]["fired_rules"] == ["3d/6h"]
    assert outage < page["started_at"] <= outage + 10 * MIN
    assert page["resolved_at"] <= outage + 15 * MIN + HOUR
    assert leak + DAY < ticket["started_at"] < leak + 2 * DAY
    assert ticket["resolved_at"] < leak + 3 * DAY + 6 * HOUR
    (inc,) = sim.store.incidents.query(limit=10)
    assert inc["id"].startswith("INC-2023-") and inc["severity"] == "SEV-1"
    assert inc["escalation_level"] >= 1                  # nobody acknowledged it in 15 minutes
    b = budget_report(sim.store, sim.slo, sim.clock.time())
    bad = 15 * 100 + 3 * 24 * 60 * 0.2
    assert b["events"]["bad"] == bad and b["events"]["total"] == 30 * 24 * 60 * 100
    assert b["remaining_fraction"] == pytest.approx(1 - bad / (30 * 24 * 60 * 100 * 0.001))
    sim.close()
