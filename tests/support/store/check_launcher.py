#!/usr/bin/env python3
"""Self-check of nx_launcher.py with pymongo (see requirements.txt).

Starts the launcher on a free loopback port in a temporary directory and checks
the change-event shapes and types, database-level streams with $match, waiting
on idle streams, cluster-level streams (client.watch(): order across
databases, $match on ns.db, resume tokens, waiting, new and dropped databases,
--refuse-cluster-streams), resume tokens, and resuming after a SIGKILL and
restart on the same data dir. Prints a few measured figures.
Exits non-zero on the first failure.

    python check_launcher.py [--quick]
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

from bson import ObjectId, Timestamp
from pymongo import MongoClient
from pymongo.errors import OperationFailure

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "nx_launcher.py")

INSERT_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "fullDocument", "ns",
               "documentKey"}
UPDATE_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "ns", "documentKey",
               "updateDescription"}
REPLACE_KEYS = INSERT_KEYS
DELETE_KEYS = {"_id", "operationType", "clusterTime", "wallTime", "ns", "documentKey"}


class CheckFailed(Exception):
    pass


def check(cond, what, detail=None):
    if not cond:
        raise CheckFailed(what + ("" if detail is None else f": {detail!r}"))
    print(f"  ok  {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHED: list["Launcher"] = []


class Launcher:
    def __init__(self, data_dir, port, *extra):
        LAUNCHED.append(self)
        self.port = port
        self.pid_file = os.path.join(data_dir, "..", f"nx-{port}.pid")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, LAUNCHER, "--data-dir", data_dir, "--host", "127.0.0.1",
             "-p", str(port), "--pid-file", self.pid_file, *extra],
            stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        line = self.proc.stdout.readline()
        self.startup = time.monotonic() - t0
        if "ready" not in line:
            self.proc.kill()
            raise CheckFailed(f"launcher did not report ready: {line!r}")
        self.uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)


def next_event(stream, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = stream.try_next()
        if ev is not None:
            return ev
    raise CheckFailed("no change event within %.1fs" % timeout)


def check_common(ev, op, db, coll):
    check(ev["operationType"] == op, f"{op}: operationType", ev["operationType"])
    check(isinstance(ev["_id"], dict) and isinstance(ev["_id"].get("_data"), str),
          f"{op}: _id is a resume token {{_data: str}}", ev["_id"])
    check(isinstance(ev["clusterTime"], Timestamp), f"{op}: clusterTime is a Timestamp",
          type(ev["clusterTime"]))
    check(isinstance(ev["wallTime"], datetime), f"{op}: wallTime is a datetime",
          type(ev["wallTime"]))
    check(ev["ns"] == {"db": db, "coll": coll}, f"{op}: ns", ev["ns"])


def section(title):
    print(f"\n== {title}")


def run_shapes(client, db_name):
    db = client[db_name]
    col = db.entries
    section("event shapes (collection stream, default fullDocument)")
    stream = col.watch(max_await_time_ms=300)
    when = datetime(2024, 5, 6, 7, 8, 9, 123000)
    res = col.insert_one({"identifier": "e1", "sgv": 120, "date": when, "isValid": True,
                          "srvCreated": 1700000000000, "srvModified": 1700000000000})
    oid = res.inserted_id
    ev = next_event(stream)
    check_common(ev, "insert", db_name, "entries")
    check(set(ev) == INSERT_KEYS, "insert: exact keys", sorted(ev))
    fd = ev["fullDocument"]
    check(isinstance(fd["_id"], ObjectId) and fd["_id"] == oid, "insert: fullDocument._id ObjectId")
    check(list(fd)[0] == "_id", "insert: _id is the first field", list(fd))
    check(fd["date"] == when and isinstance(fd["date"], datetime), "insert: date is a datetime")
    check(fd["isValid"] is True, "insert: bool stays bool", fd["isValid"])
    check(type(fd["sgv"]) is int and fd["sgv"] == 120, "insert: int stays int")
    check(isinstance(fd["srvModified"], int) and fd["srvModified"] == 1700000000000,
          "insert: large int stays int")
    check(ev["documentKey"] == {"_id": oid}, "insert: documentKey {_id}", ev["documentKey"])

    later = datetime(2024, 5, 6, 8, 0, 0, 5000)
    col.update_one({"_id": oid}, {"$set": {"isValid": False, "srvModified": 1700000000500,
                                           "at": later},
                                  "$unset": {"sgv": ""}})
    ev = next_event(stream)
    check_common(ev, "update", db_name, "entries")
    check(set(ev) == UPDATE_KEYS, "update: exact keys (no fullDocument without updateLookup)",
          sorted(ev))
    ud = ev["updateDescription"]
    check(ud["updatedFields"] == {"isValid": False, "srvModified": 1700000000500, "at": later},
          "update: updatedFields", ud["updatedFields"])
    check(ud["updatedFields"]["isValid"] is False, "update: $set false is a bool")
    check(isinstance(ud["updatedFields"]["at"], datetime), "update: $set date is a datetime")
    check(ud["removedFields"] == ["sgv"], "update: removedFields", ud["removedFields"])
    check(ud["truncatedArrays"] == [], "update: truncatedArrays []")
    stored = col.find_one({"_id": oid})
    check(stored["isValid"] is False, "find: $set false reads back as False", stored["isValid"])
    check(stored["at"] == later, "find: $set date reads back as datetime", stored["at"])
    check(col.count_documents({"isValid": False}) == 1, "find: {isValid: false} matches")

    col.update_one({"_id": oid}, {"$set": {"isValid": False}})  # no-op: no event
    col.replace_one({"_id": oid}, {"identifier": "e1", "sgv": 130, "srvModified": 1700000001000})
    ev = next_event(stream)
    check_common(ev, "replace", db_name, "entries")
    check(set(ev) == REPLACE_KEYS, "replace: exact keys", sorted(ev))
    check(ev["fullDocument"] == {"_id": oid, "identifier": "e1", "sgv": 130,
                                 "srvModified": 1700000001000},
          "replace: fullDocument is the new document", ev["fullDocument"])
    check(ev["documentKey"] == {"_id": oid}, "replace: documentKey")

    res = col.replace_one({"$or": [{"identifier": "up1"}, {"_id": ObjectId()}]},
                          {"identifier": "up1", "srvModified": 5}, upsert=True)
    up_id = res.upserted_id
    check(isinstance(up_id, ObjectId), "upsert (replace) inserted a document", up_id)
    ev = next_event(stream)
    check_common(ev, "insert", db_name, "entries")
    check(ev["documentKey"] == {"_id": up_id} and ev["fullDocument"]["identifier"] == "up1",
          "upsert that inserts is an insert event", ev)
    col.replace_one({"identifier": "up1"}, {"identifier": "up1", "srvModified": 6}, upsert=True)
    ev = next_event(stream)
    check(ev["operationType"] == "replace" and ev["fullDocument"]["srvModified"] == 6
          and ev["documentKey"] == {"_id": up_id}, "upsert that replaces is a replace event", ev)

    col.delete_one({"_id": oid})
    ev = next_event(stream)
    check_common(ev, "delete", db_name, "entries")
    check(set(ev) == DELETE_KEYS, "delete: exact keys (no fullDocument)", sorted(ev))
    check(ev["documentKey"] == {"_id": oid}, "delete: documentKey")

    ids = col.insert_many([{"n": i} for i in range(5)]).inserted_ids
    got = [next_event(stream) for _ in ids]
    check([e["documentKey"]["_id"] for e in got] == ids, "insert_many: one insert event each, in order")
    stream.close()


def run_db_stream(client, db_name):
    section("database-level stream, $match, updateLookup, resumeAfter")
    db = client[db_name]
    pipeline = [{"$match": {"ns.coll": {"$in": ["entries", "treatments"]},
                            "operationType": {"$in": ["insert", "update", "replace", "delete"]}}}]
    stream = db.watch(pipeline, full_document="updateLookup", max_await_time_ms=300)
    t_id = db.treatments.insert_one({"eventType": "Note", "srvModified": 1}).inserted_id
    db.food.insert_one({"x": 1})  # filtered out by ns.coll
    db.treatments.update_one({"_id": t_id}, {"$set": {"notes": "hi", "srvModified": 2}})
    e_id = db.entries.insert_one({"sgv": 99}).inserted_id
    ev1 = next_event(stream)
    check(ev1["operationType"] == "insert" and ev1["ns"] == {"db": db_name, "coll": "treatments"},
          "db stream: insert on treatments", ev1)
    ev2 = next_event(stream)
    check(ev2["operationType"] == "update", "db stream: food filtered out, update next", ev2)
    check(ev2["fullDocument"] == {"_id": t_id, "eventType": "Note", "srvModified": 2,
                                  "notes": "hi"}, "updateLookup: current document",
          ev2.get("fullDocument"))
    ev3 = next_event(stream)
    check(ev3["ns"]["coll"] == "entries" and ev3["documentKey"] == {"_id": e_id},
          "db stream: insert on entries", ev3)
    db.treatments.update_one({"_id": t_id}, {"$set": {"notes": "bye"}})
    db.treatments.delete_one({"_id": t_id})
    ev4 = next_event(stream)
    check(ev4["operationType"] == "update" and ev4["fullDocument"] is None,
          "updateLookup of a deleted document gives fullDocument null", ev4)
    ev5 = next_event(stream)
    check(ev5["operationType"] == "delete" and "fullDocument" not in ev5, "db stream: delete")
    stream.close()

    resumed = db.watch(pipeline, resume_after=ev2["_id"], max_await_time_ms=300)
    r = [next_event(resumed) for _ in range(3)]
    check([e["_id"] for e in r] == [ev3["_id"], ev4["_id"], ev5["_id"]],
          "resumeAfter resumes exactly after the token's event")
    resumed.close()
    started = db.watch(pipeline, start_after=ev4["_id"], max_await_time_ms=300)
    check(next_event(started)["_id"] == ev5["_id"], "startAfter resumes exactly after the event")
    started.close()

    other = client[db_name + "_other"]
    other.c.insert_one({"x": 1})
    try:
        s = other.watch(resume_after=ev2["_id"])
        s.try_next()
        raise CheckFailed("a token from another database was accepted")
    except OperationFailure as exc:
        check(exc.code == 286, "token from another database: error 286", exc.code)
    try:
        s = db.watch(resume_after={"_data": "not-a-token"})
        s.try_next()
        raise CheckFailed("a garbage token was accepted")
    except OperationFailure as exc:
        check(exc.code in (260, 286), "garbage token: error", exc.code)

    section("drop")
    cs = db.food.watch(max_await_time_ms=300)
    ds = db.watch(max_await_time_ms=300)
    db.food.drop()
    ev = next_event(cs)
    check(ev["operationType"] == "drop", "collection stream: drop event", ev)
    ev = next_event(cs)
    check(ev["operationType"] == "invalidate", "collection stream: then invalidate", ev)
    check(not cs.alive, "collection stream closed after invalidate")
    ev = next_event(ds)
    check(ev["operationType"] == "drop" and ev["ns"] == {"db": db_name, "coll": "food"},
          "db stream: drop event", ev)
    ds.close()


def collect(stream, n, timeout=5.0):
    return [next_event(stream, timeout) for _ in range(n)]


def run_cluster(client):
    section("cluster-level stream (client.watch())")
    a, b = client.cla, client.clb
    a.pre.insert_one({"x": 0})  # both databases exist before the stream opens
    b.pre.insert_one({"x": 0})
    stream = client.watch(full_document="updateLookup",
                          full_document_before_change="whenAvailable", max_await_time_ms=300)
    only_b = client.watch([{"$match": {
        "ns.db": {"$in": ["clb"]}, "ns.coll": {"$in": ["e"]},
        "operationType": {"$in": ["insert", "update", "replace", "delete"]}}}],
        max_await_time_ms=300)
    a.e.insert_one({"_id": 1, "v": 1})
    b.e.insert_one({"_id": 1, "v": 1})
    b.e.update_one({"_id": 1}, {"$set": {"v": 2}})
    a.e.replace_one({"_id": 1}, {"v": 5})
    a.t.insert_many([{"_id": i} for i in range(3)])
    b.e.delete_one({"_id": 1})
    a.e.update_one({"_id": 1}, {"$set": {"w": 1}})
    b.f.insert_one({"_id": 9})
    want = [("insert", "cla", "e"), ("insert", "clb", "e"), ("update", "clb", "e"),
            ("replace", "cla", "e"), ("insert", "cla", "t"), ("insert", "cla", "t"),
            ("insert", "cla", "t"), ("delete", "clb", "e"), ("update", "cla", "e"),
            ("insert", "clb", "f")]
    evs = collect(stream, len(want))
    check([(e["operationType"], e["ns"]["db"], e["ns"]["coll"]) for e in evs] == want,
          "cluster stream: both databases' events in write order with their ns",
          [(e["operationType"], e["ns"]) for e in evs])
    for ev, (op, db, coll) in zip(evs[:4], want):
        check_common(ev, op, db, coll)
    check(evs[2]["updateDescription"]["updatedFields"] == {"v": 2}
          and evs[2]["fullDocument"] is None
          and evs[2]["fullDocumentBeforeChange"] == {"_id": 1, "v": 1},
          "cluster update: updateDescription, updateLookup (deleted since: null), pre-image",
          evs[2])
    check(evs[3]["fullDocument"] == {"_id": 1, "v": 5}
          and evs[3]["fullDocumentBeforeChange"] == {"_id": 1, "v": 1},
          "cluster replace: fullDocument and pre-image", evs[3])
    check(evs[8]["fullDocument"] == {"_id": 1, "v": 5, "w": 1},
          "cluster update: updateLookup gives the current document", evs[8])
    check(evs[7]["documentKey"] == {"_id": 1} and "fullDocument" not in evs[7],
          "cluster delete: documentKey only", evs[7])
    datas = [e["_id"]["_data"] for e in evs]
    check(all(x < y for x, y in zip(datas, datas[1:])),
          "cluster tokens increase in stream order compared as strings", datas)
    times = [e["clusterTime"] for e in evs]
    check(all(x < y for x, y in zip(times, times[1:])), "cluster clusterTime increases")
    check(stream.resume_token["_data"] >= datas[-1], "postBatchResumeToken >= last event",
          stream.resume_token)

    got = collect(only_b, 3)
    check([e["_id"] for e in got] == [evs[1]["_id"], evs[2]["_id"], evs[7]["_id"]],
          "$match on ns.db/ns.coll/operationType: only clb.e, same tokens",
          [(e["operationType"], e["ns"]) for e in got])
    check(only_b.try_next() is None, "$match stream: nothing else")
    only_b.close()

    resumed = client.watch(resume_after=evs[3]["_id"], max_await_time_ms=300)
    rest = collect(resumed, len(evs) - 4)
    check([e["_id"] for e in rest] == [e["_id"] for e in evs[4:]],
          "resumeAfter a cluster token mid-way: exactly the rest")
    check(resumed.try_next() is None, "resumeAfter: nothing after the rest")
    resumed.close()
    started = client.watch(start_after=evs[8]["_id"], max_await_time_ms=300)
    check(next_event(started)["_id"] == evs[9]["_id"], "startAfter a cluster token")
    started.close()
    at = client.watch(start_at_operation_time=evs[8]["clusterTime"], max_await_time_ms=300)
    check([e["_id"] for e in collect(at, 2)] == [evs[8]["_id"], evs[9]["_id"]],
          "startAtOperationTime: from the event with that clusterTime on")
    at.close()
    per_db = client.cla.watch(resume_after=evs[3]["_id"], max_await_time_ms=300)
    got = collect(per_db, 4)
    check([(e["operationType"], e["ns"]["coll"]) for e in got]
          == [("insert", "t")] * 3 + [("update", "e")],
          "a database stream resumes from a cluster token (that database's rest)",
          [(e["operationType"], e["ns"]) for e in got])
    per_db.close()
    try:
        s = client.watch(resume_after={"_data": "C" + "F" * 24})
        s.try_next()
        raise CheckFailed("a cluster token from the future was accepted")
    except OperationFailure as exc:
        check(exc.code == 286, "cluster token of another log: error 286", exc.code)

    t0 = time.monotonic()
    ev = stream.try_next()
    took = time.monotonic() - t0
    check(ev is None and 0.25 <= took <= 1.0, "idle cluster getMore waits (maxAwaitTimeMS 300)",
          took)
    stream.close()

    new_name = "clnew%d" % os.getpid()
    idle = client.watch(max_await_time_ms=5000)
    lat = []
    for target in (client.cla.e, client.clb.other, client[new_name].c):
        sent = []

        def writer():
            time.sleep(0.3)
            sent.append(time.perf_counter())
            target.insert_one({"wake": 1})

        th = threading.Thread(target=writer)
        th.start()
        ev = idle.try_next()
        got_at = time.perf_counter()
        th.join()
        check(ev is not None and ev["ns"] == {"db": target.database.name, "coll": target.name},
              f"waiting cluster getMore wakes on a write to {target.full_name}",
              ev and ev["ns"])
        lat.append(got_at - sent[0])
    check(max(lat) < 0.05, "woken within 50 ms of the write",
          ["%.1f ms" % (1000 * x) for x in lat])
    check(True, f"a database created after the stream opened ({new_name}) is seen")

    client.clb.e.insert_one({"last": 1})  # not read by the stream before the drop
    client.drop_database("clb")
    ops = [(e["operationType"], e["ns"]) for e in collect(idle, 6)]
    check(ops == [("insert", {"db": "clb", "coll": "e"})]
          + [("drop", {"db": "clb", "coll": c}) for c in ("e", "f", "other", "pre")]
          + [("dropDatabase", {"db": "clb"})],
          "dropDatabase: unread events first, a drop per collection, then dropDatabase", ops)
    client.cla.e.insert_one({"after": 1})
    ev = next_event(idle)
    check(ev["operationType"] == "insert" and idle.alive,
          "cluster stream goes on after dropDatabase (no invalidate)")
    idle.close()


def run_refuse(tmp):
    section("--refuse-cluster-streams")
    data = os.path.join(tmp, "refuse")
    os.makedirs(data)
    launcher = Launcher(data, free_port(), "--refuse-cluster-streams")
    client = MongoClient(launcher.uri, serverSelectionTimeoutMS=5000)
    try:
        try:
            s = client.watch([{"$match": {"ns.db": {"$in": ["t1"]}}}])
            s.try_next()
            raise CheckFailed("client.watch() was not refused")
        except OperationFailure as exc:
            check(exc.code == 13 and exc.details.get("codeName") == "Unauthorized",
                  "client.watch(): code 13 Unauthorized", exc.details)
            check(str(exc).startswith(
                "not authorized on admin to execute command { aggregate: 1,"),
                "message as mongod's", str(exc))
        s = client.t1.watch(max_await_time_ms=300)
        client.t1.c.insert_one({"x": 1})
        ev = next_event(s)
        check(ev["operationType"] == "insert" and ev["ns"] == {"db": "t1", "coll": "c"},
              "database streams still work")
        s.close()
    finally:
        client.close()
        launcher.kill(signal.SIGTERM)


def run_idle(launcher, client, db_name):
    section("idle streams wait (maxAwaitTimeMS)")
    col = client[db_name].idle
    stream = col.watch(max_await_time_ms=700)
    t0 = time.monotonic()
    ev = stream.try_next()
    took = time.monotonic() - t0
    check(ev is None and 0.6 <= took <= 1.5, "getMore with no events waits ~700 ms", took)
    cpu0, client0, wall0 = launcher.cpu_seconds(), time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < 3.0:
        stream.try_next()
    wall = time.monotonic() - wall0
    server_pct = 100 * (launcher.cpu_seconds() - cpu0) / wall
    client_pct = 100 * (time.process_time() - client0) / wall
    print(f"  idle stream CPU: server {server_pct:.1f}% client {client_pct:.1f}% of a core")
    check(server_pct < 5 and client_pct < 10, "idle stream costs ~0% CPU",
          (server_pct, client_pct))

    def writer():
        time.sleep(0.3)
        col.insert_one({"wake": 1})

    stream2 = col.watch(max_await_time_ms=5000)
    threading.Thread(target=writer).start()
    t0 = time.monotonic()
    ev = stream2.try_next()
    took = time.monotonic() - t0
    check(ev is not None and took < 1.0, "a waiting getMore wakes early on a write", took)
    stream.close()
    stream2.close()


def change_latencies(uri, watch, targets, count, before_writes=lambda: None):
    """Insert -> change event latencies, sorted: a consumer blocked in getMore on
    `watch()` (as the bridge is) while another client inserts `count` documents
    stamped with their send time, round-robin into the collections `targets`.
    Also returns what `before_writes()` gave right before the first insert."""
    lat: list[float] = []
    started = threading.Event()

    def consume():
        s = watch()
        started.set()
        while len(lat) < count:
            ev = s.try_next()
            if ev is not None and "sent" in ev["fullDocument"]:
                lat.append(time.perf_counter() - ev["fullDocument"]["sent"])
        s.close()

    th = threading.Thread(target=consume)
    th.start()
    started.wait()
    time.sleep(0.2)
    writer = MongoClient(uri)
    mark = before_writes()
    for i in range(count):
        t = targets[i % len(targets)]
        writer[t.database.name][t.name].insert_one({"sent": time.perf_counter()})
        time.sleep(0.005)
    th.join(30)
    writer.close()
    return sorted(lat), mark


def measure(uri, client, db_name, quick):
    section("figures")
    col = client[db_name].perf
    n = 300 if quick else 2000
    t0 = time.monotonic()
    for i in range(n):
        col.insert_one({"i": i, "srvModified": i})
    rate = n / (time.monotonic() - t0)
    print(f"  insert_one from pymongo: {rate:.0f} inserts/s")

    count = 100 if quick else 300
    lat, _ = change_latencies(uri, lambda: col.watch(max_await_time_ms=1000), [col], count)
    check(len(lat) == count, "latency run: every event delivered", len(lat))
    print(f"  insert -> event latency (consumer waiting in getMore): "
          f"p50 {1000 * lat[len(lat) // 2]:.2f} ms, p95 {1000 * lat[int(len(lat) * 0.95)]:.2f} ms")

    ready = threading.Event()
    times: list[float] = []

    def consume(total):
        s = col.watch(max_await_time_ms=500)
        ready.set()
        seen = 0
        while seen < total:
            if s.try_next() is not None:
                seen += 1
                times.append(time.perf_counter())
        s.close()

    m = 2000 if quick else 10000
    th = threading.Thread(target=consume, args=(m,))
    th.start()
    ready.wait()
    t0 = time.perf_counter()
    col.insert_many([{"bulk": i} for i in range(m)])
    t_ins = time.perf_counter() - t0
    th.join(120)
    check(len(times) == m, f"insert_many of {m}: every event delivered", len(times))
    print(f"  insert_many({m}): written in {t_ins:.2f}s ({m / t_ins:.0f} docs/s), "
          f"all events by {times[-1] - t0:.2f}s ({m / (times[-1] - t0):.0f} events/s)")


def bridge_filter(dbs):
    """The $match the bridge's deployment-level stream sends."""
    return [{"$match": {"ns.db": {"$in": sorted(dbs)},
                        "ns.coll": {"$in": ["entries", "treatments", "devicestatus", "c"]},
                        "operationType": {"$in": ["insert", "update", "replace", "delete"]}}}]


def measure_cluster(launcher, uri, client, quick):
    section("figures: cluster stream")
    col = client.cperf.c
    col.insert_one({"warm": 1})
    ready = threading.Event()
    times: list[float] = []

    def consume(total, pipeline):
        s = client.watch(pipeline, max_await_time_ms=500)
        ready.set()
        while len(times) < total:
            if s.try_next() is not None:
                times.append(time.perf_counter())
        s.close()

    m = 2000 if quick else 10000
    th = threading.Thread(target=consume, args=(m, []))
    th.start()
    ready.wait()
    t0 = time.perf_counter()
    col.insert_many([{"bulk": i} for i in range(m)])
    t_ins = time.perf_counter() - t0
    th.join(120)
    check(len(times) == m, f"cluster stream: insert_many of {m}, every event delivered",
          len(times))
    print(f"  cluster stream draining insert_many({m}) into one database: written in "
          f"{t_ins:.2f}s, all events by {times[-1] - t0:.2f}s "
          f"({m / (times[-1] - t0):.0f} events/s)")

    n = 100 if quick else 1000
    names = [f"idle{i:04d}" for i in range(n)]
    t0 = time.monotonic()
    for name in names:
        client[name].c.insert_one({"seed": 1})
    print(f"  created {n} databases (one file each) in {time.monotonic() - t0:.1f}s")

    for label, targets in (("one database", [col] * 2),
                           ("round-robin over the idle databases",
                            [client[name].c for name in names])):
        count = 100 if quick else 300
        lat, cpu0 = change_latencies(
            uri,
            lambda: client.watch(bridge_filter(names + ["cperf"]), max_await_time_ms=1000),
            targets, count, before_writes=launcher.cpu_seconds)
        check(len(lat) == count, f"{n} databases, writes to {label}: every event delivered",
              len(lat))
        print(f"  insert -> event latency, cluster stream, {n} databases, writes to {label}: "
              f"p50 {1000 * lat[len(lat) // 2]:.2f} ms, "
              f"p95 {1000 * lat[int(len(lat) * 0.95)]:.2f} ms; server CPU "
              f"{1000 * (launcher.cpu_seconds() - cpu0) / count:.2f} ms per write+event")

    s = client.watch(bridge_filter(names), max_await_time_ms=500)
    s.try_next()
    cpu0, wall0 = launcher.cpu_seconds(), time.monotonic()
    while time.monotonic() - wall0 < 2.0:
        s.try_next()
    pct = 100 * (launcher.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
    s.close()
    print(f"  idle cluster stream over {n} databases: server CPU {pct:.1f}% of a core")
    check(pct < 5, "idle cluster stream costs ~0% CPU", pct)


def run_restart(tmp, quick):
    section("resume after SIGKILL and restart on the same data dir")
    data = os.path.join(tmp, "restart")
    os.makedirs(data)
    port = free_port()
    first = Launcher(data, port)
    client = MongoClient(first.uri, serverSelectionTimeoutMS=5000)
    col = client.rs.entries
    stream = client.rs.watch(max_await_time_ms=300)
    cstream = client.watch(max_await_time_ms=300)
    for i in range(3):
        col.insert_one({"i": i})
    client.rs2.c.insert_one({"k": 1})  # a database nobody opens after the restart
    evs = [next_event(stream) for _ in range(3)]
    token = evs[0]["_id"]
    cevs = collect(cstream, 4)
    ctoken = cevs[0]["_id"]
    # a pymongo stream that survives the restart (auto-resume on a network error)
    live = client.rs.watch(max_await_time_ms=300, resume_after=evs[2]["_id"])
    first.kill(signal.SIGKILL)
    check(first.proc.returncode == -signal.SIGKILL, "first server SIGKILLed")

    second = Launcher(data, port, "--changelog-retention", "20")
    c2 = MongoClient(second.uri, serverSelectionTimeoutMS=5000)
    c2.rs.entries.insert_one({"i": 3})   # after the restart, before any re-watch
    c2.rs.other.insert_one({"o": 1})
    resumed = c2.rs.watch(resume_after=token, max_await_time_ms=300)
    got = [next_event(resumed) for _ in range(4)]
    check([e["_id"] for e in got[:2]] == [evs[1]["_id"], evs[2]["_id"]],
          "resumeAfter after restart replays the pre-kill events after the token")
    check(got[2]["fullDocument"]["i"] == 3 and got[3]["ns"]["coll"] == "other",
          "events written after the restart, before the re-watch, are delivered")
    check(got[2]["_id"]["_data"] > evs[2]["_id"]["_data"], "resume tokens continue after restart "
          "(no reused sequence numbers)", (got[2]["_id"], evs[2]["_id"]))
    ev = next_event(live, timeout=10)
    check(ev["_id"] == got[2]["_id"], "a pymongo stream open across the kill resumes by itself")
    live.close()
    resumed.close()
    cres = c2.watch(resume_after=ctoken, max_await_time_ms=300)
    cgot = collect(cres, 5)
    check([e["_id"] for e in cgot[:3]] == [e["_id"] for e in cevs[1:]],
          "cluster resumeAfter after restart replays the pre-kill events (rs2 not reopened)",
          [(e["operationType"], e["ns"]) for e in cgot])
    check(cgot[3]["fullDocument"]["i"] == 3 and cgot[4]["ns"] == {"db": "rs", "coll": "other"}
          and cgot[3]["_id"]["_data"] > cevs[3]["_id"]["_data"],
          "then the events written after the restart, with larger tokens")
    cres.close()

    for i in range(40):
        c2.rs.entries.insert_one({"fill": i})
    try:
        s = c2.rs.watch(resume_after=token)
        s.try_next()
        raise CheckFailed("an expired token was accepted")
    except OperationFailure as exc:
        check(exc.code == 286, "expired token: error 286 ChangeStreamHistoryLost", exc.code)
    try:
        s = c2.watch(resume_after=ctoken)
        s.try_next()
        raise CheckFailed("an expired cluster token was accepted")
    except OperationFailure as exc:
        check(exc.code == 286, "expired cluster token: error 286", exc.code)
    second.kill(signal.SIGTERM)
    check(not os.path.exists(second.pid_file), "pid file removed on SIGTERM")


def main():
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(prefix="nx-check-") as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        launcher = Launcher(data, free_port())
        check(launcher.startup < 2.0, f"launcher ready after {launcher.startup * 1000:.0f} ms")
        client = MongoClient(launcher.uri, serverSelectionTimeoutMS=5000)
        try:
            run_shapes(client, "chk")
            run_db_stream(client, "chkdb")
            run_cluster(client)
            run_idle(launcher, client, "chkidle")
            measure(launcher.uri, client, "chkperf", quick)
            measure_cluster(launcher, launcher.uri, client, quick)
            run_refuse(tmp)
            run_restart(tmp, quick)
        finally:
            client.close()
            launcher.kill(signal.SIGTERM)
            for other in LAUNCHED:  # whatever a failed check left running
                other.kill()
    print("\nALL CHECKS PASSED")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"\nCHECK FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
