"""The SQLite schema: MIGRATIONS by version (PRAGMA user_version), applied by SqliteBase.migrate.

APPEALS_SCHEMA (migration 8) is shared with PostgreSQL (pg_schema), whose migrations carry the
same numbers: a feature's tables land on both backends under one version.
"""

from __future__ import annotations

SCHEMA_VERSION = 8


def _num_sql(row: str = "") -> str:
    """SQL for the compact int64 key of a canonical exact number (lists.exact_num), else NULL."""
    r = row
    return (
        f"CASE WHEN {r}kind = 'exact' AND {r}pattern = '+' || {r}key AND length({r}key) BETWEEN 1 AND 18 "
        f"AND {r}key NOT GLOB '*[^0-9]*' THEN CAST('1' || {r}key AS INTEGER) END"
    )


#: Every entry of an import shares its metadata; the service loads (num, profile) pairs only.
PROFILE_SIG = "json_array(list, category, note, source, created_at, expires_at)"
ASSIGN_PROFILES = f"""
    INSERT OR IGNORE INTO profiles (sig, list, category, note, source, created_at, expires_at)
        SELECT {PROFILE_SIG}, list, category, note, source, created_at, expires_at
        FROM entries INDEXED BY entries_unprofiled WHERE num IS NOT NULL AND profile IS NULL;
    UPDATE entries INDEXED BY entries_unprofiled SET profile = (SELECT p.id FROM profiles p WHERE p.sig = json_array(
            entries.list, entries.category, entries.note, entries.source, entries.created_at, entries.expires_at))
        WHERE num IS NOT NULL AND profile IS NULL;
"""
#: Migration 8 on both backends ({ID}: the id column's type). ``code`` is the reference the caller
#: hears and admins type; ``key`` the service's appeal id (a retried write is stored once).
APPEALS_SCHEMA = """
    ALTER TABLE entries ADD COLUMN no_appeal INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS entries_no_appeal ON entries (list, pattern) WHERE no_appeal != 0;
    CREATE TABLE IF NOT EXISTS appeals (
        id              {ID},
        code            TEXT NOT NULL UNIQUE,
        key             TEXT NOT NULL UNIQUE,
        ts              DOUBLE PRECISION NOT NULL,
        caller_e164     TEXT NOT NULL,
        uniqueid        TEXT NOT NULL DEFAULT '',
        called          TEXT NOT NULL DEFAULT '',
        node            TEXT NOT NULL DEFAULT '',
        rules           TEXT NOT NULL DEFAULT '',
        score           DOUBLE PRECISION NOT NULL DEFAULT 0,
        policy          TEXT NOT NULL DEFAULT '',
        entry_list      TEXT NOT NULL DEFAULT '',
        entry_pattern   TEXT NOT NULL DEFAULT '',
        entry_source    TEXT NOT NULL DEFAULT '',
        entry_category  TEXT NOT NULL DEFAULT '',
        recording       TEXT NOT NULL DEFAULT '',
        recording_bytes BIGINT,
        status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'granted', 'denied')),
        decided_at      DOUBLE PRECISION,
        note            TEXT NOT NULL DEFAULT '',
        grant_pattern   TEXT NOT NULL DEFAULT '',
        grant_expires   DOUBLE PRECISION
    );
    CREATE INDEX IF NOT EXISTS appeals_caller ON appeals (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS appeals_status ON appeals (status, ts);
    CREATE INDEX IF NOT EXISTS appeals_ts ON appeals (ts);
"""
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS entries (
        list       TEXT NOT NULL CHECK (list IN ('block', 'allow')),
        pattern    TEXT NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('exact', 'prefix', 'mask')),
        key        TEXT NOT NULL,
        category   TEXT NOT NULL DEFAULT '',
        note       TEXT NOT NULL DEFAULT '',
        source     TEXT NOT NULL DEFAULT 'cli',
        created_at REAL NOT NULL,
        expires_at REAL,
        PRIMARY KEY (list, pattern)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS entries_source ON entries (source);
    CREATE INDEX IF NOT EXISTS entries_key ON entries (key);
    CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE IF NOT EXISTS changes (
        rev     INTEGER PRIMARY KEY AUTOINCREMENT,
        list    TEXT NOT NULL,
        pattern TEXT NOT NULL,
        op      TEXT NOT NULL CHECK (op IN ('put', 'del'))
    );
    CREATE TABLE IF NOT EXISTS calls (
        id          INTEGER PRIMARY KEY,
        ts          REAL NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller      TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT,
        caller_kind TEXT NOT NULL DEFAULT '',
        caller_name TEXT NOT NULL DEFAULT '',
        called      TEXT NOT NULL DEFAULT '',
        extension   TEXT NOT NULL DEFAULT '',
        context     TEXT NOT NULL DEFAULT '',
        action      TEXT NOT NULL,
        would       TEXT,
        score       REAL NOT NULL DEFAULT 0,
        rules       TEXT NOT NULL DEFAULT '',
        policy      TEXT NOT NULL DEFAULT '',
        elapsed_ms  REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts);
    CREATE INDEX IF NOT EXISTS calls_caller ON calls (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS calls_uniqueid ON calls (uniqueid);
    """,
    # 5: outcomes of the press-a-digit challenge (failures feed rule CHALLENGE_FAILED after a restart)
    5: """
    CREATE TABLE IF NOT EXISTS challenge_outcomes (
        id          INTEGER PRIMARY KEY,
        ts          REAL NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('pass', 'fail', 'hangup'))
    );
    CREATE INDEX IF NOT EXISTS challenge_outcomes_caller ON challenge_outcomes (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS challenge_outcomes_ts ON challenge_outcomes (ts);
    """,
    # 4: the reputation cache (answers of online reputation sources, per number and source)
    4: """
    CREATE TABLE IF NOT EXISTS reputation (
        number     TEXT NOT NULL,
        source     TEXT NOT NULL,
        score      REAL,
        category   TEXT,
        status     TEXT NOT NULL CHECK (status IN ('listed', 'unlisted')),
        fetched_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (source, number)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS reputation_number ON reputation (number);
    CREATE INDEX IF NOT EXISTS reputation_expires ON reputation (expires_at);
    """,
    # 2: behaviour and evidence: call outcomes from AMI, the refusal ledger, known contacts.
    2: """
    ALTER TABLE calls ADD COLUMN linkedid TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN answered INTEGER;
    ALTER TABLE calls ADD COLUMN talk_seconds REAL;
    ALTER TABLE calls ADD COLUMN hangup_cause INTEGER;
    ALTER TABLE calls ADD COLUMN hangup_text TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN dial_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN ended_at REAL;
    CREATE INDEX IF NOT EXISTS calls_extension ON calls (extension, ts);
    CREATE TABLE IF NOT EXISTS refusals (
        id            INTEGER PRIMARY KEY,
        caller_e164   TEXT NOT NULL,
        callee        TEXT NOT NULL,
        ts            REAL NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('refuse', 'block', 'report')),
        category      TEXT NOT NULL DEFAULT '',
        source        TEXT NOT NULL DEFAULT '',
        call_uniqueid TEXT NOT NULL DEFAULT '',
        pattern       TEXT NOT NULL DEFAULT '',
        undone_at     REAL
    );
    CREATE INDEX IF NOT EXISTS refusals_caller ON refusals (caller_e164, ts);
    CREATE INDEX IF NOT EXISTS refusals_callee ON refusals (callee, ts);
    CREATE TABLE IF NOT EXISTS contacts (
        e164       TEXT PRIMARY KEY,
        last_ts    REAL NOT NULL,
        how        TEXT NOT NULL DEFAULT ''
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS contacts_last ON contacts (last_ts);
    """,
    # 6: rows written per node carry the node and a key unique across nodes (PostgreSQL shares
    # the tables between PBXs; a retried write - spool drain, `db copy` re-run - is stored once).
    # Rows from before keep key '' (outside the unique index).
    6: """
    ALTER TABLE calls ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX IF NOT EXISTS calls_key ON calls (key) WHERE key != '';
    ALTER TABLE challenge_outcomes ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE challenge_outcomes ADD COLUMN key TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX IF NOT EXISTS challenge_outcomes_key ON challenge_outcomes (key) WHERE key != '';
    """,
    # 3 (issue 6, lists at scale; merged after 4-6, see LATE_MIGRATIONS): exact numbers get an
    # int64 key (num) and a shared metadata
    # profile so that the service loads 10 million entries as two arrays, not 10 million rows of
    # text. A trigger drops the profile of a row whose metadata a writer changes.
    3: f"""
    ALTER TABLE entries ADD COLUMN num INTEGER;
    ALTER TABLE entries ADD COLUMN profile INTEGER;
    CREATE TABLE IF NOT EXISTS profiles (
        id         INTEGER PRIMARY KEY,
        sig        TEXT NOT NULL UNIQUE,
        list       TEXT NOT NULL,
        category   TEXT NOT NULL,
        note       TEXT NOT NULL,
        source     TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL
    );
    UPDATE entries SET num = {_num_sql()};
    CREATE INDEX IF NOT EXISTS entries_num ON entries (list, num, profile) WHERE num IS NOT NULL;
    CREATE INDEX IF NOT EXISTS entries_loose ON entries (list, pattern) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_unprofiled ON entries (list, pattern) WHERE num IS NOT NULL AND profile IS NULL;
    -- (a trigger entries_num_insert filling num on INSERT was created here until migration 7
    -- dropped it; it is no longer created, so a late-applied 3 does not bring it back)
    CREATE TRIGGER IF NOT EXISTS entries_profile_stale AFTER UPDATE OF category, note, source, created_at, expires_at ON entries
        WHEN NEW.profile IS NOT NULL
        BEGIN UPDATE entries SET profile = NULL WHERE list = NEW.list AND pattern = NEW.pattern; END;
    {ASSIGN_PROFILES}
    """,
    # 7 (issue 6, imports at scale): the per-row AFTER INSERT trigger that filled num for writers
    # which do not set it cost a bulk import ~2 s per million rows even when it did nothing. Every
    # edgefilter writer sets num; a row written without it (a foreign writer) still loads, through
    # the generic path (entries_loose), just as a Python object instead of two array slots.
    # The key index held every exact number a second time (its key is its pattern without '+'):
    # it now holds only the rows the compact path does not (prefixes, masks, short numbers), and
    # masks get an index of their own, so candidates() reads only indexes, never the whole table.
    # The stale-profile trigger now fires only when a writer changed an entry's metadata and left
    # its profile as it was (a writer that knows profiles sets the right one in the same UPDATE:
    # a million updated entries no longer need a second pass to find their profiles).
    7: """
    DROP TRIGGER IF EXISTS entries_num_insert;
    DROP TRIGGER IF EXISTS entries_profile_stale;
    CREATE TRIGGER entries_profile_stale AFTER UPDATE OF category, note, source, created_at, expires_at ON entries
        WHEN NEW.profile IS NOT NULL AND NEW.profile IS OLD.profile
        BEGIN UPDATE entries SET profile = NULL WHERE list = NEW.list AND pattern = NEW.pattern; END;
    DROP INDEX IF EXISTS entries_key;
    CREATE INDEX IF NOT EXISTS entries_key ON entries (key) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_masks ON entries (length(key)) WHERE kind = 'mask';
    """,
    # 8 (issue 17, appeals): block entries an admin made never appealable (`block --no-appeal`),
    # and the appeals callers left from the call (appeals.py), with the decision they appealed.
    8: APPEALS_SCHEMA.replace("{ID}", "INTEGER PRIMARY KEY"),
}

#: Migrations merged after higher numbers had shipped (3: lists at scale, merged after 4-6). A
#: database migrated past such a number while it was still reserved gets it on its next open;
#: it is recognised by a column the migration adds: {version: (table, column)}.
LATE_MIGRATIONS: dict[int, tuple[str, str]] = {3: ("entries", "num")}
