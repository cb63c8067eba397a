#!/usr/bin/env python3
"""Start nx-27017 (pinned in requirements.txt) with fixes for the bridge's tests.

nx-27017 is a MongoDB wire-protocol server on SQLite (via neosqlite). It is the
compatibility store the integration tests fall back to when neither MONGODB_URI
nor a mongod binary is available. Stock 0.8.1 gets change streams wrong in ways
that block the bridge, so this launcher monkeypatches it in-process before the
server starts; the installed package files are never modified.

Usage (same option names as nx-27017's own CLI):
    python nx_launcher.py --data-dir DIR --host 127.0.0.1 -p PORT --pid-file FILE
        [--changelog-retention N] [--refuse-cluster-streams]
It runs in the foreground (the caller owns and kills the process) and prints
one line "nx_launcher: ready on HOST:PORT (pid N)" on stdout once the port
accepts connections. `-p 0` picks a free port and prints it.
--refuse-cluster-streams answers client.watch() with 13 Unauthorized ("not
authorized on admin to execute command { aggregate: 1, ... }"), as mongod does
for a user who may read the tenant databases only, to test the fallback to one
stream per database.

Fixes (numbers are the rows of the defect table in test-store.md):

 1. Cursor ids. Stock replies carry Int32 cursor ids for change streams; the
    Rust driver refuses them ("id: expected Int64"). Every reply's cursor.id
    (and the killCursors id lists) is now an Int64. The reply converter no
    longer turns any user field `id: 0` into an Int64 either.
 2. Event field types. clusterTime is a BSON Timestamp(secs, seq), wallTime a
    BSON datetime (ms), and every document in an event is decoded with
    neosqlite's own JSON decoder, so ObjectIds, datetimes and binaries come out
    as BSON types instead of {"__neosqlite_objectid__": ..} / {"$date": ..}.
 3. Event shapes. Stock change streams are replaced by our own, fed by our own
    SQLite triggers that log the pre- and post-image of every write:
      insert  -> fullDocument, documentKey {_id}
      update  -> updateDescription {updatedFields, removedFields,
                 truncatedArrays: []} diffed top-level from the logged pre- and
                 post-image; fullDocument only with fullDocument:updateLookup
                 (the current document, or null when it is gone) or
                 whenAvailable/required (the logged post-image)
      replace -> operationType "replace" with fullDocument: an update command
                 whose update document has no $-operators (replace_one,
                 findAndModify with a replacement, bulkWrite replaceOne) is
                 tagged as a replace in the log; an upsert that inserts is an
                 insert
      delete  -> documentKey only
      drop    -> "drop" (collection streams then get "invalidate" and close)
      dropDatabase -> "dropDatabase" or "drop", then "invalidate"
    A write that changes nothing (same document) produces no event, as in
    MongoDB. fullDocumentBeforeChange whenAvailable/required gives the logged
    pre-image.
 4. Database- and cluster-level streams. `aggregate: 1` with $changeStream
    watches every collection of the database (stock watched a collection
    literally named "1"). client.watch() (`aggregate: 1` on admin with
    allChangesForCluster, stock: nothing) watches every database but admin,
    config and local, including databases created later, in one global order
    (below), with the same event shapes and options; a dropped database
    gives its events not yet read by an open cluster stream, then "drop" per
    collection and "dropDatabase" (no invalidate). Trailing $match stages are
    evaluated on the event (dotted paths, $eq $ne $gt $gte $lt $lte $in $nin
    $exists $not $and $or $nor $regex); other stages give an explicit error.
 5. Waiting. getMore on an idle stream waits up to its maxTimeMS (the
    driver's maxAwaitTimeMS; 1000 ms when absent) on a condition variable that
    every write notifies, so an idle stream costs ~0% CPU and an event arrives
    within a few ms. The server runs one thread per connection (nx-27017's own
    threaded mode) so a waiting getMore never starves other connections.
    Replies carry postBatchResumeToken. On a wake-up a database stream
    queries its log only if its database was written; a cluster stream
    queries only the databases holding rows stamped (6) past its position,
    so a write to one of 1,000 databases costs it one SQLite query.
 6. Logging from the start. The triggers are installed when a collection is
    created and on every collection of a database file when it is opened, so
    writes are logged before any watch. The log is a table in the database's
    own SQLite file (same transaction as the write): it survives SIGKILL, and
    its AUTOINCREMENT sequence never reuses a number after a restart.
    Resume tokens are {_data: "<8 hex epoch><16 hex seq>"}; the epoch is a
    random number stored with the log, so tokens of a dropped and re-created
    database are rejected. resumeAfter/startAfter resume exactly after that
    event; a token from another log, or one older than the retained history
    (--changelog-retention rows per database, default 100000), fails with
    code 286 ChangeStreamHistoryLost; an unparsable one with 260.
    startAtOperationTime is honoured (clusterTime order).
    Global order: every log row gets a gseq from one process-wide hybrid
    logical clock, gseq = (ms since 1970 << 20) + counter, strictly
    increasing, stored in the row. A TEMP trigger (this process's connection
    only, so other processes can still write the files) sets it inside the
    statement that writes the row; rows without one (other processes, a
    crash) are stamped before this server next writes, or when it opens,
    that database.
    Each database has one SQLite connection here, running one statement at a
    time and seeing its own rows at once, so a cluster stream that has read
    up to gseq g never finds a row below g later; a write A before a write B
    (any databases) has gseq(A) < gseq(B). Across a restart the clock (and a
    high-water mark in admin.db, saved once a second of activity, against a
    clock stepping back) keeps new gseqs above old ones; a stream resuming
    from before the restart first reads each database file's highest gseq.
    Cluster tokens are {_data: "C<16 hex gseq><8 hex admin epoch>"}, so they
    order as strings; clusterTime is gseq re-encoded, Timestamp(gseq //
    (1000 << 20), gseq % (1000 << 20)). A cluster token below a gseq pruned
    from any database, or from another data dir (admin.db's epoch), fails
    with 286; a database stream also resumes from a cluster token (after its
    last row at or before that position). Logs of an older launcher get
    gseq = seq: they sort before all history.
 7. Data round trips. `$set` (and the other update operators) of booleans,
    datetimes, ObjectIds etc. went through neosqlite's SQL json_set path,
    which stored false as 0 and dates as strings; such updates now take
    neosqlite's Python path, which stores them like inserts.
 Other defects a plain MongoDB client trips over, fixed here as well:
  - getMore of an unknown cursor id fails with code 43 CursorNotFound (stock
    answered ok with id 0, so a driver ended the stream instead of resuming it
    after a server restart).
  - Upserts keep the filter's _id: update_one/update_many({_id: oid}, ...,
    upsert) stored the ObjectId as a hex string, replace_one({_id: x}, doc,
    upsert) gave the new document a fresh _id, and findAndModify with upsert
    inserted the bare filter and then updated it (two events).
  - Binary values keep their subtype (stock stored every binary as subtype 0).
  - neosqlite's "evaluated in Python" warnings are silenced unless -v.

Not fixed: small Int64 values come back as Int32 (JSON storage keeps no integer
width; values beyond 32 bits come back as Int64); Decimal128 cannot be stored
(explicit write error); in find, $exists and {$ne: null} treat an explicit
null like a missing field, and count_documents({f: null}) counts only
one of the two; change-stream pipelines take $match
stages only (others are refused); no rename/create/modify events and no
showExpandedEvents; writes inside an open transaction are visible to streams
before the commit; a write made by another process on the same files is only
seen by a database stream at its next getMore (maxTimeMS at most), and by a
cluster stream only once this server writes or opens that database; a
database or collection token cannot resume a cluster stream (286); on
dropDatabase, streams on that database lose their unread events (as before),
and a cluster stream not open at the time and resumed later from before the
drop skips that database's events (open ones get them); the same event has
a different clusterTime in a cluster stream (gseq) and a database stream
(per-database seq); a write whose reply a crash cut off may reach cluster
streams opened after the restart as a new event.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from datetime import date, datetime, timezone
from decimal import Decimal

import bson
from bson import Binary as BsonBinary
from bson import Decimal128, Int64, Timestamp
from bson import ObjectId as BsonObjectId

import nx_27017.handler as nx_handler
import nx_27017.utils as nx_utils
import nx_27017.wire_protocol as nx_wire
from neosqlite.binary import Binary as NeoBinary
from neosqlite.collection import Collection
from neosqlite.collection.json_helpers import neosqlite_json_loads
from neosqlite.collection.query_helper._sql_updates import SqlUpdatesMixin
from neosqlite.connection import _is_internal_collection_name
from neosqlite.objectid import ObjectId as NeoObjectId

log = logging.getLogger("nx_launcher")

LOG_TABLE = "_neosqlite_nxlog"
META_TABLE = "_neosqlite_nxmeta"
TRIGGER_PREFIX = "_nxl_"
DEFAULT_AWAIT_MS = 1000
DEFAULT_GETMORE_BATCH = 1000
BATCH_BYTES_BUDGET = 8 * 1024 * 1024
IDLE_STREAM_SECONDS = 1800
WRITE_COMMANDS = frozenset(
    {"insert", "update", "delete", "findAndModify", "findandmodify",
     "bulkWrite", "renameCollection", "renamecollection"}
)
NO_STREAM_DBS = ("admin", "config", "local")
# Commands that never write: everything else counts as a possible write (it is
# stamped and wakes the streams), so a write path nobody hooked is not missed.
READ_ONLY_COMMANDS = frozenset(
    {"ping", "ismaster", "isMaster", "hello", "Hello", "buildinfo", "buildInfo",
     "whatsmyuri", "serverStatus", "dbStats", "dbstats", "collStats", "collstats",
     "count", "distinct", "find", "getMore", "killCursors", "listCollections",
     "listcollections", "listIndexes", "listindexes", "listSearchIndexes",
     "listDatabases", "listdatabases", "endSessions", "startSession",
     "getParameter", "getLog", "hostInfo", "connectionStatus", "getCmdLineOpts",
     "saslStart", "saslContinue", "explain", "create", "createIndexes",
     "dropIndexes", "abortTransaction", "commitTransaction", "getLastError",
     "getnonce", "logout", "currentOp", "dataSize", "validate"}
)
# Cluster positions: gseq = (milliseconds since the epoch << 20) + counter, a
# hybrid logical clock, so that clusterTime is an exact re-encoding of gseq:
# Timestamp(gseq // GSEQ_PER_SEC, gseq % GSEQ_PER_SEC); the inc stays < 2**32.
GSEQ_PER_SEC = 1000 << 20
HWM_AHEAD = 1000 << 20  # one second of gseq persisted ahead per admin write


def _error(code: int, name: str, msg: str) -> dict:
    return {"ok": 0, "errmsg": f"nx_launcher: {msg}", "code": code, "codeName": name}


# --------------------------------------------------------------------------
# Fix 1/2: reply conversion (neosqlite types -> BSON types, Int64 cursor ids)
# --------------------------------------------------------------------------

def to_bson(value):
    """Convert neosqlite value types to their BSON equivalents, recursively."""
    if isinstance(value, dict):
        return {k: to_bson(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_bson(v) for v in value]
    if isinstance(value, NeoObjectId):
        return BsonObjectId(value.binary)
    if isinstance(value, NeoBinary):
        return BsonBinary(bytes(value), value.subtype)
    if isinstance(value, Decimal):
        return Decimal128(value)
    return value


def to_neo(value):
    """Incoming BSON values -> neosqlite types (ObjectId; Binary keeps its subtype)."""
    if isinstance(value, dict):
        return {k: to_neo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_neo(v) for v in value]
    if isinstance(value, BsonObjectId):
        return NeoObjectId(value.binary)
    if isinstance(value, BsonBinary) and value.subtype != 0:
        return NeoBinary(bytes(value), value.subtype)
    return value


def convert_reply(doc):
    out = to_bson(doc)
    if isinstance(out, dict):
        cursor = out.get("cursor")
        if isinstance(cursor, dict) and type(cursor.get("id")) is int:
            cursor["id"] = Int64(cursor["id"])
        for key in ("cursorsKilled", "cursorsNotFound", "cursorsAlive", "cursorsUnknown"):
            ids = out.get(key)
            if isinstance(ids, list):
                out[key] = [Int64(i) if type(i) is int else i for i in ids]
    return out


# --------------------------------------------------------------------------
# Fix 7: updates carrying values that SQLite would bind wrongly
# --------------------------------------------------------------------------

_NON_JSON_SCALARS = (bool, datetime, date, NeoObjectId, BsonObjectId, Decimal,
                     Decimal128, Timestamp)


def _has_non_json_scalar(value) -> bool:
    if isinstance(value, dict):
        return any(_has_non_json_scalar(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_json_scalar(v) for v in value)
    return isinstance(value, _NON_JSON_SCALARS)


# --------------------------------------------------------------------------
# $match on change events
# --------------------------------------------------------------------------

_MISSING = object()
_MATCH_OPS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
              "$exists", "$not", "$regex", "$options"}


def validate_match(spec) -> str | None:
    """Return an error message if the $match spec uses unsupported features."""
    if not isinstance(spec, dict):
        return "$match needs a document"
    for key, cond in spec.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(cond, list) or not cond:
                return f"{key} needs a non-empty array"
            for sub in cond:
                err = validate_match(sub)
                if err:
                    return err
        elif key.startswith("$"):
            return f"$match operator {key} is not supported on change streams here"
        elif isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            for op, arg in cond.items():
                if op not in _MATCH_OPS:
                    return f"$match operator {op} is not supported on change streams here"
                if op in ("$in", "$nin") and not isinstance(arg, list):
                    return f"{op} needs an array"
                if op == "$not":
                    err = validate_match({key: arg})
                    if err:
                        return err
    return None


def _resolve(value, parts):
    if not parts:
        if isinstance(value, list):
            return [value] + value
        return [value]
    if isinstance(value, dict):
        if parts[0] in value:
            return _resolve(value[parts[0]], parts[1:])
        return [_MISSING]
    if isinstance(value, list):
        if parts[0].isdigit():
            idx = int(parts[0])
            if idx < len(value):
                return _resolve(value[idx], parts[1:])
            return [_MISSING]
        out = []
        for item in value:
            if isinstance(item, dict):
                out.extend(v for v in _resolve(item, parts) if v is not _MISSING)
        return out or [_MISSING]
    return [_MISSING]


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _eq(a, b) -> bool:
    if b is None:
        return a is None or a is _MISSING
    if a is _MISSING:
        return False
    if _is_num(a) and _is_num(b):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a.keys()) == list(b.keys()) and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and a == b
    except Exception:
        return False


def _cmp(a, b, op) -> bool:
    if a is _MISSING or a is None or b is None:
        return False
    if not ((_is_num(a) and _is_num(b)) or type(a) is type(b)):
        return False
    try:
        if op == "$gt":
            return a > b
        if op == "$gte":
            return a >= b
        if op == "$lt":
            return a < b
        return a <= b
    except TypeError:
        return False


def _regex_of(pattern, options=""):
    if isinstance(pattern, bson.regex.Regex):
        return re.compile(pattern.pattern, pattern.flags)
    if isinstance(pattern, re.Pattern):
        return pattern
    flags = 0
    for ch in options or "":
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}.get(ch, 0)
    return re.compile(str(pattern), flags)


_STR_SETS: dict[int, tuple] = {}


def _in(v, arg) -> bool:
    # the bridge's cluster stream filters {"ns.db": {"$in": [1,000 names]}}:
    # a string only equals a string (see _eq), so a set answers in O(1)
    if type(v) is str:
        hit = _STR_SETS.get(id(arg))
        if hit is None or hit[0] is not arg:
            if len(_STR_SETS) > 1024:
                _STR_SETS.clear()
            hit = _STR_SETS[id(arg)] = (arg, frozenset(a for a in arg if type(a) is str))
        return v in hit[1]
    return any(_eq(v, a) for a in arg)


def _cond(values, cond) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        for op, arg in cond.items():
            if op == "$eq":
                ok = any(_eq(v, arg) for v in values)
            elif op == "$ne":
                ok = not any(_eq(v, arg) for v in values)
            elif op == "$in":
                ok = any(_in(v, arg) for v in values)
            elif op == "$nin":
                ok = not any(_in(v, arg) for v in values)
            elif op in ("$gt", "$gte", "$lt", "$lte"):
                ok = any(_cmp(v, arg, op) for v in values)
            elif op == "$exists":
                ok = any(v is not _MISSING for v in values) == bool(arg)
            elif op == "$not":
                ok = not _cond(values, arg)
            elif op == "$regex":
                rx = _regex_of(arg, cond.get("$options", ""))
                ok = any(isinstance(v, str) and rx.search(v) for v in values)
            elif op == "$options":
                ok = True
            else:
                ok = False
            if not ok:
                return False
        return True
    if isinstance(cond, (re.Pattern, bson.regex.Regex)):
        rx = _regex_of(cond)
        return any(isinstance(v, str) and rx.search(v) for v in values)
    return any(_eq(v, cond) for v in values)


def match_event(event: dict, spec: dict) -> bool:
    for key, cond in spec.items():
        if key == "$and":
            if not all(match_event(event, s) for s in cond):
                return False
        elif key == "$or":
            if not any(match_event(event, s) for s in cond):
                return False
        elif key == "$nor":
            if any(match_event(event, s) for s in cond):
                return False
        elif not _cond(_resolve(event, key.split(".")), cond):
            return False
    return True


# --------------------------------------------------------------------------
# Fix 3: event construction helpers
# --------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Strict (type-aware) equality used to diff document images."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _loads(text):
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        doc = neosqlite_json_loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(doc, dict):
        return None
    if "_id" in doc and next(iter(doc)) != "_id":
        doc = {"_id": doc.pop("_id"), **doc}  # MongoDB always stores _id first
    return doc


def _qident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _qstr(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def make_token(epoch: int, seq: int, invalidate: bool = False) -> dict:
    return {"_data": f"{epoch:08X}{seq:016X}" + ("I" if invalidate else "")}


def _token_match(token, pattern: str):
    """The match of a token's `_data` (or of a bare string) against `pattern`, or None."""
    if isinstance(token, dict):
        token = token.get("_data")
    if not isinstance(token, str):
        return None
    return re.fullmatch(pattern, token)


def parse_token(token):
    """Return (epoch, seq) or None when the token is not one of ours."""
    m = _token_match(token, r"([0-9A-F]{8})([0-9A-F]{16})I?")
    if not m:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)


def make_cluster_token(epoch: int, gseq: int) -> dict:
    # gseq first: cluster tokens order by their position as plain strings, and
    # the length (25) keeps them apart from database tokens (24, or 25 with I)
    return {"_data": f"C{gseq:016X}{epoch:08X}"}


def parse_cluster_token(token):
    """Return (epoch, gseq) or None when the token is not a cluster token."""
    m = _token_match(token, r"C([0-9A-F]{16})([0-9A-F]{8})")
    if not m:
        return None
    return int(m.group(2), 16), int(m.group(1), 16)


def _now_gseq() -> int:
    return (time.time_ns() // 1_000_000) << 20


def _gseq_time(gseq: int) -> Timestamp:
    return Timestamp(gseq // GSEQ_PER_SEC, gseq % GSEQ_PER_SEC)


def _shell(value) -> str:
    """A value the way the mongo shell (and mongod's error messages) print it."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k}: {_shell(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[ " + ", ".join(_shell(v) for v in value) + " ]" if value else "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (BsonObjectId, NeoObjectId)):
        return f"ObjectId('{value}')"
    return str(value)


class Stream:
    def __init__(self, cid, db, coll, matches, full_doc, before, epoch, watermark, owner,
                 cluster=False):
        self.id = cid
        self.db = db
        self.coll = coll  # None for a database-level or cluster stream
        self.cluster = cluster  # watermark and tokens are gseqs, not seqs
        self.matches = matches
        self.full_doc = full_doc
        self.before = before
        self.epoch = epoch
        self.watermark = watermark
        self.owner = owner
        self.pending: list[dict] = []  # synthetic terminal events
        self.closed = False
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.seen_gen = None  # the database's write generation at the last pull

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}" if self.coll else f"{self.db}.$cmd.aggregate"

    def token(self, pos: int, invalidate: bool = False) -> dict:
        if self.cluster:
            return make_cluster_token(self.epoch, pos)
        return make_token(self.epoch, pos, invalidate)

    def cluster_time(self, pos: int, ts) -> Timestamp:
        if self.cluster:
            return _gseq_time(pos)
        return Timestamp(int(ts) // 1000, pos & 0xFFFFFFFF)


# --------------------------------------------------------------------------
# The change hub: log tables, triggers, streams
# --------------------------------------------------------------------------

class ChangeHub:
    def __init__(self, retention: int, refuse_cluster: bool = False):
        self.handler = None
        self.retention = max(1, int(retention))
        self.prune_every = max(1, min(1000, self.retention // 10))
        self.refuse_cluster = refuse_cluster
        self.cond = threading.Condition()
        self.gen = 0
        self.streams: dict[int, Stream] = {}
        self.streams_lock = threading.Lock()
        self.write_counts: dict[str, int] = {}
        self.db_gen: dict[str, int] = {}
        # Global order (fix 6). `last` is the highest gseq issued; the lock
        # is taken inside SQLite statements (nx_gseq), so nothing may run SQL
        # or take another lock while holding it.
        self.gseq_lock = threading.Lock()
        self.last = 0
        self.boot = None  # first gseq this process may issue (set with admin)
        self.hwm_saved = 0
        self.cluster_epoch = 0
        self.db_last: dict[str, int] = {}  # database -> highest gseq it holds
        self.lost = 0  # highest gseq pruned from any database seen so far
        self.cold_loaded = False

    # -- storage ---------------------------------------------------------

    @staticmethod
    def ensure_log(conn) -> None:
        """Create the change log and meta tables in one SQLite connection."""
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " coll TEXT NOT NULL,"
            " op TEXT NOT NULL,"
            " ts INTEGER NOT NULL DEFAULT"
            " (CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)),"
            " old_data, new_data, gseq INTEGER)"
        )
        if not conn.execute(
                f"SELECT 1 FROM pragma_table_info('{LOG_TABLE}') WHERE name = 'gseq'"
        ).fetchone():  # a log written by an older launcher
            conn.execute(f"ALTER TABLE {LOG_TABLE} ADD COLUMN gseq INTEGER")
            # its rows predate every cluster position (gseq starts near 2**60)
            conn.execute(f"UPDATE {LOG_TABLE} SET gseq = seq")
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {LOG_TABLE}_gseq ON {LOG_TABLE}(gseq)"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {META_TABLE} (k TEXT PRIMARY KEY, v)"
        )
        conn.execute(
            f"INSERT OR IGNORE INTO {META_TABLE}(k, v) VALUES ('epoch', ?), ('pruned', 0),"
            " ('pruned_gseq', 0)",
            (random.randrange(1, 0xFFFFFFFF),),
        )

    @staticmethod
    def _is_collection_table(conn, name: str) -> bool:
        if not isinstance(name, str) or _is_internal_collection_name(name):
            return False
        cols = {row[1] for row in conn.execute(
            "SELECT * FROM pragma_table_info(?)", (name,)).fetchall()}
        return {"data", "_id"} <= cols

    def install_triggers(self, conn, name: str) -> None:
        if not self._is_collection_table(conn, name):
            return
        self.ensure_log(conn)
        t, lit = _qident(name), _qstr(name)
        trig = lambda kind: _qident(f"{TRIGGER_PREFIX}{name}_{kind}")  # noqa: E731
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {trig('i')} AFTER INSERT ON {t} BEGIN "
            f"INSERT INTO {LOG_TABLE}(coll, op, new_data) VALUES ({lit}, 'i', NEW.data); END"
        )
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {trig('u')} AFTER UPDATE OF data ON {t} "
            f"WHEN OLD.data IS NOT NEW.data BEGIN "
            f"INSERT INTO {LOG_TABLE}(coll, op, old_data, new_data) "
            f"VALUES ({lit}, 'u', OLD.data, NEW.data); END"
        )
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {trig('d')} AFTER DELETE ON {t} BEGIN "
            f"INSERT INTO {LOG_TABLE}(coll, op, old_data) VALUES ({lit}, 'd', OLD.data); END"
        )

    def drop_triggers(self, conn, name: str) -> None:
        for kind in ("i", "u", "d"):
            conn.execute(f"DROP TRIGGER IF EXISTS {_qident(TRIGGER_PREFIX + name + '_' + kind)}")

    def setup_connection(self, conn, db_name: str) -> None:
        """A database file was opened: log table plus triggers on all collections.

        Runs under the handler's dict lock (the connection is not published
        yet), so it stamps without taking the database's lock.
        """
        self.ensure_log(conn)
        if db_name == "admin":
            self._init_cluster(conn)
        # A TEMP trigger lives in this connection only: other processes write
        # the same files without it (and without the function it calls), and
        # their rows are stamped by stamp_conn instead.
        conn.create_function("nx_gseq", 0, lambda: self.next_gseq(db_name))
        conn.execute(
            f"CREATE TEMP TRIGGER IF NOT EXISTS {TRIGGER_PREFIX}gseq AFTER INSERT"
            f" ON main.{LOG_TABLE} WHEN NEW.gseq IS NULL BEGIN"
            f" UPDATE {LOG_TABLE} SET gseq = nx_gseq() WHERE seq = NEW.seq; END"
        )
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
        for name in names:
            self.install_triggers(conn, name)
        # rows a crash left unstamped, or that another process wrote
        self.stamp_conn(conn, db_name)
        top = conn.execute(f"SELECT MAX(gseq) FROM {LOG_TABLE}").fetchone()[0] or 0
        pruned = int(dict(conn.execute(f"SELECT k, v FROM {META_TABLE}").fetchall())
                     .get("pruned_gseq") or 0)
        self._learn(db_name, top, pruned)

    def _init_cluster(self, conn) -> None:
        rows = dict(conn.execute(f"SELECT k, v FROM {META_TABLE}").fetchall())
        with self.gseq_lock:
            # admin's own epoch names the data dir: a replaced (or dropped)
            # admin.db makes older cluster tokens fail with 286
            self.cluster_epoch = int(rows["epoch"])
            if self.boot is None:
                hwm = int(rows.get("gseq_hwm") or 0)
                self.hwm_saved = hwm
                self.last = max(self.last, hwm - 1, _now_gseq() - 1)
                self.boot = self.last + 1

    def _learn(self, db_name: str, top: int, pruned: int) -> None:
        if db_name in NO_STREAM_DBS and db_name != "admin":
            return
        with self.gseq_lock:
            if top > self.db_last.get(db_name, 0):
                self.db_last[db_name] = top
            self.lost = max(self.lost, pruned)

    def next_gseq(self, db_name: str) -> int:
        """The gseq of one new log row (called by SQLite, inside the write)."""
        with self.gseq_lock:
            g = self.last = max(self.last + 1, _now_gseq())
            if db_name not in NO_STREAM_DBS or db_name == "admin":
                self.db_last[db_name] = g
        return g

    def stamp_conn(self, conn, db_name: str) -> bool:
        """Stamp rows that came without a gseq (another process, a crash).

        The caller holds the database's lock, or the connection is not
        published yet, so no stream reads this database between the
        reservation and the UPDATE.
        """
        lo, hi = conn.execute(
            f"SELECT MIN(seq), MAX(seq) FROM {LOG_TABLE} WHERE gseq IS NULL").fetchone()
        if lo is None:
            return False
        with self.gseq_lock:
            base = max(self.last + 1, _now_gseq())
            self.last = base + hi - lo
            if db_name not in NO_STREAM_DBS or db_name == "admin":
                self.db_last[db_name] = self.last
        conn.execute(f"UPDATE {LOG_TABLE} SET gseq = ? + seq WHERE gseq IS NULL AND seq <= ?",
                     (base - lo, hi))
        return True

    def stamp(self, db_name: str) -> None:
        """Before a write: rows another process wrote since get their gseq
        first, so that gseq order stays seq order within a database."""
        try:
            with self.handler._lock_for(db_name):
                conn = self._existing_conn(db_name)
                if conn is not None:
                    self.stamp_conn(conn, db_name)
        except Exception:
            log.debug("stamping %r skipped", db_name, exc_info=True)

    def save_hwm(self) -> None:
        """Persist a bound on the issued gseqs, so a restart never reissues one.

        The clock alone would do unless it steps back across a restart; one
        admin write per second of activity covers that.
        """
        with self.gseq_lock:
            if self.last < self.hwm_saved:
                return
            new = self.last + HWM_AHEAD
        try:
            with self.handler._lock_for("admin"):
                self._conn("admin").execute(
                    f"INSERT OR REPLACE INTO {META_TABLE}(k, v) VALUES ('gseq_hwm', ?)", (new,))
            with self.gseq_lock:
                self.hwm_saved = max(self.hwm_saved, new)
        except Exception:
            log.debug("saving the gseq high-water mark failed", exc_info=True)

    def _existing_conn(self, db_name: str):
        """The database's connection, or None if it does not exist (a read
        must not re-create a dropped database's file)."""
        h = self.handler
        if db_name not in h._conns and (
                h._mode != "files" or not os.path.exists(h._db_file(db_name))):
            return None  # (in memory mode every database stays in _conns)
        return h.get_database(db_name).db

    def _db_names(self) -> list[str]:
        names = set(self.handler._conns)
        if self.handler._mode == "files":
            try:
                names.update(e[:-3] for e in os.listdir(self.handler._data_dir)
                             if e.endswith(".db"))
            except OSError:
                pass
        return sorted(n for n in names if nx_handler._DB_NAME_RE.match(n)
                      and (n not in NO_STREAM_DBS or n == "admin"))

    def load_all(self) -> None:
        """Learn every database file's highest and pruned gseq.

        Needed once, by the first cluster stream that starts before this
        process's first gseq: rows stamped by an earlier process are in files
        this process may not have opened. Reads each file directly (no
        trigger setup, no eviction of open connections).
        """
        if self.cold_loaded:
            return
        for name in self._db_names():
            if name in self.handler._conns or self.handler._mode != "files":
                continue  # setup_connection has reported it
            path = self.handler._db_file(name)
            try:
                c = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True,
                                    timeout=5)
            except sqlite3.Error:
                continue
            try:
                cols = {r[1] for r in c.execute(
                    f"SELECT * FROM pragma_table_info('{LOG_TABLE}')").fetchall()}
                if not cols:
                    continue
                unstamped = "gseq" not in cols or c.execute(
                    f"SELECT 1 FROM {LOG_TABLE} WHERE gseq IS NULL LIMIT 1").fetchone()
                if not unstamped:
                    top = c.execute(f"SELECT MAX(gseq) FROM {LOG_TABLE}").fetchone()[0] or 0
                    row = c.execute(
                        f"SELECT v FROM {META_TABLE} WHERE k = 'pruned_gseq'").fetchone()
                    self._learn(name, top, int(row[0] or 0) if row else 0)
            except sqlite3.Error:
                unstamped = True
            finally:
                c.close()
            if unstamped:  # opening it stamps and reports it
                with self.handler._lock_for(name):
                    self._conn(name)
        self.cold_loaded = True

    @staticmethod
    def max_seq(conn) -> int:
        return conn.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {LOG_TABLE}").fetchone()[0]

    @staticmethod
    def head_seq(conn) -> int:
        """Last sequence number ever issued (survives pruning and restarts)."""
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (LOG_TABLE,)).fetchone()
        return max(int(row[0]) if row else 0, ChangeHub.max_seq(conn))

    @staticmethod
    def meta(conn) -> tuple[int, int]:
        rows = dict(conn.execute(f"SELECT k, v FROM {META_TABLE}").fetchall())
        return int(rows["epoch"]), int(rows["pruned"])

    def mark_replace(self, conn, name: str, before: int) -> None:
        conn.execute(
            f"UPDATE {LOG_TABLE} SET op = 'r' WHERE seq > ? AND op = 'u' AND coll = ?",
            (before, name),
        )

    def log_drop(self, conn, name: str) -> None:
        self.ensure_log(conn)
        conn.execute(f"INSERT INTO {LOG_TABLE}(coll, op) VALUES (?, 'drop')", (name,))

    def _conn(self, db_name: str):
        return self.handler.get_database(db_name).db

    # -- writes ----------------------------------------------------------

    def notify(self) -> None:
        with self.cond:
            self.gen += 1
            self.cond.notify_all()

    def after_write(self, db_names) -> None:
        """After a (possible) write: wake the streams, then prune."""
        if isinstance(db_names, str):
            db_names = (db_names,)
        db_names = [d for d in db_names if isinstance(d, str)]
        for db_name in db_names:
            self.db_gen[db_name] = self.db_gen.get(db_name, 0) + 1
        self.notify()
        self.save_hwm()
        for db_name in db_names:
            n = self.write_counts.get(db_name, 0) + 1
            self.write_counts[db_name] = n
            if not n % self.prune_every:
                self.prune(db_name)

    def prune(self, db_name: str) -> None:
        try:
            with self.handler._lock_for(db_name):
                conn = self._existing_conn(db_name)
                if conn is None:
                    return
                cut = self.max_seq(conn) - self.retention
                _epoch, pruned = self.meta(conn)
                if cut > pruned:
                    # the highest gseq given up: cluster tokens below it are
                    # refused (286), as MongoDB refuses tokens older than its oplog
                    gone = conn.execute(f"SELECT MAX(gseq) FROM {LOG_TABLE} WHERE seq <= ?",
                                        (cut,)).fetchone()[0] or 0
                    conn.execute(f"UPDATE {META_TABLE} SET v = max(v, ?) "
                                 "WHERE k = 'pruned_gseq'", (gone,))
                    conn.execute(f"DELETE FROM {LOG_TABLE} WHERE seq <= ?", (cut,))
                    conn.execute(f"UPDATE {META_TABLE} SET v = ? WHERE k = 'pruned'", (cut,))
                    self._learn(db_name, 0, gone)
        except Exception:
            log.debug("prune skipped", exc_info=True)

    def collections_of(self, db_name: str):
        """Collection names of an existing database, None when it does not exist."""
        try:
            with self.handler._lock_for(db_name):
                conn = self._existing_conn(db_name)
                if conn is None:
                    return None
                names = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
                return [n for n in names if self._is_collection_table(conn, n)]
        except Exception:
            return None

    def unread_rows(self, db_name: str) -> list[tuple]:
        """Rows of a database about to be dropped that an open cluster stream
        has not read yet (its file and log go with it)."""
        with self.streams_lock:
            marks = [s.watermark for s in self.streams.values() if s.cluster and not s.closed]
        if not marks or db_name in NO_STREAM_DBS:
            return []
        try:
            with self.handler._lock_for(db_name):
                conn = self._existing_conn(db_name)
                if conn is None:
                    return []
                return conn.execute(
                    f"SELECT ?||'.'||coll, 'X'||op, ts, old_data, new_data, gseq FROM {LOG_TABLE}"
                    " WHERE gseq > ? ORDER BY gseq", (db_name, min(marks))).fetchall()
        except Exception:
            log.debug("keeping the unread rows of %r failed", db_name, exc_info=True)
            return []

    def log_database_drop(self, db_name: str, colls: list[str], unread: list[tuple]) -> None:
        """Record a dropped database for cluster streams in admin's log.

        The database's own file (and log) is gone, so its unread rows (with
        their gseq), a "drop" per collection and "dropDatabase" live on in
        admin's log under op codes that start with X, which no trigger writes;
        admin is never watched otherwise.
        """
        with self.gseq_lock:
            self.db_last.pop(db_name, None)
        if db_name in NO_STREAM_DBS:
            return
        with self.handler._lock_for("admin"):
            conn = self._conn("admin")
            self.ensure_log(conn)
            conn.executemany(f"INSERT INTO {LOG_TABLE}(coll, op, ts, old_data, new_data, gseq)"
                             " VALUES (?, ?, ?, ?, ?, ?)", unread)
            conn.executemany(f"INSERT INTO {LOG_TABLE}(coll, op) VALUES (?, 'Xdrop')",
                             [(f"{db_name}.{c}",) for c in colls])
            conn.execute(f"INSERT INTO {LOG_TABLE}(coll, op) VALUES (?, 'XdropDatabase')",
                         (db_name,))

    def database_dropped(self, db_name: str) -> None:
        with self.streams_lock:
            streams = [s for s in self.streams.values() if s.db == db_name and not s.cluster]
        for st in streams:
            if st.closed or st.pending:
                continue
            seq = st.watermark + 1
            now = time.time()
            base = {
                "clusterTime": Timestamp(int(now), seq & 0xFFFFFFFF),
                "wallTime": _wall(int(now * 1000)),
            }
            first = {"_id": make_token(st.epoch, seq),
                     "operationType": "drop" if st.coll else "dropDatabase",
                     **base,
                     "ns": {"db": st.db, "coll": st.coll} if st.coll else {"db": st.db}}
            inval = {"_id": make_token(st.epoch, seq, True),
                     "operationType": "invalidate", **base}
            st.pending = [first, inval]

    # -- streams ---------------------------------------------------------

    def open_stream(self, body: dict, db_name: str, owner) -> dict:
        target = body.get("aggregate")
        pipeline = body.get("pipeline") or []
        stage0 = pipeline[0] if pipeline and isinstance(pipeline[0], dict) else {}
        opts = stage0.get("$changeStream")
        if not isinstance(opts, dict):
            return _error(40602, "Location40602",
                          "$changeStream must be the first stage of the pipeline")
        cluster = bool(opts.get("allChangesForCluster"))
        if cluster:
            if db_name != "admin" or target != 1 or isinstance(target, bool):
                return _error(73, "InvalidNamespace",
                              "$changeStream with allChangesForCluster: true must be run "
                              "on the 'admin' database with {aggregate: 1}")
            if self.refuse_cluster:
                # what mongod tells a user who may read the tenant databases only
                shown = {k: v for k, v in body.items() if k not in ("lsid", "$clusterTime")}
                return {"ok": 0, "code": 13, "codeName": "Unauthorized",
                        "errmsg": "not authorized on admin to execute command "
                                  + _shell(shown)}
        elif db_name in NO_STREAM_DBS:
            return _error(73, "InvalidNamespace",
                          f"$changeStream may not be opened on the internal {db_name} database")
        if isinstance(target, str) and target:
            coll = target
        elif target == 1 and not isinstance(target, bool):
            coll = None
        else:
            return _error(73, "InvalidNamespace", f"invalid aggregate target {target!r}")
        full_doc = opts.get("fullDocument", "default")
        if full_doc not in ("default", "updateLookup", "whenAvailable", "required"):
            return _error(9, "FailedToParse", f"unknown fullDocument {full_doc!r}")
        before = opts.get("fullDocumentBeforeChange", "off")
        if before not in ("off", "whenAvailable", "required"):
            return _error(9, "FailedToParse", f"unknown fullDocumentBeforeChange {before!r}")
        tokens = [opts.get(k) for k in ("resumeAfter", "startAfter", "startAtOperationTime")]
        if sum(t is not None for t in tokens) > 1:
            return _error(40674, "Location40674",
                          "only one of resumeAfter, startAfter and startAtOperationTime")
        matches = []
        for stage in pipeline[1:]:
            if not isinstance(stage, dict) or list(stage) != ["$match"]:
                name = next(iter(stage), "?") if isinstance(stage, dict) else stage
                return _error(115, "CommandNotSupported",
                              f"change-stream stage {name} is not supported here "
                              "(only $match)")
            err = validate_match(stage["$match"])
            if err:
                return _error(115, "CommandNotSupported", err)
            matches.append(stage["$match"])

        if cluster:
            resolved = self._cluster_start(tokens)
            if isinstance(resolved, dict):
                return resolved
            epoch, watermark = resolved
            return self._register(Stream(None, "admin", None, matches, full_doc, before,
                                         epoch, watermark, owner, cluster=True))

        with self.handler._lock_for(db_name):
            conn = self._conn(db_name)
            self.ensure_log(conn)
            epoch, pruned = self.meta(conn)
            head = self.head_seq(conn)
            resume, start_after, at_time = tokens
            token = resume if resume is not None else start_after
            if token is not None:
                parsed = parse_token(token)
                if parsed is None and parse_cluster_token(token) is not None:
                    # a cluster token names a global position: resume this
                    # database after its last row at or before it
                    c_epoch, gseq = parse_cluster_token(token)
                    pruned_g = int(dict(conn.execute(
                        f"SELECT k, v FROM {META_TABLE}").fetchall()).get("pruned_gseq") or 0)
                    if c_epoch != self.cluster_epoch or gseq > self.last:
                        return _error(286, "ChangeStreamHistoryLost",
                                      "resume token belongs to another change log "
                                      "(data dir replaced)")
                    if gseq < pruned_g:
                        return _error(286, "ChangeStreamHistoryLost",
                                      "resume point is older than the retained change history")
                    row = conn.execute(f"SELECT MAX(seq) FROM {LOG_TABLE} WHERE gseq <= ?",
                                       (gseq,)).fetchone()
                    parsed = (epoch, max(pruned, row[0] or 0))
                if parsed is None:
                    return _error(260, "InvalidResumeToken",
                                  f"resume token {token!r} was not issued by this store")
                tok_epoch, seq = parsed
                if tok_epoch != epoch or seq > head:
                    return _error(286, "ChangeStreamHistoryLost",
                                  "resume token belongs to another change log "
                                  "(database dropped, data dir replaced or other database)")
                if seq < pruned:
                    return _error(286, "ChangeStreamHistoryLost",
                                  "resume point is older than the retained change history")
                watermark = seq
            elif at_time is not None:
                if not isinstance(at_time, Timestamp):
                    return _error(9, "FailedToParse", "startAtOperationTime must be a Timestamp")
                row = conn.execute(
                    f"SELECT MIN(seq) FROM {LOG_TABLE} WHERE ts / 1000 > ? "
                    "OR (ts / 1000 = ? AND (seq & 4294967295) >= ?)",
                    (at_time.time, at_time.time, at_time.inc),
                ).fetchone()
                watermark = (row[0] - 1) if row and row[0] is not None else head
            else:
                watermark = head

        return self._register(Stream(None, db_name, coll, matches, full_doc, before, epoch,
                                     watermark, owner))

    def _register(self, st: Stream) -> dict:
        self._reap_idle()
        st.id = random.getrandbits(61) | (1 << 61)
        with self.streams_lock:
            self.streams[st.id] = st
        return {
            "ok": 1,
            "cursor": {
                "id": Int64(st.id),
                "ns": st.ns,
                "firstBatch": [],
                "postBatchResumeToken": st.token(st.watermark),
            },
        }

    def _cluster_start(self, tokens):
        """(epoch, starting gseq) of a new cluster stream, or an error reply."""
        resume, start_after, at_time = tokens
        token = resume if resume is not None else start_after
        with self.gseq_lock:
            epoch, last = self.cluster_epoch, self.last
        if token is not None:
            parsed = parse_cluster_token(token)
            if parsed is None:
                if parse_token(token) is not None:
                    return _error(286, "ChangeStreamHistoryLost",
                                  "resume token is from a database or collection stream; "
                                  "it cannot resume a cluster-level stream here")
                return _error(260, "InvalidResumeToken",
                              f"resume token {token!r} was not issued by this store")
            tok_epoch, watermark = parsed
            if tok_epoch != epoch or watermark > last:
                return _error(286, "ChangeStreamHistoryLost",
                              "resume token belongs to another change log "
                              "(data dir replaced)")
        elif at_time is not None:
            if not isinstance(at_time, Timestamp):
                return _error(9, "FailedToParse", "startAtOperationTime must be a Timestamp")
            # clusterTime is gseq re-encoded, so the mapping is exact
            watermark = at_time.time * GSEQ_PER_SEC + min(at_time.inc, GSEQ_PER_SEC - 1) - 1
        else:
            return epoch, last
        if watermark + 1 < self.boot:
            self.load_all()
        with self.gseq_lock:
            lost = self.lost
        if watermark < lost:
            return _error(286, "ChangeStreamHistoryLost",
                          "resume point is older than the retained change history")
        return epoch, watermark

    def get_stream(self, cid):
        with self.streams_lock:
            return self.streams.get(cid)

    def close_stream(self, cid) -> bool:
        with self.streams_lock:
            st = self.streams.pop(cid, None)
        if st is None:
            return False
        st.closed = True
        self.notify()
        return True

    def close_owner(self, owner) -> None:
        with self.streams_lock:
            ids = [cid for cid, s in self.streams.items() if s.owner == owner]
        for cid in ids:
            self.close_stream(cid)

    def busy(self, db_name: str) -> bool:
        # cluster streams pin no connection: with 1,000 databases they would
        # keep every file open past nx-27017's cap of 100
        with self.streams_lock:
            return any(s.db == db_name and not s.cluster for s in self.streams.values())

    def _reap_idle(self) -> None:
        limit = time.monotonic() - IDLE_STREAM_SECONDS
        with self.streams_lock:
            ids = [cid for cid, s in self.streams.items()
                   if s.last_used < limit and not s.lock.locked()]
        for cid in ids:
            self.close_stream(cid)

    def get_more(self, st: Stream, body: dict) -> dict:
        max_ms = body.get("maxTimeMS")
        try:
            wait_s = DEFAULT_AWAIT_MS / 1000.0 if max_ms is None else max(0, int(max_ms)) / 1000.0
        except (TypeError, ValueError):
            wait_s = DEFAULT_AWAIT_MS / 1000.0
        try:
            limit = int(body.get("batchSize") or DEFAULT_GETMORE_BATCH)
        except (TypeError, ValueError):
            limit = DEFAULT_GETMORE_BATCH
        limit = limit if limit > 0 else DEFAULT_GETMORE_BATCH
        deadline = time.monotonic() + wait_s
        first = True
        with st.lock:
            while True:
                with self.cond:
                    gen = self.gen
                if st.cluster:
                    events = self._pull_cluster(st, limit)
                else:
                    # a wake-up for another database's write costs no query; the
                    # first pull of every getMore still looks (other processes)
                    db_gen = self.db_gen.get(st.db, 0)
                    if first or st.pending or st.closed or db_gen != st.seen_gen:
                        st.seen_gen = db_gen
                        events = self._pull(st, limit)
                    else:
                        events = []
                first = False
                if events or st.closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with self.cond:
                    if self.gen == gen:
                        self.cond.wait(remaining)
            st.last_used = time.monotonic()
            if st.closed:
                with self.streams_lock:
                    self.streams.pop(st.id, None)
            return {
                "ok": 1,
                "cursor": {
                    "id": Int64(0 if st.closed else st.id),
                    "ns": st.ns,
                    "nextBatch": events,
                    "postBatchResumeToken": st.token(st.watermark),
                },
            }

    def _pull(self, st: Stream, limit: int) -> list[dict]:
        if st.closed:
            return []
        if st.pending:
            events, st.pending = st.pending, []
            st.closed = True
            return events
        events: list[dict] = []
        budget = BATCH_BYTES_BUDGET
        chunk = min(max(limit, 256), 2000)
        started = time.monotonic()
        while True:
            with self.handler._lock_for(st.db):
                if st.pending or st.closed:
                    break
                conn = self._conn(st.db)
                sql = (
                    "SELECT seq, coll, op, ts,"
                    " CASE WHEN typeof(old_data) = 'blob' THEN json(old_data) ELSE old_data END,"
                    " CASE WHEN typeof(new_data) = 'blob' THEN json(new_data) ELSE new_data END"
                    f" FROM {LOG_TABLE} WHERE seq > ?"
                )
                params: tuple = (st.watermark,)
                if st.coll is not None:
                    sql += " AND coll = ?"
                    params += (st.coll,)
                rows = conn.execute(sql + " ORDER BY seq LIMIT ?", params + (chunk,)).fetchall()
            for row in rows:
                seq, coll, op, ts, old, new = row
                produced = self._events_for(st, st.db, seq, coll, op, ts, old, new)
                st.watermark = seq
                for ev in produced:
                    ev = to_bson(ev)
                    if ev["operationType"] == "invalidate" or all(
                            match_event(ev, m) for m in st.matches):
                        events.append(ev)
                budget -= len(old or "") + len(new or "")
                if st.closed or len(events) >= limit or budget <= 0:
                    return events
            if events or len(rows) < chunk or time.monotonic() - started > 0.2:
                return events

    def _pull_cluster(self, st: Stream, limit: int) -> list[dict]:
        """Merge the logs of the databases written since the watermark, in gseq order.

        Only databases whose highest gseq is above the watermark are queried,
        so a wake-up after a write to one database costs one query however
        many databases exist.
        """
        if st.closed:
            return []
        events: list[dict] = []
        budget = BATCH_BYTES_BUDGET
        chunk = min(max(limit, 256), 2000)
        started = time.monotonic()
        while True:
            with self.gseq_lock:
                horizon = self.last
                dbs = sorted(d for d, g in self.db_last.items() if g > st.watermark)
            if horizon <= st.watermark:
                return events
            rows: list[tuple] = []
            bound = horizon
            for db in dbs:
                got = self._cluster_rows(db, st.watermark, horizon, chunk)
                if len(got) >= chunk:
                    # this database may hold more rows below the others' next ones
                    bound = min(bound, got[-1][0])
                rows.extend(got)
            rows.sort(key=lambda r: r[0])
            for row in rows:
                gseq, db, coll, op, ts, old, new = row
                if gseq > bound:
                    break
                if op == "XdropDatabase":
                    produced = [{"_id": st.token(gseq), "operationType": "dropDatabase",
                                 "clusterTime": _gseq_time(gseq), "wallTime": _wall(int(ts)),
                                 "ns": {"db": coll}}]
                elif op.startswith("X"):  # a dropped database's row, kept in admin
                    db, _, coll = coll.partition(".")
                    produced = self._events_for(st, db, gseq, coll, op[1:], ts, old, new)
                else:
                    produced = self._events_for(st, db, gseq, coll, op, ts, old, new)
                st.watermark = gseq
                for ev in produced:
                    ev = to_bson(ev)
                    if all(match_event(ev, m) for m in st.matches):
                        events.append(ev)
                budget -= len(old or "") + len(new or "")
                if len(events) >= limit or budget <= 0:
                    return events
            st.watermark = max(st.watermark, bound)
            if events or bound >= horizon or time.monotonic() - started > 0.2:
                return events

    def _cluster_rows(self, db: str, after: int, upto: int, chunk: int) -> list[tuple]:
        with self.handler._lock_for(db):
            conn = self._existing_conn(db)
            if conn is None:
                return []
            sql = (
                "SELECT gseq, ?, coll, op, ts,"
                " CASE WHEN typeof(old_data) = 'blob' THEN json(old_data) ELSE old_data END,"
                " CASE WHEN typeof(new_data) = 'blob' THEN json(new_data) ELSE new_data END"
                f" FROM {LOG_TABLE} WHERE gseq > ? AND gseq <= ?"
            )
            if db == "admin":  # only the records of dropped databases
                sql += " AND op GLOB 'X*'"
            return conn.execute(sql + " ORDER BY gseq LIMIT ?",
                                (db, after, upto, chunk)).fetchall()

    def _lookup(self, st: Stream, db: str, coll: str, doc_id):
        try:
            with self.handler._lock_for(db):
                conn = self._existing_conn(db)
                if conn is None:
                    return None
                row = conn.execute(
                    f"SELECT CASE WHEN typeof(data) = 'blob' THEN json(data) ELSE data END "
                    f"FROM {_qident(coll)} WHERE _id = ?",
                    (str(doc_id),),
                ).fetchone()
        except Exception:
            return None
        if not row:
            return None
        doc = _loads(row[0])
        if doc is None or not _same(doc.get("_id"), doc_id):
            return None
        return doc

    def _events_for(self, st: Stream, db, seq, coll, op, ts, old, new) -> list[dict]:
        head = {
            "_id": st.token(seq),
            "operationType": None,
            "clusterTime": st.cluster_time(seq, ts),
            "wallTime": _wall(int(ts)),
        }
        ns = {"db": db, "coll": coll}
        if op == "drop":
            ev = dict(head, operationType="drop", ns=ns)
            if st.coll is None:
                return [ev]
            st.closed = True
            inval = {"_id": st.token(seq, True), "operationType": "invalidate",
                     "clusterTime": head["clusterTime"], "wallTime": head["wallTime"]}
            return [ev, inval]
        old_doc = _loads(old)
        new_doc = _loads(new)
        if op == "i":
            if new_doc is None:
                return []
            return [dict(head, operationType="insert", fullDocument=new_doc, ns=ns,
                         documentKey={"_id": new_doc.get("_id")})]
        if op == "d":
            if old_doc is None:
                return []
            ev = dict(head, operationType="delete", ns=ns,
                      documentKey={"_id": old_doc.get("_id")})
            if st.before != "off":
                ev["fullDocumentBeforeChange"] = old_doc
            return [ev]
        if op in ("u", "r"):
            if new_doc is None:
                return []
            if old_doc is not None and _same(old_doc, new_doc):
                return []  # no-op write: MongoDB logs nothing
            key = {"_id": new_doc.get("_id")}
            if op == "r":
                ev = dict(head, operationType="replace", fullDocument=new_doc, ns=ns,
                          documentKey=key)
            else:
                old_doc = old_doc or {}
                updated = {k: v for k, v in new_doc.items()
                           if k not in old_doc or not _same(old_doc[k], v)}
                removed = [k for k in old_doc if k not in new_doc]
                ev = dict(head, operationType="update", ns=ns, documentKey=key,
                          updateDescription={"updatedFields": updated,
                                             "removedFields": removed,
                                             "truncatedArrays": []})
                if st.full_doc == "updateLookup":
                    ev["fullDocument"] = self._lookup(st, db, coll, key["_id"])
                elif st.full_doc in ("whenAvailable", "required"):
                    ev["fullDocument"] = new_doc
            if st.before != "off":
                ev["fullDocumentBeforeChange"] = old_doc
            return [ev]
        return []


def _wall(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, timezone.utc).replace(
        microsecond=(ms % 1000) * 1000)


# --------------------------------------------------------------------------
# Installing the patches
# --------------------------------------------------------------------------

def _filter_eq_id(filt):
    """The _id an upsert must use: the filter's top-level _id equality, if any."""
    if not isinstance(filt, dict) or "_id" not in filt:
        return _MISSING
    value = filt["_id"]
    if isinstance(value, dict) and any(k.startswith("$") for k in value):
        return value["$eq"] if set(value) == {"$eq"} else _MISSING
    return value


def _body_of(msg):
    for kind, doc in msg.get("sections", ()):
        if kind == "body" and isinstance(doc, dict):
            return doc
    return None


def _written_dbs(msg, body: dict, name: str, db_name: str) -> list[str]:
    """The databases a command may write: its own, plus the targets of a
    client bulkWrite (run on admin) and of $out/$merge into another database."""
    dbs = [db_name]
    if name == "bulkWrite":
        infos = list(body.get("nsInfo") or [])
        for kind, doc in msg.get("sections", ()):
            if kind == "payload" and isinstance(doc, dict):
                infos.extend(doc.get("nsInfo") or [])
        for info in infos:
            if isinstance(info, dict) and isinstance(info.get("ns"), str):
                dbs.append(info["ns"].partition(".")[0])
    elif name == "aggregate":
        for stage in body.get("pipeline") or []:
            if not isinstance(stage, dict):
                continue
            target = stage.get("$out", stage.get("$merge"))
            if isinstance(target, dict):
                target = target.get("into", target)
            if isinstance(target, dict) and isinstance(target.get("db"), str):
                dbs.append(target["db"])
    return list(dict.fromkeys(dbs))


def _writes(name: str, body: dict) -> bool:
    if name == "aggregate":
        return any(isinstance(s, dict) and ("$out" in s or "$merge" in s)
                   for s in body.get("pipeline") or [])
    return name not in READ_ONLY_COMMANDS


def install_patches(hub: ChangeHub) -> None:
    H = nx_handler.NeoSQLiteHandler

    # (1)/(2) replies; binary subtypes on the way in
    nx_wire._convert_objectids = convert_reply
    nx_utils.convert_bson_to_neo_objectids = to_neo

    # (7) booleans/dates in update operators
    orig_can_sql = SqlUpdatesMixin._can_use_sql_updates

    def _can_use_sql_updates(self, update_spec, doc_id, original_doc=None):
        if _has_non_json_scalar(update_spec):
            return False
        return orig_can_sql(self, update_spec, doc_id, original_doc)

    SqlUpdatesMixin._can_use_sql_updates = _can_use_sql_updates

    # (6) triggers for every collection, from creation / from open
    orig_create = Collection.create

    def create(self, **kwargs):
        result = orig_create(self, **kwargs)
        try:
            hub.install_triggers(self.db, self.name)
        except Exception:
            log.exception("installing change-log triggers on %r failed", self.name)
        return result

    Collection.create = create

    orig_rename = Collection.rename

    def rename(self, new_name):
        old_name = self.name
        result = orig_rename(self, new_name)
        if new_name != old_name:
            hub.drop_triggers(self.db, old_name)
            hub.install_triggers(self.db, new_name)
        return result

    Collection.rename = rename

    orig_open = H._open_db_conn

    def _open_db_conn(self, db_name):
        conn = orig_open(self, db_name)
        hub.setup_connection(conn.db, db_name)
        return conn

    H._open_db_conn = _open_db_conn

    # upserts keep the filter's _id (stock: new _id for a replacement, and the
    # ObjectId turned into a hex *string* for an update)
    def keep_upsert_id(orig, replacement):
        def wrapper(self, filt, doc, *args, **kwargs):
            if kwargs.get("upsert") and isinstance(doc, dict):
                doc_id = _filter_eq_id(filt)
                if doc_id is not _MISSING:
                    if replacement:
                        if "_id" not in doc:
                            doc = {"_id": doc_id, **doc}
                    elif isinstance(doc_id, (NeoObjectId, BsonObjectId)) and not any(
                            isinstance(v, dict) and "_id" in v for v in doc.values()):
                        doc = dict(doc)
                        doc["$setOnInsert"] = {**(doc.get("$setOnInsert") or {}),
                                               "_id": doc_id}
            return orig(self, filt, doc, *args, **kwargs)
        return wrapper

    for meth in ("update_one", "update_many"):
        setattr(Collection, meth, keep_upsert_id(getattr(Collection, meth), False))

    orig_fau = Collection.find_one_and_update

    def find_one_and_update(self, filt, update, *args, **kwargs):
        # stock upserts here by inserting the bare filter document and then
        # updating it: two change events and a string _id; do a real upsert
        if kwargs.get("upsert") and self.find_one(filt) is None:
            res = self.update_one(filt, update, upsert=True,
                                  array_filters=kwargs.get("array_filters"),
                                  session=kwargs.get("session"))
            if kwargs.get("return_document") and res.upserted_id is not None:
                return self.find_one({"_id": res.upserted_id}, kwargs.get("projection"))
            return None
        return orig_fau(self, filt, update, *args, **kwargs)

    Collection.find_one_and_update = find_one_and_update
    for meth in ("replace_one", "find_one_and_replace"):
        setattr(Collection, meth, keep_upsert_id(getattr(Collection, meth), True))

    # (3) replaces are tagged in the log
    def tag_replace(orig):
        def wrapper(self, *args, **kwargs):
            try:
                before = hub.max_seq(self.db)
            except Exception:  # no log table on this connection yet
                hub.ensure_log(self.db)
                before = 0
            try:
                return orig(self, *args, **kwargs)
            finally:
                hub.mark_replace(self.db, self.name, before)
        return wrapper

    Collection.replace_one = tag_replace(Collection.replace_one)
    Collection.find_one_and_replace = tag_replace(Collection.find_one_and_replace)

    # stream bookkeeping hooks
    orig_busy = H._conn_is_busy
    H._conn_is_busy = lambda self, db_name: orig_busy(self, db_name) or hub.busy(db_name)
    orig_close_conn = H.close_streams_for_connection

    def close_streams_for_connection(self, conn_id):
        orig_close_conn(self, conn_id)
        if conn_id is not None:
            hub.close_owner(conn_id)

    H.close_streams_for_connection = close_streams_for_connection

    # inserts: notify waiting streams
    orig_insert = H.handle_insert

    def handle_insert(self, msg):
        body = _body_of(msg) or {}
        db_name = body.get("$db", "test")  # read first: handle_insert pops "$db"
        with self._lock_for(db_name):
            hub.stamp(db_name)
            result = orig_insert(self, msg)
        hub.after_write(db_name)
        return result

    H.handle_insert = handle_insert

    # commands: our change streams, getMore, killCursors, drops, writes
    orig_command = H.handle_command

    def handle_command(self, msg):
        body = _body_of(msg)
        if not body:
            return orig_command(self, msg)
        request_id = msg["request_id"]
        name = next(iter(body))
        db_name = body.get("$db", "test")

        if name == "aggregate":
            pipeline = body.get("pipeline") or []
            if any(isinstance(s, dict) and "$changeStream" in s for s in pipeline):
                try:
                    return request_id, hub.open_stream(body, db_name, msg.get("_conn_id"))
                except Exception as exc:
                    log.exception("opening change stream failed")
                    return request_id, _error(1, "InternalError", str(exc))
            return orig_command(self, msg)

        if name == "getMore":
            try:
                cid = int(body.get("getMore"))
            except (TypeError, ValueError):
                return request_id, _error(14, "TypeMismatch", "getMore needs a cursor id")
            st = hub.get_stream(cid)
            if st is not None:
                return request_id, hub.get_more(st, body)
            with self._cursors_lock:
                known = cid in self._cursors
            if not known:
                return request_id, _error(43, "CursorNotFound", f"cursor id {cid} not found")
            return orig_command(self, msg)

        if name == "killCursors":
            killed, not_found = [], []
            for raw in body.get("cursors") or []:
                try:
                    cid = int(raw)
                except (TypeError, ValueError):
                    continue
                if hub.close_stream(cid) or self._kill_data_cursors([cid]):
                    killed.append(cid)
                else:
                    not_found.append(cid)
            return request_id, {"ok": 1, "cursorsKilled": killed,
                                "cursorsNotFound": not_found, "cursorsAlive": [],
                                "cursorsUnknown": []}

        if name == "drop":
            coll = body.get("drop")
            with self._lock_for(db_name):
                hub.stamp(db_name)
                conn = hub._conn(db_name)
                existed = isinstance(coll, str) and conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (coll,)
                ).fetchone() is not None and hub._is_collection_table(conn, coll)
                result = orig_command(self, msg)
                if existed and result[1].get("ok") == 1:
                    hub.log_drop(conn, coll)
            hub.after_write(db_name)
            return result

        if name in ("dropDatabase", "dropdatabase"):
            target = body.get(name)
            dropping = db_name if target in (1, True, None, "") else str(target)
            with self._lock_for(db_name):
                colls = hub.collections_of(dropping)
                if colls is not None:
                    hub.stamp(dropping)
                unread = hub.unread_rows(dropping) if colls is not None else []
                result = orig_command(self, msg)
                if result[1].get("ok") == 1:
                    dropped = result[1].get("dropped", db_name)
                    hub.database_dropped(dropped)
                    if colls is not None:
                        hub.log_database_drop(dropped, colls, unread)
            hub.after_write("admin")
            return result

        if not (name in WRITE_COMMANDS or _writes(name, body)):
            return orig_command(self, msg)
        dbs = _written_dbs(msg, body, name, db_name)
        for other in dbs[1:]:
            hub.stamp(other)
        with self._lock_for(db_name):
            hub.stamp(db_name)
            result = orig_command(self, msg)
        hub.after_write(dbs)
        return result

    H.handle_command = handle_command


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="nx_launcher",
        description="nx-27017 with the fixes the nsbridge tests need (foreground only)",
    )
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="one <db>.db SQLite file per database ('memory' for in-memory)")
    p.add_argument("--db", dest="db_path", default=None,
                   help="accepted for compatibility: must be a directory (same as --data-dir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=27017, help="0 picks a free port")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--log-file", default=None)
    p.add_argument("-j", "--journal-mode", dest="journal_mode", default="WAL",
                   choices=["WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF"])
    p.add_argument("--fts5-tokenizer", dest="fts5_tokenizers", action="append", default=None)
    p.add_argument("--threaded", action="store_true",
                   help="accepted for compatibility: the launcher always uses threads")
    p.add_argument("-d", "--daemon", action="store_true", help="not supported")
    p.add_argument("--single-db-compat", action="store_true", help="not supported")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--changelog-retention", type=int, default=100_000,
                   help="change-log rows kept per database for resuming (default 100000)")
    p.add_argument("--refuse-cluster-streams", action="store_true",
                   help="answer cluster-level change streams (client.watch()) with "
                        "13 Unauthorized, as mongod does for a user who may read the "
                        "tenant databases only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.daemon or args.single_db_compat:
        print("nx_launcher: --daemon and --single-db-compat are not supported", file=sys.stderr)
        return 2
    data_dir = args.data_dir
    if data_dir is None and args.db_path is not None and os.path.isdir(args.db_path):
        data_dir = args.db_path
    if data_dir is None:
        print("nx_launcher: --data-dir DIR is required", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s [%(process)d] %(message)s",
    )
    if not args.verbose:  # neosqlite warns about every query it evaluates in Python
        logging.getLogger("neosqlite").setLevel(logging.ERROR)
    if args.log_file:
        logging.getLogger().addHandler(logging.FileHandler(args.log_file))

    from neosqlite.options import JournalMode
    from nx_27017.server import handle_client_threaded

    tokenizers = None
    if args.fts5_tokenizers:
        tokenizers = [tuple(t.split("=", 1)) for t in args.fts5_tokenizers]

    hub = ChangeHub(args.changelog_retention, args.refuse_cluster_streams)
    install_patches(hub)
    handler = nx_handler.NeoSQLiteHandler(
        ":memory:",
        tokenizers=tokenizers,
        journal_mode=JournalMode.validate(args.journal_mode),
        data_dir=data_dir,
    )
    hub.handler = handler

    srv = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                        socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.host, args.port))
    srv.listen(128)
    port = srv.getsockname()[1]

    if args.pid_file:
        with open(args.pid_file, "w") as fh:
            fh.write(str(os.getpid()))

    def _exit(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)

    print(f"nx_launcher: ready on {args.host}:{port} (pid {os.getpid()})", flush=True)
    try:
        while True:
            try:
                client, _addr = srv.accept()
            except OSError:
                time.sleep(0.01)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle_client_threaded, args=(client, handler),
                             daemon=True).start()
    finally:
        srv.close()
        if args.pid_file:
            try:
                os.remove(args.pid_file)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
