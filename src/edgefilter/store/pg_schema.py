"""The PostgreSQL schema: MIGRATIONS by version (a ``schema_version`` table), with the numbers of
sqlite_schema's, and the advisory lock keys the store takes."""

from __future__ import annotations

from edgefilter.store.sqlite_schema import APPEALS_SCHEMA

SCHEMA_VERSION = 8
CHANGES_CHANNEL = "edgefilter_changes"
# pg_advisory_xact_lock keys (bigint): "edgefi" + a small number, unlikely to meet anyone else's.
LOCK_MIGRATE = 0x65646765666901
LOCK_CHANGES = 0x65646765666902
LOCK_CALLS = 0x65646765666903
LOCK_REFUSALS = 0x65646765666904

# One entry per schema version, applied in order, each in its own transaction together with its
# row in schema_version. Keep the version numbers in step with store.MIGRATIONS (SQLite): a
# feature's tables land on both backends under the same number.
MIGRATIONS: dict[int, str] = {
    1: """
    -- COLLATE "C": byte order as in SQLite, whatever the server's locale ('+', '*' and '#' are
    -- not ignored), so listings and the keyset scans of iter_entries agree on both backends.
    CREATE TABLE entries (
        list       TEXT COLLATE "C" NOT NULL CHECK (list IN ('block', 'allow')),
        pattern    TEXT COLLATE "C" NOT NULL,
        kind       TEXT NOT NULL CHECK (kind IN ('exact', 'prefix', 'mask')),
        key        TEXT COLLATE "C" NOT NULL,
        category   TEXT NOT NULL DEFAULT '',
        note       TEXT NOT NULL DEFAULT '',
        source     TEXT NOT NULL DEFAULT 'cli',
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        PRIMARY KEY (list, pattern)
    );
    CREATE INDEX entries_source ON entries (source);
    CREATE INDEX entries_key ON entries (key);
    CREATE INDEX entries_expires ON entries (expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE changes (
        rev     BIGSERIAL PRIMARY KEY,
        list    TEXT NOT NULL,
        pattern TEXT NOT NULL,
        op      TEXT NOT NULL CHECK (op IN ('put', 'del'))
    );
    CREATE FUNCTION edgefilter_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('edgefilter_changes', '');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER changes_notify AFTER INSERT ON changes
        FOR EACH STATEMENT EXECUTE FUNCTION edgefilter_notify_changes();

    CREATE TABLE calls (
        id          BIGSERIAL PRIMARY KEY,
        node        TEXT NOT NULL DEFAULT '',
        key         TEXT NOT NULL UNIQUE,
        ts          DOUBLE PRECISION NOT NULL,
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
        score       DOUBLE PRECISION NOT NULL DEFAULT 0,
        rules       TEXT NOT NULL DEFAULT '',
        policy      TEXT NOT NULL DEFAULT '',
        elapsed_ms  DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX calls_ts ON calls (ts);
    CREATE INDEX calls_caller ON calls (caller_e164, ts);
    CREATE INDEX calls_uniqueid ON calls (uniqueid);
    """,
    # 2 (SQLite 2): behaviour and evidence: call outcomes from AMI, the refusal ledger, known contacts.
    2: """
    ALTER TABLE calls ADD COLUMN linkedid TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN answered INTEGER;
    ALTER TABLE calls ADD COLUMN talk_seconds DOUBLE PRECISION;
    ALTER TABLE calls ADD COLUMN hangup_cause INTEGER;
    ALTER TABLE calls ADD COLUMN hangup_text TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN dial_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE calls ADD COLUMN ended_at DOUBLE PRECISION;
    CREATE INDEX calls_extension ON calls (extension, ts);
    -- outcomes are applied per node (two PBXs may hand out the same uniqueid)
    CREATE INDEX calls_node_uniqueid ON calls (uniqueid, node);
    CREATE TABLE refusals (
        id            BIGSERIAL PRIMARY KEY,
        caller_e164   TEXT NOT NULL,
        callee        TEXT NOT NULL,
        ts            DOUBLE PRECISION NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('refuse', 'block', 'report')),
        category      TEXT NOT NULL DEFAULT '',
        source        TEXT NOT NULL DEFAULT '',
        call_uniqueid TEXT NOT NULL DEFAULT '',
        pattern       TEXT NOT NULL DEFAULT '',
        undone_at     DOUBLE PRECISION
    );
    CREATE INDEX refusals_caller ON refusals (caller_e164, ts);
    CREATE INDEX refusals_callee ON refusals (callee, ts);
    CREATE TABLE contacts (
        e164    TEXT PRIMARY KEY,
        last_ts DOUBLE PRECISION NOT NULL,
        how     TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX contacts_last ON contacts (last_ts);
    """,
    # 3 (SQLite 3, lists at scale): exact numbers get an int64 key (num, lists.exact_num) and a
    # shared metadata profile, so a node loads millions of numbers as two arrays. Merged after
    # 4-6: a database already past v3 gets it on its next migrate (its schema_version row is
    # missing, see migrate). Row triggers keep num right and drop a profile whose metadata
    # changed for writers that do not set them; assign_profiles (set-based) gives new rows theirs.
    3: """
    ALTER TABLE entries ADD COLUMN num BIGINT;
    ALTER TABLE entries ADD COLUMN profile BIGINT;
    CREATE TABLE profiles (
        id         BIGSERIAL PRIMARY KEY,
        sig        TEXT COLLATE "C" NOT NULL UNIQUE,
        list       TEXT NOT NULL,
        category   TEXT NOT NULL,
        note       TEXT NOT NULL,
        source     TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION
    );
    CREATE FUNCTION edgefilter_entry_num() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.pattern = '+' || NEW.key AND NEW.key ~ '^[0-9]{1,18}$' THEN
            NEW.num := ('1' || NEW.key)::bigint;
        END IF;
        RETURN NEW;
    END
    $$;
    CREATE FUNCTION edgefilter_entry_profile_stale() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.profile := NULL;
        RETURN NEW;
    END
    $$;
    CREATE TRIGGER entries_num BEFORE INSERT ON entries
        FOR EACH ROW WHEN (NEW.num IS NULL AND NEW.kind = 'exact') EXECUTE FUNCTION edgefilter_entry_num();
    CREATE TRIGGER entries_profile_stale BEFORE UPDATE ON entries
        FOR EACH ROW WHEN (NEW.profile IS NOT NULL AND NEW.profile IS NOT DISTINCT FROM OLD.profile
            AND (NEW.category, NEW.note, NEW.source, NEW.created_at, NEW.expires_at)
                IS DISTINCT FROM (OLD.category, OLD.note, OLD.source, OLD.created_at, OLD.expires_at))
        EXECUTE FUNCTION edgefilter_entry_profile_stale();
    UPDATE entries SET num = ('1' || key)::bigint
        WHERE kind = 'exact' AND pattern = '+' || key AND key ~ '^[0-9]{1,18}$';
    CREATE INDEX entries_num ON entries (list, num) INCLUDE (profile) WHERE num IS NOT NULL;
    CREATE INDEX entries_loose ON entries (list, pattern) WHERE num IS NULL;
    CREATE INDEX entries_unprofiled ON entries (list, pattern) WHERE num IS NOT NULL AND profile IS NULL;
    """,
    # 4 (SQLite 4): the reputation cache (answers of online reputation sources, per number and source).
    4: """
    CREATE TABLE reputation (
        number     TEXT NOT NULL,
        source     TEXT NOT NULL,
        score      DOUBLE PRECISION,
        category   TEXT,
        status     TEXT NOT NULL CHECK (status IN ('listed', 'unlisted')),
        fetched_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (source, number)
    );
    CREATE INDEX reputation_number ON reputation (number);
    CREATE INDEX reputation_expires ON reputation (expires_at);
    """,
    # 5 (SQLite 5): outcomes of the press-a-digit challenge; node + key as SQLite gains in 6.
    5: """
    CREATE TABLE challenge_outcomes (
        id          BIGSERIAL PRIMARY KEY,
        ts          DOUBLE PRECISION NOT NULL,
        uniqueid    TEXT NOT NULL DEFAULT '',
        caller_e164 TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('pass', 'fail', 'hangup')),
        node        TEXT NOT NULL DEFAULT '',
        key         TEXT NOT NULL UNIQUE
    );
    CREATE INDEX challenge_outcomes_caller ON challenge_outcomes (caller_e164, ts);
    CREATE INDEX challenge_outcomes_ts ON challenge_outcomes (ts);
    """,
    # 6 (SQLite 6: node + key on calls and challenge outcomes): PostgreSQL has had them since 1 and 5.
    6: "SELECT 1",
    # 7 (as SQLite's): the key index keeps only rows without a compact key (exact numbers are
    # found by their pattern), masks get an index of their own: candidates() reads only indexes
    # and a bulk import maintains one index less. (SQLite also drops a per-row trigger;
    # PostgreSQL keeps its BEFORE INSERT trigger, skipped by its WHEN clause without PL/pgSQL.)
    7: """
    DROP INDEX IF EXISTS entries_key;
    CREATE INDEX entries_key ON entries (key) WHERE num IS NULL;
    CREATE INDEX IF NOT EXISTS entries_masks ON entries (length(key)) WHERE kind = 'mask';
    """,
    # 8 (as SQLite's, issue 17): entries never appealable, and the appeals themselves.
    8: APPEALS_SCHEMA.replace("{ID}", "BIGSERIAL PRIMARY KEY"),
}

#: Migrations merged after higher numbers had shipped (same numbers as store.LATE_MIGRATIONS).
LATE_MIGRATIONS = frozenset({3})
