"""Steps that bring an older store database up to ``schema.SCHEMA_VERSION``, one version at a time."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, Table, text

from .schema import ImageRow, TextRow


def _migrate_1_to_2(conn: Connection) -> None:
    # Version 1 indexed images only; version 2 adds the caption collection for image→text search.
    TextRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _migrate_2_to_3(conn: Connection) -> None:
    # Version 3 never reuses an id: a client holding the id of a deleted image must not get another
    # image under it. PostgreSQL sequences never go back; SQLite reuses the largest rowid after a delete
    # unless the table is declared AUTOINCREMENT, which only a new table can be, so the tables are copied.
    # Ids deleted before this step above the largest remaining one cannot be known any more.
    if conn.dialect.name != "sqlite":
        return
    tables: tuple[Table, ...] = (ImageRow.__table__, TextRow.__table__)  # type: ignore[assignment]
    for table in tables:
        old = f"{table.name}_v2"
        conn.execute(text(f'ALTER TABLE "{table.name}" RENAME TO "{old}"'))
        for index in table.indexes:
            conn.execute(text(f'DROP INDEX IF EXISTS "{index.name}"'))
        table.create(conn)
        columns = ", ".join(f'"{c.name}"' for c in table.columns)
        conn.execute(text(f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{old}"'))
        conn.execute(text(f'DROP TABLE "{old}"'))


#: MIGRATIONS[v] upgrades a database at schema version v to v + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}
